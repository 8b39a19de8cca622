#!/usr/bin/env bash
# ATKD end to end: SFT teacher -> offline teacher data (generate_data.py) -> student distilled (train.py) -> eval.py.
#
#   bash atkd/run.sh            tiny CPU demo, no downloads (a few minutes on 2 cores): a byte-level BPE tokenizer
#                               trained on the Alpaca-GPT4 STAND-IN (data/atkd/, Dolly dev items), random tiny OPT
#                               teacher and student; the teacher is briefly fine-tuned, then distilled with atkd.
#                               Numbers mean nothing.
#   REAL=1 bash atkd/run.sh     teacher SmolLM2-135M-Instruct (python -m common.pretrained), student = 10 of its 30
#                               blocks (STUDENT_LAYERS, the contra_kd REAL cut); prompts in the model's chat template;
#                               the student distilled with atkd and with forward KD on the stand-in's answers
#                               (--sample_source gt, the release's default), SEEDS training seeds each, the two
#                               methods side by side on one core each; greedy ROUGE-L on EVAL_ITEMS Dolly test items
#                               per model; one table with the per-seed means and a paired test across seeds and items
#                               (atkd vs forward, each vs the student before KD). Budget: 30 min on 2 idle cores
#                               (README "REAL=1" gives the measured time; KD_STEPS etc. trade time for power).
#   bash atkd/run.sh KL CUDA GPUS PORT TEACHER_SIZE STUDENT_SIZE PER_BSZ SETTING SAMPLE
#                               the paper's OPT setting on your checkpoints (atkd/scripts/distillation.sh), then
#                               atkd/scripts/evaluation.sh.
# Settings below can be overridden from the environment, e.g. STEPS=40 SAMPLE=student bash atkd/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -gt 0 ]; then
  bash atkd/scripts/distillation.sh "$@"
  bash atkd/scripts/evaluation.sh "$2" "$1" "$5" "$6" "${7:-1}" "${8:-vanilla}" "${9:-gt}"
  exit 0
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${DATA:-data/atkd/alpaca_gpt4_standin.json}
CHAT=()
if [ -z "${REAL:-}" ]; then
  OUT=${OUT:-runs/atkd-tiny}
  : "${N_ITEMS:=128}" "${N_GEN:=96}" "${MAX_LEN:=256}" "${GEN_TOKENS:=48}" "${EVAL_ITEMS:=16}" "${EVAL_SETS:=dolly,vicuna}"
  : "${SFT_EPOCHS:=6}" "${SFT_LR:=3e-3}" "${KD_EPOCHS:=3}" "${KD_LR:=2e-3}" "${BSZ:=8}" "${SEEDS:=42}" "${BF16:=False}"
  : "${SAMPLE:=teacher}" "${SIDE_BY_SIDE:=}"
  METHODS=${METHODS:-atkd}
  if [ ! -f "$OUT/student-init/config.json" ]; then
    echo "== tokenizer and random tiny OPT teacher / student -> $OUT"
    python - "$OUT" "$DATA" <<'PY'
import json, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

out, data = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
core = Tokenizer(models.BPE())
core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
core.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "</s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
core.train_from_iterator((f"{x['instruction']} {x['input']}\n{x['output']}" for x in data), trainer)
core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])  # OPT's BOS = EOS
tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="</s>")
for name, layers, width in (("teacher-init", 4, 128), ("student-init", 2, 64)):
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=width, ffn_dim=4 * width, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=width,
                    pad_token_id=0, bos_token_id=1, eos_token_id=1)
    OPTForCausalLM(cfg).save_pretrained(out / name)
    tok.save_pretrained(out / name)
PY
  fi
  TEACHER_INIT=$OUT/teacher-init
  STUDENT_INIT=$OUT/student-init
  EVAL_FLAGS=(--max_new_tokens "$GEN_TOKENS" --max_items "$EVAL_ITEMS" --sets "$EVAL_SETS")
