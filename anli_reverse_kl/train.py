"""Train a Flan-T5 student on ANLI: SFT, word-level KD, SeqKD or MiniLLM (spec §3); causal LMs take the same
paths (MiniLLM on a decoder-only pair is LMOps' original setting).

    python anli_reverse_kl/train.py --type sft --model_path google/flan-t5-large --data_dir processed/r1 --save runs/sft
    python anli_reverse_kl/train.py --type kd --model_path ... --teacher_model_path runs/teacher/model ...
    python anli_reverse_kl/train.py --type seqkd --data_dir runs/seqkd_data/r1 ...     # generate_data.py output
    python anli_reverse_kl/train.py --type minillm --model_path runs/sft/model --teacher_model_path ... ...
    torchrun --nproc_per_node 8 anli_reverse_kl/train.py ...                             # data parallel

`--data_dir` is one round's folder written by prepare_data.py (items prompt ⟂ target ⟂ ...); a causal LM reads
prompt + target as one sequence, and the EOS that prepare_data closes each prompt with (the T5 encoder's end) is
left off. Losses, per target token (the targets are aligned with the logits, so position t scores target t):
  sft / seqkd  r·CE(first target token) + (1 - r)·CE(other target tokens), r = --loss_ratio; each term a
               mean over the whole optimiser step (its first tokens, its other tokens)
  kd           (1 - λ)·CE + λ·soft-CE(p, q), λ = --kd_ratio, token mean
  minillm      per iteration: --num_rollouts prompts, decoder samples from (1 - α) q + α p in chunks of
               --chunk_size, scored once (minillm.py); then --ppo_epochs passes over the shuffled store in
               minibatches of --batch_size x --gradient_accumulation_steps per rank, each an optimiser step on
               L_pg [+ L_reg with --single_step_reg] [+ lm_coef·((1 - λ) CE + λ soft-CE) on a --lm_data_dir batch]

Checkpoints under --save/checkpoints (common.hf_training; sft/kd/seqkd every --save_interval optimiser
steps, minillm after every --save_interval rollout iterations); rerunning the same command resumes from the
last one. The weights at each of these points also go to --save/step-N (N = optimiser steps; from_pretrained
folders, as MiniLLM saves every save_interval), the final ones to --save/model; --save/log.jsonl gets one line
per optimiser step.
"""
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire
import torch

from anli_reverse_kl.minillm import minillm_loss, sample_responses, score_rollouts, store_fields
from anli_reverse_kl.prepare_data import read_items
from common import hf
from common.distributed import all_reduce_dp, dp_group, print0, rank_seed, setup, shutdown
from common.hf_training import (autocast, export_model, grad_scaler, grad_sync, load_checkpoint, lr_schedule,
                                optimizer_step, save_checkpoint, unwrap, wrap_ddp)
from common.io import append_jsonl, atomic_write_json, read_jsonl, write_jsonl
from common.labels import causal_lm_batch, seq2seq_batch, targets_and_mask
from common.losses import cross_entropy, soft_cross_entropy
from common.training import Throughput, dp_shard, global_count

TYPES = ("sft", "kd", "seqkd", "minillm")
# per-type defaults (spec §3: the fork's scripts; MiniLLM's where the fork is silent). None in a flag = this.
DEFAULTS = {
    "sft": dict(lr=9e-5, optimizer="adafactor", batch_size=12, gradient_accumulation_steps=6, epochs=5,
                warmup_iters=1000, weight_decay=0.01, clip_grad=0.9, lr_decay_style="cosine", max_len=350),
    "minillm": dict(lr=7e-5, optimizer="adamw", batch_size=12, gradient_accumulation_steps=6, total_iters=100,
                    warmup_iters=0, weight_decay=1e-6, clip_grad=1.0, lr_decay_style="constant", max_len=360),
}
DEFAULTS["kd"] = DEFAULTS["seqkd"] = DEFAULTS["sft"]


