#!/usr/bin/env bash
# CONTRA-KD pipeline (contra_kd.md §1): data -> teacher SFT -> student warm-up ("init", dev-loss selection)
# -> velocity field -> DistiLLM and DistiLLM+CONTRA (dev Rouge-L selection) -> evaluation, one table.
#
#   bash contra_kd/run.sh      tiny CPU demo, no downloads (a few minutes on 2 cores): random tiny GPT-2 teacher
#                              (4 layers) and student (2 layers) with a character tokenizer, the Dolly and
#                              OpenWebText stand-ins of data/README.md. The numbers mean nothing.
# The paper's configurations are in contra_kd/scripts/ (GPT-2 1.5B -> 0.1B, OpenLLaMA2 7B -> 3B, LLaMA2 13B -> 7B).
# Every setting can be overridden from the environment, e.g. OUT=/tmp/x EPOCHS=1 NPROC=2 bash contra_kd/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model gains nothing from a second thread, only waiting

OUT=${OUT:-runs/contra_kd-tiny}
NPROC=${NPROC:-1}
: "${EPOCHS:=2}" "${BATCH:=8}" "${LR:=1e-3}" "${MAX_LEN:=320}" "${MAX_PROMPT:=256}" "${LAYERS:=2}"
: "${NUM:=200}" "${EVAL_NUM:=20}" "${EVAL_SEEDS:=10,20}" "${EVAL_SETS:=dolly,sinst}"
launch() {  # one process without torchrun, else torchrun on this node
  if [ "$NPROC" = 1 ]; then python "$@"; else torchrun --standalone --nproc_per_node "$NPROC" "$@"; fi
}

if [ ! -f "$OUT/student/config.json" ]; then
  echo "== tiny random models -> $OUT/{teacher,student}"
  mkdir -p "$OUT"
  python - "$OUT" <<'EOF'
import sys
from tests.tiny import save_tiny
out = sys.argv[1]
save_tiny("gpt2", f"{out}/teacher", seed=1, n_layer=4, n_embd=64, n_positions=512)
save_tiny("gpt2", f"{out}/student", seed=2, n_layer=2, n_embd=32, n_positions=512)
EOF
fi

DOLLY=$OUT/processed/dolly/full/tiny
OWT=$OUT/processed/openwebtext/tiny/$MAX_LEN/200
echo "== data: Dolly stand-in (first $NUM train / dev records; full + prompt), OpenWebText stand-in chunks -> $OUT/processed"
python contra_kd/prepare_data.py dolly --data-dir data/contra_kd/dolly_standin --processed-data-dir "$OUT/processed/dolly" \
  --model-path "$OUT/student" --model-type tiny --max-prompt-length "$MAX_PROMPT" --num "$NUM"
python contra_kd/prepare_data.py pretrain --data-file data/contra_kd/owt_standin.txt \
  --processed-data-dir "$OUT/processed/openwebtext" --model-path "$OUT/student" --model-type tiny \
  --max-length "$MAX_LEN" --dev-num 20 --train-num 200

COMMON=(--data-dir "$DOLLY" --batch-size "$BATCH" --lr "$LR" --max-length "$MAX_LEN" --max-prompt-length "$MAX_PROMPT"
        --num-distill-layers "$LAYERS" --eval-batch-size 16)

echo "== teacher SFT -> $OUT/teacher_sft"
launch contra_kd/train.py --type sft --model-path "$OUT/teacher" --save "$OUT/teacher_sft" --epochs "$EPOCHS" "${COMMON[@]}"
echo "== student warm-up (init, dev-loss selection) -> $OUT/init"
launch contra_kd/train.py --type sft --model-path "$OUT/student" --save "$OUT/init" --epochs 1 --select-by loss "${COMMON[@]}"

echo "== velocity field (rectified flow, teacher SFT <- student init) -> $OUT/velocity_field"
launch contra_kd/train_velocity_field.py --model-path "$OUT/init/best" --teacher-model-path "$OUT/teacher_sft/best" \
  --data-dir "$DOLLY" --save "$OUT/velocity_field" --epochs 1 --batch-size "$BATCH" --lr "$LR" --max-length "$MAX_LEN" \
  --num-distill-layers "$LAYERS" --velocity-width 64 --velocity-blocks 2

KD=(--model-path "$OUT/init/best" --teacher-model-path "$OUT/teacher_sft/best" --lm-data-dir "$OWT" --epochs "$EPOCHS"
    --init-threshold 0.2 "${COMMON[@]}")
echo "== DistiLLM (adaptive SRKL + OWT) -> $OUT/distillm"
launch contra_kd/train.py --type adaptive-srkl --save "$OUT/distillm" "${KD[@]}"
echo "== DistiLLM + CONTRA (velocity field re-fitted after each epoch) -> $OUT/distillm_contra"
launch contra_kd/train.py --type distillm+contra --save "$OUT/distillm_contra" "${KD[@]}" \
  --velocity-field "$OUT/velocity_field/velocity_field.safetensors" --projector "$OUT/velocity_field/projector.safetensors"

echo "== eval (sampling, no-repeat 6-gram, seeds $EVAL_SEEDS, first $EVAL_NUM items of $EVAL_SETS) -> $OUT/eval"
for run in teacher_sft init distillm distillm_contra; do
  metrics=()
  if [ -f "$OUT/$run/metrics.jsonl" ]; then metrics=(--metrics "$OUT/$run/metrics.jsonl"); fi
  launch contra_kd/eval.py --model-path "$OUT/$run/best" --save "$OUT/eval/$run" --sets "$EVAL_SETS" --seeds "$EVAL_SEEDS" \
    --num "$EVAL_NUM" --batch-size 16 --max-length "$MAX_LEN" --max-prompt-length "$MAX_PROMPT" --label "$run" "${metrics[@]}"
done
python - "$OUT" <<'EOF' | tee "$OUT/eval/table.md"
import sys
from contra_kd.eval import table
out, runs = sys.argv[1], ["teacher_sft", "init", "distillm", "distillm_contra"]
print(table([f"{out}/eval/{r}/results.json" for r in runs], runs, paper_pair="gpt2"))
print("Tiny random models on stand-in data: demo numbers, not comparable to the paper rows.")
EOF
echo "done: table $OUT/eval/table.md, curves $OUT/eval/*/curves.png"
