"""MCC-KD training (Chen et al., Findings of EMNLP 2023): CoT fine-tuning on two rationales of each question
plus a consistency term between the student's answer distributions under the two.

    torchrun --nproc_per_node 8 mcc_kd/train_mcc.py --task GSM8K --ckpt_dir CKPT --save_dir SAVE \
        --train_file data/GSM8K/train-multi-cots.json --label_file data/GSM8K/test.json \
        --model_type lora-llama-1-7b --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 --epochs 24 \
        --use_float16 True

Per item a random pair (i, j) of its filtered rationales, redrawn each time the item is seen:

    L = ½ (CE(x, r_i) + CE(x, r_j)) + α · KL_span            (mcc_kd.md §1; KL_span = losses.md §4.1)

KL_span compares the student's token distributions at the answer span of r_i and of r_j (`indices`, made by
prepare_data.py), softened by T on both sides, both sides trained, mean over span tokens then over items.
The loop, checkpoints, evaluation and selection are train.py's.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file (torchrun mcc_kd/train_mcc.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.cli import run_cli
from common.losses import mcc_span_kl
from common.parallel import tp_group
from mcc_kd.data import IGNORE_INDEX, collate, encode_example, logit_spans
from mcc_kd.train import (choose, computed_lengths, loss_mode, rows_of, run_training,
                          sequence_cross_entropy_sum)


def mcc_batch(items, idx, epoch, tokenizer, cfg):
    """Batch a (rationale i of every item) stacked on batch b (rationale j), with their answer spans as the
    logit positions that predict the answer tokens (the file's convention, cfg.indices, converted here)."""
    examples, spans = [[], []], [[], []]
    for item_id in idx:
        item = items[item_id]
        at_logits = logit_spans(item["indices"], cfg.indices)
        for side, k in enumerate(choose(len(item["output"]), 2, cfg.seed, epoch, item_id)):
            examples[side].append(encode_example(tokenizer, item["instruction"], item["output"][k], cfg.max_seq_len,
                                                 cfg.chat_template))
            spans[side].append(at_logits[k])
    tokens, labels = collate(examples[0] + examples[1], tokenizer.pad_id)
    spans_a, spans_b = torch.tensor(spans[0]), torch.tensor(spans[1])
    usable = ((spans_a[:, 1] < cfg.max_seq_len) & (spans_b[:, 1] < cfg.max_seq_len)).sum()  # as mcc_span_kl skips
    counts = {"sequences": int(((labels != IGNORE_INDEX).sum(1) > 0).sum()), "span_items": int(usable)}
    return {"tokens": tokens, "labels": labels, "spans_a": spans_a, "spans_b": spans_b, "counts": counts}


def mcc_loss(model, batch, norms, cfg):
    n = batch["spans_a"].shape[0]
    spans = torch.cat([batch["spans_a"], batch["spans_b"]])  # one pass over the 2B sequences: a then b
    hidden = model.hidden(batch["tokens"], lengths=computed_lengths(batch["labels"], spans))
    with loss_mode(hidden):
        logits = model.head_logits(hidden)  # computed by each loss on the rows it reads
        ce = sequence_cross_entropy_sum(logits, batch["labels"]) / norms["sequences"]  # = ½(CE_a + CE_b), item means
        kl = mcc_span_kl(rows_of(logits, 0, n), rows_of(logits, n, 2 * n), spans_a=batch["spans_a"],
                         spans_b=batch["spans_b"], temperature=cfg.T, max_seq_len=cfg.max_seq_len,
                         normalizer=norms["span_items"], group=tp_group())
    return ce + cfg.alpha * kl, {"ce": ce, "kl": kl}, hidden


def main(task: str, ckpt_dir: str, save_dir: str, train_file: str, label_file: str, model_type: str = None,
         dev_file: str = None, log_dir: str = "log", tokenizer_file: str = None, max_seq_len: int = 512,
         max_batch_size: int = 2, accumulation_steps: int = 2, eval_batch_size: int = 24, lr: float = 1e-5,
         epochs: int = 12, alpha: float = 0.01, T: float = 1.3, lora_rank: int = 64, lora_alpha: float = None,
         use_float16: bool = False, use_bfloat16: bool = False, seed: int = None, tp_size: int = None,
         save_steps: int = 7200, shuffle: bool = False, chat_template: bool = False, indices: str = None,
         config_file: str = None, selection: str = "best"):
    """MCC-KD; flags as the original's train_mcc.py, defaults as the author's scripts (mcc_kd.md §3.3, §4).
    `indices` is the train file's convention ("logits" or "tokens"): by default what its sidecar records
    ("logits" without one); given, the sidecar must say the same."""
    run_training(SimpleNamespace(**locals()), mcc_batch, mcc_loss, multi_cot=True)


if __name__ == "__main__":
    run_cli(main)
