"""Training utilities for transformers models: DDP, mixed precision, lr schedules, resumable checkpoints,
export. Plain functions, so each method's train.py keeps its loop in view:

    lay = setup(cfg.seed)                                                       # common.distributed
    model = hf.load_model(cfg.model_path, dtype="float32", device=lay.device)  # fp32 master weights
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = lr_schedule(optimizer, "cosine", cfg.warmup_steps, total_steps, min_lr=cfg.min_lr)
    scaler = grad_scaler(cfg.dtype, lay.device)                                 # enabled for float16 only
    state = load_checkpoint(cfg.save_dir, lay, model, optimizer, scheduler, scaler) or {"step": 0}
    ddp = wrap_ddp(model, lay)
    for step in range(state["step"], total_steps):
        micro = plan[step]                                                      # this rank's micro-batches
        norm = global_count(sum(n_counted(b) for b in micro), lay.device)      # common.training: whole step
        for i, batch in enumerate(micro):
            with grad_sync(ddp, i == len(micro) - 1):                           # DDP reduces once per step
                with autocast(cfg.dtype, lay.device):
                    loss = loss_sum(ddp(**batch).logits, batch) / norm
                scaler.scale(loss).backward()
        grad_norm = optimizer_step(optimizer, scheduler, scaler, cfg.max_grad_norm)
        state["step"] = step + 1
        if state["step"] % cfg.save_steps == 0:
            save_checkpoint(cfg.save_dir, state, lay, model, optimizer, scheduler, scaler, tokenizer)
    export_model(model, tokenizer, cfg.out_dir, lay)                            # LoRA merged

Losses are divided by the whole step's counted tokens (summed over micro-batches and DP ranks), so the DDP
wrapper *sums* gradients over ranks rather than averaging them: 2 ranks x 2 micro-batches give the update
of 1 rank x 4, whatever the token count of each micro-batch.

Checkpoints (one folder per save; `load_checkpoint` must run after everything that draws random numbers,
e.g. LoRA init, so the restored RNG states continue the interrupted run exactly):

    save_dir/checkpoints/step-00000120/model/        save_pretrained: the model, or the LoRA adapter; tokenizer
                                      trainer.pt     optimizer, scheduler and grad-scaler states (rank 0)
                                      rng-00.pt ...  every rank's torch CPU / CUDA, Python and numpy RNG states
                                      state.json     written last by rank 0: the commit marker (step, data
                                                     position, anything else; DP size and model identity)
"""
import contextlib
import glob
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import hf
from common.cli import UserError
from common.distributed import Layout, to_dtype
from common.io import atomic_folder, atomic_save, atomic_write_json, read_tensors
from common.training import complete_checkpoints, latest_checkpoint

# ---------------------------------------------------------------------------- data parallel


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _sum_gradients(_, bucket):
    """DDP comm hook: sum (not average) gradients over ranks; the loss already carries the global normaliser."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(model, lay: Layout, **ddp_kwargs):
    """DistributedDataParallel summing gradients over the DP ranks; `model` itself for a single rank."""
    if lay.dp_size == 1:
        return model
    device_ids = [lay.device.index] if lay.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    ddp.register_comm_hook(None, _sum_gradients)
    return ddp


def grad_sync(model, sync: bool):
    """Context for one micro-batch's forward and backward: DDP all-reduces only where `sync` (the last
    micro-batch of a step); elsewhere gradients accumulate locally (no_sync)."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# ---------------------------------------------------------------------------- precision and optimiser step

def autocast(dtype, device):
    """bf16 / fp16 autocast around the forward (fp32 master weights); a no-op for float32."""
    dtype = to_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(dtype, device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow); disabled, i.e. pass-through, for other dtypes."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=to_dtype(dtype) == torch.float16)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: works behind frozen embeddings, LoRA and DDP)."""
    unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    unwrap(model).config.use_cache = False


