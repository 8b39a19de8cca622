#!/usr/bin/env bash
# Evaluate a student of scripts/distillation.sh on the five instruction sets (atkd.md §7): greedy, 256 new tokens,
# batch 16; ROUGE-L and the judge request files (score them with --judge module:function, see atkd/eval.py).
#   bash atkd/scripts/evaluation.sh CUDA KL TEACHER_SIZE STUDENT_SIZE PER_BSZ SETTING SAMPLE
# The seed README's seven arguments, in its order (`$cuda $kl $student_size $teacher_size $per_bsz $setting
# $sample`); the 3rd and 4th are distillation.sh's 5th and 6th, the teacher's and the student's size as that
# script uses them, and PER_BSZ is accepted and unused (the release's script read it and never used it either).
# (The release's script read alpaca_*_vs_pythia_* while training wrote alpaca_*_vs_OPT_*; ours reads what
# distillation.sh writes.)
set -euo pipefail
if [ $# -ne 7 ]; then
  echo "usage: bash atkd/scripts/evaluation.sh CUDA KL TEACHER_SIZE STUDENT_SIZE PER_BSZ SETTING SAMPLE (got $# arguments)" >&2
  exit 2
fi
cuda=$1 kl=$2 teacher_size=$3 student_size=$4 setting=$6 sample=$7
run=${DATAPATH:-./outputs}/alpaca_${teacher_size}_vs_OPT_${student_size}/alpaca_${sample}_${kl}_${setting}
CUDA_VISIBLE_DEVICES=$cuda python atkd/eval.py --model_path "$run/model" --output_dir "$run/eval" --bf16 True \
  ${JUDGE:+--judge "$JUDGE"}
