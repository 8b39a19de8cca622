"""Distil a hybrid RWKV-6 student from its Llama teacher (spec §4, §7).

    # stage 1: align every layer's hidden states (teach_mode.is_hidden_align: True)
    torchrun --nproc_per_node 6 -m rwkv_llama.train --config_file configs/hybrid.yaml --is_hidden_align true \
        --c4_data /data/c4 --micro_bsz 3 --max_seq_length 2048 --lr_init 1e-4 --output_dir out/stage1
    # stage 2: 0.1 * KL(teacher || student) + 1 * CE, from stage 1's student
    torchrun ... --is_hidden_align false --ckpt_file out/stage1/student.safetensors --output_dir out/stage2

The student is the teacher's transformers Llama with the layers in RWKV.layers replaced (rwkv_llama/model.py).
The teacher runs in-process or in teacher servers (teach_mode.is_client; rwkv_llama/teacher_server.py), behind
one interface: forward(input_ids, lengths) -> (logits, hidden states or None). Labels are pre-shifted
(rwkv_llama/data.py), so CE compares logits[t] with labels[t] (the original shifted them a second time).

Every YAML field is also a flag (the last path component: --layers, --kl_weight, --is_client, ...); flags win.
"""
import math
import os
from itertools import islice
import sys
import time
from typing import Optional

import torch
import yaml

from common import hf
from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES, all_reduce_dp, peer_failure, print0, set_timeout, setup, shutdown
from common.hf_training import (autocast, full_state_dict, grad_sync, load_checkpoint, load_device, optimizer_step,
                                save_checkpoint, unwrap, wrap_model)
from common.io import append_jsonl, atomic_write_json, read_tensors, save_tensors
from common.losses import cross_entropy, forward_kl, hidden_mse
from rwkv_llama.data import IGNORE, c4_stream, chat_stream, rank_batches
from rwkv_llama.model import all_hidden_states, build_hybrid, head_size_for, rwkv_modules
from rwkv_llama.teacher_server import InProcessTeacher, TeacherError, client_for_rank, why_failed

# YAML field -> (flag, type, default). The original's fields, plus the server's dtype and timeouts.
FIELDS = {
    "RWKV.layers": ("layers", list, None),
    "Llama.model_id": ("model_id", str, None),
    "kl_weight": ("kl_weight", float, 0.1),
    "ce_weight": ("ce_weight", float, 1.0),
    "model_file": ("model_file", str, ""),
    "teach_mode.is_client": ("is_client", bool, False),
    "teach_mode.nccl_file": ("nccl_file", str, "nccl.txt"),
    "teach_mode.is_hidden_align": ("is_hidden_align", bool, False),
    "teach_mode.num_groups": ("num_groups", int, 1),
    "teach_mode.logits_dtype": ("logits_dtype", str, "fp32"),
    "teach_mode.connect_timeout_s": ("connect_timeout_s", float, 600.0),
    "teach_mode.reply_timeout_s": ("reply_timeout_s", float, 600.0),
    "is_sft": ("is_sft", bool, False),
    "is_llama_ffn": ("is_llama_ffn", bool, False),
    "is_rwkv_att_only": ("is_rwkv_att_only", bool, False),
    "is_all_labels_kl": ("is_all_labels_kl", bool, False),
}
# --strategy -> common.hf_training sharding; the original's DeepSpeed stages run as DDP (ZeRO-2) or FSDP (ZeRO-3)
STRATEGIES = {"ddp": "ddp", "fsdp": "fsdp", "fsdp_offload": "fsdp_offload", "deepspeed_stage_2": "ddp",
              "deepspeed_stage_3": "fsdp", "deepspeed_stage_3_offload": "fsdp_offload"}
IGNORED = {"RWKV.grad_cp": "the --grad_cp flag decides (as in the original)", "RWKV.grap_cp": "a typo of grad_cp",
           "RWKV.pad_id": "unused; padding is the tokenizer's EOS"}


def _check_type(value, kind, where: str, flag: str, from_flag: bool = False):
    if from_flag and kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"          # fire keeps lower-case true/false as strings
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in v)}[kind](value)
    if not ok:
        want = "a list of layer indices" if kind is list else kind.__name__
        fix = f"e.g. --{flag} {'[0,2,4]' if kind is list else 'true' if kind is bool else 1}" if from_flag else \
            f"fix the file or override it with --{flag}"
        raise UserError(f"{where} must be {want}, got {type(value).__name__} {value!r} ({fix})")
    return list(value) if kind is list else kind(value)


