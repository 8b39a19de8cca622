#!/usr/bin/env bash
# RWKVinLLAMA end to end: teacher server + 2 DDP trainers, stage 1 (hidden alignment) then stage 2 (0.1 KL +
# 1 CE), then held-out perplexity of the teacher, the hybrid before distillation, after stage 1 and stage 2.
#
#   bash rwkv_llama/run.sh           tiny CPU demo, no downloads (a few minutes on 2 cores): a random 4-layer
#                                    Llama teacher (tests/tiny.py), layers 0 and 2 replaced, the C4 stand-in
#                                    (data/rwkv_llama/c4_standin, en + gsm8k). Numbers mean nothing.
#   REAL=1 bash rwkv_llama/run.sh    SmolLM2-135M-Instruct (common.pretrained, cached in $MODEL_DIR) as the
#                                    teacher; in layers 2 7 12 17 22 27 of its 30 the attention is replaced by
#                                    the RWKV-6 time-mix (is_rwkv_att_only: the Llama norms and MLP stay), the
#                                    UltraChat stand-in (Dolly conversations), stage 1 then stage 2, one server
#                                    + 1 trainer; one table (held-out perplexity and KL(teacher || model)) with the
#                                    times (9-12 CPU-minutes: 5-10 min on 2 idle cores).
# Settings can be overridden from the environment (STEPS1=50 LAYERS='[0,1]' MODE=block bash rwkv_llama/run.sh).
# MODE: block (full RWKV block, fresh LayerNorms), llama_ffn, att_only (spec §1.1).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${REAL:-}" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  NPROC=${NPROC:-2}        # trainers (one teacher group: the server is rank NPROC of it)
  OUT=${OUT:-runs/rwkv_llama-tiny}
  TEACHER=$OUT/teacher
  : "${LAYERS:=[0,2]}" "${MODE:=block}" "${HEAD_SIZE:=8}" "${LEN:=64}" "${BSZ:=4}" "${STEPS1:=40}" "${STEPS2:=40}"
  : "${LR1:=3e-3}" "${LR2:=1e-3}" "${WARMUP:=0}" "${GRAD_CP:=1}" "${VAL_BATCHES:=8}" "${EVAL_BATCHES:=$VAL_BATCHES}"
  : "${DTYPE:=}"           # train.py's default: float32 on a CPU, bfloat16 on a GPU
  DATA=(--c4_data data/rwkv_llama/c4_standin --languages '[en,gsm8k]')
  EVAL_DATA=("${DATA[@]}")
  mkdir -p "$OUT"
  [ -f "$TEACHER/config.json" ] || python -c "from tests.tiny import save_tiny; save_tiny('llama', '$TEACHER', num_hidden_layers=4)"
else
  # the server and one trainer take turns (the trainer waits for the teacher), each with both cores
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  NPROC=${NPROC:-1}
  OUT=${OUT:-runs/rwkv_llama-smollm2}
  MODEL_DIR=${MODEL_DIR:-${KDZOO_CACHE:-$HOME/.cache/kdzoo}/models/smollm2-135m-instruct}
  TEACHER=$MODEL_DIR
  # full RWKV blocks (MODE=block) start at perplexity ~1e7 on SmolLM2: their fresh LayerNorms pass its
  # massive activations (|h| up to 2.5e4) into relu^2; att_only keeps the Llama norms and starts near 32
  : "${LAYERS:=[2,7,12,17,22,27]}" "${MODE:=att_only}" "${HEAD_SIZE:=64}" "${LEN:=128}" "${BSZ:=4}"
  : "${STEPS1:=20}" "${STEPS2:=30}" "${LR1:=1e-3}" "${LR2:=5e-4}" "${WARMUP:=3}" "${GRAD_CP:=0}"
  : "${VAL_BATCHES:=2}" "${EVAL_BATCHES:=12}"
  : "${DTYPE:=bfloat16}"  # the fast KD step: the student under bf16 autocast (README "Benchmarks")
  DATA=(--train_data data/rwkv_llama/ultrachat_standin/train.jsonl
        --val_data data/rwkv_llama/ultrachat_standin/validation.jsonl)
  EVAL_DATA=(--val_data data/rwkv_llama/ultrachat_standin/validation.jsonl)
  mkdir -p "$OUT"
  echo "== teacher: SmolLM2-135M-Instruct -> $TEACHER"
  python -m common.pretrained fetch --name smollm2-135m-instruct --save_path "$TEACHER"
