#!/usr/bin/env bash
# The evaluation protocol (contra_kd.md §4) on every set and 5 seeds for one checkpoint folder.
#   bash $0 CKPT_PATH [PAPER_PAIR=gpt2|openllama2|llama2] [NPROC]
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT=$1; PAIR=${2:-gpt2}; NPROC=${3:-1}
torchrun --standalone --nproc_per_node "$NPROC" contra_kd/eval.py --model-path "$CKPT" --save "$CKPT/eval" \
  --sets dolly,self-inst,vicuna,sinst --seeds 10,20,30,40,50 --batch-size 8 --max-length 512 \
  --max-prompt-length 256 --paper-pair "$PAIR" $( [ -f "$CKPT/../metrics.jsonl" ] && echo --metrics "$CKPT/../metrics.jsonl" )