def load_config(config_file: Optional[str], flags: dict) -> dict:
    """Flat {flag: value} from the YAML (nested as the original's) and the flags, type-checked."""
    cfg = {flag: default for flag, _, default in FIELDS.values()}
    if config_file:
        if not os.path.isfile(config_file):
            raise UserError(f"--config_file {config_file}: no such file (a YAML like rwkv_llama/run.sh writes)")
        with open(config_file) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                raise UserError(f"{config_file}{f':{mark.line + 1}' if mark else ''} is not valid YAML "
                                f"({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{config_file}: expected YAML fields (RWKV.layers, Llama.model_id, ...), got "
                            f"{type(raw).__name__}")
        flat = {}

        def walk(d, prefix=""):
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict) and key not in FIELDS:
                    walk(v, key + ".")
                else:
                    flat[key] = v
        walk(raw)
        for key, value in flat.items():
            if key in IGNORED:
                print0(f"{config_file}: {key} is ignored ({IGNORED[key]})")
                continue
            if key not in FIELDS:
                raise UserError(f"{config_file}: unknown field {key!r}; known fields: {', '.join(FIELDS)}")
            flag, kind, _ = FIELDS[key]
            cfg[flag] = _check_type(value, kind, f"{config_file}: field {key}", flag)
    by_flag = {flag: (key, kind) for key, (flag, kind, _) in FIELDS.items()}
    for flag, value in flags.items():
        if flag not in by_flag:
            raise UserError(f"unknown flag --{flag}; config flags: {', '.join('--' + f for f in by_flag)}")
        cfg[flag] = _check_type(value, by_flag[flag][1], f"--{flag}", flag, from_flag=True)
    if cfg["model_id"] is None:
        raise UserError("no teacher: set Llama.model_id in --config_file or pass --model_id")
    if cfg["layers"] is None:
        raise UserError("no layers to replace: set RWKV.layers in --config_file or pass --layers '[0,2,4]'")
    if cfg["is_llama_ffn"] and cfg["is_rwkv_att_only"]:
        raise UserError("is_llama_ffn and is_rwkv_att_only exclude each other; set one of them")
    check_choice("--logits_dtype", cfg["logits_dtype"], ("fp32", "bf16"))
    check_range("--num_groups", cfg["num_groups"], low=1)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Optimiser groups and the RWKV-LM schedule (spec §7)

