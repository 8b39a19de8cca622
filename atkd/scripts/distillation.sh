#!/usr/bin/env bash
# The paper's distillation run (atkd.md §6), positional arguments in the released script's order:
#   bash atkd/scripts/distillation.sh KL CUDA GPUS PORT TEACHER_SIZE STUDENT_SIZE PER_BSZ SETTING SAMPLE
#   bash atkd/scripts/distillation.sh atkd 0,1,2,3,4,5,6,7 8 29500 6.7b 1.3b 1 vanilla gt
# The release named the 5th and 6th arguments student_size / teacher_size but used the 5th for the TEACHER
# (fine-tuned/OPT-$5) and the 6th for the STUDENT (original/OPT-$6); the order is kept, the names say their use.
# Folders (yours to provide; nothing is downloaded): fine-tuned/OPT-<size> (the SFT teacher), original/OPT-<size>
# (the pretrained student), alpaca_gpt4_data.json, and for SAMPLE != gt the teacher file
# generated_data/OPT_<teacher size>/alpaca_generated_data.jsonl (atkd/generate_data.py makes it).
set -euo pipefail
kl=${1:-atkd} cuda=${2:-0} gpus=${3:-1} port=${4:-29500} teacher_size=${5:?teacher size, e.g. 6.7b}
student_size=${6:?student size, e.g. 1.3b} per_bsz=${7:-1} setting=${8:-vanilla} sample=${9:-gt}
datapath=${DATAPATH:-./outputs}
teacher_model=${TEACHER_DIR:-fine-tuned}/OPT-${teacher_size}
student_model=${STUDENT_DIR:-original}/OPT-${student_size}
save_path=$datapath/alpaca_${teacher_size}_vs_OPT_${student_size}/alpaca_${sample}_${kl}_${setting}
if [ "$sample" == "gt" ]; then
  data_path=${ALPACA:-alpaca_gpt4_data.json}
else
  data_path=generated_data/OPT_${teacher_size}/alpaca_generated_data.jsonl
  [ -f "$data_path" ] || python atkd/generate_data.py --teacher_model_path "$teacher_model" \
    --data_path "${ALPACA:-alpaca_gpt4_data.json}" --output_path "$data_path" --bf16 True
fi
mkdir -p "$save_path"
CUDA_VISIBLE_DEVICES=$cuda torchrun --nproc_per_node "$gpus" --master_port "$port" atkd/train.py \
  --student_model_path "$student_model" \
  --teacher_model_path "$teacher_model" \
  --data_path "$data_path" \
  --task alpaca \
  --setting "$setting" \
  --max_propose_num 5 \
  --bf16 True \
  --output_dir "$save_path" \
  --num_train_epochs 3 \
  --per_device_train_batch_size "$per_bsz" \
  --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps 2 \
  --evaluation_strategy "no" \
  --save_strategy "no" \
  --learning_rate 2e-5 \
  --weight_decay 0. \
  --warmup_ratio 0.03 \
  --lr_scheduler_type "cosine" \
  --logging_steps 1 \
  --tf32 True \
  --model_max_length 512 \
  --gradient_checkpointing True \
  --lazy_preprocess True \
  --run_name "distillation_${sample}_${kl}" \
  --mode offline \
  --sample_source "$sample" \
  --kl_method "$kl" \
  2>&1 | tee "$save_path/training.log"