def clip_gradients(optimizer, max_norm: Optional[float], scaler: Optional[torch.amp.GradScaler] = None) -> float:
    """Unscale (fp16), clip to `max_norm` (None: no clipping) and return the total norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    limit = float("inf") if max_norm is None or max_norm <= 0 else max_norm
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def optimizer_step(optimizer, scheduler=None, scaler: Optional[torch.amp.GradScaler] = None,
                   max_grad_norm: Optional[float] = None) -> float:
    """Clip, step, advance the schedule, zero the gradients; returns the gradient norm. A step that fp16
    loss scaling skips (inf/nan gradients) does not advance the schedule."""
    norm = clip_gradients(optimizer, max_grad_norm, scaler)
    skipped = False
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    if scheduler is not None and not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def lr_schedule(optimizer, name: str, warmup_steps: int = 0, total_steps: Optional[int] = None, min_lr: float = 0.0):
    """Linear warmup from 0 over `warmup_steps`, then "constant", "linear" (to 0 at total_steps) or "cosine"
    (half a cosine down to `min_lr` at total_steps; with no warmup, torch's CosineAnnealingLR)."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    if name not in ("linear", "cosine"):
        raise UserError(f"lr schedule must be one of constant, linear, cosine; got {name!r}")
    if not total_steps:
        raise ValueError(f"the {name} lr schedule needs the total number of optimiser steps (total_steps)")
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr=min_lr)


# ---------------------------------------------------------------------------- checkpoints

def model_signature(model) -> dict:
    """What a resume checks: the architecture class, LoRA or not, and the (trainable) parameter counts."""
    model = unwrap(model)
    base = model.get_base_model() if hf.is_lora(model) else model
    return {"class": type(base).__name__, "lora": hf.is_lora(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _describe(sig: dict) -> str:
    lora = " with LoRA" if sig["lora"] else ""
    return f"{sig['class']}{lora}, {sig['parameters']:,} parameters, {sig['trainable']:,} trainable"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir: str, state: dict, lay: Layout, model, optimizer, scheduler=None, scaler=None,
                    tokenizer=None, keep: int = 1) -> str:
    """Resumable checkpoint at `state["step"]` (every rank calls it); older complete ones beyond `keep` are
    pruned after this one is committed. Returns the folder."""
    folder = os.path.join(save_dir, "checkpoints", f"step-{state['step']:08d}")
    if lay.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # an earlier, interrupted save of this step
        os.makedirs(folder)
    _barrier()
    if lay.is_main:
        # in-memory parameter names (no conversion back to the hub layout), so resume loads them 1:1
        unwrap(model).save_pretrained(os.path.join(folder, "model"), save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(folder, "model"))
        atomic_save({"optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None}, os.path.join(folder, "trainer.pt"))
    atomic_save(rng_state(), os.path.join(folder, f"rng-{lay.rank:02d}.pt"))
    _barrier()
    if lay.is_main:
        atomic_write_json(dict(state, dp_size=lay.dp_size, model=model_signature(model)), os.path.join(folder, "state.json"))
        for old in complete_checkpoints(save_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def _load_weights(model, folder: str) -> None:
    model = unwrap(model)
    if hf.is_lora(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, read_tensors(os.path.join(folder, "adapter_model.safetensors")))
        bad = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
    else:
        state = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            state.update(read_tensors(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        own = model.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        bad = list(unexpected) + [k for k in missing if own[k].data_ptr() not in loaded]  # tied weights load once
    if bad:
        raise UserError(f"{folder} does not match the model (e.g. {bad[:3]}): resume with the same model and "
                        "LoRA settings, or start afresh with another --save_dir")


def load_checkpoint(save_dir: str, lay: Layout, model, optimizer, scheduler=None, scaler=None) -> Optional[dict]:
    """Restore the newest complete checkpoint under save_dir (weights, optimiser, schedule, scaler, this rank's
    RNG) and return its state; None when there is none (a fresh run)."""
    folder, state = latest_checkpoint(save_dir)
    if folder is None:
        return None
    if state["dp_size"] != lay.dp_size:
        raise UserError(f"{folder} was saved by {state['dp_size']} data-parallel processes, this run has {lay.dp_size} "
                        f"(data order and RNG states are per rank): relaunch with --nproc_per_node {state['dp_size']}, "
                        "or start afresh with another --save_dir")
    if state["model"] != model_signature(model):
        raise UserError(f"{folder} was saved from another model ({_describe(state['model'])}), this run trains "
                        f"{_describe(model_signature(model))}: resume with the same model and LoRA settings, or "
                        "start afresh with another --save_dir")
    _load_weights(model, os.path.join(folder, "model"))
    saved = torch.load(os.path.join(folder, "trainer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(torch.load(os.path.join(folder, f"rng-{lay.rank:02d}.pt"), weights_only=True))
    return state


def export_model(model, tokenizer, out_dir: str, lay: Optional[Layout] = None) -> str:
    """A folder `from_pretrained` loads (LoRA merged into the weights), written by rank 0 beside `out_dir`
    and swapped in whole; every rank calls it."""
    if lay is None or lay.is_main:
        with atomic_folder(out_dir) as tmp:
            hf.merge_lora(unwrap(model)).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    _barrier()
    return out_dir
