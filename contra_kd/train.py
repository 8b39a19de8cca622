"""Distil a transformers causal LM on Dolly-style data: SFT, KD, SeqKD, DistiLLM, FDD, DistiLLM-2, each of the
last three optionally with CONTRA-KD (contra_kd.md §5, losses.md).

    torchrun --nproc_per_node N contra_kd/train.py --type distillm+contra \
        --model-path INIT --teacher-model-path TEACHER --data-dir processed_data/dolly/full/gpt2 \
        --lm-data-dir processed_data/openwebtext/gpt2/512/22.87K --save runs/gpt2/distillm_contra \
        --velocity-field VF/velocity_field.safetensors --projector VF/projector.safetensors \
        [--batch-size 16] [--lr 5e-4] [--epochs 20] [--peft lora]

Objective per optimiser step (λ = kd_ratio, token means over response tokens of the whole step):
    sft, seqkd   CE                              (seqkd: --data-dir holds teacher outputs, contra_kd/generate_data.py)
    kd           (1-λ)·CE + λ·soft-CE(p, q)
    distillm     (1-λ)·CE + λ·SKL_α or SRKL_α    (--loss skl | srkl), on ground truth, fresh student outputs or
                                                  replayed ones, chosen each step by the adaptive schedule (§5.3)
    fdd          (1-λ)·CE + λ·(RKL + L_FDD)
    distillm2    mean over pairs of (2-β)·SKL_α(teacher output) + β·SRKL_α(student output, mixture detached)
    +contra      + λ·L_CONTRA(k = (epoch+1)/E), projector and field frozen; after every student epoch the field
                 and projector are re-fitted for --velocity-epochs epochs of L_RF on the current student
    any type     + lm_coef·CE on an OpenWebText chunk per micro-batch when --lm-data-dir is given
AdamW (weight decay 0.01, none on biases and norms), cosine from lr to lr_min over all steps, no warmup,
clip 1.0; `--dtype bfloat16` / `float16` runs every forward (sampling included) under autocast over fp32 weights.
Each epoch ends with the dev CE (DistiLLM's threshold; `--select-by loss`) and the dev Rouge-L of
sampled responses (`--select-by rougeL`, default); the best epoch is exported to `save/best`, the last to
`save/final`, and with `--save-interval N` (the original's flag; -1: none) the student every N optimiser
steps to `save/step-N`.

The run is a fixed sequence of units (dev evaluation of the start point, student steps, epoch ends, re-fit
steps) whose randomness is keyed by (seed, unit, rank), so 1 process x GA 2 and 2 processes x GA 1 follow
the same loss curve and a killed run resumes exactly: re-run the same command. Checkpoints
(common/hf_training) after every epoch end and re-fit, and every --save-steps units; the velocity field, its
optimiser and the replay buffers sit beside them in `save/extras/step-N/`, written before the checkpoint
commits.
"""
import functools
import os
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun contra_kd/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common import hf
from common.cli import UserError, run_cli
from common.distributed import all_reduce_dp, print0, rank_seed, setup, shutdown
from common.generation import generate
from common.hf_training import (autocast, export_model, grad_scaler, grad_sync, load_checkpoint, lr_schedule,
                                optimizer_step, save_checkpoint, unwrap, wrap_ddp)
from common.io import append_jsonl, atomic_save, atomic_write_json, read_jsonl, write_jsonl
from common.losses import (contra_loss, cross_entropy, fdd_loss, reverse_kl, skew_forward_kl, skew_reverse_kl,
                           soft_cross_entropy)
from common.metrics import rouge_l
from common.training import complete_checkpoints, global_count
from contra_kd.data import (ChunkSplit, InstructionSplit, collate, epoch_order, model_inputs, rank_micro_batches)
from contra_kd.distillm import AdaptiveSGO, ReplayBuffer
from contra_kd.eval import sample_responses
from contra_kd.flow import Flow, load_flow, save_flow
from contra_kd.train_velocity_field import fit_step, flow_expectation, flow_optimizer, layer_pairing, sequence_times