else
  OUT=${OUT:-runs/atkd-smollm2}
  : "${N_ITEMS:=240}" "${N_GEN:=64}" "${MAX_LEN:=384}" "${GEN_TOKENS:=64}" "${EVAL_ITEMS:=200}" "${EVAL_SETS:=dolly}"
  : "${SFT_EPOCHS:=0}" "${KD_EPOCHS:=1}" "${KD_LR:=1e-4}" "${BSZ:=4}" "${SEEDS:=1 2 3}"
  : "${BF16:=True}"  # the fast KD step: bf16 teacher, student under bf16 autocast (README "Benchmarks")
  : "${SAMPLE:=gt}" "${SIDE_BY_SIDE:=1}" "${STUDENT_LAYERS:=0,1,2,3,21,23,25,27,28,29}"
  METHODS=${METHODS:-atkd forward}
  CHAT=(--chat_template True)  # the instruct teacher's own prompt format (the student is cut from it)
  TEACHER_INIT=$OUT/smollm2-135m-instruct
  [ -f "$TEACHER_INIT/SOURCE.md" ] || python -m common.pretrained fetch --name smollm2-135m-instruct --save_path "$TEACHER_INIT"
  STUDENT_INIT=$OUT/student-init
  if [ ! -f "$STUDENT_INIT/config.json" ]; then
    echo "== student: the teacher's blocks $STUDENT_LAYERS -> $STUDENT_INIT"
    python -m common.hf keep_layers --model_path "$TEACHER_INIT" --save_path "$STUDENT_INIT" --layers "$STUDENT_LAYERS"
  fi
fi
EVAL_FLAGS=(--max_new_tokens "$GEN_TOKENS" --max_items "$EVAL_ITEMS" --sets "$EVAL_SETS" --bf16 "$BF16" "${CHAT[@]}")

SUBSET=$OUT/train.json  # the first N_ITEMS stand-in items
python -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:int(sys.argv[3])], open(sys.argv[2],'w'))" \
  "$DATA" "$SUBSET" "$N_ITEMS"

TEACHER=$TEACHER_INIT
if [ "$SFT_EPOCHS" != 0 ]; then
  TEACHER=$OUT/teacher/model
  echo "== teacher SFT on the stand-in (train.py --kl_method seqkd --sample_source gt) -> $TEACHER"
  python atkd/train.py --student_model_path "$TEACHER_INIT" --teacher_model_path "$TEACHER_INIT" \
    --data_path "$SUBSET" --output_dir "$OUT/teacher" --kl_method seqkd --sample_source gt \
    --num_train_epochs "$SFT_EPOCHS" --learning_rate "$SFT_LR" --per_device_train_batch_size "$BSZ" \
    --gradient_accumulation_steps 1 --model_max_length "$MAX_LEN" --logging_steps 8 --warmup_ratio 0.03 "${CHAT[@]}"
fi

KD_DATA=$SUBSET
case "$SAMPLE" in teacher|mix_request_teacher)
  KD_DATA=$OUT/generated/alpaca_generated_data.jsonl
  echo "== offline teacher outputs for $N_GEN items (generate_data.py) -> $KD_DATA"
  python -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:int(sys.argv[3])], open(sys.argv[2],'w'))" \
    "$DATA" "$OUT/gen_items.json" "$N_GEN"
  python atkd/generate_data.py --teacher_model_path "$TEACHER" --data_path "$OUT/gen_items.json" \
    --output_path "$KD_DATA" --max_new_tokens "$GEN_TOKENS" --bf16 "$BF16" "${CHAT[@]}" ;;
esac

echo "== evaluate teacher and student before distillation"
python atkd/eval.py --model_path "$TEACHER" --output_dir "$OUT/eval/teacher" "${EVAL_FLAGS[@]}"
python atkd/eval.py --model_path "$STUDENT_INIT" --output_dir "$OUT/eval/student-init" "${EVAL_FLAGS[@]}"

