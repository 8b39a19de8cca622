#!/usr/bin/env bash
# CONTRA-KD pipeline (contra_kd.md §1): data -> teacher SFT -> student warm-up ("init", dev-loss selection)
# -> velocity field -> DistiLLM and DistiLLM+CONTRA (dev Rouge-L selection) -> evaluation, one table.
#
#   bash contra_kd/run.sh      tiny CPU demo, no downloads (a few minutes on 2 cores): random tiny GPT-2 teacher
#                              (4 layers) and student (2 layers) with a character tokenizer, the Dolly and
#                              OpenWebText stand-ins of data/README.md. The numbers mean nothing.
#   REAL=1 bash contra_kd/run.sh
#                              a real pair on 2 CPU cores (12 CPU-minutes: 33 min wall on a busy shared machine; README
#                              "REAL run"): teacher SmolLM2-135M-Instruct
#                              (python -m common.pretrained, cached in $KDZOO_CACHE), student = 10 of its 30 blocks
#                              (STUDENT_LAYERS; tied embeddings kept; python -m common.hf keep_layers). Teacher SFT is
#                              skipped (TEACHER_EPOCHS=0): the teacher is already instruction-tuned. No OpenWebText
#                              term (LM=0): it would double each student step. bf16 autocast (DTYPE). Dolly stand-in
#                              tokenised with the SmolLM2 tokenizer (EOS <|im_end|>, pad = EOS), NUM train / DEV_NUM
#                              dev items, at most MAX_LEN - MAX_PROMPT new tokens; eval on the first EVAL_NUM Dolly
#                              test items (settings printed with the table).
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
  : "${LM:=1}" "${DTYPE:=float32}" "${EVAL_BATCH:=16}" "${PAPER_PAIR:=gpt2}"
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
  : "${NUM:=64}" "${DEV_NUM:=8}" "${EVAL_NUM:=32}" "${EVAL_SEEDS:=10}" "${EVAL_SETS:=dolly}"
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

DOLLY=$OUT/processed/dolly/full/$MODEL_TYPE
OWT=$OUT/processed/openwebtext/$MODEL_TYPE/$MAX_LEN/200
echo "== data: Dolly stand-in (first $NUM train / $DEV_NUM dev records; full + prompt) -> $OUT/processed"
python contra_kd/prepare_data.py dolly --data-dir data/contra_kd/dolly_standin --processed-data-dir "$OUT/processed/dolly" \
  --model-path "$OUT/student" --model-type "$MODEL_TYPE" --max-prompt-length "$MAX_PROMPT" --num "$NUM" --dev-num "$DEV_NUM"
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
echo "== DistiLLM (adaptive SRKL$([ "$LM" = 1 ] && echo " + OWT")) -> $OUT/distillm"
launch contra_kd/train.py --type adaptive-srkl --save "$OUT/distillm" "${KD[@]}"
echo "== DistiLLM + CONTRA (velocity field re-fitted after each epoch) -> $OUT/distillm_contra"
launch contra_kd/train.py --type distillm+contra --save "$OUT/distillm_contra" "${KD[@]}" \
  --velocity-field "$OUT/velocity_field/velocity_field.safetensors" --projector "$OUT/velocity_field/projector.safetensors"

echo "== eval (sampling, no-repeat 6-gram, seeds $EVAL_SEEDS, first $EVAL_NUM items of $EVAL_SETS) -> $OUT/eval"
RUNS=(teacher init distillm distillm_contra)
declare -A MODEL=([teacher]=$TEACHER [init]=$OUT/init/best [distillm]=$OUT/distillm/best
                  [distillm_contra]=$OUT/distillm_contra/best)
for run in "${RUNS[@]}"; do
  metrics=()
  if [ -f "$OUT/$run/metrics.jsonl" ]; then metrics=(--metrics "$OUT/$run/metrics.jsonl"); fi
  launch contra_kd/eval.py --model-path "${MODEL[$run]}" --save "$OUT/eval/$run" --sets "$EVAL_SETS" --seeds "$EVAL_SEEDS" \
    --num "$EVAL_NUM" --batch-size "$EVAL_BATCH" --max-length "$MAX_LEN" --max-prompt-length "$MAX_PROMPT" --label "$run" \
    --dtype "$DTYPE" "${metrics[@]}"
done
python - "$OUT" "$PAPER_PAIR" "${RUNS[@]}" <<'PY' | tee "$OUT/eval/table.md"
import sys
from contra_kd.eval import table
out, paper_pair, runs = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
print(table([f"{out}/eval/{r}/results.json" for r in runs], runs, paper_pair=paper_pair))
PY
cat <<TXT | tee -a "$OUT/eval/table.md"
Settings: first $EVAL_NUM test items of $EVAL_SETS, sampling seeds $EVAL_SEEDS, at most $((MAX_LEN - MAX_PROMPT)) new tokens,
$DTYPE; trained on the first $NUM / $DEV_NUM stand-in train / dev records (prompts over $MAX_PROMPT tokens dropped),
$EPOCHS epochs x batch $BATCH, lr $LR.
$([ -z "${REAL:-}" ] && echo "Tiny random models on stand-in data: demo numbers, not comparable to the paper rows.")
TXT
echo "done: table $OUT/eval/table.md, curves $OUT/eval/*/curves.png"