def check_models(student, teacher, student_tok, teacher_tok, model_path, teacher_path):
    """Teacher and student of one kind (both encoder-decoder or both causal) and one tokenizer for both (the
    rollouts and KD compare token by token)."""
    if teacher is None:
        return
    if hf.is_seq2seq(student) != hf.is_seq2seq(teacher):
        kind = {True: "an encoder-decoder", False: "a decoder-only"}
        raise ValueError(f"--teacher_model_path {teacher_path} is {kind[hf.is_seq2seq(teacher)]} model "
                         f"({type(teacher).__name__}) and --model_path {model_path} {kind[hf.is_seq2seq(student)]} "
                         f"one ({type(student).__name__}): give both of one kind")
    if student_tok.get_vocab() != teacher_tok.get_vocab() or \
            (student_tok.eos_token_id, student_tok.pad_token_id) != (teacher_tok.eos_token_id, teacher_tok.pad_token_id):
        raise ValueError(f"--teacher_model_path {teacher_path} and --model_path {model_path} have different "
                         f"tokenizers ({len(teacher_tok)} vs {len(student_tok)} tokens or different ids): use a "
                         f"teacher that shares the student's tokenizer (Flan-T5 sizes all do)")
    hf.check_vocab(student, teacher, student_tok)


def load_items(data_dir: str, max_prompt_length: int, max_len: int, prompt_eos: int = None) -> list:
    """(prompt, target) token lists of the train split; prompts over max_prompt_length are dropped (MiniLLM),
    targets cut to max_len tokens. `prompt_eos`: an id to take off the end of each prompt (a causal LM's)."""
    items = read_items(data_dir, "train")
    prompts = [it["prompt"][:-1] if it["prompt"][-1:] == [prompt_eos] else it["prompt"] for it in items]
    kept = [(p, it["target"][:max_len]) for p, it in zip(prompts, items) if len(p) <= max_prompt_length]
    print0(f"{data_dir}: {len(kept)} train items ({len(items) - len(kept)} prompts over {max_prompt_length} tokens "
           f"dropped)")
    if not kept:
        raise ValueError(f"--data_dir {data_dir}: no train item has a prompt within --max_prompt_length "
                         f"{max_prompt_length}")
    return kept


