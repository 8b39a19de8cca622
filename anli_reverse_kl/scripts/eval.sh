#!/usr/bin/env bash
# Every model of one round on dev and test of all three rounds (spec §4): label-constrained and generation
# accuracy, token-level accuracy, Rouge-L of reasons; one table. Greedy decoding; for the fork's sampled
# decoding add: --do_sample True --top_p 0.9 --temperature 0.7 --repetition_penalty 1.15
source "$(dirname "$0")/common.sh"
RUNS=()
for run in teacher_xl_sft sft_large kd_large seqkd_large minillm_large_xl; do
  [ -d "$RESULTS/$ROUND/$run/model" ] || continue
  launch anli_reverse_kl/eval.py run --model_path "$RESULTS/$ROUND/$run/model" --data_dir "$PROCESSED" \
    --rounds r1,r2,r3 --splits dev,test --save "$RESULTS/$ROUND/eval/$run" --batch_size 32 --max_new_tokens 180
  RUNS+=("--$run" "$RESULTS/$ROUND/eval/$run")
done
python anli_reverse_kl/eval.py compare "${RUNS[@]}" | tee "$RESULTS/$ROUND/eval/comparison.md"
