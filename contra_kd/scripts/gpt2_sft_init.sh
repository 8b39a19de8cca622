#!/usr/bin/env bash
# GPT-2 teacher SFT (XL, 10 epochs, lr 5e-5, 4 x GA 2 on one GPU as CONTRA; dev Rouge-L selection) and the
# student warm-up "init" (base, 3 epochs, lr 5e-4, batch 8; dev-loss selection); contra_kd.md §5.1.
#   GPT2_XL=/path/gpt2-xl GPT2_BASE=/path/gpt2 NPROC=1 bash $0
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-1}
run() { torchrun --standalone --nproc_per_node "$NPROC" contra_kd/train.py "$@"; }
D=(--data-dir processed_data/dolly/full/gpt2 --max-length 512 --max-prompt-length 256 --seed 10)
run --type sft --model-path "$GPT2_XL" --save results/gpt2/sft/xlarge --lr 5e-5 --batch-size 4 \
  --gradient-accumulation-steps 2 --epochs 10 "${D[@]}"
run --type sft --model-path "$GPT2_BASE" --save results/gpt2/init/base --lr 5e-4 --batch-size 8 --epochs 3 \
  --select-by loss "${D[@]}"
# SFT baseline (student from its base weights on ground truth): 20 epochs, lr 5e-4, batch 2
run --type sft --model-path "$GPT2_BASE" --save results/gpt2/sft/base --lr 5e-4 --batch-size 2 --epochs 20 "${D[@]}"
