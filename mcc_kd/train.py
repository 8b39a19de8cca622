"""Std-CoT fine-tuning: the student learns one random teacher rationale per question (MCC-KD's SFT baseline).

    torchrun --nproc_per_node 8 mcc_kd/train.py --task GSM8K --ckpt_dir CKPT --save_dir SAVE \
        --train_file data/GSM8K/train.json --label_file data/GSM8K/test.json --model_type lora-llama-1-7b \
        --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 --epochs 24 --use_float16 True

This file holds the whole loop; `train_mcc.py` reuses it with its own batch and loss. Per optimiser step:
  1. the step's micro-batches are fixed by the data position (items are not shuffled by default, as the
     original); randomness (which rationale) comes from a generator keyed on (seed, epoch, item), so every TP
     rank of a DP group builds the same batch and a resumed run makes the same choices;
  2. the loss is normalised by the number of sequences in the whole step, summed over micro-batches and DP
     ranks (item-mean CE, v1): splitting a step into micro-batches never changes it;
  3. Adam with a constant lr, no warmup, no clipping, no loss scaling (v1); DP gradients are summed.
After each epoch the dev file is evaluated and the best epoch kept; at the end the best weights are
reloaded and `label_file` (the test set) evaluated. `--selection last` skips the per-epoch evaluation and
scores the last epoch's weights on `label_file` (no choice made on any evaluated file). Checkpoints every `save_steps` steps and each epoch;
re-running the same command resumes from the last one.
"""
import contextlib
import os
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file (torchrun mcc_kd/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from tqdm import tqdm

from common.cli import check_choice, check_range, run_cli
from common.losses import HeadLogits, compiled_chunks, cross_entropy
from common.parallel import print0, shutdown, tp_group
from common.training import (Throughput, average_gradients, dp_shard, global_count, load_latest_checkpoint,
                             load_weights, save_checkpoint, save_weights)
from mcc_kd.answers import check_task
from mcc_kd.data import IGNORE_INDEX, INDICES, collate, encode_example, load_task_file, rationales, sidecar_indices
from mcc_kd.eval import build_model, evaluate, split_name, write_results

SELECTIONS = ("best", "last")  # the weights reported on label_file: best epoch on dev (v1), or the last one
CHUNK_SIZE = 128  # rows of [V] logits at a time in the losses


def sequence_cross_entropy_sum(logits, labels):
    """Σ over sequences of the mean -log q(label) over that sequence's supervised tokens (labels pre-shifted).
    logits: [B, S, V], or the model's `head_logits` (the head then runs on the supervised rows only, in chunks)."""
    supervised = labels != IGNORE_INDEX
    n = supervised.sum(1)
    if not n.any():
        return cross_entropy(logits, target_ids=labels, mask=supervised, group=tp_group())  # 0 with a graph
    return sum(cross_entropy(rows_of(logits, b), target_ids=labels[b:b + 1], mask=supervised[b:b + 1],
                             chunk_size=CHUNK_SIZE, normalizer=n[b], group=tp_group())
               for b in n.nonzero().flatten().tolist())


def rows_of(logits, start: int, end: int = None):
    """logits[start:end] (one row when end is None), for logits or a HeadLogits."""
    end = start + 1 if end is None else end
    if not isinstance(logits, HeadLogits):
        return logits[start:end]
    hidden, weight = zip(*logits.terms)
    return HeadLogits(tuple(h[start:end] for h in hidden), weight, logits.bias)


def computed_lengths(labels, *spans):
    """Per row, the positions a loss reads: up to the last supervised label and the end of any span (a later
    position cannot change an earlier one under causal attention, so the model skips them)."""
    at = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(labels != IGNORE_INDEX, at, -1).amax(1) + 1
    for span in spans:
        last = torch.maximum(last, span[:, 1].to(last.device).clamp(max=labels.shape[1]))
    return last


@contextlib.contextmanager
def loss_mode(hidden):
    """The head's matmuls in the model's bf16/fp16 (fp32 adapters cast once per loss call), losses in fp32, each
    chunk's loss and logit gradient one compiled kernel where the vocabulary is wide (SmolLM2's 49152: 1.17x the
    LoRA step of 8 layers, benchmarks/train_step.py; tiny vocabularies stay eager)."""
    low = hidden.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(hidden.device.type, dtype=hidden.dtype, enabled=low), compiled_chunks():
        yield


def choose(n: int, k: int, seed: int, epoch: int, item: int) -> list:
    """k distinct rationale positions out of n, the same on every rank and on resume."""
    return random.Random(f"{seed}-{epoch}-{item}").sample(range(n), k)


# ---- Std-CoT: one random rationale per question ----

def sft_batch(items, idx, epoch, tokenizer, cfg):
    examples = []
    for i in idx:
        outputs = rationales(items[i])
        pick = choose(len(outputs), 1, cfg.seed, epoch, i)[0]
        examples.append(encode_example(tokenizer, items[i]["instruction"], outputs[pick], cfg.max_seq_len,
                                       cfg.chat_template))
    tokens, labels = collate(examples, tokenizer.pad_id)
    return {"tokens": tokens, "labels": labels, "counts": {"sequences": int(((labels != IGNORE_INDEX).sum(1) > 0).sum())}}


def sft_loss(model, batch, norms, cfg):
    hidden = model.hidden(batch["tokens"], lengths=computed_lengths(batch["labels"]))
    with loss_mode(hidden):
        ce = sequence_cross_entropy_sum(model.head_logits(hidden), batch["labels"]) / norms["sequences"]
    return ce, {"ce": ce}, hidden


# ---- the loop (shared with train_mcc.py) ----

def epoch_plan(n_items: int, epoch: int, cfg, lay) -> list:
    """This DP rank's optimiser steps for one epoch: a list of steps, each a list of micro-batches of item ids."""
    order = list(range(n_items))
    if cfg.shuffle:  # a deviation from the original (unshuffled), keyed on (seed, epoch)
        random.Random(f"{cfg.seed}-{epoch}-order").shuffle(order)
    mine = dp_shard(order, lay.dp_rank, lay.dp_size)
    micro = [mine[i:i + cfg.max_batch_size] for i in range(0, len(mine), cfg.max_batch_size)]
    return [micro[i:i + cfg.accumulation_steps] for i in range(0, len(micro), cfg.accumulation_steps)]


def run_training(cfg, make_batch, batch_loss, multi_cot: bool):
    check_task(cfg.task)  # --dev_file "": no dev file, the test file scored every epoch (HEAD)
    check_choice("--selection", cfg.selection, SELECTIONS)
    for flag in ("max_batch_size", "accumulation_steps", "epochs", "save_steps"):
        check_range(f"--{flag}", getattr(cfg, flag), low=1)
    if getattr(cfg, "indices", None) is not None:
        check_choice("--indices", cfg.indices, INDICES)
    cfg.seed = 1 if cfg.seed is None else cfg.seed
    if cfg.dev_file is None:
        beside = os.path.join(os.path.dirname(cfg.label_file), "dev.json")
        cfg.dev_file = beside if os.path.exists(beside) and os.path.abspath(beside) != os.path.abspath(cfg.label_file) else None
    if multi_cot and cfg.indices is None:  # the convention the file's sidecar records (prepare_data.py)
        cfg.indices = sidecar_indices(cfg.train_file) or "logits"
        print0(f"{cfg.train_file}: indices are {cfg.indices!r} positions")
    for f in (cfg.train_file, cfg.label_file, cfg.dev_file):  # a bad file fails before the model loads
        if f:
            load_task_file(f, train=f == cfg.train_file, multi_cot=multi_cot and f == cfg.train_file)
    lay, model, tokenizer = build_model(cfg.ckpt_dir, cfg.model_type, cfg.lora_rank, cfg.lora_alpha, cfg.tokenizer_file,
                                        cfg.max_seq_len, cfg.eval_batch_size, cfg.tp_size, cfg.use_float16,
                                        cfg.use_bfloat16, cfg.seed, cfg.config_file)
    items = load_task_file(cfg.train_file, multi_cot=multi_cot, train=True, tokenizer=tokenizer if multi_cot else None,
                           chat=cfg.chat_template, indices=getattr(cfg, "indices", "logits"))
    dev = load_task_file(cfg.dev_file) if cfg.dev_file and cfg.selection == "best" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    device = next(model.parameters()).device
    print0(f"{cfg.task}: {len(items)} training items, {sum(p.numel() for p in trainable):,} trainable parameters "
           f"(TP {lay.tp_size} x DP {lay.dp_size}); checkpoints and weights -> {cfg.save_dir}")

    state = load_latest_checkpoint(cfg.save_dir, model, optimizer, lay)
    if state is None:
        state = {"step": 0, "epoch": 0, "position": 0, "best_epoch": None, "best_accuracy": -1.0, "history": []}
    else:
        print0(f"resumed from step {state['step']} (epoch {state['epoch']}, step {state['position']} of the epoch)")

    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        plan = epoch_plan(len(items), epoch, cfg, lay)
        meter = Throughput()
        bar = tqdm(range(state["position"], len(plan)), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not lay.is_main)
        for s in bar:
            batches = [make_batch(items, idx, epoch, tokenizer, cfg) for idx in plan[s]]
            norms = {k: max(global_count(sum(b["counts"][k] for b in batches), device), 1.0) for k in batches[0]["counts"]}
            logs = {}
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss, parts, hidden = batch_loss(model, batch, norms, cfg)
                loss.backward()
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + v.item()
                meter.add(int((batch["tokens"] != tokenizer.pad_id).sum()))
            average_gradients(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["position"] = s + 1
            bar.set_postfix(**{k: f"{v:.4f}" for k, v in logs.items()}, lr=optimizer.param_groups[0]["lr"],
                            tok_s=f"{meter.rate():.0f}")
            if state["step"] % 100 == 0:  # as the original: what the model currently predicts for one example
                with torch.no_grad():
                    logits = gather_from_model_parallel_region(model.head(hidden[0][batch["labels"][0] != IGNORE_INDEX]))
                    print0(f"step {state['step']} argmax: {tokenizer.decode(logits.argmax(-1).tolist())!r}")
            if state["step"] % cfg.save_steps == 0 and state["position"] < len(plan):
                save_checkpoint(cfg.save_dir, model, optimizer, lay, state)

        # end of epoch: select on dev (or score the test file every epoch when there is no dev file), or keep
        # the last epoch unscored (selection "last")
        weights_dir = os.path.join(cfg.save_dir, f"epoch-{epoch + 1:03d}")
        save_weights(weights_dir, model, lay)
        if cfg.selection == "last":
            if lay.is_main and state["best_epoch"] is not None:
                shutil.rmtree(os.path.join(cfg.save_dir, f"epoch-{state['best_epoch']:03d}"), ignore_errors=True)
            state["best_epoch"], state["epoch"], state["position"] = epoch + 1, epoch + 1, 0
            save_checkpoint(cfg.save_dir, model, optimizer, lay, state)
            continue
        eval_file, eval_items = (cfg.dev_file, dev) if dev else (cfg.label_file, load_task_file(cfg.label_file))
        records, metrics = evaluate(model, tokenizer, eval_items, cfg.task, cfg.eval_batch_size, cfg.max_seq_len, lay,
                                    cfg.chat_template)
        write_results(cfg.log_dir, cfg.task, f"{split_name(eval_file)}-epoch{epoch + 1}", records, metrics, lay)
        state["history"].append({"epoch": epoch + 1, "file": eval_file, **metrics})
        if metrics["accuracy"] > state["best_accuracy"]:
            previous = state["best_epoch"]
            state["best_epoch"], state["best_accuracy"] = epoch + 1, metrics["accuracy"]
            if dev and previous is not None and lay.is_main:  # with a dev file only the best epoch is kept
                shutil.rmtree(os.path.join(cfg.save_dir, f"epoch-{previous:03d}"), ignore_errors=True)
        elif dev and lay.is_main:
            shutil.rmtree(weights_dir, ignore_errors=True)
        state["epoch"], state["position"] = epoch + 1, 0
        save_checkpoint(cfg.save_dir, model, optimizer, lay, state)

    best_dir = os.path.join(cfg.save_dir, f"epoch-{state['best_epoch']:03d}")
    if cfg.selection == "last":
        print0(f"last epoch {state['best_epoch']} (no selection); its weights: {best_dir}")
    else:
        print0(f"best epoch {state['best_epoch']} ({100 * state['best_accuracy']:.2f} on "
               f"{'dev' if dev else split_name(cfg.label_file)}); its weights: {best_dir}")
    if dev or cfg.selection == "last":
        load_weights(best_dir, model, lay)
        records, metrics = evaluate(model, tokenizer, load_task_file(cfg.label_file), cfg.task, cfg.eval_batch_size,
                                    cfg.max_seq_len, lay, cfg.chat_template)
        write_results(cfg.log_dir, cfg.task, split_name(cfg.label_file), records, metrics, lay)
    shutdown()


def main(task: str, ckpt_dir: str, save_dir: str, train_file: str, label_file: str, model_type: str = None,
         dev_file: str = None, log_dir: str = "log", tokenizer_file: str = None, max_seq_len: int = 512,
         max_batch_size: int = 1, accumulation_steps: int = 4, eval_batch_size: int = 24, lr: float = 1e-5,
         epochs: int = 12, lora_rank: int = 64, lora_alpha: float = None, use_float16: bool = False,
         use_bfloat16: bool = False, seed: int = None, tp_size: int = None, save_steps: int = 7200,
         shuffle: bool = False, chat_template: bool = False, config_file: str = None, selection: str = "best"):
    """Std-CoT fine-tuning; flags as the original's train.py, defaults as the author's SFT script (mcc_kd.md §3.3).
    selection "last" (ours): no per-epoch evaluation, the last epoch's weights scored on label_file."""
    run_training(SimpleNamespace(**locals()), sft_batch, sft_loss, multi_cot=False)


if __name__ == "__main__":
    run_cli(main)
