#!/usr/bin/env bash
# Dolly (DSKD split) and OpenWebText for GPT-2 (contra_kd.md §2): processed_data/dolly/{full,prompt}/gpt2,
# processed_data/openwebtext/gpt2/512/22.87K (CONTRA: 1,000 dev + 22,870 train chunks).
#   DOLLY=/path/dsk_dolly (train.jsonl + dev.jsonl)  OWT=/path/openwebtext.txt  TOKENIZER=/path/gpt2  bash $0
set -euo pipefail
cd "$(dirname "$0")/../.."
python contra_kd/prepare_data.py dolly --data-dir "$DOLLY" --processed-data-dir processed_data/dolly \
  --model-path "$TOKENIZER" --model-type gpt2 --max-prompt-length 256
python contra_kd/prepare_data.py pretrain --data-file "$OWT" --processed-data-dir processed_data/openwebtext \
  --model-path "$TOKENIZER" --model-type gpt2 --max-length 512 --dev-num 1000 --train-num 22870 --train-num-name 22.87K
