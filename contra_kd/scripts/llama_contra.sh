#!/usr/bin/env bash
# OpenLLaMA2 7B -> 3B or LLaMA2 13B -> 7B with LoRA (contra_kd.md §3, §6): teacher SFT (LoRA, 10 epochs, 16 x 1,
# lr 5e-4, merged on export), student init (LoRA, 3 epochs, dev-loss selection), velocity field (width 2400 /
# 3200, batch 16, on the merged models), DistiLLM + CONTRA (adaptive SRKL, 16 x 1, 10 epochs, init threshold 0.2,
# loss eps 0.2, OWT "1M"), bf16. LoRA r 16, alpha 64, dropout 0.1 (the code; the paper text says alpha 16).
#   FAMILY=openllama2 TEACHER_BASE=/path/open_llama_7b_v2 STUDENT_BASE=/path/open_llama_3b_v2 NPROC=8 bash $0
#   FAMILY=llama2 TEACHER_BASE=/path/Llama-2-13b-hf STUDENT_BASE=/path/Llama-2-7b-hf NPROC=8 bash $0
# (data first: prepare_data.py --model-type $FAMILY, as gpt2_data.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-1}
case "$FAMILY" in
  openllama2) WIDTH=2400 ;;
  llama2) WIDTH=3200 ;;
  *) echo "FAMILY must be openllama2 or llama2, got '$FAMILY'" >&2; exit 1 ;;
esac
run() { torchrun --standalone --nproc_per_node "$NPROC" "$@"; }
R=results/$FAMILY
DATA=processed_data/dolly/full/$FAMILY
D=(--data-dir "$DATA" --max-length 512 --max-prompt-length 256 --seed 10 --dtype bfloat16
   --peft lora --peft-lora-r 16 --peft-lora-alpha 64 --peft-lora-dropout 0.1)
run contra_kd/train.py --type sft --model-path "$TEACHER_BASE" --save "$R/sft/teacher" --lr 5e-4 --batch-size 16 \
  --epochs 10 "${D[@]}"
run contra_kd/train.py --type sft --model-path "$STUDENT_BASE" --save "$R/init/student" --lr 5e-4 --batch-size 16 \
  --epochs 3 --select-by loss "${D[@]}"
run contra_kd/train_velocity_field.py --model-path "$R/init/student/best" --teacher-model-path "$R/sft/teacher/best" \
  --data-dir "$DATA" --save "$R/velocity_field" --velocity-width "$WIDTH" --batch-size 16 --epochs 3 --lr 5e-4 \
  --dtype bfloat16
run contra_kd/train.py --type adaptive-srkl-contra --model-path "$R/init/student/best" \
  --teacher-model-path "$R/sft/teacher/best" --save "$R/train/contra/distillm" --lr 5e-4 --batch-size 16 --epochs 10 \
  --init-threshold 0.2 --loss-eps 0.2 --lm-data-dir "processed_data/openwebtext/$FAMILY/512/1M" \
  --velocity-field "$R/velocity_field/velocity_field.safetensors" --projector "$R/velocity_field/projector.safetensors" \
  "${D[@]}"