def param_groups(model, weight_decay: float) -> list:
    """lerp/decay LoRAs (*_w1, *_w2), time_maa*, time_faaaa: no decay; time_decay: 2x lr; other >= 2-D
    weights decay; the rest not. Each group's "lr" is its multiplier; the schedule scales it."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(("_w1", "_w2")):
            key = ("lora", 1.0, 0.0)
        elif "time_maa" in name:
            key = ("time_maa", 1.0, 0.0)
        elif "time_decay" in name:
            key = ("time_decay", 2.0, 0.0)
        elif "time_faaaa" in name:
            key = ("time_faaaa", 1.0, 0.0)
        elif p.dim() >= 2:
            key = ("decay", 1.0, weight_decay)
        else:
            key = ("no_decay", 1.0, 0.0)
        groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr=mult, weight_decay=wd, name=name) for (name, mult, wd), ps in groups.items()]


def rwkv_lr(step: int, lr_init: float, lr_final: float, warmup_steps: int, total_steps: int) -> float:
    """Exponential from lr_init to lr_final over total_steps (linear if either is 0), warmup from 1% of it."""
    progress = min(max((step - warmup_steps + 1) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    if lr_init == 0 or lr_final == 0:
        lr = lr_init + (lr_final - lr_init) * progress
    else:
        lr = lr_init * math.exp(math.log(lr_final / lr_init) * progress)
    if step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr


# ---------------------------------------------------------------------------------------------------------
# Data: every rank reads the same stream and tokenises only its own rows (rwkv_llama/data.py)

def data_stream(chat_files, c4_data, languages, split: str, max_rows: Optional[int] = None):
    """The stream of UltraChat-style files (chat_files) or of the C4 interleave (c4_data, split); None if neither."""
    if chat_files:
        return chat_stream(chat_files, max_rows)
    if c4_data:
        return c4_stream(c4_data, languages, split, max_rows)
    return None


# ---------------------------------------------------------------------------------------------------------
# Losses (spec §4). Sums over the step are divided by `norm`, the whole step's count over all ranks.

def step_losses(student, batch, teacher, cfg, norm: dict):
    ids, labels, lengths = batch["input_ids"], batch["labels"], batch["lengths"]
    mask = labels != IGNORE
    targets = labels.clamp(min=0)       # pre-shifted: logits[t] predicts labels[t], no second shift
    attn = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
    if cfg["is_sft"]:
        logits = student(input_ids=ids, attention_mask=attn).logits
        ce = cross_entropy(logits, target_ids=targets, mask=mask, normalizer=norm["tokens"])
        return ce, dict(ce=ce.detach())
    with torch.no_grad():
        t_logits, t_hidden = teacher.forward(ids, lengths)
    if cfg["is_hidden_align"]:      # stage 1: every layer's output, the last one final-normed
        _, s_hidden = all_hidden_states(student, ids, attn)
        loss = hidden_mse(s_hidden, t_hidden.to(s_hidden.dtype), mask=mask) / norm["batches"]
        return loss, dict(hidden_mse=loss.detach())
    logits = student(input_ids=ids, attention_mask=attn).logits
    if cfg["is_all_labels_kl"]:     # batchmean: every position and vocabulary entry, divided by B
        kl = forward_kl(logits, t_logits, mask=torch.ones_like(mask), normalizer=norm["sequences"])
    else:
        kl = forward_kl(logits, t_logits, mask=mask, normalizer=norm["tokens"])
    ce = cross_entropy(logits, target_ids=targets, mask=mask, normalizer=norm["tokens"])
    return cfg["kl_weight"] * kl + cfg["ce_weight"] * ce, dict(kl=kl.detach(), ce=ce.detach())


def step_normaliser(batches, lay) -> dict:
    """Counts of the whole optimiser step over all ranks: summing the micro-batch losses divided by them gives
    the full-batch mean (DDP sums gradients). hidden_mse is a per-micro-batch mean: divide by the batches."""
    counts = torch.tensor([sum(int((b["labels"] != IGNORE).sum()) for b in batches),
                           sum(b["input_ids"].shape[0] for b in batches), len(batches)],
                          dtype=torch.float64, device=lay.device)
    tokens, sequences, n = all_reduce_dp(counts).tolist()
    return dict(tokens=max(tokens, 1.0), sequences=sequences, batches=n)


@torch.no_grad()
def evaluate(student, batches, teacher, cfg, lay) -> dict:
    """Mean of the loss terms, student CE and teacher CE over the validation micro-batches, over all ranks."""
    student.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=lay.device)
    for b in batches:
        b = {k: v.to(lay.device) for k, v in b.items()}
        mask = b["labels"] != IGNORE
        n = float(mask.sum())
        t_logits, t_hidden = teacher.forward(b["input_ids"], b["lengths"])
        attn = (torch.arange(b["input_ids"].shape[1], device=lay.device)[None] < b["lengths"][:, None]).long()
        if cfg["is_hidden_align"]:
            logits, s_hidden = all_hidden_states(student, b["input_ids"], attn)
            sums[3] += float(hidden_mse(s_hidden, t_hidden, mask=mask)) * n
        else:
            logits = student(input_ids=b["input_ids"], attention_mask=attn).logits
            sums[3] += float(forward_kl(logits, t_logits, mask=mask, normalizer=1.0))
        sums[0] += float(cross_entropy(logits, target_ids=b["labels"].clamp(min=0), mask=mask, normalizer=1.0))
        sums[1] += float(cross_entropy(t_logits, target_ids=b["labels"].clamp(min=0), mask=mask, normalizer=1.0))
        sums[2] += n
    all_reduce_dp(sums)
    student.train()
    n = max(float(sums[2]), 1.0)
    term = "val_hidden_mse" if cfg["is_hidden_align"] else "val_kl"
    return {"val_ce": float(sums[0]) / n, "val_teacher_ce": float(sums[1]) / n, term: float(sums[3]) / n}


# ---------------------------------------------------------------------------------------------------------
# Student weights (only the replaced layers: everything else is the teacher's)

def save_student(model, path: str, cfg: dict, weights: Optional[dict] = None) -> None:
    """The replaced layers' weights, from `weights` (a whole state dict: common.hf_training.full_state_dict of a
    sharded model) or the model's own."""
    model = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}
    weights = weights if weights is not None else {n: p.detach() for n, p in model.named_parameters()}
    save_tensors({names[id(p)]: weights[names[id(p)]].cpu() for m in rwkv_modules(model) for p in m.parameters()},
                 path)
    atomic_write_json(dict(layers=model.config.rwkv_layers, mode=model.config.rwkv_mode, model_id=cfg["model_id"],
                           head_size=cfg["head_size"], kv_layout=cfg["kv_layout"]), path + ".json")