fi
case "$MODE" in
  block) LLAMA_FFN=False; ATT_ONLY=False ;; llama_ffn) LLAMA_FFN=True; ATT_ONLY=False ;;
  att_only) LLAMA_FFN=False; ATT_ONLY=True ;;
  *) echo "MODE=$MODE: must be block, llama_ffn or att_only" >&2; exit 1 ;;
esac

cat > "$OUT/hybrid.yaml" <<YAML
RWKV:
  layers: $LAYERS
Llama:
  model_id: $TEACHER
kl_weight: 0.1
ce_weight: 1
model_file: hybrid
teach_mode:
  is_client: True
  nccl_file: $OUT/nccl.txt
  is_hidden_align: True
  num_groups: 1
is_sft: False
is_llama_ffn: $LLAMA_FFN
is_rwkv_att_only: $ATT_ONLY
is_all_labels_kl: False
YAML

SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true' EXIT
stage() {  # stage NAME HIDDEN(true|false) STEPS LR [extra train flags]: server in the background, torchrun trainers
  local name=$1 hidden=$2 steps=$3 lr=$4; shift 4
  local hiddens=(); [ "$hidden" = true ] && hiddens=(--output_all_hiddens)
  rm -f "$OUT/nccl.txt_0"   # never let trainers read a file from an earlier run
  python -m rwkv_llama.teacher_server --model_id "$TEACHER" --batch "$BSZ" --length "$LEN" --size $((NPROC + 1)) \
    "${hiddens[@]}" --nccl_id_file "$OUT/nccl.txt_0" --backend gloo --request_timeout_s 600 &
  SERVER=$!
  local t0=$SECONDS
  torchrun --standalone --nproc_per_node "$NPROC" -m rwkv_llama.train --config_file "$OUT/hybrid.yaml" \
    --is_hidden_align "$hidden" "${DATA[@]}" --max_seq_length "$LEN" --micro_bsz "$BSZ" --max_steps "$steps" \
    --lr_init "$lr" --lr_final "$lr" --warmup_steps "$WARMUP" --head_size "$HEAD_SIZE" --grad_cp "$GRAD_CP" \
    --val_check_interval 20 ${DTYPE:+--dtype "$DTYPE"} \
    --max_val_batches "$VAL_BATCHES" --log_every_n_steps 20 --output_dir "$OUT/$name" "$@"
  wait "$SERVER"; SERVER=""
  echo $((SECONDS - t0)) > "$OUT/$name/seconds"
}

echo "== stage 1: hidden-state alignment -> $OUT/stage1"
stage stage1 true "$STEPS1" "$LR1"
echo "== stage 2: 0.1 KL + 1 CE from stage 1 -> $OUT/stage2"
stage stage2 false "$STEPS2" "$LR2" --ckpt_file "$OUT/stage1/student.safetensors"

echo "== held-out perplexity and KL to the teacher (one process: teacher, hybrid before distillation, after stage 1, after stage 2)"
python - "$OUT" "$TEACHER" "$LAYERS" "$MODE" "$LEN" "$BSZ" "$EVAL_BATCHES" "$HEAD_SIZE" "${EVAL_DATA[@]}" <<'PY'
import json, os, sys
from rwkv_llama.eval import main as evaluate
out, teacher, layers, mode, length, bsz, batches, head_size, *data = sys.argv[1:]
data = dict(zip([d.lstrip("-") for d in data[::2]], data[1::2]))
if "languages" in data:
    data["languages"] = data["languages"].strip("[]").split(",")
runs = [("teacher", "teacher", {}), ("init", "hybrid before distillation", dict(layers=json.loads(layers), mode=mode)),
        ("stage1", "after stage 1", dict(ckpt_file=f"{out}/stage1/student.safetensors")),
        ("stage2", "after stage 2", dict(ckpt_file=f"{out}/stage2/student.safetensors"))]
lines = ["| model | held-out perplexity | held-out KL(teacher ‖ model) | training time | eval time |", "|---|---|---|---|---|"]
for name, label, extra in runs:
    evaluate(teacher, **extra, **data, max_seq_length=int(length), micro_bsz=int(bsz), max_batches=int(batches),
             head_size=int(head_size), label=label, output_dir=f"{out}/eval/{name}")
    m = json.load(open(f"{out}/eval/{name}/metrics.json"))
    secs = open(f"{out}/{name}/seconds").read().strip() + " s" if name.startswith("stage") else "-"
    kl = f"{m['kl_to_teacher']:.4f}" if "kl_to_teacher" in m else "-"
    lines.append(f"| {label} | {m['perplexity']:,.3f} | {kl} | {secs} | {m['seconds']:.0f} s |")
print(f"\nlayers {layers} ({mode}), {m['tokens']} held-out label tokens\n" + "\n".join(lines))
PY