def item_order(n: int, position: int, count: int, seed: int) -> list:
    """Indices `position .. position + count` of an endless stream of epochs, each a permutation seeded by
    (seed, epoch): a resumed run finds its place from the position alone."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset:offset + count - len(out)]
    return out


def make_optimizer(model, name: str, lr: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adafactor":  # the fork's: a fixed lr, no relative step or parameter scaling
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "adamw":  # MiniLLM's
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    raise ValueError(f"--optimizer must be adafactor or adamw, got {name!r}")


def to_batch(pairs, tok, start_id, device) -> dict:
    """(prompt, target) pairs -> model inputs, targets and mask; start_id None: a causal LM (prompt + target)."""
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    if start_id is None:
        batch = causal_lm_batch(prompts, targets, pad_id=tok.pad_token_id)
    else:
        batch = seq2seq_batch(prompts, targets, pad_id=tok.pad_token_id, decoder_start_id=start_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["targets"], batch["mask"] = targets_and_mask(batch.pop("labels"), shift=start_id is None)
    return batch


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "decoder_input_ids",
                                  "decoder_attention_mask") if k in batch}


def first_token_masks(mask):
    """(each row's first counted position, the others)."""
    first = mask & (mask.cumsum(1) == 1)
    return first, mask & ~first


def sft_loss(logits, batch, loss_ratio, n_first, n_rest):
    """r·CE(first target token) + (1 - r)·CE(other target tokens), each divided by its whole-step count."""
    first, rest = first_token_masks(batch["mask"])
    return (loss_ratio * cross_entropy(logits, target_ids=batch["targets"], mask=first, normalizer=max(n_first, 1))
            + (1 - loss_ratio) * cross_entropy(logits, target_ids=batch["targets"], mask=rest,
                                               normalizer=max(n_rest, 1)))


def kd_loss(logits, teacher_logits, batch, kd_ratio, n_tokens):
    """(1 - λ)·CE + λ·soft-CE(p, q) per target token, divided by the whole step's target tokens."""
    ce = cross_entropy(logits, target_ids=batch["targets"], mask=batch["mask"], normalizer=max(n_tokens, 1))
    kd = soft_cross_entropy(logits, teacher_logits, mask=batch["mask"], normalizer=max(n_tokens, 1))
    return (1 - kd_ratio) * ce + kd_ratio * kd


def train(type: str = "sft", model_path: str = None, teacher_model_path: str = None, data_dir: str = None,
          save: str = None, lr: float = None, optimizer: str = None, batch_size: int = None,
          gradient_accumulation_steps: int = None, epochs: int = None, total_iters: int = None,
          warmup_iters: int = None, weight_decay: float = None, clip_grad: float = None, lr_decay_style: str = None,
          max_len: int = None, max_prompt_length: int = 320, loss_ratio: float = 0.8, kd_ratio: float = 0.5,
          ppo_epochs: int = 2, num_rollouts: int = 32, chunk_size: int = 16, teacher_mixed_alpha: float = 0.2,
          gamma: float = 0.95, reward_scaling: float = 0.5, cliprange_reward: float = 100.0, cliprange: float = 0.2,
          length_norm: bool = True, single_step_reg: bool = False, lm_data_dir: str = None, lm_coef: float = 1.0,
          max_new_tokens: int = 180, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          dtype: str = "float32", save_interval: int = 500, seed: int = 10):
    if type not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {type!r}")
    for flag, value in (("--model_path", model_path), ("--data_dir", data_dir), ("--save", save)):
        if value is None:
            raise ValueError(f"{flag} is required")
    if type in ("kd", "minillm") and teacher_model_path is None:
        raise ValueError(f"--type {type} needs --teacher_model_path")
    if type == "seqkd" and not os.path.exists(os.path.join(data_dir, "seqkd.json")):
        raise ValueError(f"--type seqkd: {data_dir} holds no teacher outputs (no seqkd.json); write them with "
                         f"anli_reverse_kl/generate_data.py and pass its --save folder as --data_dir")
    cfg = dict(DEFAULTS[type])
    cfg.update({k: v for k, v in dict(lr=lr, optimizer=optimizer, batch_size=batch_size, epochs=epochs,
                                      gradient_accumulation_steps=gradient_accumulation_steps, total_iters=total_iters,
                                      warmup_iters=warmup_iters, weight_decay=weight_decay, clip_grad=clip_grad,
                                      lr_decay_style=lr_decay_style, max_len=max_len).items() if v is not None})
    lay = setup(seed)
    os.makedirs(save, exist_ok=True)
    tok = hf.load_tokenizer(model_path)
    model = hf.load_model(model_path, dtype="float32", device=lay.device)
    teacher = teacher_tok = None
    if type in ("kd", "minillm"):
        teacher = hf.load_model(teacher_model_path, device=lay.device, frozen=True, flag="--teacher_model_path")
        teacher_tok = hf.load_tokenizer(teacher_model_path, flag="--teacher_model_path")
    check_models(model, teacher, tok, teacher_tok, model_path, teacher_model_path)
    model.train()
    start_id = model.config.decoder_start_token_id if hf.is_seq2seq(model) else None
    prompt_eos = None if hf.is_seq2seq(model) else tok.eos_token_id
    items = load_items(data_dir, max_prompt_length, cfg["max_len"], prompt_eos)
    lm_items = load_items(lm_data_dir, max_prompt_length, cfg["max_len"], prompt_eos) if lm_data_dir else None

    accum, per_rank = cfg["gradient_accumulation_steps"], cfg["batch_size"]
    if type == "minillm":
        total_steps = cfg["total_iters"]
    else:
        per_step = per_rank * accum * lay.dp_size
        steps_per_epoch = math.ceil(len(items) / per_step)
        total_steps = cfg["epochs"] * steps_per_epoch
    opt = make_optimizer(model, cfg["optimizer"], cfg["lr"], cfg["weight_decay"])
    scheduler = lr_schedule(opt, cfg["lr_decay_style"], cfg["warmup_iters"], total_steps)
    scaler = grad_scaler(dtype, lay.device)
    state = load_checkpoint(save, lay, model, opt, scheduler, scaler) or {"step": 0, "iteration": 0}
    if lay.is_main:
        atomic_write_json(dict(cfg, type=type, model_path=model_path, teacher_model_path=teacher_model_path,
                               data_dir=data_dir, dp_size=lay.dp_size, total_steps=total_steps),
                          os.path.join(save, "args.json"))
    print0(f"{type}: {total_steps} optimiser steps, {len(items)} items, dp {lay.dp_size}, resuming at step "
           f"{state['step']}")
    ddp = wrap_ddp(model, lay)
    log_path = os.path.join(save, "log.jsonl")
    if lay.is_main and os.path.exists(log_path):  # a resumed run redoes the steps after its checkpoint
        write_jsonl([r for r in read_jsonl(log_path, drop_partial_last=True) if r["step"] <= state["step"]], log_path)
    group = dp_group() if lay.dp_size > 1 else None

    def log(step, values):
        values = dict(step=step, lr=opt.param_groups[0]["lr"], **values)
        if lay.is_main:
            append_jsonl(log_path, values)
        print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    def lm_batches(step, n_micro):
        """This rank's --lm_data_dir micro-batches for optimiser step `step` (MiniLLM's PT term)."""
        order = item_order(len(lm_items), step * per_rank * accum * lay.dp_size, per_rank * accum * lay.dp_size,
                           seed + 1)
        mine = dp_shard([lm_items[i] for i in order], lay.dp_rank, lay.dp_size)
        return [to_batch(mine[k * per_rank:(k + 1) * per_rank], tok, start_id, lay.device) for k in range(n_micro)]

    def backward_step(micro, loss_fn):
        """One optimiser step over `micro` batches: loss_fn(batch) -> (loss, terms) already divided by the
        step's global counts; returns the summed terms."""
        sums = {}
        for k, batch in enumerate(micro):
            with grad_sync(ddp, k == len(micro) - 1):
                with autocast(dtype, lay.device):
                    loss, terms = loss_fn(batch)
                scaler.scale(loss).backward()
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        return sums

    def export_steps():
        if state["step"] < total_steps:  # the last weights go to --save/model
            export_model(unwrap(ddp), tok, os.path.join(save, f"step-{state['step']}"), lay)

    meter = Throughput()
    if type != "minillm":
        while state["step"] < total_steps:
            step = state["step"]
            epoch, k = divmod(step, steps_per_epoch)
            order = item_order(len(items), epoch * len(items) + k * per_step, min(per_step, len(items) - k * per_step),
                               seed)
            mine = dp_shard([items[i] for i in order], lay.dp_rank, lay.dp_size)
            micro = [to_batch(mine[j:j + per_rank], tok, start_id, lay.device) for j in range(0, len(mine), per_rank)]
            n_first = global_count(sum(int(first_token_masks(b["mask"])[0].sum()) for b in micro), lay.device)
            n_tok = global_count(sum(int(b["mask"].sum()) for b in micro), lay.device)

            def loss_fn(batch):
                logits = ddp(**model_inputs(batch)).logits
                if type == "kd":
                    with torch.no_grad():
                        teacher_logits = teacher(**model_inputs(batch)).logits
                    loss = kd_loss(logits, teacher_logits, batch, kd_ratio, n_tok)
                else:
                    loss = sft_loss(logits, batch, loss_ratio, n_first, n_tok - n_first)
                return loss, dict(loss=loss.detach())

            sums = backward_step(micro, loss_fn)
            meter.add(int(n_tok))
            grad_norm = optimizer_step(opt, scheduler, scaler, cfg["clip_grad"])
            state["step"] = step + 1
            loss = all_reduce_dp(torch.tensor(sums["loss"], device=lay.device)).item()
            log(state["step"], dict(epoch=epoch, loss=loss, grad_norm=grad_norm, tokens_per_s=meter.rate()))
            if state["step"] % save_interval == 0 or state["step"] == total_steps:
                save_checkpoint(save, state, lay, model, opt, scheduler, scaler, tok)
                export_steps()
    else:
        settings = dict(alpha=teacher_mixed_alpha, gamma=gamma, reward_scaling=reward_scaling,
                        reward_clip=cliprange_reward, length_norm=length_norm)
        while state["step"] < total_steps:
            it = state["iteration"]
            # rollouts: this rank's share of the iteration's prompts, sampled in chunks
            order = item_order(len(items), it * num_rollouts, num_rollouts, seed)
            prompts = [items[i][0] for i in dp_shard(order, lay.dp_rank, lay.dp_size)]
            t0, responses = time.perf_counter(), []
            for c in range(0, len(prompts), chunk_size):
                responses += sample_responses(unwrap(ddp), teacher, prompts[c:c + chunk_size],
                                              max_new_tokens=max_new_tokens, alpha=teacher_mixed_alpha,
                                              temperature=temperature, top_k=top_k, top_p=top_p,
                                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                              seed=rank_seed(seed, it * 100003 + c, lay.dp_rank))
            elapsed = time.perf_counter() - t0
            store = score_rollouts(unwrap(ddp), teacher, prompts, responses, pad_id=tok.pad_token_id,
                                   batch_size=chunk_size, group=group, **settings)
            mask = store["mask"]
            sums = all_reduce_dp(torch.stack([(store["rewards"] * mask).sum(), mask.sum().float()]))
            w = store["weights"][mask]
            w_range = torch.stack([w.min(), -w.max()])
            if lay.dp_size > 1:
                torch.distributed.all_reduce(w_range, op=torch.distributed.ReduceOp.MIN, group=group)
            rollout_log = dict(iteration=it, reward=(sums[0] / sums[1]).item(), w_min=w_range[0].item(),
                               w_max=-w_range[1].item(), response_tokens=int(sums[1]),
                               rollout_tokens_per_s=sums[1].item() / max(elapsed, 1e-9))
            # PPO epochs over the shuffled store, each minibatch (x accumulation) an optimiser step
            n = mask.shape[0]
            g = torch.Generator().manual_seed(seed * 100003 + it)
            for _ in range(ppo_epochs):
                perm = torch.randperm(n, generator=g).tolist()
                for s in range(0, n, per_rank * accum):
                    if state["step"] >= total_steps:
                        break
                    rows = perm[s:s + per_rank * accum]
                    micro = [{k: store[k][rows[j:j + per_rank]] for k in store_fields(store)}
                             for j in range(0, len(rows), per_rank)]
                    if lm_items:
                        for batch, lm in zip(micro, lm_batches(state["step"], len(micro))):
                            batch["lm"] = lm
                    n_resp = global_count(sum(int(b["mask"].sum()) for b in micro), lay.device)
                    n_lm = global_count(sum(int(b["lm"]["mask"].sum()) for b in micro), lay.device) if lm_items else 0

                    def loss_fn(batch):
                        terms = minillm_loss(ddp, teacher, batch, clip_range=cliprange,
                                             single_step_reg=single_step_reg, normalizer=max(n_resp, 1))
                        if "lm" in batch:
                            logits = ddp(**model_inputs(batch["lm"])).logits
                            with torch.no_grad():
                                teacher_logits = teacher(**model_inputs(batch["lm"])).logits
                            terms["pt"] = kd_loss(logits, teacher_logits, batch["lm"], kd_ratio, n_lm)
                            terms["loss"] = terms["loss"] + lm_coef * terms["pt"]
                        return terms["loss"], {k: v.detach() for k, v in terms.items()}

                    sums = backward_step(micro, loss_fn)
                    meter.add(int(n_resp))
                    grad_norm = optimizer_step(opt, scheduler, scaler, cfg["clip_grad"])
                    state["step"] += 1
                    terms = all_reduce_dp(torch.tensor(list(sums.values()), device=lay.device)).tolist()
                    log(state["step"], dict(rollout_log, **dict(zip(sums, terms)), grad_norm=grad_norm,
                                            tokens_per_s=meter.rate()))
            state["iteration"] = it + 1
            if state["iteration"] % save_interval == 0 or state["step"] >= total_steps:
                save_checkpoint(save, state, lay, model, opt, scheduler, scaler, tok)
                export_steps()
    export_model(unwrap(ddp), tok, os.path.join(save, "model"), lay)
    print0(f"saved {os.path.join(save, 'model')}")
    shutdown()


if __name__ == "__main__":
    fire.Fire(train)
