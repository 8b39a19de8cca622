#!/usr/bin/env bash
# MiniLLM: Flan-T5-large (SFT) student, Flan-T5-XL (SFT) teacher; the fork's t-5-scripts/train_large_large.sh
# settings (spec §3.4): 2 PPO epochs, 32 rollouts in chunks of 16, 12 x 6, lr 7e-5, 100 iterations, teacher mix
# 0.2, length normalisation on, no single-step term, fp32. Add --single_step_reg for MiniLLM's default on
# decoder-only models, --lm_data_dir DIR (prepare_data.py output) for the PT term.
source "$(dirname "$0")/common.sh"
launch anli_reverse_kl/train.py --type minillm --model_path "$SFT_STUDENT" --teacher_model_path "$TEACHER" \
  --data_dir "$PROCESSED/$ROUND" --save "$RESULTS/$ROUND/minillm_large_xl" --ppo_epochs 2 --num_rollouts 32 \
  --chunk_size 16 --batch_size 12 --gradient_accumulation_steps 6 --lr 7e-5 --optimizer adamw --total_iters 100 \
  --teacher_mixed_alpha 0.2 --gamma 0.95 --reward_scaling 0.5 --cliprange_reward 100 --cliprange 0.2 \
  --length_norm True --kd_ratio 0.5 --max_len 360 --max_prompt_length 180 --max_new_tokens 180 \
  --temperature 1.0 --top_k 0 --top_p 1.0 --save_interval 10