distil() {  # distil KL SEED: train the student -> $OUT/KL-sSEED, evaluate it -> $OUT/eval/KL-sSEED
  python atkd/train.py --student_model_path "$STUDENT_INIT" --teacher_model_path "$TEACHER" --data_path "$KD_DATA" \
    --output_dir "$OUT/$1-s$2" --kl_method "$1" --sample_source "$SAMPLE" --num_train_epochs "$KD_EPOCHS" \
    --learning_rate "$KD_LR" --per_device_train_batch_size "$BSZ" --gradient_accumulation_steps 1 \
    --model_max_length "$MAX_LEN" --logging_steps "${LOG_STEPS:-4}" --seed "$2" --bf16 "$BF16" "${CHAT[@]}" &&
  python atkd/eval.py --model_path "$OUT/$1-s$2/model" --output_dir "$OUT/eval/$1-s$2" "${EVAL_FLAGS[@]}"
}
RUNS=()
for SEED in $SEEDS; do
  read -r -a KLS <<< "$METHODS"
  if [ -n "$SIDE_BY_SIDE" ] && [ "${#KLS[@]}" -gt 1 ]; then
    # all methods of this seed at once, one core each; all but the last in their own process groups (set -m),
    # so that a failure stops their python too (a plain kill of a backgrounded function reaches only its subshell)
    echo "== distil, seed $SEED: ${KLS[*]} side by side (--sample_source $SAMPLE; logs $OUT/<method>-s$SEED.log)"
    PIDS=()
    for KL in "${KLS[@]:0:${#KLS[@]}-1}"; do
      set -m; distil "$KL" "$SEED" > "$OUT/$KL-s$SEED.log" 2>&1 & PIDS+=($!); set +m
    done
    trap 'for p in "${PIDS[@]}"; do kill -TERM -- -"$p" 2>/dev/null || true; done' EXIT
    trap 'exit 130' INT; trap 'exit 143' TERM
    distil "${KLS[-1]}" "$SEED" > "$OUT/${KLS[-1]}-s$SEED.log" 2>&1 || { tail -n 20 "$OUT/${KLS[-1]}-s$SEED.log"; exit 1; }
    for i in "${!PIDS[@]}"; do wait "${PIDS[$i]}" || { tail -n 20 "$OUT/${KLS[$i]}-s$SEED.log"; exit 1; }; done
    trap - EXIT INT TERM
  else
    for KL in "${KLS[@]}"; do
      echo "== distil: --kl_method $KL --sample_source $SAMPLE --seed $SEED -> $OUT/$KL-s$SEED"
      distil "$KL" "$SEED"
    done
  fi
  for KL in "${KLS[@]}"; do RUNS+=("$KL-s$SEED"); done
done

echo "== ROUGE-L (stand-in data; not paper numbers)"
python - "$OUT/eval" "$METHODS" "${RUNS[@]}" <<'PY' | tee "$OUT/eval/table.md"
import json, statistics, sys
from pathlib import Path
from common.metrics import paired_test
root, methods, runs = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
def items(name, s):  # per-item ROUGE-L of one model on one set
    return [r["rougeL"] for r in json.loads((root / name / s / "predictions.json").read_text())]
sets = list(json.loads((root / "teacher" / "results.json").read_text()))
seeds = {m: [r for r in runs if r.rsplit("-s", 1)[0] == m] for m in methods}
print("| model | " + " | ".join(f"{s} ROUGE-L" for s in sets) + " | per seed |")
print("|---|" + "---|" * len(sets) + "---|")
for name, label in (("teacher", "teacher"), ("student-init", "student before KD")):
    print(f"| {label} | " + " | ".join(f"{statistics.fmean(items(name, s)):.2f}" for s in sets) + " | - |")
for m in methods:
    cells, per_seed = [], []
    for s in sets:
        means = [statistics.fmean(items(r, s)) for r in seeds[m]]
        sd = f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else ""
        cells.append(f"{statistics.fmean(means):.2f}{sd}")
        per_seed.append(" ".join(f"{x:.2f}" for x in means))
    print(f"| student after {m} ({len(seeds[m])} seeds) | " + " | ".join(cells) + f" | {'; '.join(per_seed)} |")
pairs = [(m, "student-init") for m in methods] + [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
print("\nPaired differences (mean over seeds and items; p: sign-flip permutation test over items, all seeds of an "
      "item flipped together):")
for a, b in pairs:
    for s in sets:
        xa = [items(r, s) for r in seeds[a]]
        xb = [items(r, s) for r in seeds[b]] if b in seeds else [items(b, s)] * len(xa)
        diff, p = paired_test(xa, xb)
        print(f"- {a} - {'student before KD' if b == 'student-init' else b} on {s}: {diff:+.2f} ROUGE-L (p {p:.3g}, "
              f"{len(xa[0])} items x {len(xa)} seeds)")
PY
