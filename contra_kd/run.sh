#!/usr/bin/env bash
# CONTRA-KD pipeline (contra_kd.md §1): data -> teacher SFT -> student warm-up ("init", dev-loss selection)
# -> velocity field -> DistiLLM and DistiLLM+CONTRA (dev Rouge-L selection) -> evaluation, one table.
#
#   bash contra_kd/run.sh      tiny CPU demo, no downloads (a few minutes on 2 cores): random tiny GPT-2 teacher
#                              (4 layers) and student (2 layers) with a character tokenizer, the Dolly and
#                              OpenWebText stand-ins of data/README.md. The numbers mean nothing.
#   REAL=1 bash contra_kd/run.sh
#                              a real pair on 2 CPU cores (budget: 30 min on 2 idle cores; README "REAL run" gives the
#                              measured time): teacher SmolLM2-135M-Instruct
#                              (python -m common.pretrained, cached in $KDZOO_CACHE), student = 10 of its 30 blocks
#                              (STUDENT_LAYERS; tied embeddings kept; python -m common.hf keep_layers). Teacher SFT is
#                              skipped (TEACHER_EPOCHS=0): the teacher is already instruction-tuned. Prompts in its
#                              chat template (CHAT=1). No OpenWebText term (LM=0): it would double each student step.
#                              bf16 autocast (DTYPE). Dolly stand-in tokenised with the SmolLM2 tokenizer (EOS
#                              <|im_end|>, pad = EOS), NUM train / DEV_NUM dev items, at most MAX_LEN - MAX_PROMPT new
#                              tokens. DistiLLM and DistiLLM+CONTRA each trained with SEEDS training seeds (side by
#                              side, one core each), all from the same init and velocity field; eval on the first
#                              EVAL_NUM Dolly test items; the table ends with a paired test across seeds and items.
# The paper's configurations are in contra_kd/scripts/ (GPT-2 1.5B -> 0.1B, OpenLLaMA2 7B -> 3B, LLaMA2 13B -> 7B).
# Every setting can be overridden from the environment, e.g. OUT=/tmp/x EPOCHS=1 NPROC=2 bash contra_kd/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model gains nothing from a second thread, only waiting

NPROC=${NPROC:-1}
launch() {  # one process without torchrun, else torchrun on this node
  if [ "$NPROC" = 1 ]; then python "$@"; else torchrun --standalone --nproc_per_node "$NPROC" "$@"; fi
}

if [ -z "${REAL:-}" ]; then
  OUT=${OUT:-runs/contra_kd-tiny}
  : "${EPOCHS:=2}" "${BATCH:=8}" "${LR:=1e-3}" "${MAX_LEN:=320}" "${MAX_PROMPT:=256}" "${LAYERS:=2}"
  : "${NUM:=200}" "${DEV_NUM:=$NUM}" "${EVAL_NUM:=20}" "${EVAL_SEEDS:=10,20}" "${EVAL_SETS:=dolly,sinst}"
  : "${TEACHER_EPOCHS:=$EPOCHS}" "${INIT_EPOCHS:=1}" "${VF_EPOCHS:=1}" "${VF_WIDTH:=64}" "${VF_BLOCKS:=2}"
  : "${LM:=1}" "${DTYPE:=float32}" "${EVAL_BATCH:=16}" "${PAPER_PAIR:=gpt2}" "${SEEDS:=10}" "${CHAT:=}"
  : "${SIDE_BY_SIDE:=}"
  MODEL_TYPE=tiny
  TEACHER_BASE=$OUT/teacher
  if [ ! -f "$OUT/student/config.json" ]; then
    echo "== tiny random models -> $OUT/{teacher,student}"
    mkdir -p "$OUT"
    python - "$OUT" <<'PY'
import sys
from tests.tiny import save_tiny
out = sys.argv[1]
save_tiny("gpt2", f"{out}/teacher", seed=1, n_layer=4, n_embd=64, n_positions=512)
save_tiny("gpt2", f"{out}/student", seed=2, n_layer=2, n_embd=32, n_positions=512)
PY
  fi
