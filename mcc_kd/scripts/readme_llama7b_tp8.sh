#!/usr/bin/env bash
# The original README's 8-GPU command (HEAD): LLaMA-1-7B split for 8 ranks, LoRA r 128, 24 epochs,
# 6 questions per micro-batch, eval batch 384, fp16. The README does not state alpha / T; the HEAD code's
# defaults (0.1 / 1.0) are used here. No dev file: the test file is scored every epoch, as HEAD did.
# The README ran GSM8K with its never-reproducible preview file; we ship multi-rationale data for SVAMP and ASDiv
# only (GSM8K and CSQA need teacher rationales generated first: data/README.md).
#   CKPT_DIR=/path/llama-7b-tp8 TASK=SVAMP bash mcc_kd/scripts/readme_llama7b_tp8.sh
set -euo pipefail
: "${CKPT_DIR:?set CKPT_DIR to a checkpoint folder split for 8 ranks}"
TASK=${TASK:-SVAMP}
SAVE_DIR=${SAVE_DIR:-runs/mcc_kd-$TASK-tp8}
TRAIN_FILE=${TRAIN_FILE:-$SAVE_DIR/$TASK-train-multi-cots.json}
cd "$(dirname "$0")/../.."
[ -f "$TRAIN_FILE" ] || python mcc_kd/prepare_data.py filter --task "$TASK" --input_file "data/$TASK/train.json" \
  --output_file "$TRAIN_FILE" --tokenizer_file "$CKPT_DIR" --max_seq_len 512
torchrun --nproc_per_node 8 mcc_kd/train_mcc.py \
  --task "$TASK" \
  --ckpt_dir "$CKPT_DIR" \
  --save_dir "$SAVE_DIR" \
  --train_file "$TRAIN_FILE" \
  --label_file "data/$TASK/test.json" \
  --dev_file "" \
  --model_type lora-llama-1-7b \
  --max_batch_size 6 \
  --accumulation_steps 1 \
  --lora_rank 128 \
  --eval_batch_size 384 \
  --epochs 24 \
  --alpha 0.1 \
  --T 1.0 \
  --use_float16 True