def load_student(model, path: str) -> None:
    state = read_tensors(path)
    own = dict(model.named_parameters())
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if bad:
        raise UserError(f"--ckpt_file {path}: weights {bad[:3]} do not fit this student (other RWKV.layers, "
                        "mode or teacher?); build it with the settings of the run that wrote the file")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def data_files(paths) -> list:
    """--train_data / --val_data as a list of files (fire gives one path as a string, several as a tuple)."""
    return [] if not paths else [paths] if isinstance(paths, str) else list(paths)


def check_inputs(cfg, train_data, val_data, c4_data, ckpt_file, dtype, kv_layout, max_steps, counts: dict) -> None:
    """Flags, data files and the teacher folder, checked before anything loads."""
    for name, value in counts.items():
        if value is not None:
            check_range(f"--{name}", value, low=1)
    if max_steps is not None:
        check_range("--max_steps", max_steps, low=0)  # 0: save the initial student
    if dtype is not None:
        check_choice("--dtype", dtype, DTYPES)
    check_choice("--kv_layout", kv_layout, ("tile", "interleave"))
    if bool(train_data) == bool(c4_data):
        raise UserError("pass exactly one data source: --train_data (UltraChat-style JSONL/parquet files, with "
                        "--val_data) or --c4_data DIR (its train and validation splits)")
    for flag, paths in (("--train_data", train_data), ("--val_data", val_data)):
        for path in data_files(paths):
            if not os.path.isfile(str(path)):
                raise UserError(f"{flag} {path}: no such file (UltraChat-style JSONL, JSONL.gz, JSON or parquet)")
    if c4_data and not os.path.isdir(c4_data):
        raise UserError(f"--c4_data {c4_data}: no such folder (one subfolder per language with *train* / "
                        f"*validation* files)")
    if ckpt_file and not os.path.isfile(ckpt_file):
        raise UserError(f"--ckpt_file {ckpt_file}: no such file (the student.safetensors of an earlier stage)")
    hf.check_model_folder(cfg["model_id"], "Llama.model_id")


