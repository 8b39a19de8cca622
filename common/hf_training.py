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

Fully sharded data parallel (PyTorch FSDP2) is the same loop with one switch, `wrap_model(..., sharding)`:

    sharding = sharding_from_flag(cfg.fsdp)                 # "ddp", "fsdp" or "fsdp_offload"
    model = wrap_model(student, lay, sharding, cfg.dtype)   # before the optimizer: FSDP replaces the parameters
    teacher = wrap_model(teacher, lay, sharding)            # frozen: sharded too, blocks resharded after forward
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    state = load_checkpoint(cfg.save_dir, lay, model, optimizer, scheduler, scaler) or {"step": 0}
    ... the loop above, unchanged (grad_sync, optimizer_step, save_checkpoint, export_model) ...
    with gathered(model, teacher):                          # generation / uneven evaluation on whole weights
        responses = generate(unwrap(model), prompts, ...)

`fully_shard` goes on every block (the members of the outermost ModuleLists: decoder layers, T5
blocks) and on the root. bf16 runs all-gather bf16 parameters and reduce gradients in fp32 (the sharded
master weights and AdamW states stay fp32); "fsdp_offload" keeps parameters, gradients and optimiser
states on the CPU (DeepSpeed ZeRO-3 offload's layout; the optimiser steps on the CPU). Gradients are
summed over ranks (the loss carries the whole-step normaliser, as under DDP). Between micro-batches FSDP
accumulates unsharded gradients without communication; with offload every micro-batch reduce-scatters
into the CPU shards instead (whole unsharded gradients would not fit where offload is needed).
Checkpoints of a sharded model are torch.distributed.checkpoint folders (each rank writes its shards of the
trainable weights and of the optimiser states); export gathers the whole model to rank 0:

    save_dir/checkpoints/step-00000120/sharded/         DCP: __0_0.distcp, __1_0.distcp, .metadata
                                      trainer.pt        scheduler, grad-scaler states; whether the optimiser had any
                                      rng-00.pt ...     every rank's RNG states
                                      state.json        the commit marker, written last (sharding: "fsdp")
"""
import contextlib
import copy
import glob
import os
import random
import shutil
import sys
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
    if is_fsdp(model):  # takes effect at this micro-batch's backward; offload reduces every micro-batch
        model.set_requires_gradient_sync(sync or model.kdzoo_sharding == "fsdp_offload")
        return contextlib.nullcontext()
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# ---------------------------------------------------------------------------- fully sharded data parallel

SHARDINGS = ("ddp", "fsdp", "fsdp_offload")


def sharding_from_flag(value, flag: str = "--fsdp", dtype="float32") -> str:
    """The sharding a --fsdp flag asks for: off (None, False, "") -> "ddp"; on (True, or HF Trainer's
    "full_shard auto_wrap") -> "fsdp"; with the word "offload" -> "fsdp_offload". Checked before anything
    loads, with the run's compute dtype (FSDP trains in float32 or bfloat16)."""
    if value is None or value is False or value == "":
        return "ddp"
    words = {"full_shard"} if value is True else set(str(value).replace(",", " ").split())
    unknown = words - {"full_shard", "auto_wrap", "offload"}
    if unknown:
        raise UserError(f"{flag} {value!r}: {' '.join(sorted(unknown))} is not built; FSDP here shards parameters, "
                        f"gradients and optimiser states of every block: pass {flag} \"full_shard auto_wrap\" "
                        f"(or {flag} alone), adding \"offload\" to keep them on the CPU")
    if to_dtype(dtype) == torch.float16:
        raise UserError(f"{flag} with float16: fp16 loss scaling of sharded gradients is not built; train in "
                        "bfloat16 (or float16 without FSDP)")
    return "fsdp_offload" if "offload" in words else "fsdp"


def _trainable(model) -> bool:
    return any(p.requires_grad for p in model.parameters())


def is_fsdp(model) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded before someone imported FSDP
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def fsdp_blocks(model) -> list:
    """The blocks FSDP shards one by one: the members of every outermost ModuleList (decoder layers, T5's
    encoder and decoder blocks, a hybrid student's mix of block classes; a block's own lists stay inside it)."""
    lists, inner = [], set()
    for module in model.modules():  # parents come before their children
        if isinstance(module, torch.nn.ModuleList) and id(module) not in inner:
            lists.append(module)
            inner.update(id(m) for m in module.modules() if m is not module)
    if not lists:
        raise ValueError(f"{type(model).__name__} holds no ModuleList of blocks, so FSDP would gather it whole: "
                         "train it with DDP")
    return [block for blocks in lists for block in blocks]


def shard_model(model, lay: Layout, *, offload: bool = False, dtype="float32"):
    """FSDP2 in place: `fully_shard` on each block, then on the root, over the data-parallel ranks; returns
    the model (now also an FSDPModule). A trainable model in bf16 all-gathers bf16 parameters and reduces fp32
    gradients; a frozen one (a teacher) keeps its dtype. Blocks reshard after their forward; the root (embeddings,
    head) is not resharded after forward (FSDP's default): a trainable model's is after backward, a teacher's
    stays gathered (so its head's weights can be read after a forward, as chunked losses do)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    trainable = _trainable(model)
    dtype = to_dtype(dtype)
    if trainable and dtype == torch.float16:
        raise UserError("FSDP trains in bfloat16 or float32: fp16 loss scaling of sharded gradients is not built; "
                        "use --dtype bfloat16 (or DDP for float16)")
    options = dict(mesh=init_device_mesh(lay.device.type, (lay.dp_size,)))
    if trainable and dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=lay.device.type == "cuda")
    for block in fsdp_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum, not average: the loss already carries the whole-step normaliser
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    model.kdzoo_sharding, model.kdzoo_device = "fsdp_offload" if offload else "fsdp", lay.device
    # FSDP takes the first module to run forward for its root; generation may call the encoder of an
    # encoder-decoder first (on gathered weights), so the root is settled now (torch 2.13's private call)
    model._get_fsdp_state()._lazy_init()
    return model


def wrap_model(model, lay: Layout, sharding: str = "ddp", dtype="float32"):
    """The model a train.py runs: under "ddp" the DDP wrapper of a trainable model (a frozen one as it is);
    under "fsdp" / "fsdp_offload" the model sharded in place (shard_model), trainable or frozen. Build the
    optimiser from the returned model's parameters, after this call."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if sharding != "ddp":
        return shard_model(model, lay, offload=sharding == "fsdp_offload", dtype=dtype)
    return wrap_ddp(model, lay) if _trainable(model) else model


def load_device(lay: Layout, sharding: str = "ddp") -> torch.device:
    """Where a train.py loads a model before wrap_model: the CPU under FSDP (fully_shard moves each block's
    shards to the rank's device, so no GPU ever holds a whole model), else the rank's device."""
    return torch.device("cpu") if sharding != "ddp" else lay.device


def compute_device(model) -> torch.device:
    """The device a model computes on (its inputs go there): a sharded model's rank device, even where its
    shards are offloaded to the CPU; else its parameters' device."""
    return model.kdzoo_device if is_fsdp(model) else next(unwrap(model).parameters()).device


@contextlib.contextmanager
def gathered(*models):
    """Whole weights on every rank inside the block, for loops whose forward count differs between ranks
    (generation, an evaluation split unevenly): sharded blocks would wait on each other's all-gathers.
    Costs the whole model's memory meanwhile; a no-op for unsharded models (and None)."""
    roots = [m for m in models if m is not None and is_fsdp(m)]
    modules = [(m, m is not root) for root in roots for m in root.modules() if is_fsdp(m)]
    for module, _ in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module, reshard_after_forward in modules:
            module.set_reshard_after_forward(reshard_after_forward, recurse=False)
            module.reshard()


def full_state_dict(model) -> dict:
    """Every weight whole, on the CPU of rank 0 ({} on the other ranks); every rank calls it. Unsharded
    models give their own state_dict (on every rank)."""
    if not is_fsdp(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _plain_class(module) -> type:
    """The module's own class (fully_shard swaps in a subclass of it and FSDPModule)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return next(c for c in type(module).__mro__ if fsdp is None or not issubclass(c, fsdp.FSDPModule))


def _unsharded_copy(model, state: dict):
    """A plain transformers (or peft) model of the FSDP `model`'s class holding `state`, built on the meta
    device and filled by assignment (no second initialisation, no copy of the weights)."""
    base = model.get_base_model() if hf.is_lora(model) else model
    with torch.device("meta"):
        plain = _plain_class(base)(copy.deepcopy(base.config))
        if hf.is_lora(model):
            from peft import get_peft_model

            plain = get_peft_model(plain, copy.deepcopy(model.peft_config[model.active_adapter]))
    plain.load_state_dict(state, strict=True, assign=True)
    (plain.get_base_model() if hf.is_lora(plain) else plain).tie_weights()
    return plain.eval()


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
    norm = torch.nn.utils.clip_grad_norm_(params, limit)  # FSDP: over the shards of every rank, a DTensor
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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


# ---------------------------------------------------------------------------- the KD step's fast path

KD_CHUNK_SIZE = 256  # logits rows per chunk of the fast path: fp32 temporaries of [256, V] (50 MB at V = 49152)


def lm_logits(model, inputs: dict, *, fast: bool, frozen: bool = False, **kwargs):
    """(output, logits) of one forward, for a loss from common.losses.

    fast: the model stops before its LM head and `logits` is a common.losses.HeadLogits (the head's input and
    weights), which a loss given `chunk_size=KD_CHUNK_SIZE` turns into logits one chunk of rows at a time, so the
    [B, S, V] logits never exist; else `output.logits`. frozen (a teacher): under torch.inference_mode with fast
    (no autograd bookkeeping at all), under no_grad otherwise. Call it under `autocast(dtype, device)` for the
    bf16 step: a bf16 teacher, fp32 student weights, bf16 matmuls, the divergence in fp32.
    """
    grad = torch.inference_mode() if frozen and fast else torch.no_grad() if frozen else contextlib.nullcontext()
    with grad:
        if fast:
            return hf.head_logits(model, **inputs, **kwargs)
        out = model(**inputs, **kwargs)
        return out, out.logits


# ---------------------------------------------------------------------------- checkpoints

def model_signature(model) -> dict:
    """What a resume checks: the architecture class, LoRA or not, and the (trainable) parameter counts."""
    model = unwrap(model)
    base = model.get_base_model() if hf.is_lora(model) else model
    return {"class": _plain_class(base).__name__, "lora": hf.is_lora(model),
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
    sharding = model.kdzoo_sharding if is_fsdp(model) else "ddp"
    if sharding != "ddp":  # every rank writes its shards
        import torch.distributed.checkpoint as dcp

        shards = _sharded_state(model, optimizer, with_optimizer=bool(optimizer.state))
        dcp.save(shards, checkpoint_id=os.path.join(folder, "sharded"))
    if lay.is_main:
        if sharding == "ddp":  # in-memory parameter names (no conversion back to the hub layout): resume loads 1:1
            unwrap(model).save_pretrained(os.path.join(folder, "model"), save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(folder, "model"))
        atomic_save({"optimizer": optimizer.state_dict() if sharding == "ddp" else bool(optimizer.state),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None}, os.path.join(folder, "trainer.pt"))
    atomic_save(rng_state(), os.path.join(folder, f"rng-{lay.rank:02d}.pt"))
    _barrier()
    if lay.is_main:
        atomic_write_json(dict(state, dp_size=lay.dp_size, model=model_signature(model), sharding=sharding),
                          os.path.join(folder, "state.json"))
        for old in complete_checkpoints(save_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def _sharded_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (a LoRA base) come from the model folder; ignore_frozen_params filters saving only
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _sharded_state(model, optimizer, with_optimizer: bool) -> dict:
    """This rank's shards of the trainable weights and of their optimiser states, keyed by parameter name.
    An optimiser that has not stepped yet has no states to save (torch would make some with a dummy step)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_sharded_options())}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_sharded_options())
    return state


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
    saved_sharded, sharded = state.get("sharding", "ddp") != "ddp", is_fsdp(model)
    if saved_sharded != sharded:
        how = {False: "DDP", True: "FSDP"}
        raise UserError(f"{folder} was saved by a {how[saved_sharded]} run, this run uses {how[sharded]} (the two "
                        f"write different checkpoints): resume with the same --fsdp / --strategy setting, or start "
                        "afresh with another --save_dir")
    saved = torch.load(os.path.join(folder, "trainer.pt"), map_location="cpu", weights_only=True)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        shards = _sharded_state(model, optimizer, saved["optimizer"])  # whether the optimiser had stepped
        dcp.load(shards, checkpoint_id=os.path.join(folder, "sharded"))
        # the frozen weights (a LoRA base) are not in the checkpoint: the load may miss those and nothing else
        missing, unexpected = set_model_state_dict(model, shards["model"], options=_sharded_options(strict=False))
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        wrong = sorted(set(missing) - frozen) + sorted(unexpected)
        if wrong:
            raise UserError(f"{folder}: the checkpoint does not fit the model ({len(wrong)} trainable weights "
                            f"missing or unknown, e.g. {wrong[0]}): resume with the same model and LoRA "
                            "settings, or start afresh with another --save_dir")
        if "optimizer" in shards:
            set_optimizer_state_dict(model, optimizer, shards["optimizer"], options=_sharded_options())
    else:
        _load_weights(model, os.path.join(folder, "model"))
        optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(torch.load(os.path.join(folder, f"rng-{lay.rank:02d}.pt"), weights_only=True))
    return state


def export_model(model, tokenizer, out_dir: str, lay: Optional[Layout] = None) -> str:
    """A folder `from_pretrained` loads (LoRA merged into the weights), written by rank 0 beside `out_dir`
    and swapped in whole; every rank calls it. A sharded model is gathered whole to rank 0's CPU first."""
    if is_fsdp(model):
        state = full_state_dict(model)
        model = _unsharded_copy(model, state) if lay is None or lay.is_main else None
        if hf.is_lora(model):
            model = model.merge_and_unload()  # a private copy: merged in place
    if lay is None or lay.is_main:
        with atomic_folder(out_dir) as tmp:
            hf.merge_lora(unwrap(model)).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    _barrier()
    return out_dir
