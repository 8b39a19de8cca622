#!/usr/bin/env bash
# MCC-KD end to end: prepare the multi-CoT file -> Std-CoT baseline (train.py) -> MCC-KD (train_mcc.py) -> eval.
#
#   bash mcc_kd/run.sh                      tiny CPU demo, no downloads (a few minutes on 2 cores): a random tiny
#                                           LLaMA in our layout, a SentencePiece tokenizer trained from the shipped
#                                           SVAMP rationales, the SVAMP stand-in splits. Numbers mean nothing.
#   CKPT_DIR=/path/llama-7b TASK=SVAMP NPROC=8 bash mcc_kd/run.sh
#                                           the paper's setting (mcc_kd.md §4) on a real checkpoint split for
#                                           NPROC ranks (python -m common.checkpoint_split ... --n NPROC).
# Every setting below can be overridden from the environment, e.g. EPOCHS=1 LORA_RANK=128 bash mcc_kd/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-SVAMP}
NPROC=${NPROC:-1}
if [ -z "${CKPT_DIR:-}" ]; then  # tiny demo
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model gains nothing from a second thread, only waiting
  OUT=${OUT:-runs/mcc_kd-tiny}
  CKPT_DIR=$OUT/ckpt
  MODEL_TYPE=${MODEL_TYPE:-lora-tiny-llama}
  TRAIN_FILE=${TRAIN_FILE:-data/SVAMP/train_standin.json}
  DEV_FILE=${DEV_FILE:-data/SVAMP/dev_standin.json}
  LABEL_FILE=${LABEL_FILE:-data/SVAMP/test_standin.json}
  : "${MAX_SEQ_LEN:=192}" "${LORA_RANK:=16}" "${LR:=3e-3}" "${EPOCHS:=2}" "${ALPHA:=0.01}" "${T:=1.3}"
  : "${EVAL_BATCH_SIZE:=20}" "${PRECISION:=}"
  if [ ! -f "$CKPT_DIR/params.json" ]; then
    echo "== tokenizer and tiny model -> $CKPT_DIR"
    mkdir -p "$OUT"
    python -m common.tokenizer train --input_files data/SVAMP/train.json --model_prefix "$OUT/tokenizer" --vocab_size 1000
    python -m common.checkpoint_split init --model_type tiny-llama --tokenizer "$OUT/tokenizer.model" --save_path "$CKPT_DIR"
  fi
else  # the paper: LLaMA-7B, LoRA r 64 (scale 1), lr 1e-5 constant, 12 epochs, alpha 0.01, T 1.3, seq 512
  OUT=${OUT:-runs/mcc_kd-$TASK}
  MODEL_TYPE=${MODEL_TYPE:-lora-llama-1-7b}
  TRAIN_FILE=${TRAIN_FILE:-data/$TASK/train.json}
  DEV_FILE=${DEV_FILE:-data/$TASK/dev.json}
  LABEL_FILE=${LABEL_FILE:-data/$TASK/test.json}
  : "${MAX_SEQ_LEN:=512}" "${LORA_RANK:=64}" "${LR:=1e-5}" "${EPOCHS:=12}" "${ALPHA:=0.01}" "${T:=1.3}"
  : "${EVAL_BATCH_SIZE:=24}" "${PRECISION:=--use_float16 True}"
fi

launch() {  # one process without torchrun, else torchrun on this node
  if [ "$NPROC" = 1 ]; then python "$@"; else torchrun --standalone --nproc_per_node "$NPROC" "$@"; fi
}
COMMON=(--task "$TASK" --ckpt_dir "$CKPT_DIR" --model_type "$MODEL_TYPE" --lora_rank "$LORA_RANK" --lr "$LR"
        --epochs "$EPOCHS" --max_seq_len "$MAX_SEQ_LEN" --eval_batch_size "$EVAL_BATCH_SIZE"
        --dev_file "$DEV_FILE" --label_file "$LABEL_FILE")
# shellcheck disable=SC2206
COMMON+=($PRECISION)

MCC_FILE=$OUT/$TASK-train-multi-cots.json
echo "== prepare: correctness + diversity filtering, answer-span indices -> $MCC_FILE"
python mcc_kd/prepare_data.py filter --task "$TASK" --input_file "$TRAIN_FILE" --output_file "$MCC_FILE" \
  --tokenizer_file "$CKPT_DIR/tokenizer.model" --max_seq_len "$MAX_SEQ_LEN"

echo "== Std-CoT fine-tuning (train.py) -> $OUT/sft (weights), $OUT/sft/log (predictions, metrics)"
launch mcc_kd/train.py "${COMMON[@]}" --train_file "$TRAIN_FILE" --save_dir "$OUT/sft" --log_dir "$OUT/sft/log"

echo "== MCC-KD (train_mcc.py) -> $OUT/mcc, $OUT/mcc/log"
launch mcc_kd/train_mcc.py "${COMMON[@]}" --train_file "$MCC_FILE" --save_dir "$OUT/mcc" --log_dir "$OUT/mcc/log" \
  --alpha "$ALPHA" --T "$T"

BEST=$(ls -d "$OUT"/mcc/epoch-* | tail -n 1)
echo "== eval (eval.py) of $BEST on $LABEL_FILE -> $OUT/eval"
launch mcc_kd/eval.py --task "$TASK" --ckpt_dir "$CKPT_DIR" --model_type "$MODEL_TYPE" --lora_rank "$LORA_RANK" \
  --lora_dir "$BEST" --label_file "$LABEL_FILE" --eval_batch_size "$EVAL_BATCH_SIZE" --max_seq_len "$MAX_SEQ_LEN" \
  --log_dir "$OUT/eval" $PRECISION
echo "done: metrics in $OUT/sft/log, $OUT/mcc/log and $OUT/eval"
