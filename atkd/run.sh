#!/usr/bin/env bash
# ATKD end to end: SFT teacher -> offline teacher data (generate_data.py) -> student distilled (train.py) -> eval.py.
#
#   bash atkd/run.sh            tiny CPU demo, no downloads (a few minutes on 2 cores): a byte-level BPE tokenizer
#                               trained on the Alpaca-GPT4 STAND-IN (data/atkd/, Dolly dev items), random tiny OPT
#                               teacher and student; the teacher is briefly fine-tuned, then distilled with atkd.
#                               Numbers mean nothing.
#   REAL=1 bash atkd/run.sh     teacher SmolLM2-135M-Instruct (python -m common.pretrained), student = its first
#                               STUDENT_LAYERS layers; teacher data on the stand-in; the student distilled with atkd
#                               and with forward KD; one ROUGE-L table (teacher, student before / after each).
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
SAMPLE=${SAMPLE:-teacher}
if [ -z "${REAL:-}" ]; then
  OUT=${OUT:-runs/atkd-tiny}
  : "${N_ITEMS:=128}" "${N_GEN:=96}" "${MAX_LEN:=256}" "${GEN_TOKENS:=48}" "${EVAL_ITEMS:=16}" "${EVAL_SETS:=dolly,vicuna}"
  : "${SFT_EPOCHS:=6}" "${SFT_LR:=3e-3}" "${KD_EPOCHS:=3}" "${KD_LR:=2e-3}" "${BSZ:=8}"
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
  : "${N_ITEMS:=256}" "${N_GEN:=64}" "${MAX_LEN:=384}" "${GEN_TOKENS:=64}" "${EVAL_ITEMS:=32}" "${EVAL_SETS:=dolly}"
  : "${SFT_EPOCHS:=0}" "${KD_EPOCHS:=1}" "${KD_LR:=1e-4}" "${BSZ:=4}" "${STUDENT_LAYERS:=10}"
  METHODS=${METHODS:-atkd forward}
  TEACHER_INIT=$OUT/smollm2-135m-instruct
  [ -f "$TEACHER_INIT/SOURCE.md" ] || python -m common.pretrained fetch --name smollm2-135m-instruct --save_path "$TEACHER_INIT"
  STUDENT_INIT=$OUT/student-init
  if [ ! -f "$STUDENT_INIT/config.json" ]; then
    echo "== student: the teacher's first $STUDENT_LAYERS layers -> $STUDENT_INIT"
    python -m common.hf keep_layers --model_path "$TEACHER_INIT" --save_path "$STUDENT_INIT" \
      --layers "$(seq -s, 0 $((STUDENT_LAYERS - 1)))"
  fi
  EVAL_FLAGS=(--max_new_tokens "$GEN_TOKENS" --max_items "$EVAL_ITEMS" --sets "$EVAL_SETS")
fi

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
    --gradient_accumulation_steps 1 --model_max_length "$MAX_LEN" --logging_steps 8 --warmup_ratio 0.03
fi

GEN=$OUT/generated/alpaca_generated_data.jsonl
echo "== offline teacher outputs for $N_GEN items (generate_data.py) -> $GEN"
python -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:int(sys.argv[3])], open(sys.argv[2],'w'))" \
  "$DATA" "$OUT/gen_items.json" "$N_GEN"
python atkd/generate_data.py --teacher_model_path "$TEACHER" --data_path "$OUT/gen_items.json" \
  --output_path "$GEN" --max_new_tokens "$GEN_TOKENS"

echo "== evaluate teacher and student before distillation"
python atkd/eval.py --model_path "$TEACHER" --output_dir "$OUT/eval/teacher" "${EVAL_FLAGS[@]}"
python atkd/eval.py --model_path "$STUDENT_INIT" --output_dir "$OUT/eval/student-init" "${EVAL_FLAGS[@]}"

for KL in $METHODS; do
  echo "== distil: --kl_method $KL --sample_source $SAMPLE -> $OUT/$KL"
  python atkd/train.py --student_model_path "$STUDENT_INIT" --teacher_model_path "$TEACHER" --data_path "$GEN" \
    --output_dir "$OUT/$KL" --kl_method "$KL" --sample_source "$SAMPLE" --num_train_epochs "$KD_EPOCHS" \
    --learning_rate "$KD_LR" --per_device_train_batch_size "$BSZ" --gradient_accumulation_steps 1 \
    --model_max_length "$MAX_LEN" --logging_steps "${LOG_STEPS:-4}"
  python atkd/eval.py --model_path "$OUT/$KL/model" --output_dir "$OUT/eval/$KL" "${EVAL_FLAGS[@]}"
done

echo "== ROUGE-L (stand-in data; not paper numbers)"
python - "$OUT/eval" teacher student-init $METHODS <<'PY'
import json, sys
from pathlib import Path
root, names = Path(sys.argv[1]), sys.argv[2:]
results = {n: json.loads((root / n / "results.json").read_text()) for n in names}
sets = list(results[names[0]])
print("| model | " + " | ".join(sets) + " |")
print("|---|" + "---|" * len(sets))
for n in names:
    label = {"teacher": "teacher", "student-init": "student before KD"}.get(n, f"student after {n}")
    print(f"| {label} | " + " | ".join(f"{results[n][s]['rougeL']:.2f}" for s in sets) + " |")
PY
