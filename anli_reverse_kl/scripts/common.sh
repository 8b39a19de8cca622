# Shared settings of the paper-scale scripts (sourced). Flan-T5-XL teacher, Flan-T5-large student, one ANLI
# round per run (ROUND=r1|r2|r3), NPROC GPUs on this node. Model folders are local (nothing is downloaded):
# put the Hugging Face checkpoints google/flan-t5-xl and google/flan-t5-large under CKPT_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROUND=${ROUND:-r1}
NPROC=${NPROC:-8}
CKPT_DIR=${CKPT_DIR:-checkpoints}
TEACHER_BASE=${TEACHER_BASE:-$CKPT_DIR/flan-t5-xl}
STUDENT_BASE=${STUDENT_BASE:-$CKPT_DIR/flan-t5-large}
ANLI_DIR=${ANLI_DIR:-data/anli/plain_text}          # facebook/anli parquet files ({split}_{round}-*.parquet)
PROCESSED=${PROCESSED:-processed_data/anli/flan-t5}
RESULTS=${RESULTS:-results/anli_reverse_kl}
TEACHER=${TEACHER:-$RESULTS/$ROUND/teacher_xl_sft/model}
SFT_STUDENT=${SFT_STUDENT:-$RESULTS/$ROUND/sft_large/model}
declare -A SFT_LR=([r1]=9e-5 [r2]=7e-5 [r3]=1e-4)  # the fork's per-round SFT learning rates
launch() { torchrun --standalone --nproc_per_node "$NPROC" "$@"; }
