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
`--fast-kd` (default) is the fast step (common.hf_training.lm_logits): the teacher under inference_mode (cast to
--dtype), both models stopped before their heads and every loss over the vocabulary computed KD_CHUNK_SIZE
rows at a time from the hidden states (each chunk's divergence compiled where the vocabulary is wide:
common.losses.compiled_chunks); `--fast-kd false` computes the full logits first, as the original.
Each epoch ends with the dev CE (DistiLLM's threshold; `--select-by loss`) and, with `--select-by rougeL`
(default), the dev Rouge-L of sampled responses; the best epoch is exported to `save/best`, the last to
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
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file (torchrun contra_kd/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common import hf
from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES, all_reduce_dp, print0, rank_seed, setup, shutdown, to_dtype
from common.generation import generate
from common.hf_training import (KD_CHUNK_SIZE, autocast, export_model, gathered, grad_scaler, grad_sync, lm_logits,
                                load_checkpoint, load_device, lr_schedule, optimizer_step, save_checkpoint,
                                sharding_from_flag, unwrap, wrap_ddp, wrap_model)
from common.io import append_jsonl, atomic_save, read_jsonl, write_jsonl
from common.losses import (compiled_chunks, contra_loss, cross_entropy, fdd_loss, reverse_kl, skew_forward_kl,
                           skew_reverse_kl, soft_cross_entropy)
from common.metrics import rouge_l
from common.training import adamw, complete_checkpoints, epoch_order, global_count
from contra_kd.data import ChunkSplit, InstructionSplit, collate, model_inputs, rank_micro_batches
from contra_kd.distillm import AdaptiveSGO, ReplayBuffer, distillm2_beta
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


def per_sequence_mean(loss_fn, student_logits, teacher_logits, mask, rows, **kwargs):
    """Σ over `rows` of each sequence's token mean (DistiLLM-2 reduces per sequence, then over the batch)."""
    total = torch.zeros((), device=mask.device)
    for b in rows:
        own = torch.zeros_like(mask)
        own[b] = mask[b]
        total = total + loss_fn(student_logits, teacher_logits, mask=own, **kwargs)
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
         eval_batch_size: int = 8, fsdp=None, fast_kd: bool = True):
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
    check_choice("--dtype", dtype, DTYPES)
    sharding = sharding_from_flag(fsdp, "--fsdp", dtype)  # --fsdp [offload]: student and teacher sharded (FSDP)
    fast_kd = fast_kd and sharding == "ddp"  # FSDP shards the head (no weights to chunk with): the plain step
    for flag, value in (("--batch-size", batch_size), ("--gradient-accumulation-steps", gradient_accumulation_steps),
                        ("--epochs", epochs), ("--max-prompt-length", max_prompt_length),
                        ("--num-distill-layers", num_distill_layers), ("--eval-batch-size", eval_batch_size),
                        ("--velocity-update-interval", velocity_update_interval)):
        check_range(flag, value, low=1)
    check_range("--max-length", max_length, low=max_prompt_length + 1)  # room for a response
    for flag, value in (("--kd-ratio", kd_ratio), ("--skew-alpha", skew_alpha)):
        check_range(flag, value, 0, 1)

    # every input is checked before the models load: the folders and files, then the data
    hf.check_model_folder(model_path, "--model-path")
    if needs_teacher:
        hf.check_model_folder(teacher_model_path, "--teacher-model-path")
    for flag, path in (("--velocity-field", velocity_field), ("--projector", projector)):
        if contra and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file (contra_kd/train_velocity_field.py writes it)")
    run = Run(SimpleNamespace(**locals()), base, contra, loss, needs_teacher)
    run.load_data()
    run.load_models()
    run.plan_and_resume()
    bar = tqdm(total=len(run.units), initial=run.state["step"], desc="units", disable=not run.lay.is_main)
    for u in range(run.state["step"], len(run.units)):
        kind = run.units[u][0]
        postfix = run.do_unit(u)
        run.state["step"] = u + 1
        bar.update(1)
        if postfix:
            bar.set_postfix(**postfix)
        if kind in ("start", "epoch_end", "refit_end") or (save_steps and kind in ("step", "refit")
                                                           and run.state["step"] % save_steps == 0):
            run.checkpoint()
    bar.close()
    run.finish()
    shutdown()


class Run:
    """The run's shared state and its stages: models, data and the unit plan, resume, then one method per unit
    kind. `state["step"]` is common.hf_training's checkpoint counter: here it counts the units done; a unit's
    `step` (in the log and the schedules) is the optimiser step of the student."""

    def __init__(self, flags, base: str, contra: bool, loss: str, needs_teacher: bool):
        self.f, self.base, self.contra, self.loss, self.needs_teacher = flags, base, contra, loss, needs_teacher
        self.lay = setup(flags.seed)
        self.metrics_path = os.path.join(flags.save, "metrics.jsonl")

    # ---- setup ----

    def load_models(self):
        """Tokenizer, student (LoRA with --peft), the frozen teacher, the layer pairing, the frozen flow."""
        f, lay = self.f, self.lay
        self.tokenizer = hf.load_tokenizer(f.model_path, flag="--model-path")
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        flags = ("--model-path", "--teacher-model-path")
        if self.needs_teacher:  # one vocabulary: every loss compares the two distributions token by token
            teacher_tokenizer = hf.load_tokenizer(f.teacher_model_path, flag=flags[1])
            hf.check_tokenizers(self.tokenizer, teacher_tokenizer, flags)
        self.student = hf.load_model(f.model_path, dtype="float32", device=load_device(lay, f.sharding),
                                     flag="--model-path")
        self.teacher = None
        if self.needs_teacher:
            self.teacher = hf.load_model(f.teacher_model_path, device=load_device(lay, f.sharding), frozen=True,
                                         flag=flags[1])
            hf.check_vocab(self.student, self.teacher, self.tokenizer, teacher_tokenizer, flags=flags)
            if f.fast_kd and f.dtype != "float32":  # the fast step's teacher: in the autocast dtype, never cast per
                self.teacher.to(to_dtype(f.dtype))   # forward
        if f.peft:
            self.student = add_lora(self.student, f.peft_lora_r, f.peft_lora_alpha, f.peft_lora_dropout, f.model_path)
        self.pairing = layer_pairing(self.student, self.teacher, f.num_distill_layers) \
            if self.base == "fdd" or self.contra else None
        self.flow = None
        if self.contra:
            field, proj = load_flow(f.velocity_field, f.projector,
                                    flow_expectation(self.student, self.teacher, self.pairing), f.velocity_dropout)
            self.flow = Flow(field, proj).to(lay.device)

    def load_data(self):
        """Dev references, the train items (DistiLLM-2: (TGO, SGO) pairs), re-fit data and OpenWebText chunks."""
        f = self.f
        dev_dir, dev_flag = (f.gt_data_dir, "--gt-data-dir") if self.base == "distillm2" else (f.data_dir, "--data-dir")
        self.dev = InstructionSplit(dev_dir, "valid", dev_flag)
        if self.dev.records is None:
            raise UserError(f"{dev_flag} {dev_dir}: valid.jsonl (the dev references) is missing; re-run "
                            f"contra_kd/prepare_data.py")
        if self.base == "distillm2":
            tgo, sgo = (InstructionSplit(os.path.join(f.data_dir, k), "train") for k in ("tgo", "sgo"))
            if len(tgo) != len(sgo):
                raise UserError(f"{f.data_dir}: tgo holds {len(tgo)} items and sgo {len(sgo)}; they must pair up")
            self.train = list(zip((tgo[i] for i in range(len(tgo))), (sgo[i] for i in range(len(sgo)))))
        else:
            self.train = InstructionSplit(f.data_dir, "train")
            if len(self.train) and self.train[0][1] is None:
                raise UserError(f"--data-dir {f.data_dir} holds prompt-only items; train on the `full` variant")
        self.refit_data = InstructionSplit(f.gt_data_dir or f.data_dir, "train",
                                           "--gt-data-dir" if f.gt_data_dir else "--data-dir") if self.contra else None
        self.lm = ChunkSplit(f.lm_data_dir, "train") if f.lm_data_dir else None

    def plan_and_resume(self):
        """The unit plan (a global batch per optimiser step: batch x GA x processes), optimisers and schedules,
        the adaptive-SGO schedule and buffer; everything restored from the last checkpoint when there is one."""
        f, lay = self.f, self.lay
        self.global_batch = f.batch_size * f.gradient_accumulation_steps * lay.dp_size
        self.steps_per_epoch = len(self.train) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"--data-dir {f.data_dir}: {len(self.train)} items, fewer than one global batch of "
                             f"{self.global_batch} (batch-size x gradient-accumulation-steps x processes)")
        self.total_iters = f.epochs * self.steps_per_epoch
        self.refit_epochs = {e for e in range(f.epochs - 1) if (e + 1) % f.velocity_update_interval == 0} \
            if self.contra else set()
        self.refit_steps = f.velocity_epochs * (len(self.refit_data) // self.global_batch) if self.contra else 0
        self.units = plan_units(f.epochs, self.steps_per_epoch, self.refit_steps, self.refit_epochs)

        # DDP, or the student (and the teacher) sharded in place before the optimiser and a sharded checkpoint
        self.ddp = wrap_model(self.student, lay, f.sharding, f.dtype)
        self.teacher = wrap_model(self.teacher, lay, f.sharding) if self.teacher is not None else None
        self.optimizer = adamw(self.student, f.lr, f.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, "cosine", 0, self.total_iters, min_lr=f.lr_min)
        self.scaler = grad_scaler(f.dtype, lay.device)
        if self.contra:  # one cosine schedule spanning all re-fit rounds, at the student lr
            self.flow_opt = flow_optimizer(self.flow.field, self.flow.projector, f.lr, f.weight_decay)
            self.flow_sched = lr_schedule(self.flow_opt, "cosine", 0, max(1, len(self.refit_epochs) * self.refit_steps),
                                          min_lr=f.lr_min)
        self.schedule = AdaptiveSGO(f.init_threshold, f.loss_eps, f.capacity, f.replay_ratio) \
            if self.base == "distillm" else None
        self.buffer = ReplayBuffer(f.capacity) if self.schedule else None

        state = load_checkpoint(f.save, lay, self.student, self.optimizer, self.scheduler, self.scaler)
        if lay.is_main:
            os.makedirs(f.save, exist_ok=True)
        plan = {"type": f"{self.base}{'+contra' if self.contra else ''}", "units": len(self.units),
                "global_batch": self.global_batch}
        if state is None:
            state = {"step": 0, "best": None, "plan": plan}
            if lay.is_main and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)  # rows of an attempt that never reached a checkpoint
        else:
            if state.get("plan") != plan:
                raise UserError(f"{f.save} holds a run of {state.get('plan')}, this command plans {plan}: resume with "
                                 f"the same type, epochs, data and batch settings, or pass another --save")
            if self.contra:
                flow_pt = os.path.join(self.extras(state["step"]), "flow.pt")
                saved = torch.load(flow_pt, map_location=lay.device, weights_only=True)
                self.flow.load_state_dict(saved["flow"])
                self.flow_opt.load_state_dict(saved["optimizer"])
                self.flow_sched.load_state_dict(saved["scheduler"])
            if self.schedule:
                self.schedule.load_state_dict(state["sgo"])
                self.buffer.load_state_dict(read_jsonl(os.path.join(self.extras(state["step"]),
                                                                    f"buffer-{lay.rank:02d}.jsonl"))[0])
            if lay.is_main and os.path.exists(self.metrics_path):
                write_jsonl([r for r in read_jsonl(self.metrics_path, drop_partial_last=True)
                             if r["unit"] < state["step"]], self.metrics_path)
            print0(f"resumed {f.save} at unit {state['step']} of {len(self.units)}")
        self.state = state
        self.flow_ddp = wrap_ddp(self.flow, lay) if self.contra else None  # wrapped while trainable; frozen outside
        if self.contra:                                                    # re-fits
            self.flow.eval().requires_grad_(False)
        print0(f"--type {plan['type']} (loss {self.loss if self.base == 'distillm' else '-'}): {len(self.train)} "
               f"train items, {self.steps_per_epoch} steps/epoch x {f.epochs}, global batch {self.global_batch}, "
               f"{len(self.refit_epochs)} re-fits of {self.refit_steps} steps, {lay.dp_size} process(es)")

    # ---- bookkeeping ----

    def extras(self, units_done: int) -> str:
        return os.path.join(self.f.save, "extras", f"step-{units_done:08d}")

    def log(self, row: dict):
        if self.lay.is_main:
            append_jsonl(self.metrics_path, row)

    def checkpoint(self):
        """The flow (+ its optimiser) and every rank's replay buffer beside the checkpoint, written before it
        commits; extras of pruned checkpoints removed."""
        lay, folder = self.lay, self.extras(self.state["step"])
        if lay.is_main:
            os.makedirs(folder, exist_ok=True)
        if lay.dp_size > 1:
            torch.distributed.barrier()
        if self.contra and lay.is_main:
            atomic_save({"flow": self.flow.state_dict(), "optimizer": self.flow_opt.state_dict(),
                         "scheduler": self.flow_sched.state_dict()}, os.path.join(folder, "flow.pt"))
        if self.schedule:
            write_jsonl([self.buffer.state_dict()], os.path.join(folder, f"buffer-{lay.rank:02d}.jsonl"))
            self.state["sgo"] = self.schedule.state_dict()
        save_checkpoint(self.f.save, self.state, lay, self.student, self.optimizer, self.scheduler, self.scaler,
                        self.tokenizer)
        if lay.is_main:
            keep = {os.path.basename(c) for c in complete_checkpoints(self.f.save)}
            for old in os.listdir(os.path.join(self.f.save, "extras")):
                if old not in keep:
                    shutil.rmtree(os.path.join(self.f.save, "extras", old), ignore_errors=True)

    # ---- dev evaluation ----

    def dev_loss(self) -> float:
        """Token-mean CE of the student on the ground-truth dev split, sharded over processes."""
        f, lay, student = self.f, self.lay, unwrap(self.student)
        student.eval()
        total, count = torch.zeros((), device=lay.device), 0
        mine = list(range(lay.dp_rank, len(self.dev), lay.dp_size))
        with torch.no_grad(), gathered(student):  # FSDP: ranks run different numbers of batches
            for i in range(0, len(mine), f.eval_batch_size):
                batch = collate([self.dev[j] for j in mine[i:i + f.eval_batch_size]], self.pad_id, f.max_length,
                                lay.device)
                with autocast(f.dtype, lay.device):
                    logits = student(**model_inputs(batch)).logits
                n = int(batch["mask"].sum())
                total += cross_entropy(logits, target_ids=batch["target_ids"], mask=batch["mask"]) * n
                count += n
        return (all_reduce_dp(total) / global_count(count, lay.device)).item()

    def dev_rouge(self) -> float:
        f = self.f
        with autocast(f.dtype, self.lay.device), gathered(self.student):
            preds = sample_responses(unwrap(self.student), self.tokenizer, [r["prompt"] for r in self.dev.records],
                                     lay=self.lay, seed=f.seed, batch_size=f.eval_batch_size,
                                     max_prompt_length=f.max_prompt_length,
                                     max_new_tokens=f.max_length - f.max_prompt_length, desc="dev Rouge-L")
        return 100 * sum(rouge_l(p, r["output"]) for p, r in zip(preds, self.dev.records)) / len(preds)

    # ---- a student step ----

    @functools.lru_cache(maxsize=2)
    def lm_order(self, wrap: int) -> list:
        return epoch_order(len(self.lm), self.f.seed, f"lm-{wrap}")

    def lm_micro_batches(self, step: int, micro: list) -> list:
        """OpenWebText chunks: the p-th of the run is item p of a permutation redrawn each pass over the corpus."""
        lm, positions = self.lm, [[step * self.global_batch + off + j for j in range(len(idx))] for off, idx in micro]
        return [collate([([], lm[self.lm_order(p // len(lm))[p % len(lm)]]) for p in ps], self.pad_id,
                        self.f.max_length, self.lay.device) for ps in positions]

    def student_pairs(self, step: int, micro: list) -> tuple:
        """This rank's (prompt, response) pairs per micro-batch, and where they came from (§5.3)."""
        f, lay, train = self.f, self.lay, self.train
        source = "ground_truth"
        if self.schedule:
            r = random.Random(f"{f.seed}-sgo-{step}").random()  # one draw per step, the same on every rank
            source = self.schedule.choose(step, self.total_iters, r, len(self.buffer))
        if self.base == "distillm2":  # [teacher outputs; student outputs] of the same prompts
            return [[train[i][0] for i in idx] + [train[i][1] for i in idx] for _, idx in micro], source
        if source == "ground_truth":
            return [[train[i] for i in idx] for _, idx in micro], source
        if source == "replay":
            rng = random.Random(f"{f.seed}-replay-{step}-{lay.dp_rank}")
            return [self.buffer.sample(len(idx), rng) for _, idx in micro], source
        out = []
        for offset, idx in micro:  # seeded by the micro-batch's place in the global batch: any process count
            gen = torch.Generator(device=lay.device).manual_seed(rank_seed(f.seed, step, offset))  # draws the same
            prompts = [train[i][0][-f.max_prompt_length:] for i in idx]
            with autocast(f.dtype, lay.device), gathered(self.student):
                responses = generate(unwrap(self.student), prompts, f.max_length - f.max_prompt_length,
                                     temperature=1.0, top_p=f.gen_top_p, top_k=0, eos_id=self.eos_id,
                                     pad_id=self.pad_id, padding="left", generator=gen)
            pairs = list(zip(prompts, [list(r) for r in responses]))
            self.buffer.push(pairs)
            out.append(pairs)
        return out, source

    def student_step(self, epoch: int, step: int, index: int) -> tuple:
        """One optimiser step of the student: (logged terms summed over ranks, source, tokens, gradient norm)."""
        f, lay = self.f, self.lay
        items = epoch_order(len(self.train), f.seed, epoch)[index * self.global_batch:(index + 1) * self.global_batch]
        micro = rank_micro_batches(items, lay.dp_rank, lay.dp_size, f.batch_size)
        pairs, source = self.student_pairs(step, micro)
        unwrap(self.student).train()
        batches = [collate(p, self.pad_id, f.max_length, lay.device) for p in pairs]
        lm_batches = self.lm_micro_batches(step, micro) if self.lm else []
        counts = dict(tokens=global_count(sum(int(b["mask"].sum()) for b in batches), lay.device),
                      pairs=global_count(sum(b["input_ids"].shape[0] // 2 for b in batches), lay.device),
                      lm=global_count(sum(int(b["mask"].sum()) for b in lm_batches), lay.device) if self.lm else 1)
        counts["fdd"] = global_count(sum(int(b["attention_mask"].sum()) for b in batches), lay.device) \
            if f.fdd_mask == "attention" else counts["tokens"]
        hidden = self.base == "fdd" or self.contra
        k = (epoch + 1) / f.epochs
        logged, tokens = {}, 0
        for m, batch in enumerate(batches):
            if self.lm:  # its own backward, never the step's last, so DDP syncs once
                with grad_sync(self.ddp, False):
                    with autocast(f.dtype, lay.device), compiled_chunks(f.fast_kd):
                        _, logits = lm_logits(self.ddp, model_inputs(lm_batches[m]), fast=f.fast_kd)
                        lm_loss = f.lm_coef * cross_entropy(logits, target_ids=lm_batches[m]["target_ids"],
                                                            mask=lm_batches[m]["mask"], normalizer=counts["lm"],
                                                            chunk_size=KD_CHUNK_SIZE if f.fast_kd else None)
                    self.scaler.scale(lm_loss).backward()
                logged["loss_lm"] = logged.get("loss_lm", 0.0) + lm_loss.detach() / f.lm_coef
                tokens += int(lm_batches[m]["attention_mask"].sum())
            with grad_sync(self.ddp, m == len(batches) - 1):
                with autocast(f.dtype, lay.device), compiled_chunks(f.fast_kd):
                    out, logits = lm_logits(self.ddp, model_inputs(batch), fast=f.fast_kd, output_hidden_states=hidden)
                    t_out = t_logits = None
                    if self.teacher is not None:
                        t_out, t_logits = lm_logits(self.teacher, model_inputs(batch), fast=f.fast_kd, frozen=True,
                                                    output_hidden_states=self.base == "fdd")
                    total, terms = objective(self, out, logits, t_out, t_logits, batch, k, counts, step)
                self.scaler.scale(total).backward()
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + value.detach()
            logged["loss"] = logged.get("loss", 0.0) + total.detach()
            tokens += int(batch["attention_mask"].sum())
        grad_norm = optimizer_step(self.optimizer, self.scheduler, self.scaler, f.clip_grad)
        values = {k_: all_reduce_dp(v.reshape(()).float().clone()).item() for k_, v in logged.items()}
        if self.lm:
            values["loss"] += f.lm_coef * values["loss_lm"]
        return values, source, global_count(tokens, lay.device), grad_norm

    def refit_step(self, round_: int, index: int) -> float:
        """One optimiser step of L_RF for the flow on the current (frozen) student and the ground truth."""
        f, lay = self.f, self.lay
        n_round = len(self.refit_data) // self.global_batch
        epoch_in_round, i = divmod(index, n_round)
        items = epoch_order(len(self.refit_data), f.seed, f"refit-{round_}-{epoch_in_round}")[
            i * self.global_batch:(i + 1) * self.global_batch]
        micro = [(off, collate([self.refit_data[j] for j in idx], self.pad_id, f.max_length, lay.device))
                 for off, idx in rank_micro_batches(items, lay.dp_rank, lay.dp_size, f.batch_size)]
        unwrap(self.student).eval()
        self.flow.train().requires_grad_(True)
        value = fit_step(self.flow_ddp, self.student, self.teacher, micro, self.pairing,
                         sequence_times(f.seed, round_ + 1, index, self.global_batch), lay, f.dtype)
        optimizer_step(self.flow_opt, self.flow_sched, None, f.clip_grad)
        self.flow.eval().requires_grad_(False)
        return value

    # ---- the units ----

    def do_unit(self, u: int) -> dict:
        """Run unit u of the plan and log it; returns what the progress bar shows."""
        kind, epoch, index = self.units[u]
        if kind == "start":
            row = {"kind": "epoch", "unit": u, "epoch": -1}
            if self.schedule:
                row["dev_loss"] = self.dev_loss()
                self.schedule.update(row["dev_loss"])
            self.log(row)
        elif kind == "step":
            step = epoch * self.steps_per_epoch + index
            clock = time.time()  # this step only: epoch ends and re-fits in between are not student tokens
            values, source, tokens, grad_norm = self.student_step(epoch, step, index)
            lr = self.scheduler.get_last_lr()[0]
            self.log({"kind": "step", "unit": u, "step": step, "epoch": epoch, "source": source, **values, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens / (time.time() - clock)})
            if self.f.save_interval > 0 and (step + 1) % self.f.save_interval == 0 and step + 1 < self.total_iters:
                export_model(self.student, self.tokenizer, os.path.join(self.f.save, f"step-{step + 1}"), self.lay)
            return dict(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", src=source[:3])
        elif kind == "epoch_end":
            self.end_epoch(u, epoch)
        elif kind == "refit":
            round_ = sorted(self.refit_epochs).index(epoch)
            value = self.refit_step(round_, index)
            self.log({"kind": "step", "unit": u, "refit_round": round_, "epoch": epoch, "loss_rf": value,
                      "lr_flow": self.flow_sched.get_last_lr()[0]})
            return dict(loss_rf=f"{value:.4f}")
        return {}

    def end_epoch(self, u: int, epoch: int):
        """Dev CE (DistiLLM's threshold), dev Rouge-L when it selects, the best epoch exported to save/best."""
        f = self.f
        row = {"kind": "epoch", "unit": u, "epoch": epoch, "dev_loss": self.dev_loss()}
        if f.select_by == "rougeL":  # sampling the dev set is costly: only when it selects the epoch
            row["dev_rougeL"] = self.dev_rouge()
        if self.schedule:
            self.schedule.update(row["dev_loss"])
            row["sgo_threshold"] = self.schedule.threshold
        value = row["dev_rougeL"] if f.select_by == "rougeL" else -row["dev_loss"]
        if self.state["best"] is None or value > self.state["best"]["value"]:
            self.state["best"] = {"epoch": epoch, "value": value}
            export_model(self.student, self.tokenizer, os.path.join(f.save, "best"), self.lay)
        self.log(row)
        print0(f"epoch {epoch}: dev loss {row['dev_loss']:.4f}"
               + (f", dev Rouge-L {row['dev_rougeL']:.2f}" if "dev_rougeL" in row else "")
               + (f", SGO threshold {self.schedule.threshold:.1f}" if self.schedule else ""))

    def finish(self):
        f = self.f
        export_model(self.student, self.tokenizer, os.path.join(f.save, "final"), self.lay)
        if self.contra and self.lay.is_main:
            save_flow(os.path.join(f.save, "velocity_field.safetensors"), os.path.join(f.save, "projector.safetensors"),
                      self.flow.field, self.flow.projector, self.pairing)
        if self.state["best"]:
            print0(f"best epoch {self.state['best']['epoch']} by dev {f.select_by} -> {f.save}/best; last -> "
                   f"{f.save}/final")


def objective(run: Run, out, logits, t_out, t_logits, batch, k: float, counts: dict, step: int) -> tuple:
    """The step's loss for one micro-batch (already divided by whole-step counts) and its logged terms.
    logits, t_logits: the models' logits, or with --fast-kd their HeadLogits (computed chunk by chunk)."""
    f, base = run.f, run.base
    mask, chunk = batch["mask"], KD_CHUNK_SIZE if f.fast_kd else None
    terms = {}
    if base == "distillm2":
        half = mask.shape[0] // 2
        beta = distillm2_beta(step, run.total_iters, f.gradual_beta)
        tgo = per_sequence_mean(skew_forward_kl, logits, t_logits, mask, range(half), alpha=f.skew_alpha,
                                chunk_size=chunk)
        sgo = per_sequence_mean(skew_reverse_kl, logits, t_logits, mask, range(half, 2 * half),
                                alpha=f.skew_alpha, detach_mixture=True, chunk_size=chunk)
        terms["loss_tgo_skl"], terms["loss_sgo_srkl"] = tgo / counts["pairs"], sgo / counts["pairs"]
        total = ((2 - beta) * tgo + beta * sgo) / counts["pairs"]
    else:
        ce = cross_entropy(logits, target_ids=batch["target_ids"], mask=mask, normalizer=counts["tokens"],
                           chunk_size=chunk)
        terms["loss_ce"] = ce
        if base in ("sft", "seqkd"):
            total = ce
        elif base == "kd":
            kd = soft_cross_entropy(logits, t_logits, mask=mask, normalizer=counts["tokens"], chunk_size=chunk)
            terms["loss_kd"], total = kd, (1 - f.kd_ratio) * ce + f.kd_ratio * kd
        elif base == "distillm":
            divergence = skew_forward_kl if run.loss == "skl" else skew_reverse_kl
            d = divergence(logits, t_logits, mask=mask, alpha=f.skew_alpha, normalizer=counts["tokens"],
                           chunk_size=chunk)
            terms[f"loss_{run.loss}"], total = d, (1 - f.kd_ratio) * ce + f.kd_ratio * d
        else:  # fdd
            rkl = reverse_kl(logits, t_logits, mask=mask, normalizer=counts["tokens"], chunk_size=chunk)
            fmask = mask if f.fdd_mask == "response" else batch["attention_mask"].bool()
            head_s, head_t = unwrap(run.student).get_output_embeddings(), run.teacher.get_output_embeddings()
            fdd = fdd_loss([out.hidden_states[i] for i in run.pairing["student_layers"]],
                           [t_out.hidden_states[i] for i in run.pairing["teacher_layers"]], head_s, head_t,
                           mask=fmask, normalizer=counts["fdd"])
            terms["loss_rkl"], terms["loss_fdd"] = rkl, fdd
            total = (1 - f.kd_ratio) * ce + f.kd_ratio * (rkl + fdd)
    if run.contra:
        states = [out.hidden_states[i] for i in run.pairing["student_layers"]]
        c = contra_loss(run.flow.field, run.flow.projector, states, mask=mask, k=k, normalizer=counts["tokens"])
        terms["loss_contra"], total = c, total + f.kd_ratio * c
    return total, terms


if __name__ == "__main__":
    run_cli(main)