def main(config_file: Optional[str] = None, output_dir: str = "out/rwkv_llama", max_epochs: int = 1,
         max_steps: Optional[int] = None, num_devices: Optional[int] = None, num_nodes: int = 1, grad_cp: int = 0,
         max_seq_length: int = 2048, lr_init: float = 1e-4, lr_final: float = 1e-5, warmup_steps: int = 0,
         micro_bsz: int = 2, accumulate_grad_batches: int = 1, train_data=None, val_data=None,
         c4_data: Optional[str] = None,
         languages=("en", "zh"), max_rows: Optional[int] = None, shuffle_buffer: int = 10_000,
         dropout: float = 0.0, strategy: str = "ddp", epoch_count: int = 150,
         weight_decay: float = 0.1, val_check_interval: Optional[int] = None, log_every_n_steps: int = 1000,
         ckpt_file: Optional[str] = None, seed: int = 42, head_size: int = 64, kv_layout: str = "tile",
         chunk_len: int = 32, max_val_batches: int = 16, dtype: Optional[str] = None, **config_flags):
    """Train one stage; writes {output_dir}/student.safetensors, metrics.jsonl and resumable checkpoints.
    The data is streamed: `max_rows` caps the training rows (quick runs), `shuffle_buffer` rows are shuffled at
    a time (rank_batches)."""
    from tqdm import tqdm

    cfg = load_config(config_file, config_flags)
    sharding = STRATEGIES.get("deepspeed_stage_2" if strategy.startswith("deepspeed_stage_2") else strategy)
    if sharding is None:
        raise UserError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)} (deepspeed_stage_2* too)")
    if strategy.startswith("deepspeed"):
        print0(f"--strategy {strategy}: DeepSpeed ZeRO-{strategy[len('deepspeed_stage_')]} is run as "
               + {"ddp": "plain DDP", "fsdp": "PyTorch FSDP (parameters, gradients and optimiser states sharded)",
                  "fsdp_offload": "PyTorch FSDP with CPU offload (parameters, gradients and optimiser states sharded, "
                                  "kept on the CPU; the optimiser steps there)"}[sharding])
    check_inputs(cfg, train_data, val_data, c4_data, ckpt_file, dtype, kv_layout, max_steps,
                 dict(max_epochs=max_epochs, max_seq_length=max_seq_length, micro_bsz=micro_bsz, max_rows=max_rows,
                      shuffle_buffer=shuffle_buffer, accumulate_grad_batches=accumulate_grad_batches,
                      epoch_count=epoch_count, head_size=head_size,
                      chunk_len=chunk_len, log_every_n_steps=log_every_n_steps,
                      val_check_interval=val_check_interval, num_devices=num_devices, num_nodes=num_nodes))
    lay = setup(seed)
    if num_devices is not None and num_devices * num_nodes != lay.dp_size:
        raise UserError(f"--num_devices {num_devices} x --num_nodes {num_nodes} != {lay.dp_size} processes: "
                        f"launch with torchrun --nproc_per_node {num_devices} (or drop --num_devices)")
    dtype = dtype or ("bfloat16" if lay.device.type == "cuda" else "float32")
    tokenizer = hf.load_tokenizer(cfg["model_id"], flag="Llama.model_id")
    tokenizer.pad_token = tokenizer.eos_token
    stream = data_stream(train_data, c4_data, languages, "train", max_rows)
    val_stream = data_stream(val_data, c4_data, languages, "validation")
    for s in (stream, val_stream):
        if s is not None:
            s.n_rows                    # every row read and checked once, before the models load
    teacher_model = hf.load_model(cfg["model_id"], dtype="float32", device=load_device(lay, sharding), frozen=True,
                                  flag="Llama.model_id")
    mode = "att_only" if cfg["is_rwkv_att_only"] else "llama_ffn" if cfg["is_llama_ffn"] else "block"
    head_size = head_size_for(teacher_model.config.hidden_size, head_size)
    cfg.update(head_size=head_size, kv_layout=kv_layout)
    torch.manual_seed(seed)     # the random parts (gate, LoRAs) as eval.build_model(layers=..., seed=seed) draws them
    student = build_hybrid(teacher_model, cfg["layers"], mode, head_size=head_size, kv_layout=kv_layout,
                           dropout=dropout, chunk_len=chunk_len, grad_cp=bool(grad_cp)).train()
    if ckpt_file:
        load_student(student, ckpt_file)
    hf.check_vocab(student, teacher_model, tokenizer, tokenizer, flags=("Llama.model_id", "Llama.model_id"))
    if cfg["is_sft"]:
        teacher = None
    elif cfg["is_client"]:
        teacher = client_for_rank(cfg["nccl_file"], lay.rank, lay.world_size, cfg["num_groups"], batch=micro_bsz,
                                  length=max_seq_length, vocab=hf.vocab_width(student),
                                  hidden=student.config.hidden_size,
                                  n_layers=student.config.num_hidden_layers, pad_id=tokenizer.eos_token_id,
                                  output_all_hiddens=cfg["is_hidden_align"], logits_dtype=cfg["logits_dtype"],
                                  device=lay.device, connect_timeout_s=cfg["connect_timeout_s"],
                                  reply_timeout_s=cfg["reply_timeout_s"])
    else:
        teacher = InProcessTeacher(wrap_model(teacher_model, lay, sharding), output_all_hiddens=cfg["is_hidden_align"])
    if teacher is None or cfg["is_client"]:
        del teacher_model

    batches_per_epoch = stream.n_rows // (lay.dp_size * micro_bsz)
    epoch_steps = batches_per_epoch // accumulate_grad_batches
    if epoch_steps == 0:
        raise UserError(f"{stream.n_rows} training rows give no step of {lay.dp_size} ranks x --micro_bsz {micro_bsz} "
                        f"x --accumulate_grad_batches {accumulate_grad_batches}")
    total_steps = epoch_steps * max_epochs if max_steps is None else max_steps
    if epoch_count > max_epochs:
        print0(f"note: --epoch_count {epoch_count} > --max_epochs {max_epochs}: the lr schedule spans {epoch_count} "
               f"epochs (RWKV-LM style), so this run stays near lr_init {lr_init}")

    model = wrap_model(student, lay, sharding, dtype)  # DDP, or the student sharded in place (before its optimizer)
    optimizer = torch.optim.AdamW(param_groups(student, weight_decay), betas=(0.9, 0.95), eps=1e-8)
    schedule_steps = epoch_count * epoch_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: rwkv_lr(s, lr_init, lr_final, warmup_steps, schedule_steps))
    state = load_checkpoint(output_dir, lay, student, optimizer, scheduler) or {"step": 0}
    if state["step"]:
        print0(f"resuming from step {state['step']}")

    def epoch_batches(stream, epoch, start=0):
        return rank_batches(stream, tokenizer, max_seq_length, micro_bsz, epoch=epoch, seed=seed, dp_rank=lay.dp_rank,
                            dp_size=lay.dp_size, shuffle_buffer=shuffle_buffer, start=start)
    val = list(islice(epoch_batches(val_stream, 0), max_val_batches)) if val_stream else []
    os.makedirs(output_dir, exist_ok=True)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    real_bsz = micro_bsz * accumulate_grad_batches * lay.dp_size
    if cfg["is_client"] and lay.world_size > 1:   # a trainer that ends or stops ends the others in time too
        set_timeout(cfg["reply_timeout_s"])
    bar = tqdm(total=total_steps, initial=state["step"], disable=not lay.is_main, desc="stage 1" if
               cfg["is_hidden_align"] else "stage 2", file=sys.stdout)
    epoch, this_epoch = -1, None
    for step in range(state["step"], total_steps):
        if step // epoch_steps != epoch:     # a new epoch, or a resumed run: the same stream from its position
            epoch = step // epoch_steps
            this_epoch = epoch_batches(stream, epoch, start=step % epoch_steps * accumulate_grad_batches)
        batches = [{n: v.to(lay.device) for n, v in b.items()} for b in islice(this_epoch, accumulate_grad_batches)]
        t0 = time.perf_counter()
        norm = step_normaliser(batches, lay)
        logged = {}
        for i, batch in enumerate(batches):
            with grad_sync(model, i == len(batches) - 1), autocast(dtype, lay.device):
                loss, parts = step_losses(model, batch, teacher, cfg, norm)
                loss.backward()
            for name, v in dict(loss=loss.detach(), **parts).items():
                logged[name] = logged.get(name, 0.0) + v
        grad_norm = optimizer_step(optimizer, scheduler, None, 1.0)
        state["step"] = step + 1
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=lay.device) for v in logged.values()])
        totals = dict(zip(logged, all_reduce_dp(totals).tolist()))
        dt = time.perf_counter() - t0
        record = dict(step=state["step"], **totals, lr=optimizer.param_groups[0]["lr"] /
                      optimizer.param_groups[0].get("initial_lr", 1.0), grad_norm=grad_norm,
                      kt_per_s=max_seq_length * real_bsz / dt / 1000, tokens=state["step"] * real_bsz * max_seq_length)
        if val_check_interval and state["step"] % val_check_interval == 0 and val:
            record.update(evaluate(model, val, teacher, cfg, lay))
        if lay.is_main:
            append_jsonl(metrics_path, record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}", kts=f"{record['kt_per_s']:.2f}")
        bar.update(1)
        if state["step"] % log_every_n_steps == 0 and state["step"] < total_steps:
            save_checkpoint(output_dir, state, lay, student, optimizer, scheduler, keep=2)
    bar.close()
    final = evaluate(model, val, teacher, cfg, lay) if val else {}
    weights = full_state_dict(student)  # every rank: a sharded student is gathered to rank 0
    if lay.is_main:
        save_student(student, os.path.join(output_dir, "student.safetensors"), cfg, weights)
        atomic_write_json(dict(step=state["step"], **final), os.path.join(output_dir, "final_metrics.json"))
        print0(f"done: {state['step']} steps; " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    if teacher is not None:
        teacher.shutdown()
    shutdown()
    return None


def end_on_fault(e: BaseException) -> None:
    """A peer of this trainer ended or stopped: the teacher server (TeacherError) or another trainer (a failed
    collective). One line, from the trainer of the group that reports it, then exit 1 without the interpreter's
    teardown: gloo's threads may still hold the sockets of dead peers. Anything else is re-raised."""
    if isinstance(e, TeacherError):
        if e.report:
            print(f"error: {e}", file=sys.stderr, flush=True)
    elif peer_failure(e):
        print(f"error: trainer rank {os.environ.get('RANK', '0')}: another trainer of this data-parallel group "
              f"ended or stopped ({why_failed(e)})", file=sys.stderr, flush=True)
    else:
        raise e
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    try:
        run_cli(main)
    except RuntimeError as e:
        end_on_fault(e)
