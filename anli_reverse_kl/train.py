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
  sft / seqkd  r·CE(first target token) + (1 - r)·CE(other target tokens), r = --loss_ratio; the first term a
               mean over the step's items; the second, as the fork's compute_class_reas_loss, a sum over the
               other tokens divided by items x (max_len - 1) (its labels padded with -100 to max_len count in
               the mean; --reason_mean fork), or a mean over the other tokens (--reason_mean tokens)
  kd           (1 - λ)·CE + λ·soft-CE(p, q), λ = --kd_ratio, token mean
  minillm      per iteration: --num_rollouts prompts, decoder samples from (1 - α) q + α p in chunks of
               --chunk_size, scored once (minillm.py); then --ppo_epochs passes over the shuffled store in
               minibatches of --batch_size x --gradient_accumulation_steps per rank, each an optimiser step on
               L_pg [+ L_reg with --single_step_reg] [+ lm_coef·((1 - λ) CE + λ soft-CE) on a --lm_data_dir batch];
               advantages whitened per minibatch over its padded [B, --max_new_tokens] entries as released
               (--whiten release) or once per store over response tokens (--whiten masked); log-probabilities
               at --temperature as released (the teacher's reward at 1)

--fast_kd (default) is the fast step of sft / kd / seqkd and of MiniLLM's PT term (common.hf_training.lm_logits):
the teacher under inference_mode (cast to --dtype), both models stopped before their (T5: scaled, tied) heads and
the losses computed KD_CHUNK_SIZE decoder positions at a time; --fast_kd false computes the full logits first.

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
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from anli_reverse_kl.minillm import WHITEN, minillm_loss, sample_responses, score_rollouts, store_fields
from anli_reverse_kl.prepare_data import read_items
from common import hf
from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES, all_reduce_dp, dp_group, print0, rank_seed, setup, shutdown, to_dtype
from common.hf_training import (KD_CHUNK_SIZE, autocast, export_model, gathered, grad_scaler, grad_sync, lm_logits,
                                load_checkpoint, load_device, lr_schedule, optimizer_step, save_checkpoint,
                                sharding_from_flag, unwrap, wrap_model)
from common.io import append_jsonl, atomic_write_json, read_jsonl, write_jsonl
from common.labels import causal_lm_batch, seq2seq_batch, targets_and_mask
from common.losses import compiled_chunks, cross_entropy, soft_cross_entropy
from common.training import Throughput, dp_shard, epoch_order, global_count

TYPES = ("sft", "kd", "seqkd", "minillm")
OPTIMIZERS = ("adafactor", "adamw")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
REASON_MEANS = ("fork", "tokens")
# per-type defaults (spec §3: the fork's scripts; MiniLLM's where the fork is silent). None in a flag = this.
DEFAULTS = {
    "sft": dict(lr=9e-5, optimizer="adafactor", batch_size=12, gradient_accumulation_steps=6, epochs=5,
                warmup_iters=1000, weight_decay=0.01, clip_grad=0.9, lr_decay_style="cosine", max_len=350),
    "minillm": dict(lr=7e-5, optimizer="adamw", batch_size=12, gradient_accumulation_steps=6, total_iters=100,
                    warmup_iters=0, weight_decay=1e-6, clip_grad=1.0, lr_decay_style="constant", max_len=360),
}
DEFAULTS["kd"] = DEFAULTS["seqkd"] = DEFAULTS["sft"]


def is_seq2seq(path: str, flag: str) -> bool:
    """Whether a model folder holds an encoder-decoder (read from its config.json, before any weights load)."""
    return bool(hf.load_config(path, flag).is_encoder_decoder)


def check_same_kind(model_path: str, teacher_path: str) -> None:
    """Teacher and student both encoder-decoder or both causal (one scoring layout for the rollouts and KD)."""
    kind = {True: "an encoder-decoder", False: "a decoder-only"}
    student, teacher = is_seq2seq(model_path, "--model_path"), is_seq2seq(teacher_path, "--teacher_model_path")
    if student != teacher:
        raise UserError(f"--teacher_model_path {teacher_path} is {kind[teacher]} model and --model_path "
                        f"{model_path} {kind[student]} one: give both of one kind")


def check_flags(cfg: dict, dtype: str, ratios: dict, counts: dict) -> None:
    """The per-type settings and the other flags, before anything loads: choices, ratios in [0, 1], counts >= 1."""
    check_choice("--optimizer", cfg["optimizer"], OPTIMIZERS)
    check_choice("--lr_decay_style", cfg["lr_decay_style"], LR_DECAY_STYLES)
    check_choice("--dtype", dtype, DTYPES)
    check_range("--warmup_iters", cfg["warmup_iters"], low=0)
    for name, value in ratios.items():
        check_range(f"--{name}", value, 0, 1)
    counts = dict(counts, **{k: cfg[k] for k in ("batch_size", "gradient_accumulation_steps", "max_len", "epochs",
                                                 "total_iters") if k in cfg})
    for name, value in counts.items():
        check_range(f"--{name}", value, low=1)


def load_items(data_dir: str, max_prompt_length: int, max_len: int, flag: str = "--data_dir",
               prompt_eos: int = None) -> list:
    """(prompt, target) token lists of the train split; prompts over max_prompt_length are dropped (MiniLLM),
    targets cut to max_len tokens. `prompt_eos`: an id to take off the end of each prompt (a causal LM's)."""
    items = read_items(data_dir, "train", flag)
    prompts = [it["prompt"][:-1] if it["prompt"][-1:] == [prompt_eos] else it["prompt"] for it in items]
    kept = [(p, it["target"][:max_len]) for p, it in zip(prompts, items) if len(p) <= max_prompt_length]
    print0(f"{data_dir}: {len(kept)} train items ({len(items) - len(kept)} prompts over {max_prompt_length} tokens "
           f"dropped)")
    if not kept:
        raise UserError(f"{flag} {data_dir}: no train item has a prompt within --max_prompt_length "
                        f"{max_prompt_length}")
    return kept


def item_order(n: int, position: int, count: int, seed: int) -> list:
    """Indices `position .. position + count` of an endless stream of epochs, each a permutation seeded by
    (seed, epoch): a resumed run finds its place from the position alone."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), n)
        perm = epoch_order(n, seed, epoch)
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
    check_choice("--optimizer", name, OPTIMIZERS)


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


def sft_loss(logits, batch, loss_ratio, n_first, n_rest, chunk_size=None):
    """r·CE(first target token) + (1 - r)·CE(other target tokens), each summed and divided by its whole-step
    normaliser: n_first = the step's items; n_rest = their other tokens, or items x (max_len - 1) as the fork."""
    first, rest = first_token_masks(batch["mask"])
    return (loss_ratio * cross_entropy(logits, target_ids=batch["targets"], mask=first, normalizer=max(n_first, 1),
                                       chunk_size=chunk_size)
            + (1 - loss_ratio) * cross_entropy(logits, target_ids=batch["targets"], mask=rest,
                                               normalizer=max(n_rest, 1), chunk_size=chunk_size))


def kd_loss(logits, teacher_logits, batch, kd_ratio, n_tokens, chunk_size=None):
    """(1 - λ)·CE + λ·soft-CE(p, q) per target token, divided by the whole step's target tokens. Logits or, on
    the fast path, common.losses.HeadLogits with a chunk_size."""
    ce = cross_entropy(logits, target_ids=batch["targets"], mask=batch["mask"], normalizer=max(n_tokens, 1),
                       chunk_size=chunk_size)
    kd = soft_cross_entropy(logits, teacher_logits, mask=batch["mask"], normalizer=max(n_tokens, 1),
                            chunk_size=chunk_size)
    return (1 - kd_ratio) * ce + kd_ratio * kd


def train(type: str = "sft", model_path: str = None, teacher_model_path: str = None, data_dir: str = None,
          save: str = None, lr: float = None, optimizer: str = None, batch_size: int = None,
          gradient_accumulation_steps: int = None, epochs: int = None, total_iters: int = None,
          warmup_iters: int = None, weight_decay: float = None, clip_grad: float = None, lr_decay_style: str = None,
          max_len: int = None, max_prompt_length: int = 320, loss_ratio: float = 0.8, kd_ratio: float = 0.5,
          ppo_epochs: int = 2, num_rollouts: int = 32, chunk_size: int = 16, teacher_mixed_alpha: float = 0.2,
          gamma: float = 0.95, reward_scaling: float = 0.5, cliprange_reward: float = 100.0, cliprange: float = 0.2,
          length_norm: bool = True, single_step_reg: bool = False, whiten: str = "release",
          reason_mean: str = "fork", lm_data_dir: str = None, lm_coef: float = 1.0,
          max_new_tokens: int = 180, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          dtype: str = "float32", save_interval: int = 500, seed: int = 10, fsdp=None, fast_kd: bool = True):
    check_choice("--type", type, TYPES)
    check_choice("--whiten", whiten, WHITEN)
    check_choice("--reason_mean", reason_mean, REASON_MEANS)
    for flag, value in (("--model_path", model_path), ("--data_dir", data_dir), ("--save", save)):
        if value is None:
            raise UserError(f"{flag} is required")
    if type in ("kd", "minillm") and teacher_model_path is None:
        raise UserError(f"--type {type} needs --teacher_model_path")
    cfg = dict(DEFAULTS[type])
    cfg.update({k: v for k, v in dict(lr=lr, optimizer=optimizer, batch_size=batch_size, epochs=epochs,
                                      gradient_accumulation_steps=gradient_accumulation_steps, total_iters=total_iters,
                                      warmup_iters=warmup_iters, weight_decay=weight_decay, clip_grad=clip_grad,
                                      lr_decay_style=lr_decay_style, max_len=max_len).items() if v is not None})
    check_flags(cfg, dtype, dict(loss_ratio=loss_ratio, kd_ratio=kd_ratio, teacher_mixed_alpha=teacher_mixed_alpha),
                dict(max_prompt_length=max_prompt_length, ppo_epochs=ppo_epochs, num_rollouts=num_rollouts,
                     chunk_size=chunk_size, max_new_tokens=max_new_tokens, save_interval=save_interval))
    sharding = sharding_from_flag(fsdp, "--fsdp", dtype)  # --fsdp [offload]: student and teacher sharded (FSDP)
    fast_kd = fast_kd and sharding == "ddp"  # FSDP shards the head (no weights to chunk with): the plain step
    if sharding != "ddp" and cfg["optimizer"] == "adafactor":
        raise UserError("--fsdp with --optimizer adafactor: transformers' Adafactor keeps factored statistics that "
                        "do not shard; pass --optimizer adamw with --fsdp, or train without --fsdp")
    # every input is checked before any weights load: the model folders by their configs, then the data
    seq2seq = is_seq2seq(model_path, "--model_path")
    if type in ("kd", "minillm"):
        check_same_kind(model_path, teacher_model_path)
    if type == "seqkd" and not os.path.exists(os.path.join(data_dir, "seqkd.json")):
        raise UserError(f"--type seqkd: {data_dir} holds no teacher outputs (no seqkd.json); write them with "
                        f"anli_reverse_kl/generate_data.py and pass its --save folder as --data_dir")
    flags = SimpleNamespace(**{k: v for k, v in locals().items() if k != "cfg"})
    prompt_eos = None if seq2seq else hf.load_tokenizer(model_path).eos_token_id
    items = load_items(data_dir, max_prompt_length, cfg["max_len"], prompt_eos=prompt_eos)
    lm_items = load_items(lm_data_dir, max_prompt_length, cfg["max_len"], "--lm_data_dir", prompt_eos) \
        if lm_data_dir else None
    run = start_run(flags, cfg)
    if type == "minillm":
        total_steps = cfg["total_iters"]
    else:
        steps_per_epoch = math.ceil(len(items) / run.per_step)
        total_steps = cfg["epochs"] * steps_per_epoch
    run.resume(total_steps, items)
    if type == "minillm":
        while run.state["step"] < total_steps:
            minillm_iteration(run, items, lm_items, total_steps)
    else:
        while run.state["step"] < total_steps:
            supervised_step(run, items, steps_per_epoch, total_steps)
    export_model(unwrap(run.ddp), run.tok, os.path.join(save, "model"), run.lay)
    print0(f"saved {os.path.join(save, 'model')}")
    shutdown()


# ---- the run's stages: setup and resume, one supervised step, one MiniLLM iteration (rollouts + PPO steps) ----

@dataclass
class Run:
    """What every stage shares: the flags, the resolved settings, the process layout, tokenizer and models, the
    optimiser with its schedule and scaler, and the resumable state {step, iteration}."""
    flags: SimpleNamespace
    cfg: dict
    lay: object
    tok: object
    model: torch.nn.Module
    ddp: torch.nn.Module
    teacher: object
    opt: object = None
    scheduler: object = None
    scaler: object = None
    state: dict = None
    meter: Throughput = field(default_factory=Throughput)

    @property
    def per_step(self) -> int:  # items of one optimiser step over all ranks
        return self.cfg["batch_size"] * self.cfg["gradient_accumulation_steps"] * self.lay.dp_size

    @property
    def group(self):
        return dp_group() if self.lay.dp_size > 1 else None

    @property
    def log_path(self) -> str:
        return os.path.join(self.flags.save, "log.jsonl")

    def resume(self, total_steps: int, items: list) -> None:
        """Optimiser, schedule and scaler for `total_steps`, restored from the last checkpoint when there is one;
        args.json; the log cut back to the restored step (a resumed run redoes the steps after it)."""
        f, cfg, lay = self.flags, self.cfg, self.lay
        # DDP, or the student sharded in place before its optimiser exists (and before a sharded checkpoint loads)
        self.ddp = wrap_model(self.model, lay, f.sharding, f.dtype)
        self.teacher = wrap_model(self.teacher, lay, f.sharding) if self.teacher is not None else None
        self.opt = make_optimizer(self.model, cfg["optimizer"], cfg["lr"], cfg["weight_decay"])
        self.scheduler = lr_schedule(self.opt, cfg["lr_decay_style"], cfg["warmup_iters"], total_steps)
        self.scaler = grad_scaler(f.dtype, lay.device)
        self.state = load_checkpoint(f.save, lay, self.model, self.opt, self.scheduler, self.scaler) or \
            {"step": 0, "iteration": 0}
        if lay.is_main:
            atomic_write_json(dict(cfg, type=f.type, model_path=f.model_path, teacher_model_path=f.teacher_model_path,
                                   data_dir=f.data_dir, dp_size=lay.dp_size, total_steps=total_steps),
                              os.path.join(f.save, "args.json"))
            if os.path.exists(self.log_path):
                write_jsonl([r for r in read_jsonl(self.log_path, drop_partial_last=True)
                             if r["step"] <= self.state["step"]], self.log_path)
        print0(f"{f.type}: {total_steps} optimiser steps, {len(items)} items, dp {lay.dp_size}, resuming at step "
               f"{self.state['step']}")

    def batch(self, pairs) -> dict:
        start_id = self.model.config.decoder_start_token_id if self.flags.seq2seq else None
        return to_batch(pairs, self.tok, start_id, self.lay.device)

    def backward(self, micro: list, loss_fn) -> dict:
        """Forward and backward of each micro-batch (DDP syncs at the last): loss_fn(batch) -> (loss, terms),
        both already divided by the step's global counts. Returns this rank's terms summed over `micro`."""
        totals = {}
        for k, batch in enumerate(micro):
            with grad_sync(self.ddp, k == len(micro) - 1):
                with autocast(self.flags.dtype, self.lay.device), compiled_chunks(self.flags.fast_kd):
                    loss, terms = loss_fn(batch)
                self.scaler.scale(loss).backward()
            for name, v in terms.items():
                totals[name] = totals.get(name, 0.0) + float(v)
        return totals

    def step(self, tokens: int, terms: dict, **values) -> None:
        """Clip, optimiser and schedule step; the step's terms summed over ranks; one log line."""
        self.meter.add(int(tokens))
        grad_norm = optimizer_step(self.opt, self.scheduler, self.scaler, self.cfg["clip_grad"])
        self.state["step"] += 1
        summed = all_reduce_dp(torch.tensor(list(terms.values()), device=self.lay.device)).tolist()
        record = dict(step=self.state["step"], lr=self.opt.param_groups[0]["lr"], **values, **dict(zip(terms, summed)),
                      grad_norm=grad_norm, tokens_per_s=self.meter.rate())
        if self.lay.is_main:
            append_jsonl(self.log_path, record)
        print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def checkpoint(self, total_steps: int) -> None:
        """A resume checkpoint; the weights also to --save/step-N unless this is the last step (--save/model)."""
        save_checkpoint(self.flags.save, self.state, self.lay, self.model, self.opt, self.scheduler, self.scaler,
                        self.tok)
        if self.state["step"] < total_steps:
            export_model(unwrap(self.ddp), self.tok, os.path.join(self.flags.save, f"step-{self.state['step']}"),
                         self.lay)


def start_run(flags, cfg) -> Run:
    """Processes, tokenizer, student (trainable, fp32) and the frozen teacher of kd / minillm, checked."""
    lay = setup(flags.seed)
    os.makedirs(flags.save, exist_ok=True)
    tok = hf.load_tokenizer(flags.model_path)
    teacher = teacher_tok = None
    if flags.type in ("kd", "minillm"):  # one tokenizer for both: the rollouts and KD compare token by token
        teacher_tok = hf.load_tokenizer(flags.teacher_model_path, flag="--teacher_model_path")
        hf.check_tokenizers(tok, teacher_tok)
    model = hf.load_model(flags.model_path, dtype="float32", device=load_device(lay, flags.sharding))
    if flags.type in ("kd", "minillm"):
        teacher = hf.load_model(flags.teacher_model_path, device=load_device(lay, flags.sharding), frozen=True,
                                flag="--teacher_model_path")
        hf.check_vocab(model, teacher, tok, teacher_tok)
        if flags.fast_kd and flags.dtype != "float32" and (flags.type == "kd" or flags.lm_data_dir):
            teacher.to(to_dtype(flags.dtype))  # the fast step's teacher: in the autocast dtype, never cast per forward
    model.train()
    return Run(flags, cfg, lay, tok, model, model, teacher)


def supervised_step(run: Run, items: list, steps_per_epoch: int, total_steps: int) -> None:
    """One optimiser step of sft / seqkd / kd over the step's share of an epoch (a permutation per epoch)."""
    f, lay, per_rank = run.flags, run.lay, run.cfg["batch_size"]
    epoch, k = divmod(run.state["step"], steps_per_epoch)
    order = item_order(len(items), epoch * len(items) + k * run.per_step,
                       min(run.per_step, len(items) - k * run.per_step), f.seed)
    mine = dp_shard([items[i] for i in order], lay.dp_rank, lay.dp_size)
    micro = [run.batch(mine[j:j + per_rank]) for j in range(0, len(mine), per_rank)]
    n_first = global_count(sum(int(first_token_masks(b["mask"])[0].sum()) for b in micro), lay.device)
    n_tok = global_count(sum(int(b["mask"].sum()) for b in micro), lay.device)
    n_rest = n_tok - n_first if f.reason_mean == "tokens" else n_first * (run.cfg["max_len"] - 1)

    chunk = KD_CHUNK_SIZE if f.fast_kd else None

    def loss_fn(batch):
        _, logits = lm_logits(run.ddp, model_inputs(batch), fast=f.fast_kd)
        if f.type == "kd":
            _, teacher_logits = lm_logits(run.teacher, model_inputs(batch), fast=f.fast_kd, frozen=True)
            loss = kd_loss(logits, teacher_logits, batch, f.kd_ratio, n_tok, chunk)
        else:
            loss = sft_loss(logits, batch, f.loss_ratio, n_first, n_rest, chunk)
        return loss, dict(loss=loss.detach())

    run.step(n_tok, run.backward(micro, loss_fn), epoch=epoch)
    if run.state["step"] % f.save_interval == 0 or run.state["step"] == total_steps:
        run.checkpoint(total_steps)


def rollouts(run: Run, items: list, iteration: int) -> tuple:
    """This rank's share of the iteration's --num_rollouts prompts, sampled from the teacher-mixed policy in
    chunks and scored (minillm.py): the PPO store, and what the log shows of it."""
    f, lay = run.flags, run.lay
    order = item_order(len(items), iteration * f.num_rollouts, f.num_rollouts, f.seed)
    prompts = [items[i][0] for i in dp_shard(order, lay.dp_rank, lay.dp_size)]
    t0, responses = time.perf_counter(), []
    with gathered(run.ddp, run.teacher):  # FSDP: whole weights while ranks sample different lengths
        for c in range(0, len(prompts), f.chunk_size):
            responses += sample_responses(unwrap(run.ddp), run.teacher, prompts[c:c + f.chunk_size],
                                          max_new_tokens=f.max_new_tokens, alpha=f.teacher_mixed_alpha,
                                          temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                                          eos_id=run.tok.eos_token_id, pad_id=run.tok.pad_token_id,
                                          seed=rank_seed(f.seed, iteration * 100003 + c, lay.dp_rank))
    elapsed = time.perf_counter() - t0
    with autocast(f.dtype, lay.device):  # log q_old at the PPO loss's precision, so that the ratio is 1 at θ_old
        store = score_rollouts(unwrap(run.ddp), run.teacher, prompts, responses, pad_id=run.tok.pad_token_id,
                               batch_size=f.chunk_size, group=run.group, temperature=f.temperature,
                               alpha=f.teacher_mixed_alpha, gamma=f.gamma, reward_scaling=f.reward_scaling,
                               reward_clip=f.cliprange_reward, length_norm=f.length_norm)
    mask = store["mask"]
    reward_and_count = all_reduce_dp(torch.stack([(store["rewards"] * mask).sum(), mask.sum().float()]))
    w = store["weights"][mask]
    w_range = torch.stack([w.min(), -w.max()])
    if lay.dp_size > 1:
        torch.distributed.all_reduce(w_range, op=torch.distributed.ReduceOp.MIN, group=run.group)
    summary = dict(iteration=iteration, reward=(reward_and_count[0] / reward_and_count[1]).item(),
                   w_min=w_range[0].item(), w_max=-w_range[1].item(), response_tokens=int(reward_and_count[1]),
                   rollout_tokens_per_s=reward_and_count[1].item() / max(elapsed, 1e-9))
    return store, summary


def ppo_step(run: Run, store: dict, rows: list, summary: dict, lm_items) -> None:
    """One optimiser step on the store's `rows` (this rank's minibatch x accumulation): L_pg (+ L_reg)
    [+ lm_coef·PT term on a --lm_data_dir batch]."""
    f, lay, per_rank = run.flags, run.lay, run.cfg["batch_size"]
    micro = [{k: store[k][rows[j:j + per_rank]] for k in store_fields(store)} for j in range(0, len(rows), per_rank)]
    if lm_items:  # MiniLLM's PT term: the p-th chunk of the run is item p of an endless stream of epochs
        order = item_order(len(lm_items), run.state["step"] * run.per_step, run.per_step, f.seed + 1)
        mine = dp_shard([lm_items[i] for i in order], lay.dp_rank, lay.dp_size)
        for k, batch in enumerate(micro):
            batch["lm"] = run.batch(mine[k * per_rank:(k + 1) * per_rank])
    n_resp = global_count(sum(int(b["mask"].sum()) for b in micro), lay.device)
    n_lm = global_count(sum(int(b["lm"]["mask"].sum()) for b in micro), lay.device) if lm_items else 0

    def loss_fn(batch):
        terms = minillm_loss(run.ddp, run.teacher, batch, clip_range=f.cliprange, single_step_reg=f.single_step_reg,
                             normalizer=max(n_resp, 1), temperature=f.temperature, whiten=f.whiten,
                             width=f.max_new_tokens, group=run.group)
        if "lm" in batch:
            _, logits = lm_logits(run.ddp, model_inputs(batch["lm"]), fast=f.fast_kd)
            _, teacher_logits = lm_logits(run.teacher, model_inputs(batch["lm"]), fast=f.fast_kd, frozen=True)
            terms["pt"] = kd_loss(logits, teacher_logits, batch["lm"], f.kd_ratio, n_lm,
                                  KD_CHUNK_SIZE if f.fast_kd else None)
            terms["loss"] = terms["loss"] + f.lm_coef * terms["pt"]
        return terms["loss"], {k: v.detach() for k, v in terms.items()}

    run.step(n_resp, run.backward(micro, loss_fn), **summary)


def minillm_iteration(run: Run, items: list, lm_items, total_steps: int) -> None:
    """Rollouts, then --ppo_epochs passes over the shuffled store, each minibatch (x accumulation) an optimiser
    step; a checkpoint every --save_interval iterations and at the end."""
    f = run.flags
    iteration = run.state["iteration"]
    store, summary = rollouts(run, items, iteration)
    n, minibatch = store["mask"].shape[0], run.cfg["batch_size"] * run.cfg["gradient_accumulation_steps"]
    g = torch.Generator().manual_seed(f.seed * 100003 + iteration)
    for _ in range(f.ppo_epochs):
        perm = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, minibatch):
            if run.state["step"] >= total_steps:
                break
            ppo_step(run, store, perm[s:s + minibatch], summary, lm_items)
    run.state["iteration"] = iteration + 1
    if run.state["iteration"] % f.save_interval == 0 or run.state["step"] >= total_steps:
        run.checkpoint(total_steps)


if __name__ == "__main__":
    run_cli(train)
