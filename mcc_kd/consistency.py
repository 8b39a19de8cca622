"""Held-out answer consistency, the quantity MCC-KD trains: on questions never trained on, each with several
filtered teacher rationales (prepare_data.py filter), the student's symmetric KL between its answer-span
distributions under two rationales of the same question (mcc_span_kl at temperature T, as train_mcc.py's term),
averaged over the question's pairs. Lower = the answer the model predicts depends less on which rationale led
to it.

    python mcc_kd/consistency.py --task SVAMP --ckpt_dir CKPT --file runs/x/heldout-multi-cots.json \
        --lora_dir runs/x/mcc/epoch-003 --lora_rank 16 --chat_template True --log_dir runs/x/mcc/log

Teacher-forced, no sampling: deterministic for given weights. Writes log_dir/<task>-<stem>-consistency-
predictions.json ({index, instruction, label, pairs, kl} per question) and -consistency-metrics.json
({N, mean_kl, T}).
"""
import itertools
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun mcc_kd/consistency.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from tqdm import tqdm

from common.cli import UserError, check_choice, check_range, run_cli
from common.losses import mcc_span_kl
from common.parallel import Layout, dp_group, shutdown
from common.training import load_weights
from mcc_kd.answers import check_task
from mcc_kd.data import INDICES, collate, encode_example, load_task_file, logit_spans, sidecar_indices
from mcc_kd.eval import build_model, split_name, write_results


@torch.no_grad()
def span_consistency(model, tokenizer, items: list, T: float, max_seq_len: int, batch_size: int, lay: Layout,
                     chat: bool = False, indices: str = "logits", max_rationales: int = 3) -> list[dict]:
    """Per question (sharded over DP groups, gathered): the mean over pairs of its first `max_rationales`
    rationales of mcc_span_kl between the two answer spans' logits."""
    model.eval()
    device = next(model.parameters()).device
    mine = list(range(lay.dp_rank, len(items), lay.dp_size))
    sequences = [(i, k) for i in mine for k in range(min(len(items[i]["output"]), max_rationales))]
    at_span = {}  # (question, rationale) -> fp32 logits at its answer span [L, V]
    for start in tqdm(range(0, len(sequences), batch_size), desc="consistency", disable=not lay.is_main, leave=False):
        chunk = sequences[start:start + batch_size]
        examples = [encode_example(tokenizer, items[i]["instruction"], items[i]["output"][k], max_seq_len, chat)
                    for i, k in chunk]
        tokens, _ = collate(examples, tokenizer.pad_id)
        spans = [logit_spans(items[i]["indices"], indices)[k] for i, k in chunk]
        # the positions up to each span's end, and the head on the span rows only
        hidden = model.hidden(tokens.to(device), lengths=torch.tensor([end for _, end in spans]))
        for b, ((i, k), (begin, end)) in enumerate(zip(chunk, spans)):
            at_span[i, k] = gather_from_model_parallel_region(model.head(hidden[b, begin:end])).float()
    records = []
    for i in mine:
        k = min(len(items[i]["output"]), max_rationales)
        kls = [mcc_span_kl(at_span[i, x][None], at_span[i, y][None], spans_a=[[0, len(at_span[i, x])]],
                           spans_b=[[0, len(at_span[i, y])]], temperature=T).item()
               for x, y in itertools.combinations(range(k), 2)]
        records.append({"index": i, "instruction": items[i]["instruction"], "label": items[i]["label"],
                        "pairs": len(kls), "kl": sum(kls) / len(kls)})
    if lay.dp_size > 1:
        gathered = [None] * lay.dp_size
        dist.all_gather_object(gathered, records, group=dp_group())
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return records


def main(task: str, ckpt_dir: str, file: str, model_type: str = None, lora_dir: str = None, lora_rank: int = -1,
         lora_alpha: float = None, tokenizer_file: str = None, T: float = 1.3, max_rationales: int = 3,
         eval_batch_size: int = 24, max_seq_len: int = 512, log_dir: str = "log", tp_size: int = None,
         use_float16: bool = False, use_bfloat16: bool = False, seed: int = None, chat_template: bool = False,
         indices: str = None, config_file: str = None):
    """Held-out consistency of a base checkpoint, or with trained weights from `lora_dir`, on an MCC file of
    questions the model was not trained on (`file`, with `indices` made for this tokenizer and prompt format)."""
    check_task(task)
    indices = indices or sidecar_indices(file) or "logits"  # as train_mcc: the file's own convention
    check_choice("--indices", indices, INDICES)
    check_range("--max_rationales", max_rationales, low=2)  # a pair at least
    for flag, value in (("--eval_batch_size", eval_batch_size), ("--max_seq_len", max_seq_len)):
        check_range(flag, value, low=1)
    load_task_file(file, multi_cot=True)  # a bad file fails before the model loads
    if lora_dir is not None and not os.path.isdir(lora_dir):
        raise UserError(f"--lora_dir {lora_dir}: no such folder (an epoch-* folder of a train.py --save_dir)")
    lay, model, tokenizer = build_model(ckpt_dir, model_type, lora_rank, lora_alpha, tokenizer_file, max_seq_len,
                                        eval_batch_size, tp_size, use_float16, use_bfloat16, seed, config_file)
    items = load_task_file(file, multi_cot=True, tokenizer=tokenizer, chat=chat_template, indices=indices)
    if lora_dir is not None:
        load_weights(lora_dir, model, lay)
    records = span_consistency(model, tokenizer, items, T, max_seq_len, eval_batch_size, lay, chat_template, indices,
                               max_rationales)
    metrics = {"N": len(records), "mean_kl": sum(r["kl"] for r in records) / len(records), "T": T,
               "max_rationales": max_rationales}
    write_results(log_dir, task, f"{split_name(file)}-consistency", records, metrics, lay,
                  summary=f"mean span KL (T {T}) {metrics['mean_kl']:.4f}")
    shutdown()


if __name__ == "__main__":
    run_cli(main)
