#!/usr/bin/env bash
# Word-level KD baseline: (1 - 0.5) CE + 0.5 soft-CE(teacher, student) on the gold targets (spec §3.2).
source "$(dirname "$0")/common.sh"
launch anli_reverse_kl/train.py --type kd --kd_ratio 0.5 --model_path "$STUDENT_BASE" --teacher_model_path "$TEACHER" \
  --data_dir "$PROCESSED/$ROUND" --save "$RESULTS/$ROUND/kd_large" --lr "${SFT_LR[$ROUND]}" --optimizer adafactor \
  --batch_size 12 --gradient_accumulation_steps 6 --epochs 5 --warmup_iters 1000 --weight_decay 0.01 --clip_grad 0.9 \
  --max_len 350 --max_prompt_length 320 --save_interval 500
