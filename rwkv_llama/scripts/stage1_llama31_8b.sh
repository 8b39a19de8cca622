#!/usr/bin/env bash
# Stage 1 of the original README: hidden-state alignment of a pure RWKV student (all 32 layers) on C4 en+zh,
# 6 trainers on GPUs 1-6 served by the two servers of servers_llama31_8b.sh (start those first).
#   MODEL_ID=/models/Meta-Llama-3.1-8B-Instruct C4=/data/c4 bash rwkv_llama/scripts/stage1_llama31_8b.sh
# The original ran DeepSpeed ZeRO-3 with CPU offload: --strategy deepspeed_stage_3_offload runs as PyTorch FSDP
# with CPU offload (an 8B student with fp32 AdamW states does not fit an 80 GB GPU under plain DDP;
# python -m common.memory_plan --folder rwkv_llama gives the per-GPU memory of each mode).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL_ID:?set MODEL_ID}" "${C4:?set C4 to the local C4 folder with en/ and zh/}"
CONFIG=${CONFIG:-hybrid_full_logits}
sed "s#\${MODEL_ID}#$MODEL_ID#" "rwkv_llama/scripts/configs/$CONFIG.yaml" > "/tmp/$CONFIG.yaml"
CUDA_VISIBLE_DEVICES=1,2,3,4,5,6 torchrun --standalone --nproc_per_node 6 -m rwkv_llama.train \
  --config_file "/tmp/$CONFIG.yaml" --is_hidden_align true --max_epochs 3 --num_devices 6 --grad_cp 1 \
  --max_seq_length 2048 --lr_init 1e-4 --micro_bsz 3 --c4_data "$C4" --languages '[en,zh]' --dropout 0.01 \
  --strategy deepspeed_stage_3_offload --output_dir "${OUT:-runs/distill-c4-en-zh}"
