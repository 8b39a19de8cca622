#!/usr/bin/env bash
# train_mcc.py with our defaults only (mcc_kd/README.md, "Defaults beside the original"): micro-batch 2 x
# accumulation 2, alpha 0.01, T 1.3, 12 epochs, LoRA r 64 at scale 1, fp32, best epoch on dev.json, reported on test.
#   CKPT_DIR=/path/llama-7b-split TASK=SVAMP bash mcc_kd/scripts/defaults.sh
set -euo pipefail
: "${CKPT_DIR:?set CKPT_DIR to a checkpoint folder in our layout}"
TASK=${TASK:-SVAMP}
SAVE_DIR=${SAVE_DIR:-runs/mcc_kd-$TASK-defaults}
TRAIN_FILE=${TRAIN_FILE:-$SAVE_DIR/$TASK-train-multi-cots.json}
cd "$(dirname "$0")/../.."
[ -f "$TRAIN_FILE" ] || python mcc_kd/prepare_data.py filter --task "$TASK" --input_file "data/$TASK/train.json" \
  --output_file "$TRAIN_FILE" --tokenizer_file "$CKPT_DIR"
python mcc_kd/train_mcc.py --task "$TASK" --ckpt_dir "$CKPT_DIR" --save_dir "$SAVE_DIR" --train_file "$TRAIN_FILE" \
  --label_file "data/$TASK/test.json" --model_type lora-llama-1-7b
