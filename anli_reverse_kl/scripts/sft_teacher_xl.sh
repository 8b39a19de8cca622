#!/usr/bin/env bash
# Teacher: Flan-T5-XL SFT on one round (spec §3.1; Adafactor, fixed lr, 12 x 6 per GPU, 5 epochs, fp32).
source "$(dirname "$0")/common.sh"
launch anli_reverse_kl/train.py --type sft --model_path "$TEACHER_BASE" --data_dir "$PROCESSED/$ROUND" \
  --save "$RESULTS/$ROUND/teacher_xl_sft" --lr "${SFT_LR[$ROUND]}" --optimizer adafactor --batch_size 12 \
  --gradient_accumulation_steps 6 --epochs 5 --warmup_iters 1000 --weight_decay 0.01 --clip_grad 0.9 \
  --loss_ratio 0.8 --max_len 350 --max_prompt_length 320 --save_interval 500