else
  OUT=${OUT:-runs/contra_kd-smollm2}
  MODEL_DIR=${MODEL_DIR:-${KDZOO_CACHE:-$HOME/.cache/kdzoo}/models/smollm2-135m-instruct}
  : "${EPOCHS:=2}" "${BATCH:=8}" "${LR:=3e-4}" "${MAX_LEN:=256}" "${MAX_PROMPT:=128}" "${LAYERS:=4}"
  : "${NUM:=64}" "${DEV_NUM:=8}" "${EVAL_NUM:=100}" "${EVAL_SEEDS:=10}" "${EVAL_SETS:=dolly}" "${SEEDS:=10 20 30}"
  : "${CHAT:=1}" "${SIDE_BY_SIDE:=1}"
  : "${TEACHER_EPOCHS:=0}" "${INIT_EPOCHS:=1}" "${VF_EPOCHS:=1}" "${VF_WIDTH:=384}" "${VF_BLOCKS:=2}"
  : "${LM:=0}" "${DTYPE:=bfloat16}" "${EVAL_BATCH:=32}" "${PAPER_PAIR:=}"
  # the first 4 blocks and 6 of the last 9: of five cuts tried, the one with the lowest dev CE before training
  # (9.1 nats; teacher 2.6, first 10 blocks 22.0, every 3rd 15.8, first 7 + last 3 12.0, first 5 + last 5 12.0)
  : "${STUDENT_LAYERS:=0,1,2,3,21,23,25,27,28,29}"
  MODEL_TYPE=smollm2
  echo "== teacher: SmolLM2-135M-Instruct -> $MODEL_DIR"
  python -m common.pretrained fetch --name smollm2-135m-instruct --save_path "$MODEL_DIR"
  TEACHER_BASE=$MODEL_DIR
  if [ ! -f "$OUT/student/config.json" ]; then
    echo "== student: the teacher's blocks $STUDENT_LAYERS -> $OUT/student"
    python -m common.hf keep_layers --model_path "$MODEL_DIR" --save_path "$OUT/student" --layers "$STUDENT_LAYERS"
  fi
fi

CHAT_FLAG=(); [ -n "$CHAT" ] && CHAT_FLAG=(--chat-template True)
DOLLY=$OUT/processed/dolly/full/$MODEL_TYPE
OWT=$OUT/processed/openwebtext/$MODEL_TYPE/$MAX_LEN/200
echo "== data: Dolly stand-in (first $NUM train / $DEV_NUM dev records; full + prompt) -> $OUT/processed"
python contra_kd/prepare_data.py dolly --data-dir data/contra_kd/dolly_standin --processed-data-dir "$OUT/processed/dolly" \
  --model-path "$OUT/student" --model-type "$MODEL_TYPE" --max-prompt-length "$MAX_PROMPT" --num "$NUM" --dev-num "$DEV_NUM" \
  "${CHAT_FLAG[@]}"
LM_FLAGS=()
if [ "$LM" = 1 ]; then
  echo "== data: OpenWebText stand-in chunks -> $OWT"
  python contra_kd/prepare_data.py pretrain --data-file data/contra_kd/owt_standin.txt \
    --processed-data-dir "$OUT/processed/openwebtext" --model-path "$OUT/student" --model-type "$MODEL_TYPE" \
    --max-length "$MAX_LEN" --dev-num 20 --train-num 200
  LM_FLAGS=(--lm-data-dir "$OWT")
fi

COMMON=(--data-dir "$DOLLY" --batch-size "$BATCH" --lr "$LR" --max-length "$MAX_LEN" --max-prompt-length "$MAX_PROMPT"
        --num-distill-layers "$LAYERS" --eval-batch-size "$EVAL_BATCH" --dtype "$DTYPE")

TEACHER=$TEACHER_BASE
if [ "$TEACHER_EPOCHS" != 0 ]; then
  echo "== teacher SFT -> $OUT/teacher_sft"
  launch contra_kd/train.py --type sft --model-path "$TEACHER_BASE" --save "$OUT/teacher_sft" --epochs "$TEACHER_EPOCHS" "${COMMON[@]}"
  TEACHER=$OUT/teacher_sft/best
fi
echo "== student warm-up (init, dev-loss selection) -> $OUT/init"
launch contra_kd/train.py --type sft --model-path "$OUT/student" --save "$OUT/init" --epochs "$INIT_EPOCHS" --select-by loss "${COMMON[@]}"

echo "== velocity field (rectified flow, teacher <- student init) -> $OUT/velocity_field"
launch contra_kd/train_velocity_field.py --model-path "$OUT/init/best" --teacher-model-path "$TEACHER" \
  --data-dir "$DOLLY" --save "$OUT/velocity_field" --epochs "$VF_EPOCHS" --batch-size "$BATCH" --lr "$LR" \
  --max-length "$MAX_LEN" --num-distill-layers "$LAYERS" --velocity-width "$VF_WIDTH" --velocity-blocks "$VF_BLOCKS" \
  --dtype "$DTYPE"

KD=(--model-path "$OUT/init/best" --teacher-model-path "$TEACHER" "${LM_FLAGS[@]}" --epochs "$EPOCHS"
    --init-threshold 0.2 "${COMMON[@]}")
