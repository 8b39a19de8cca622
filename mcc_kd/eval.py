"""MCC-KD evaluation (mcc_kd.md §5): greedy chain-of-thought generation, final-answer accuracy over all items.

    torchrun --nproc_per_node N mcc_kd/eval.py --task GSM8K --ckpt_dir CKPT --model_type lora-llama-1-7b \
        --lora_dir SAVE/best --lora_rank 64 --label_file data/GSM8K/test.json --eval_batch_size 24

Prompt [BOS] + instruction (or the chat template, --chat_template True), greedy, total length <= max_seq_len
(a longer prompt is cut, with a warning, as the original), output cut at the first EOS. Accuracy =
correct / N over all N items; items with no extractable answer count as wrong and are reported as
`missing`. Writes log_dir/<task>-<split>-predictions.json and log_dir/<task>-<split>-metrics.json.

`build_model` (process setup, tokenizer, model shard) lives here and train.py imports it with `evaluate`,
so the folder reads data -> answers -> eval -> train -> train_mcc without a cycle.
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun mcc_kd/eval.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.cli import UserError, check_range, run_cli
from common.generation import generate
from common.io import atomic_write_json
from common.model import load_model, model_args
from common.parallel import Layout, dp_group, print0, setup, shutdown
from common.tokenizer import load_tokenizer
from common.training import load_weights
from mcc_kd.answers import check_task, extract_answer, is_correct
from mcc_kd.data import fit_prompt, load_task_file


def build_model(ckpt_dir, model_type, lora_rank, lora_alpha, tokenizer_file, max_seq_len, max_batch_size,
                tp_size, use_float16, use_bfloat16, seed, config_file=None):
    """Process setup, tokenizer and this rank's model shard. The architecture comes from `config_file` (a
    params.json, as the original's --config_file), else ckpt_dir/params.json if present, else `model_type`.
    The tokenizer is `tokenizer_file`, else the checkpoint folder's own (tokenizer.model or an HF tokenizer.json)."""
    if config_file is not None and not os.path.isfile(config_file):
        raise UserError(f"--config_file {config_file}: no such file (a params.json)")
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"--ckpt_dir {ckpt_dir}: no such checkpoint folder (convert one with "
                        f"`python -m common.checkpoint_split --ckpt_file MODEL --save_path {ckpt_dir}`)")
    if use_float16 and use_bfloat16:
        raise UserError("--use_float16 and --use_bfloat16 exclude each other; pass one of them")
    for flag, value in (("--max_seq_len", max_seq_len), ("--eval_batch_size", max_batch_size)):
        check_range(flag, value, low=1)
    dtype = "float16" if use_float16 else "bfloat16" if use_bfloat16 else "float32"
    if model_type is not None:
        model_args(model_type, lora_rank=lora_rank)  # a known type, and `lora-` iff lora_rank > 0
    try:
        tokenizer = load_tokenizer(tokenizer_file or ckpt_dir)
    except UserError as e:
        raise UserError(f"{e}; pass --tokenizer_file" if tokenizer_file is None else str(e)) from None
    lay = setup(tp_size=tp_size, seed=1 if seed is None else seed, dtype=dtype)
    if lora_rank <= 0 and dtype == "float16":
        print0("warning: full fine-tuning in fp16: Adam's eps=1e-8 underflows (the original's setting)")
    has_params = config_file is not None or os.path.exists(os.path.join(ckpt_dir, "params.json"))
    model = load_model(ckpt_dir, model_type=None if has_params else model_type, lora_rank=lora_rank, dtype=dtype,
                       max_seq_len=max_seq_len, max_batch_size=max_batch_size, lora_alpha=lora_alpha,
                       params_file=config_file)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model in {ckpt_dir} "
                        f"only {model.args.vocab_size}: pass the checkpoint's own --tokenizer_file")
    return lay, model, tokenizer


def eval_prompt(tokenizer, instruction: str, max_seq_len: int, chat: bool = False) -> list[int]:
    """The prompt, cut to max_seq_len - 1 tokens (room for one answer token) with a warning, as the original;
    a chat prompt loses user text, never its assistant header (`fit_prompt`)."""
    return fit_prompt(tokenizer, instruction, max_seq_len - 1, chat)


@torch.no_grad()
def evaluate(model, tokenizer, items: list, task: str, eval_batch_size: int, max_seq_len: int, lay: Layout,
             chat: bool = False):
    """Greedy answers for `items`, sharded over DP groups and gathered; returns (records, metrics) on every rank."""
    check_task(task)
    mine = list(range(lay.dp_rank, len(items), lay.dp_size))
    records = []
    batches = range(0, len(mine), eval_batch_size)
    for start in tqdm(batches, desc=f"eval {task}", disable=not lay.is_main, leave=False):
        idx = mine[start:start + eval_batch_size]
        prompts = [eval_prompt(tokenizer, items[i]["instruction"], max_seq_len, chat) for i in idx]
        # left padding: one prefill for the whole batch (prompt lengths differ)
        outputs = generate(model, prompts, max_new_tokens=None, temperature=0.0, eos_id=tokenizer.eos_id,
                           max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, padding="left")
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


def write_results(log_dir: str, task: str, split: str, records: list, metrics: dict, lay: Layout,
                  summary: str = None) -> None:
    """log_dir/<task>-<split>-predictions.json and -metrics.json, and one line (`summary`, else the accuracy)."""
    if not lay.is_main:
        return
    os.makedirs(log_dir, exist_ok=True)
    stem = os.path.join(log_dir, f"{task}-{split}")
    atomic_write_json(records, f"{stem}-predictions.json")  # the summary reads these: never a torn file
    atomic_write_json(metrics, f"{stem}-metrics.json")
    summary = summary or (f"correct {metrics['correct']} | missing {metrics['missing']} | accuracy "
                          f"{100 * metrics['accuracy']:.2f}")
    print0(f"| {task} {split} | N {metrics['N']} | {summary} |  -> {stem}-predictions.json")


def split_name(path: str) -> str:
    return Path(path).stem


def main(task: str, ckpt_dir: str, label_file: str, model_type: str = None, lora_dir: str = None,
         lora_rank: int = -1, lora_alpha: float = None, tokenizer_file: str = None, eval_batch_size: int = 24,
         max_seq_len: int = 512, log_dir: str = "log", tp_size: int = None, use_float16: bool = False,
         use_bfloat16: bool = False, seed: int = None, chat_template: bool = False, config_file: str = None):
    """Evaluate a base checkpoint, optionally with trained weights from `lora_dir` (a train.py save folder)."""
    check_task(task)
    items = load_task_file(label_file)
    if lora_dir is not None and not os.path.isdir(lora_dir):
        raise UserError(f"--lora_dir {lora_dir}: no such folder (an epoch-* folder of a train.py --save_dir)")
    lay, model, tokenizer = build_model(ckpt_dir, model_type, lora_rank, lora_alpha, tokenizer_file,
                                        max_seq_len, eval_batch_size, tp_size, use_float16, use_bfloat16, seed,
                                        config_file)
    if lora_dir is not None:
        load_weights(lora_dir, model, lay)
    records, metrics = evaluate(model, tokenizer, items, task, eval_batch_size, max_seq_len, lay, chat_template)
    write_results(log_dir, task, split_name(label_file), records, metrics, lay)
    shutdown()


if __name__ == "__main__":
    run_cli(main)