TYPES = ("sft", "kd", "seqkd", "distillm", "fdd", "distillm2")
CONTRA_BASES = ("distillm", "fdd", "distillm2")
# original --type strings -> (ours, --loss they imply). srkl-aesop keeps the adaptive SGOs its name check dropped.
ALIASES = {"adaptive-sfkl": ("distillm", "skl"), "adaptive-srkl": ("distillm", "srkl"),
           "srkl-aesop": ("distillm", "srkl"), "rkl-fdd": ("fdd", None),
           "adaptive-srkl-contra": ("distillm+contra", "srkl"), "rkl-contra-fdd": ("fdd+contra", None),
           "distillm2-v2": ("distillm2", None), "distillm2-v2-contra": ("distillm2+contra", None)}


def parse_type(type_: str, loss: str):
    """(base type, with CONTRA, DistiLLM divergence) from --type and --loss."""
    type_, implied = ALIASES.get(type_, (type_, None))
    loss = implied or loss
    base, contra = (type_[:-len("+contra")], True) if type_.endswith("+contra") else (type_, False)
    valid = list(TYPES) + [f"{b}+contra" for b in CONTRA_BASES] + list(ALIASES)
    if base not in TYPES or (contra and base not in CONTRA_BASES):
        raise UserError(f"--type {type_!r} is not one of: {', '.join(valid)}")
    if loss not in ("skl", "srkl"):
        raise UserError(f"--loss {loss!r}: use skl or srkl")
    return base, contra, loss


def add_lora(model, r, alpha, dropout, model_path):
    try:
        return hf.add_lora(model, r=r, alpha=alpha, dropout=dropout)
    except ValueError as e:
        raise UserError(f"--peft lora: peft cannot wrap {model_path} ({model.config.model_type}) with its default "
                         f"targets ({str(e).splitlines()[0]}); use a model peft supports or train it fully "
                         f"without --peft") from None


def build_optimizer(model, lr: float, weight_decay: float = 0.01):
    """AdamW; no weight decay on biases and norm weights (the one-dimensional parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=lr)


def per_sequence_mean(loss_fn, student_logits, teacher_logits, mask, rows, **kwargs):
    """Σ over `rows` of each sequence's token mean (DistiLLM-2 reduces per sequence, then over the batch)."""
    total = student_logits.new_zeros(())
    for b in rows:
        total = total + loss_fn(student_logits[b:b + 1], teacher_logits[b:b + 1], mask=mask[b:b + 1], **kwargs)
    return total


def plan_units(epochs: int, steps_per_epoch: int, refit_steps: int, refit_epochs) -> list:
    """The run as a list of (kind, epoch, index): start, step x steps_per_epoch, epoch_end, then refit steps
    after the epochs in `refit_epochs`."""
    units = [("start", -1, 0)]
    for epoch in range(epochs):
        units += [("step", epoch, i) for i in range(steps_per_epoch)] + [("epoch_end", epoch, 0)]
        if epoch in refit_epochs:
            units += [("refit", epoch, i) for i in range(refit_steps)] + [("refit_end", epoch, 0)]
    return units


