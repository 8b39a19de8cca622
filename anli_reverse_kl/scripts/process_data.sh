#!/usr/bin/env bash
# ANLI r1-r3 (train/dev/test parquet of facebook/anli) -> prompt/target items, binarised (spec §2); the fork's
# t-5-scripts/tools/process_data_anli.sh. Flan-T5 sizes share one tokenizer: the teacher's is used.
source "$(dirname "$0")/common.sh"
python anli_reverse_kl/prepare_data.py --data_dir "$ANLI_DIR" --tokenizer "$TEACHER_BASE" --save "$PROCESSED" \
  --rounds r1,r2,r3 --splits train,dev,test --max_prompt_length 320
