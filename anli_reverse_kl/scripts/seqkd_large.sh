#!/usr/bin/env bash
# SeqKD baseline: the SFT loss on the teacher's outputs (plain SFT, as the paper's SeqKD; spec §3.3).
source "$(dirname "$0")/common.sh"
launch anli_reverse_kl/train.py --type seqkd --model_path "$STUDENT_BASE" --data_dir "$RESULTS/$ROUND/seqkd_data" \
  --save "$RESULTS/$ROUND/seqkd_large" --lr "${SFT_LR[$ROUND]}" --optimizer adafactor --batch_size 12 \
  --gradient_accumulation_steps 6 --epochs 5 --warmup_iters 1000 --weight_decay 0.01 --clip_grad 0.9 \
  --loss_ratio 0.8 --max_len 350 --max_prompt_length 320 --save_interval 500