def main(type: str = "sft", loss: str = "srkl", model_path: str = None, teacher_model_path: str = None,
         data_dir: str = None, lm_data_dir: str = None, gt_data_dir: str = None, save: str = None,
         lr: float = 5e-4, lr_min: float = 1e-7, weight_decay: float = 0.01, batch_size: int = 8,
         gradient_accumulation_steps: int = 1, epochs: int = 20, seed: int = 10, max_length: int = 512,
         max_prompt_length: int = 256, kd_ratio: float = 1.0, lm_coef: float = 1.0, skew_alpha: float = 0.1,
         init_threshold: float = 0.0, loss_eps: float = 0.1, capacity: int = 1000, replay_ratio: str = "decreasing",
         gen_top_p: float = 1.0, num_distill_layers: int = 6, fdd_mask: str = "response", velocity_epochs: int = 1,
         velocity_update_interval: int = 1, velocity_field: str = None, projector: str = None,
         velocity_dropout: float = 0.1, gradual_beta: bool = False, peft: str = None, peft_lora_r: int = 16,
         peft_lora_alpha: float = 64, peft_lora_dropout: float = 0.1, select_by: str = "rougeL",
         save_steps: int = 0, save_interval: int = -1, clip_grad: float = 1.0, dtype: str = "float32",
         eval_batch_size: int = 8):
    base, contra, loss = parse_type(type, loss)
    for flag, value in (("--model-path", model_path), ("--data-dir", data_dir), ("--save", save)):
        if not value:
            raise UserError(f"{flag} is required")
    needs_teacher = base in ("kd", "distillm", "fdd", "distillm2") or contra
    if needs_teacher and not teacher_model_path:
        raise UserError(f"--type {type} needs --teacher-model-path")
    if contra and not (velocity_field and projector):
        raise UserError(f"--type {type} needs --velocity-field and --projector (contra_kd/train_velocity_field.py)")
    if base == "distillm2" and not gt_data_dir:
        raise UserError("--type distillm2 needs --gt-data-dir (ground-truth Dolly `full` data: dev set, re-fits)")
    if peft not in (None, "lora"):
        raise UserError(f"--peft {peft!r}: only 'lora' is supported")
    if select_by not in ("rougeL", "loss"):
        raise UserError(f"--select-by {select_by!r}: use rougeL or loss")
    if fdd_mask not in ("response", "attention"):
        raise UserError(f"--fdd-mask {fdd_mask!r}: use response (ours) or attention (the original)")

    lay = setup(seed)
    tokenizer = hf.load_tokenizer(model_path, flag="--model-path")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    student = hf.load_model(model_path, dtype="float32", device=lay.device, flag="--model-path")
    teacher = None
    if needs_teacher:
        teacher = hf.load_model(teacher_model_path, device=lay.device, frozen=True, flag="--teacher-model-path")
        hf.check_vocab(student, teacher, tokenizer)
    if peft:
        student = add_lora(student, peft_lora_r, peft_lora_alpha, peft_lora_dropout, model_path)
    pairing = layer_pairing(student, teacher, num_distill_layers) if base == "fdd" or contra else None
    flow = None
    if contra:
        field, proj = load_flow(velocity_field, projector, flow_expectation(student, teacher, pairing), velocity_dropout)
        flow = Flow(field, proj).to(lay.device)

    # data: a global batch per optimiser step (batch x GA x processes)
    dev = InstructionSplit(gt_data_dir if base == "distillm2" else data_dir, "valid")
    if dev.records is None:
        raise UserError(f"{gt_data_dir if base == 'distillm2' else data_dir}: valid.jsonl (the dev references) is "
                         f"missing; re-run contra_kd/prepare_data.py")
    if base == "distillm2":
        tgo, sgo_data = (InstructionSplit(os.path.join(data_dir, k), "train") for k in ("tgo", "sgo"))
        if len(tgo) != len(sgo_data):
            raise UserError(f"{data_dir}: tgo holds {len(tgo)} items and sgo {len(sgo_data)}; they must pair up")
        train = list(zip((tgo[i] for i in range(len(tgo))), (sgo_data[i] for i in range(len(sgo_data)))))
    else:
        train = InstructionSplit(data_dir, "train")
        if len(train) and train[0][1] is None:
            raise UserError(f"--data-dir {data_dir} holds prompt-only items; train on the `full` variant")
    refit_data = InstructionSplit(gt_data_dir or data_dir, "train") if contra else None
    lm = ChunkSplit(lm_data_dir, "train") if lm_data_dir else None
    global_batch = batch_size * gradient_accumulation_steps * lay.dp_size
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--data-dir {data_dir}: {len(train)} items, fewer than one global batch of {global_batch} "
                         f"(batch-size x gradient-accumulation-steps x processes)")
    total_iters = epochs * steps_per_epoch
    refit_epochs = {e for e in range(epochs - 1) if (e + 1) % velocity_update_interval == 0} if contra else set()
    refit_steps = velocity_epochs * (len(refit_data) // global_batch) if contra else 0
    units = plan_units(epochs, steps_per_epoch, refit_steps, refit_epochs)

    optimizer = build_optimizer(student, lr, weight_decay)
    scheduler = lr_schedule(optimizer, "cosine", 0, total_iters, min_lr=lr_min)
    scaler = grad_scaler(dtype, lay.device)
    if contra:  # one cosine schedule spanning all re-fit rounds, at the student lr
        flow_opt = flow_optimizer(flow.field, flow.projector, lr, weight_decay)
        flow_sched = lr_schedule(flow_opt, "cosine", 0, max(1, len(refit_epochs) * refit_steps), min_lr=lr_min)
    schedule = AdaptiveSGO(init_threshold, loss_eps, capacity, replay_ratio) if base == "distillm" else None
    buffer = ReplayBuffer(capacity) if schedule else None

    state = load_checkpoint(save, lay, student, optimizer, scheduler, scaler)
    extras = lambda step: os.path.join(save, "extras", f"step-{step:08d}")  # noqa: E731
    metrics_path = os.path.join(save, "metrics.jsonl")
    if lay.is_main:
        os.makedirs(save, exist_ok=True)
    plan = {"type": f"{base}{'+contra' if contra else ''}", "units": len(units), "global_batch": global_batch}
    if state is None:
        state = {"step": 0, "best": None, "plan": plan}
        if lay.is_main and os.path.exists(metrics_path):
            os.remove(metrics_path)  # rows of an attempt that never reached a checkpoint
    else:
        if state.get("plan") != plan:
            raise UserError(f"{save} holds a run of {state.get('plan')}, this command plans {plan}: resume with the "
                             f"same type, epochs, data and batch settings, or pass another --save")
        if contra:
            flow_file = os.path.join(extras(state["step"]), "flow.pt")
            saved = torch.load(flow_file, map_location=lay.device, weights_only=True)
            flow.load_state_dict(saved["flow"])
            flow_opt.load_state_dict(saved["optimizer"])
            flow_sched.load_state_dict(saved["scheduler"])
        if schedule:
            schedule.load_state_dict(state["sgo"])
            buffer.load_state_dict(read_jsonl(os.path.join(extras(state["step"]), f"buffer-{lay.rank:02d}.jsonl"))[0])
        if lay.is_main and os.path.exists(metrics_path):
            write_jsonl([r for r in read_jsonl(metrics_path, drop_partial_last=True) if r["unit"] < state["step"]],
                        metrics_path)
        print0(f"resumed {save} at unit {state['step']} of {len(units)}")
    ddp = wrap_ddp(student, lay)
    flow_ddp = wrap_ddp(flow, lay) if contra else None  # wrapped while trainable; frozen outside re-fits
    if contra:
        flow.eval().requires_grad_(False)
    print0(f"--type {base}{'+contra' if contra else ''} (loss {loss if base == 'distillm' else '-'}): {len(train)} "
           f"train items, {steps_per_epoch} steps/epoch x {epochs}, global batch {global_batch}, "
           f"{len(refit_epochs)} re-fits of {refit_steps} steps, {lay.dp_size} process(es)")

    def log(row):
        if lay.is_main:
            append_jsonl(metrics_path, row)

    def checkpoint():
        folder = extras(state["step"])
        if lay.is_main:
            os.makedirs(folder, exist_ok=True)
        if lay.dp_size > 1:
            torch.distributed.barrier()
        if contra and lay.is_main:
            atomic_save({"flow": flow.state_dict(), "optimizer": flow_opt.state_dict(),
                         "scheduler": flow_sched.state_dict()}, os.path.join(folder, "flow.pt"))
        if schedule:
            write_jsonl([buffer.state_dict()], os.path.join(folder, f"buffer-{lay.rank:02d}.jsonl"))
            state["sgo"] = schedule.state_dict()
        save_checkpoint(save, state, lay, student, optimizer, scheduler, scaler, tokenizer)
        if lay.is_main:  # extras of pruned checkpoints
            keep = {os.path.basename(f) for f in complete_checkpoints(save)}
            for old in os.listdir(os.path.join(save, "extras")):
                if old not in keep:
                    shutil.rmtree(os.path.join(save, "extras", old), ignore_errors=True)

    def dev_loss():
        """Token-mean CE of the student on the ground-truth dev split, sharded over processes."""
        unwrap(student).eval()
        total, count = torch.zeros((), device=lay.device), 0
        mine = list(range(lay.dp_rank, len(dev), lay.dp_size))
        with torch.no_grad():
            for i in range(0, len(mine), eval_batch_size):
                batch = collate([dev[j] for j in mine[i:i + eval_batch_size]], pad_id, max_length, lay.device)
                with autocast(dtype, lay.device):
                    logits = unwrap(student)(**model_inputs(batch)).logits
                n = int(batch["mask"].sum())
                total += cross_entropy(logits, target_ids=batch["target_ids"], mask=batch["mask"]) * n
                count += n
        return (all_reduce_dp(total) / global_count(count, lay.device)).item()

    def dev_rouge():
        with autocast(dtype, lay.device):
            preds = sample_responses(unwrap(student), tokenizer, [r["prompt"] for r in dev.records], lay=lay,
                                     seed=seed, batch_size=eval_batch_size, max_prompt_length=max_prompt_length,
                                     max_new_tokens=max_length - max_prompt_length, desc="dev Rouge-L")
        return 100 * sum(rouge_l(p, r["output"]) for p, r in zip(preds, dev.records)) / len(preds)

    @functools.lru_cache(maxsize=2)
    def lm_order(wrap):
        return epoch_order(len(lm), seed, f"lm-{wrap}")

    def lm_micro_batches(step, micro):
        """OpenWebText chunks: the p-th of the run is item p of a permutation redrawn each pass over the corpus."""
        positions = [[step * global_batch + off + j for j in range(len(idx))] for off, idx in micro]
        return [collate([([], lm[lm_order(p // len(lm))[p % len(lm)]]) for p in ps], pad_id, max_length, lay.device)
                for ps in positions]

    def student_pairs(step, micro):
        """This rank's (prompt, response) pairs per micro-batch, and where they came from (§5.3)."""
        source = "ground_truth"
        if schedule:
            r = random.Random(f"{seed}-sgo-{step}").random()  # one draw per step, the same on every rank
            source = schedule.choose(step, total_iters, r, len(buffer))
        if base == "distillm2":  # [teacher outputs; student outputs] of the same prompts
            return [[train[i][0] for i in idx] + [train[i][1] for i in idx] for _, idx in micro], source
        if source == "ground_truth":
            return [[train[i] for i in idx] for _, idx in micro], source
        if source == "replay":
            rng = random.Random(f"{seed}-replay-{step}-{lay.dp_rank}")
            return [buffer.sample(len(idx), rng) for _, idx in micro], source
        gen = torch.Generator(device=lay.device).manual_seed(rank_seed(seed, step, lay.dp_rank))
        out = []
        for _, idx in micro:
            prompts = [train[i][0][-max_prompt_length:] for i in idx]
            with autocast(dtype, lay.device):
                responses = generate(unwrap(student), prompts, max_length - max_prompt_length, temperature=1.0,
                                     top_p=gen_top_p, top_k=0, eos_id=eos_id, pad_id=pad_id, padding="left",
                                     generator=gen)
            pairs = list(zip(prompts, [list(r) for r in responses]))
            buffer.push(pairs)
            out.append(pairs)
        return out, source

    def objective(out, t_out, batch, k, n_tok, n_fdd, n_pairs, step):
        """The step's loss for one micro-batch (already divided by whole-step counts) and its logged terms."""
        logits, mask = out.logits, batch["mask"]
        terms = {}
        if base == "distillm2":
            half = logits.shape[0] // 2
            beta = 1 + 0.5 * min(1.0, 2 * step / total_iters) if gradual_beta else 1.0
            tgo = per_sequence_mean(skew_forward_kl, logits, t_out.logits, mask, range(half), alpha=skew_alpha)
            sgo = per_sequence_mean(skew_reverse_kl, logits, t_out.logits, mask, range(half, 2 * half),
                                    alpha=skew_alpha, detach_mixture=True)
            terms["loss_tgo_skl"], terms["loss_sgo_srkl"] = tgo / n_pairs, sgo / n_pairs
            total = ((2 - beta) * tgo + beta * sgo) / n_pairs
        else:
            ce = cross_entropy(logits, target_ids=batch["target_ids"], mask=mask, normalizer=n_tok)
            terms["loss_ce"] = ce
            if base in ("sft", "seqkd"):
                total = ce
            elif base == "kd":
                kd = soft_cross_entropy(logits, t_out.logits, mask=mask, normalizer=n_tok)
                terms["loss_kd"], total = kd, (1 - kd_ratio) * ce + kd_ratio * kd
            elif base == "distillm":
                divergence = skew_forward_kl if loss == "skl" else skew_reverse_kl
                d = divergence(logits, t_out.logits, mask=mask, alpha=skew_alpha, normalizer=n_tok)
                terms[f"loss_{loss}"], total = d, (1 - kd_ratio) * ce + kd_ratio * d
            else:  # fdd
                rkl = reverse_kl(logits, t_out.logits, mask=mask, normalizer=n_tok)
                fmask = mask if fdd_mask == "response" else batch["attention_mask"].bool()
                head_s, head_t = unwrap(student).get_output_embeddings(), teacher.get_output_embeddings()
                fdd = fdd_loss([out.hidden_states[i] for i in pairing["student_layers"]],
                               [t_out.hidden_states[i] for i in pairing["teacher_layers"]], head_s, head_t,
                               mask=fmask, normalizer=n_fdd)
                terms["loss_rkl"], terms["loss_fdd"] = rkl, fdd
                total = (1 - kd_ratio) * ce + kd_ratio * (rkl + fdd)
        if contra:
            c = contra_loss(flow.field, flow.projector, [out.hidden_states[i] for i in pairing["student_layers"]],
                            mask=mask, k=k, normalizer=n_tok)
            terms["loss_contra"], total = c, total + kd_ratio * c
        return total, terms

    def student_step(epoch, step, index):
        items = epoch_order(len(train), seed, epoch)[index * global_batch:(index + 1) * global_batch]
        micro = rank_micro_batches(items, lay.dp_rank, lay.dp_size, batch_size)
        pairs, source = student_pairs(step, micro)
        unwrap(student).train()
        batches = [collate(p, pad_id, max_length, lay.device) for p in pairs]
        lm_batches = lm_micro_batches(step, micro) if lm else []
        n_tok = global_count(sum(int(b["mask"].sum()) for b in batches), lay.device)
        n_fdd = global_count(sum(int(b["attention_mask"].sum()) for b in batches), lay.device) \
            if fdd_mask == "attention" else n_tok
        n_pairs = global_count(sum(b["input_ids"].shape[0] // 2 for b in batches), lay.device)
        n_lm = global_count(sum(int(b["mask"].sum()) for b in lm_batches), lay.device) if lm else 1
        hidden = base == "fdd" or contra
        k = (epoch + 1) / epochs
        logged, tokens = {}, 0
        for m, batch in enumerate(batches):
            if lm:  # its own backward, never the step's last, so DDP syncs once
                with grad_sync(ddp, False):
                    with autocast(dtype, lay.device):
                        lm_logits = ddp(**model_inputs(lm_batches[m])).logits
                        lm_loss = lm_coef * cross_entropy(lm_logits, target_ids=lm_batches[m]["target_ids"],
                                                          mask=lm_batches[m]["mask"], normalizer=n_lm)
                    scaler.scale(lm_loss).backward()
                logged["loss_lm"] = logged.get("loss_lm", 0.0) + lm_loss.detach() / lm_coef
                tokens += int(lm_batches[m]["attention_mask"].sum())
            with grad_sync(ddp, m == len(batches) - 1):
                with autocast(dtype, lay.device):
                    out = ddp(**model_inputs(batch), output_hidden_states=hidden)
                    t_out = None
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = teacher(**model_inputs(batch), output_hidden_states=base == "fdd")
                    total, terms = objective(out, t_out, batch, k, n_tok, n_fdd, n_pairs, step)
                scaler.scale(total).backward()
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + value.detach()
            logged["loss"] = logged.get("loss", 0.0) + total.detach()
            tokens += int(batch["attention_mask"].sum())
        grad_norm = optimizer_step(optimizer, scheduler, scaler, clip_grad)
        values = {k_: all_reduce_dp(v.reshape(()).float().clone()).item() for k_, v in logged.items()}
        if lm:
            values["loss"] += lm_coef * values["loss_lm"]
        return values, source, global_count(tokens, lay.device), grad_norm

    def refit_step(round_, index):
        n_round = len(refit_data) // global_batch
        epoch_in_round, i = divmod(index, n_round)
        items = epoch_order(len(refit_data), seed, f"refit-{round_}-{epoch_in_round}")[i * global_batch:
                                                                                        (i + 1) * global_batch]
        micro = [(off, collate([refit_data[j] for j in idx], pad_id, max_length, lay.device))
                 for off, idx in rank_micro_batches(items, lay.dp_rank, lay.dp_size, batch_size)]
        unwrap(student).eval()
        flow.train().requires_grad_(True)
        value = fit_step(flow_ddp, student, teacher, micro, pairing, sequence_times(seed, round_ + 1, index, global_batch),
                         lay, dtype)
        optimizer_step(flow_opt, flow_sched, None, clip_grad)
        flow.eval().requires_grad_(False)
        return value

    bar = tqdm(total=len(units), initial=state["step"], desc="units", disable=not lay.is_main)
    clock = time.time()
    for u in range(state["step"], len(units)):
        kind, epoch, index = units[u]
        if kind == "start":
            row = {"kind": "epoch", "unit": u, "epoch": -1}
            if schedule:
                row["dev_loss"] = dev_loss()
                schedule.update(row["dev_loss"])
            log(row)
        elif kind == "step":
            step = epoch * steps_per_epoch + index
            values, source, tokens, grad_norm = student_step(epoch, step, index)
            now = time.time()
            log({"kind": "step", "unit": u, "step": step, "epoch": epoch, "source": source, **values,
                 "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tokens / (now - clock)})
            clock = now
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", src=source[:3])
            if save_interval > 0 and (step + 1) % save_interval == 0 and step + 1 < total_iters:
                export_model(student, tokenizer, os.path.join(save, f"step-{step + 1}"), lay)
        elif kind == "epoch_end":
            row = {"kind": "epoch", "unit": u, "epoch": epoch, "dev_loss": dev_loss(), "dev_rougeL": dev_rouge()}
            if schedule:
                schedule.update(row["dev_loss"])
                row["sgo_threshold"] = schedule.threshold
            value = row["dev_rougeL"] if select_by == "rougeL" else -row["dev_loss"]
            if state["best"] is None or value > state["best"]["value"]:
                state["best"] = {"epoch": epoch, "value": value}
                export_model(student, tokenizer, os.path.join(save, "best"), lay)
            log(row)
            print0(f"epoch {epoch}: dev loss {row['dev_loss']:.4f}, dev Rouge-L {row['dev_rougeL']:.2f}"
                   + (f", SGO threshold {schedule.threshold:.1f}" if schedule else ""))
        elif kind == "refit":
            round_ = sorted(refit_epochs).index(epoch)
            value = refit_step(round_, index)
            log({"kind": "step", "unit": u, "refit_round": round_, "epoch": epoch, "loss_rf": value,
                 "lr_flow": flow_sched.get_last_lr()[0]})
            bar.set_postfix(loss_rf=f"{value:.4f}")
        state["step"] = u + 1
        bar.update(1)
        if kind in ("start", "epoch_end", "refit_end") or (save_steps and kind in ("step", "refit")
                                                           and state["step"] % save_steps == 0):
            checkpoint()
    bar.close()
    export_model(student, tokenizer, os.path.join(save, "final"), lay)
    if contra and lay.is_main:
        save_flow(os.path.join(save, "velocity_field.safetensors"), os.path.join(save, "projector.safetensors"),
                  flow.field, flow.projector, pairing)
    if state["best"]:
        print0(f"best epoch {state['best']['epoch']} by dev {select_by} -> {save}/best; last -> {save}/final")
    shutdown()


if __name__ == "__main__":
    run_cli(main)
