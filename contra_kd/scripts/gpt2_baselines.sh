#!/usr/bin/env bash
# GPT-2 1.5B -> 0.1B baselines (contra_kd.md §5): KD (kd_ratio 1.0, from the pretrained GPT-2 base, batch 16, OWT:
# CONTRA's / DistiLLM's kd_base.sh), DistiLLM (adaptive SKL, 8 x 1, 20 epochs, OWT), FDD (RKL + L_FDD + OWT,
# 8 x GA 2, 20 epochs), DistiLLM-2 (TGO/SGO of up to 512 new tokens, batch 16, gradual β).
#   GPT2_BASE=/path/gpt2 NPROC=1 bash $0      (after gpt2_data.sh and gpt2_sft_init.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-1}
: "${GPT2_BASE:?set GPT2_BASE to the pretrained GPT-2 (base) folder the KD baseline starts from}"
run() { torchrun --standalone --nproc_per_node "$NPROC" "$@"; }
T=results/gpt2/sft/xlarge/best
S=results/gpt2/init/base/best
G=processed_data/dolly/full/gpt2
D=(--teacher-model-path "$T" --max-length 512 --max-prompt-length 256 --lr 5e-4 --epochs 20 --seed 10)
OWT=(--lm-data-dir processed_data/openwebtext/gpt2/512/22.87K --lm-coef 1.0)
run contra_kd/train.py --type kd --model-path "$GPT2_BASE" --save results/gpt2/train/kd/0.1B_1.5B \
  --data-dir $G --batch-size 16 --kd-ratio 1.0 "${D[@]}" "${OWT[@]}"
run contra_kd/train.py --type adaptive-sfkl --model-path "$S" --save results/gpt2/train/distillm/0.1B_1.5B \
  --data-dir $G --batch-size 8 --skew-alpha 0.1 --init-threshold 0.0 --loss-eps 0.1 --capacity 1000 "${D[@]}" "${OWT[@]}"
run contra_kd/train.py --type rkl-fdd --model-path "$S" --save results/gpt2/train/fdd/0.1B_1.5B \
  --data-dir $G --batch-size 8 --gradient-accumulation-steps 2 --num-distill-layers 6 "${D[@]}" "${OWT[@]}"
# DistiLLM-2: teacher and student outputs (temperature 1, top-p 0.95, up to 512 new tokens as CONTRA's
# generate_data.sh) on the training prompts, then the loss
run contra_kd/generate_data.py --model-path "$T" --data-dir $G --save processed_data/distillm2/gpt2/tgo --max-new-tokens 512
run contra_kd/generate_data.py --model-path "$S" --data-dir $G --save processed_data/distillm2/gpt2/sgo --max-new-tokens 512
run contra_kd/train.py --type distillm2-v2 --model-path "$S" --save results/gpt2/train/distillm2/0.1B_1.5B \
  --data-dir processed_data/distillm2/gpt2 --gt-data-dir $G --batch-size 16 --gradual-beta "${D[@]}" "${OWT[@]}"
