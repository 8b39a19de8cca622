#!/usr/bin/env bash
# MiniLLM on ANLI, end to end: data -> teacher SFT -> student SFT -> MiniLLM, plus the KD and SeqKD baselines
# -> evaluation of every model -> one comparison table.
#
#   bash anli_reverse_kl/run.sh    tiny CPU demo, no downloads (a few minutes on 2 cores): random tiny T5 teacher
#                                  (d_model 64) and student (d_model 32) with a character tokenizer, round r1 of the
#                                  ANLI STAND-IN (data/anli_standin/, templated from SVAMP). The numbers mean nothing.
# The paper-scale settings (Flan-T5-XL teacher, Flan-T5-large student) are in anli_reverse_kl/scripts/.
# Every setting can be overridden from the environment, e.g. OUT=/tmp/x EPOCHS=1 NPROC=2 bash anli_reverse_kl/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model gains nothing from a second thread, only waiting

OUT=${OUT:-runs/anli_reverse_kl-tiny}
SRC=${SRC:-data/anli_standin}  # ANLI rows ({split}_{round}.jsonl or the release's parquet files)
NPROC=${NPROC:-1}
ROUND=${ROUND:-r1}
: "${EPOCHS:=2}" "${BATCH:=8}" "${LR:=3e-3}" "${MAX_PROMPT:=512}" "${MAX_NEW:=48}" "${TOTAL_ITERS:=8}"
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
save_tiny("t5", f"{out}/teacher", seed=1, d_model=64, d_ff=128, num_heads=4, d_kv=16)
save_tiny("t5", f"{out}/student", seed=2)
EOF
fi

DATA=$OUT/processed
echo "== data: ANLI stand-in round $ROUND -> $DATA/$ROUND"
python anli_reverse_kl/prepare_data.py --data_dir "$SRC" --tokenizer "$OUT/teacher" --save "$DATA" \
  --rounds "$ROUND" --max_prompt_length "$MAX_PROMPT"

SFT=(--type sft --data_dir "$DATA/$ROUND" --epochs "$EPOCHS" --batch_size "$BATCH" --gradient_accumulation_steps 1
     --lr "$LR" --warmup_iters 5 --max_prompt_length "$MAX_PROMPT" --save_interval 20)
echo "== teacher SFT -> $OUT/teacher_sft"
launch anli_reverse_kl/train.py "${SFT[@]}" --model_path "$OUT/teacher" --save "$OUT/teacher_sft"
echo "== student SFT (MiniLLM's initialisation and the SFT baseline) -> $OUT/sft"
launch anli_reverse_kl/train.py "${SFT[@]}" --model_path "$OUT/student" --save "$OUT/sft"
echo "== KD baseline (word-level, kd_ratio 0.5) -> $OUT/kd"
launch anli_reverse_kl/train.py "${SFT[@]}" --type kd --kd_ratio 0.5 --model_path "$OUT/student" \
  --teacher_model_path "$OUT/teacher_sft/model" --save "$OUT/kd"
echo "== SeqKD baseline: teacher outputs -> $OUT/seqkd_data, then SFT on them -> $OUT/seqkd"
launch anli_reverse_kl/generate_data.py --teacher_model_path "$OUT/teacher_sft/model" --data_dir "$DATA/$ROUND" \
  --save "$OUT/seqkd_data" --max_new_tokens "$MAX_NEW"
launch anli_reverse_kl/train.py "${SFT[@]}" --type seqkd --data_dir "$OUT/seqkd_data" --model_path "$OUT/student" \
  --save "$OUT/seqkd"
echo "== MiniLLM (teacher-mixed rollouts, alpha 0.2; from the SFT student) -> $OUT/minillm"
launch anli_reverse_kl/train.py --type minillm --model_path "$OUT/sft/model" --teacher_model_path "$OUT/teacher_sft/model" \
  --data_dir "$DATA/$ROUND" --save "$OUT/minillm" --total_iters "$TOTAL_ITERS" --num_rollouts 16 --chunk_size 8 \
  --batch_size "$BATCH" --gradient_accumulation_steps 1 --ppo_epochs 2 --lr 1e-3 --max_new_tokens "$MAX_NEW" \
  --max_prompt_length "$MAX_PROMPT" --save_interval 1

RUNS=()
for run in teacher_sft sft kd seqkd minillm; do
  echo "== eval $run -> $OUT/eval/$run"
  launch anli_reverse_kl/eval.py run --model_path "$OUT/$run/model" --data_dir "$DATA" --rounds "$ROUND" \
    --save "$OUT/eval/$run" --max_new_tokens "$MAX_NEW"
  RUNS+=("--$run" "$OUT/eval/$run")
done
echo "== comparison (stand-in data, tiny random models: a pipeline check, not ANLI results)"
python anli_reverse_kl/eval.py compare "${RUNS[@]}" | tee "$OUT/comparison.md"