CONTRA=(--velocity-field "$OUT/velocity_field/velocity_field.safetensors" --projector "$OUT/velocity_field/projector.safetensors")
evaluate() {  # evaluate RUN MODEL_DIR: the §4 protocol -> $OUT/eval/RUN
  local metrics=()
  if [ -f "$OUT/$1/metrics.jsonl" ]; then metrics=(--metrics "$OUT/$1/metrics.jsonl"); fi
  launch contra_kd/eval.py --model-path "$2" --save "$OUT/eval/$1" --sets "$EVAL_SETS" --seeds "$EVAL_SEEDS" \
    --num "$EVAL_NUM" --batch-size "$EVAL_BATCH" --max-length "$MAX_LEN" --max-prompt-length "$MAX_PROMPT" --label "$1" \
    --dtype "$DTYPE" "${CHAT_FLAG[@]}" "${metrics[@]}"
}
distil() {  # distil RUN SEED [flags]: train from the init with this seed -> $OUT/RUN, evaluate its best -> $OUT/eval/RUN
  launch contra_kd/train.py --save "$OUT/$1" --seed "$2" "${KD[@]}" "${@:3}" && evaluate "$1" "$OUT/$1/best"
}
# one training seed keeps the single-seed folder names (distillm, distillm_contra); several get -sSEED
read -r -a SEED_LIST <<< "$SEEDS"
suffix() { [ "${#SEED_LIST[@]}" = 1 ] || echo "-s$1"; }
echo "== eval (sampling, no-repeat 6-gram, seeds $EVAL_SEEDS, first $EVAL_NUM items of $EVAL_SETS) -> $OUT/eval"
evaluate teacher "$TEACHER"
evaluate init "$OUT/init/best"
RUNS=(teacher init)
for SEED in "${SEED_LIST[@]}"; do
  A=distillm$(suffix "$SEED") B=distillm_contra$(suffix "$SEED")
  DISTILLM=(distil "$A" "$SEED" --type adaptive-srkl)
  WITH_CONTRA=(distil "$B" "$SEED" --type distillm+contra "${CONTRA[@]}")
  if [ -n "$SIDE_BY_SIDE" ]; then
    # one core each; DistiLLM in its own process group (set -m) so that a failure stops its python too
    echo "== seed $SEED: DistiLLM (adaptive SRKL) -> $OUT/$A and DistiLLM + CONTRA -> $OUT/$B, side by side (DistiLLM's log: $OUT/$A.log)"
    set -m; "${DISTILLM[@]}" > "$OUT/$A.log" 2>&1 & PID=$!; set +m
    trap 'kill -TERM -- -"$PID" 2>/dev/null || true' EXIT
    trap 'exit 130' INT; trap 'exit 143' TERM
    "${WITH_CONTRA[@]}" || { echo "DistiLLM + CONTRA failed: stopping DistiLLM" >&2; exit 1; }
    wait "$PID" || { tail -n 20 "$OUT/$A.log"; exit 1; }
    trap - EXIT INT TERM
  else
    echo "== seed $SEED: DistiLLM (adaptive SRKL$([ "$LM" = 1 ] && echo " + OWT")) -> $OUT/$A"
    "${DISTILLM[@]}"
    echo "== seed $SEED: DistiLLM + CONTRA (velocity field re-fitted after each epoch) -> $OUT/$B"
    "${WITH_CONTRA[@]}"
  fi
  RUNS+=("$A" "$B")
done
python - "$OUT" "$PAPER_PAIR" "${RUNS[@]}" <<'PY' | tee "$OUT/eval/table.md"
import sys
from contra_kd.eval import paired_comparison, table
out, paper_pair, runs = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
print(table([f"{out}/eval/{r}/results.json" for r in runs], runs, paper_pair=paper_pair))
a, b = [r for r in runs if r.startswith("distillm_contra")], [r for r in runs if r.startswith("distillm") and "contra" not in r]
print(paired_comparison({"DistiLLM+CONTRA": [f"{out}/eval/{r}" for r in a], "DistiLLM": [f"{out}/eval/{r}" for r in b],
                         "student init": [f"{out}/eval/init"]}))
PY
cat <<TXT | tee -a "$OUT/eval/table.md"
Settings: first $EVAL_NUM test items of $EVAL_SETS, sampling seeds $EVAL_SEEDS, at most $((MAX_LEN - MAX_PROMPT)) new tokens,
$DTYPE$([ -n "$CHAT" ] && echo ", chat-template prompts"); trained on the first $NUM / $DEV_NUM stand-in train / dev records (prompts over $MAX_PROMPT tokens dropped),
$EPOCHS epochs x batch $BATCH, lr $LR, training seeds $SEEDS.
$([ -z "${REAL:-}" ] && echo "Tiny random models on stand-in data: demo numbers, not comparable to the paper rows.")
TXT
echo "done: table $OUT/eval/table.md, curves $OUT/eval/*/curves.png"
