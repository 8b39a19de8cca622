#!/usr/bin/env bash
# The paper's setting (author scripts, v1; mcc_kd.md §4): LLaMA-7B, LoRA r 64 at scale 1 with fp32 adapters on an
# fp16 base, Adam lr 1e-5 constant, 12 epochs, MCC batch 2 questions x accumulation 2 (SFT 1 x 4), alpha 0.01,
# T 1.3, max_seq_len 512, best epoch on dev, reported on test.
#   CKPT_DIR=/path/llama-7b-split TASK=SVAMP NPROC=1 bash mcc_kd/scripts/paper_llama7b.sh
# CKPT_DIR holds consolidated.*.pth split for NPROC ranks (python -m common.checkpoint_split ... --n NPROC),
# params.json and tokenizer.model.
set -euo pipefail
: "${CKPT_DIR:?set CKPT_DIR to a checkpoint folder in our layout}"
export CKPT_DIR TASK=${TASK:-SVAMP} NPROC=${NPROC:-1} MODEL_TYPE=lora-llama-1-7b
export LORA_RANK=64 LR=1e-5 EPOCHS=12 ALPHA=0.01 T=1.3 MAX_SEQ_LEN=512 EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-24}
export PRECISION="--use_float16 True"
exec bash "$(dirname "$0")/../run.sh"
