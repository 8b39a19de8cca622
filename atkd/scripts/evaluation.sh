#!/usr/bin/env bash
# Evaluate a student of scripts/distillation.sh on the five instruction sets (atkd.md §7): greedy, 256 new tokens,
# batch 16; ROUGE-L and the judge request files (score them with --judge module:function, see atkd/eval.py).
#   bash atkd/scripts/evaluation.sh CUDA KL TEACHER_SIZE STUDENT_SIZE SETTING SAMPLE
# (the release's script read alpaca_*_vs_pythia_* while training wrote alpaca_*_vs_OPT_*; ours reads what
# distillation.sh writes)
set -euo pipefail
cuda=${1:-0} kl=${2:-atkd} teacher_size=${3:?teacher size} student_size=${4:?student size} setting=${5:-vanilla}
sample=${6:-gt}
run=${DATAPATH:-./outputs}/alpaca_${teacher_size}_vs_OPT_${student_size}/alpaca_${sample}_${kl}_${setting}
CUDA_VISIBLE_DEVICES=$cuda python atkd/eval.py --model_path "$run/model" --output_dir "$run/eval" --bf16 True \
  ${JUDGE:+--judge "$JUDGE"}
