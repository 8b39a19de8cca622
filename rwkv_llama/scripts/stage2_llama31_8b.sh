#!/usr/bin/env bash
# Stage 2 of the original (train.sh, first length bucket 1-256): 0.1 KL + 1 CE from the stage-1 student,
# micro batch 48 (-b), 600 warmup steps (-w), accumulation 256 (-A) [unverified short flags], lr 1e-4 -> 5e-4
# (sic: the original's lr_final exceeds lr_init; with --epoch_count 150 it barely moves), validation every
# 5000 steps, checkpoints every 20000. Servers: HIDDENS= BATCH=48 LENGTH=256 servers_llama31_8b.sh.
# The original read pre-tokenised length buckets (--preprocessed_data); here the C4 interleave at LENGTH.
#   MODEL_ID=... C4=... STAGE1=runs/distill-c4-en-zh/student.safetensors bash rwkv_llama/scripts/stage2_llama31_8b.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL_ID:?set MODEL_ID}" "${C4:?set C4}" "${STAGE1:?set STAGE1 to the stage-1 student.safetensors}"
CONFIG=${CONFIG:-hybrid_full_logits} BS=${BS:-48} LENGTH=${LENGTH:-256}
sed "s#\${MODEL_ID}#$MODEL_ID#" "rwkv_llama/scripts/configs/$CONFIG.yaml" > "/tmp/$CONFIG.yaml"
CUDA_VISIBLE_DEVICES=1,2,3,4,5,6 torchrun --standalone --nproc_per_node 6 -m rwkv_llama.train \
  --config_file "/tmp/$CONFIG.yaml" --is_hidden_align false --ckpt_file "$STAGE1" --num_devices 6 --grad_cp 1 \
  --max_seq_length "$LENGTH" --micro_bsz "$BS" --warmup_steps 600 --accumulate_grad_batches 256 \
  --lr_init 1e-4 --lr_final 5e-4 --c4_data "$C4" --languages '[en,zh]' --dropout 0.01 \
  --val_check_interval 5000 --log_every_n_steps 20000 --strategy deepspeed_stage_3_offload \
  --output_dir "${OUT:-runs/distill-stage2-1-256}"
