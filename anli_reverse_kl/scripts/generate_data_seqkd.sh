#!/usr/bin/env bash
# SeqKD data: the SFT teacher samples a target for every train prompt (temperature 1, top-p 1, top-k 0; spec §3.3).
source "$(dirname "$0")/common.sh"
launch anli_reverse_kl/generate_data.py --teacher_model_path "$TEACHER" --data_dir "$PROCESSED/$ROUND" \
  --save "$RESULTS/$ROUND/seqkd_data" --max_new_tokens 180 --temperature 1.0 --top_p 1.0 --top_k 0 --batch_size 32
