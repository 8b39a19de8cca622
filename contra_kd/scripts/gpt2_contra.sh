#!/usr/bin/env bash
# GPT-2 1.5B -> 0.1B with CONTRA-KD (contra_kd.md §5.6, §6): velocity field (width 1024, 4 blocks, LD 6, lr 5e-4,
# 3 epochs, batch 8), then DistiLLM+CONTRA (16 x 1), FDD+CONTRA (8 x GA 2) and DistiLLM-2+CONTRA (16 x 1, gradual
# β, its own field trained on the TGO and SGO sequences), 20 epochs, lr 5e-4, OWT 22.87K; re-fit after every epoch.
#   NPROC=1 bash $0      (after gpt2_data.sh, gpt2_sft_init.sh and, for DistiLLM-2, gpt2_baselines.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-1}
run() { torchrun --standalone --nproc_per_node "$NPROC" "$@"; }
T=results/gpt2/sft/xlarge/best
S=results/gpt2/init/base/best
VF=results/gpt2/velocity_field
VF2=results/gpt2/velocity_field_distillm2
FIELD=(--num-distill-layers 6 --velocity-width 1024 --velocity-blocks 4 --lr 5e-4 --epochs 3 --batch-size 8)
run contra_kd/train_velocity_field.py --model-path "$S" --teacher-model-path "$T" \
  --data-dir processed_data/dolly/full/gpt2 --save "$VF" "${FIELD[@]}"
D=(--model-path "$S" --teacher-model-path "$T" --max-length 512 --max-prompt-length 256 --lr 5e-4 --epochs 20
   --seed 10 --lm-data-dir processed_data/openwebtext/gpt2/512/22.87K --num-distill-layers 6
   --velocity-epochs 1 --velocity-update-interval 1)
run contra_kd/train.py --type adaptive-srkl-contra --data-dir processed_data/dolly/full/gpt2 \
  --save results/gpt2/train/contra/distillm/0.1B_1.5B --batch-size 16 --skew-alpha 0.1 --init-threshold 0.0 \
  --loss-eps 0.1 --capacity 1000 --velocity-field "$VF/velocity_field.safetensors" \
  --projector "$VF/projector.safetensors" "${D[@]}"
run contra_kd/train.py --type rkl-contra-fdd --data-dir processed_data/dolly/full/gpt2 \
  --save results/gpt2/train/contra/fdd/0.1B_1.5B --batch-size 8 --gradient-accumulation-steps 2 \
  --velocity-field "$VF/velocity_field.safetensors" --projector "$VF/projector.safetensors" "${D[@]}"
# DistiLLM-2 + CONTRA: its own field, trained on the teacher- and student-output sequences (TGO and SGO, as
# CONTRA's train_velocity_field_distillm2.sh); re-fits on ground truth
run contra_kd/train_velocity_field.py --model-path "$S" --teacher-model-path "$T" \
  --data-dir processed_data/distillm2/gpt2 --save "$VF2" "${FIELD[@]}"
run contra_kd/train.py --type distillm2-v2-contra --data-dir processed_data/distillm2/gpt2 \
  --gt-data-dir processed_data/dolly/full/gpt2 --save results/gpt2/train/contra/distillm2/0.1B_1.5B \
  --batch-size 16 --gradual-beta --velocity-field "$VF2/velocity_field.safetensors" \
  --projector "$VF2/projector.safetensors" "${D[@]}"
