"""MCC-KD evaluation (mcc_kd.md §5): greedy chain-of-thought generation, final-answer accuracy over all items.

    torchrun --nproc_per_node N mcc_kd/eval.py --task GSM8K --ckpt_dir CKPT --model_type lora-llama-1-7b \
        --lora_dir SAVE/best --lora_rank 64 --label_file data/GSM8K/test.json --eval_batch_size 24

Prompt [BOS] + instruction, greedy, total length <= max_seq_len, output cut at the first EOS. Accuracy =
correct / N over all N items; items with no extractable answer count as wrong and are reported as
`missing`. Writes log_dir/<task>-<split>-predictions.json and log_dir/<task>-<split>-metrics.json.
"""
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun mcc_kd/eval.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire
import torch
import torch.distributed as dist
from tqdm import tqdm

from common.generation import generate
from common.parallel import Layout, dp_group, print0
from mcc_kd.answers import check_task, extract_answer, is_correct
from mcc_kd.data import load_task_file, prompt_ids


@torch.no_grad()
def evaluate(model, tokenizer, items: list, task: str, eval_batch_size: int, max_seq_len: int, lay: Layout):
    """Greedy answers for `items`, sharded over DP groups and gathered; returns (records, metrics) on every rank."""
    check_task(task)
    mine = list(range(lay.dp_rank, len(items), lay.dp_size))
    records = []
    batches = range(0, len(mine), eval_batch_size)
    for start in tqdm(batches, desc=f"eval {task}", disable=not lay.is_main, leave=False):
        idx = mine[start:start + eval_batch_size]
        prompts = [prompt_ids(tokenizer, items[i]["instruction"]) for i in idx]
        outputs = generate(model, prompts, max_new_tokens=None, temperature=0.0, eos_id=tokenizer.eos_id,
                           max_seq_len=max_seq_len, pad_id=tokenizer.pad_id)
        for i, new in zip(idx, outputs):
            text = tokenizer.decode(new)
            predict = extract_answer(text, task)
            records.append({"index": i, "instruction": items[i]["instruction"], "output": text, "predict": predict,
                            "label": items[i]["label"], "correct": is_correct(predict, items[i]["label"], task)})
    if lay.dp_size > 1:
        gathered = [None] * lay.dp_size
        dist.all_gather_object(gathered, records, group=dp_group())
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    n = len(records)
    correct = sum(r["correct"] for r in records)
    metrics = {"N": n, "correct": correct, "missing": sum(r["predict"] is None for r in records),
               "accuracy": correct / n if n else 0.0}
    return records, metrics


def write_results(log_dir: str, task: str, split: str, records: list, metrics: dict, lay: Layout) -> None:
    if not lay.is_main:
        return
    os.makedirs(log_dir, exist_ok=True)
    stem = os.path.join(log_dir, f"{task}-{split}")
    with open(f"{stem}-predictions.json", "w") as f:
        json.dump(records, f, indent=2, ensure_ascii=False)
    with open(f"{stem}-metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    print0(f"| {task} {split} | N {metrics['N']} | correct {metrics['correct']} | missing {metrics['missing']} "
           f"| accuracy {100 * metrics['accuracy']:.2f} |  -> {stem}-predictions.json")


def split_name(path: str) -> str:
    return Path(path).stem


def main(task: str, ckpt_dir: str, label_file: str, model_type: str = None, lora_dir: str = None,
         lora_rank: int = -1, lora_alpha: float = None, tokenizer_file: str = None, eval_batch_size: int = 24,
         max_seq_len: int = 512, log_dir: str = "log", tp_size: int = None, use_float16: bool = False,
         use_bfloat16: bool = False, seed: int = None):
    """Evaluate a base checkpoint, optionally with trained weights from `lora_dir` (a train.py save folder)."""
    from mcc_kd.train import build_model  # the same model construction as training

    lay, model, tokenizer = build_model(ckpt_dir, model_type, lora_rank, lora_alpha, tokenizer_file,
                                        max_seq_len, eval_batch_size, tp_size, use_float16, use_bfloat16, seed)
    if lora_dir is not None:
        from common.training import load_weights
        load_weights(lora_dir, model, lay)
    items = load_task_file(label_file)
    records, metrics = evaluate(model, tokenizer, items, task, eval_batch_size, max_seq_len, lay)
    write_results(log_dir, task, split_name(label_file), records, metrics, lay)


if __name__ == "__main__":
    fire.Fire(main)
