#!/usr/bin/env bash
# The original README's two teacher servers on one 8-GPU node (GPUs 0 and 7), one per group of 3 trainers:
# --batch 3 (= trainers' --micro_bsz), --length 2048 (= --max_seq_length), --size 4 (3 trainers + the server).
# Stage 1 needs --output_all_hiddens; for stage 2 run with HIDDENS= (empty).
#   MODEL_ID=/models/Meta-Llama-3.1-8B-Instruct bash rwkv_llama/scripts/servers_llama31_8b.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL_ID:?set MODEL_ID to the Llama-3.1-8B-Instruct folder}"
BATCH=${BATCH:-3} LENGTH=${LENGTH:-2048} HIDDENS=${HIDDENS---output_all_hiddens}
rm -f nccl.txt_0 nccl.txt_1       # the original repository even committed stale ones
# shellcheck disable=SC2086
python -m rwkv_llama.teacher_server --model_id "$MODEL_ID" --batch "$BATCH" --length "$LENGTH" --size 4 \
  $HIDDENS --device_id 0 --nccl_id_file nccl.txt_0 &
# shellcheck disable=SC2086
python -m rwkv_llama.teacher_server --model_id "$MODEL_ID" --batch "$BATCH" --length "$LENGTH" --size 4 \
  $HIDDENS --device_id 7 --nccl_id_file nccl.txt_1 &
wait
