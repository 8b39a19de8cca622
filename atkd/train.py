"""ATKD and the KD objectives / sample sources it compares, on any transformers causal LM (atkd.md §2-3, §6).

    torchrun --nproc_per_node 8 atkd/train.py --student_model_path original/OPT-1.3b \
        --teacher_model_path fine-tuned/OPT-6.7b --data_path alpaca_gpt4_data.json --task alpaca \
        --setting vanilla --sample_source gt --kl_method atkd --bf16 True --output_dir runs/atkd ...

One optimiser step:
  1. per micro-batch, the continuation its `sample_source` asks for (dataset answer, offline teacher output, a
     greedy continuation of the current student, or a per-token student/teacher mix), each ending with EOS;
  2. the number of target tokens of the whole step, summed over micro-batches and data-parallel ranks: every
     micro-batch loss is divided by it, so splitting a batch does not change the step (specs README);
  3. per micro-batch: teacher logits under no_grad, student logits, the `kl_method` loss, backward;
  4. clip at 1.0, AdamW, cosine schedule with linear warmup; a log line and a metrics JSONL record.
"""
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atkd.data import encode, load_training_data  # noqa: E402
from common import hf, losses  # noqa: E402
from common.cli import UserError, check_choice, check_range, run_cli  # noqa: E402
from common.distributed import all_reduce_dp, print0, rank_seed, setup, shutdown  # noqa: E402
from common.generation import generate  # noqa: E402
from common.hf_training import (KD_CHUNK_SIZE, autocast, compute_device, enable_gradient_checkpointing,  # noqa: E402
                                export_model, gathered, grad_sync, lm_logits, load_checkpoint, load_device,
                                lr_schedule, optimizer_step, save_checkpoint, sharding_from_flag, wrap_model)
from common.io import append_jsonl, read_jsonl, write_jsonl  # noqa: E402
from common.labels import IGNORE_INDEX, causal_lm_batch, targets_and_mask  # noqa: E402
from common.training import adamw, epoch_order  # noqa: E402

KL_METHODS = ("forward", "reverse", "jsd", "gjsd", "dkd", "tvd", "atkd", "seqkd")
SAMPLE_SOURCES = ("gt", "teacher", "student", "mix_token", "mix_request_teacher", "mix_request_gt")
JSD_FORWARD_WEIGHT = 0.9  # OSD's fwd_loss_ratio: what the release's `jsd` ran (losses.md §2.4)
ON_POLICY_MAX_NEW_TOKENS = 256
MIX_TOKEN_MAX_NEW_TOKENS = 128


# ---- losses (atkd.md §2) ----

def kd_loss(kl_method: str, student_logits, teacher_logits, targets, *, alpha: float = 0.2, beta: float = 1.0,
            gjsd_beta: float = 0.5, setting: str = "vanilla", normalizer=None, parts: dict = None, chunk_size=None):
    """The `kl_method` objective on logits [B, S, V] (or common.losses.HeadLogits) and the targets aligned with
    them (-100: not counted). atkd with a `parts` dict fills it with the split and its terms (losses.atkd's, from
    the same pass)."""
    mask = targets != IGNORE_INDEX
    kw = dict(mask=mask, normalizer=normalizer, chunk_size=chunk_size)
    if kl_method == "forward":
        return losses.forward_kl(student_logits, teacher_logits, **kw)
    if kl_method == "reverse":
        return losses.reverse_kl(student_logits, teacher_logits, **kw)
    if kl_method == "jsd":
        return losses.fkl_rkl_mix(student_logits, teacher_logits, weight=JSD_FORWARD_WEIGHT, **kw)
    if kl_method == "gjsd":
        return losses.generalized_jsd(student_logits, teacher_logits, beta=gjsd_beta, **kw)
    if kl_method == "tvd":
        return losses.tvd(student_logits, teacher_logits, **kw)
    if kl_method == "dkd":
        return losses.dkd(student_logits, teacher_logits, target_ids=targets, alpha=alpha, beta=beta, **kw)
    if kl_method == "atkd":
        out = losses.atkd(student_logits, teacher_logits, target_ids=targets, lam=alpha,
                          reverse=setting == "reverse", return_parts=parts is not None, **kw)
        if parts is None:
            return out
        parts.update(out[1])
        return out[0]
    if kl_method == "seqkd":
        return losses.cross_entropy(student_logits, target_ids=targets, **kw)
    check_choice("--kl_method", kl_method, KL_METHODS)


@torch.no_grad()
def loss_terms(kl_method: str, student_logits, teacher_logits, targets, *, chunk_size=None) -> dict:
    """The parts of a compound loss, each a token mean over this micro-batch, for the log: jsd: fkl, rkl;
    dkd: tckd, nckd. (atkd's split and parts come from the loss itself: kd_loss(..., parts={}).)"""
    mask = targets != IGNORE_INDEX
    s, t = student_logits, teacher_logits
    kw = dict(chunk_size=chunk_size)
    if kl_method == "jsd":
        return dict(fkl=losses.forward_kl(s, t, mask=mask, **kw).item(),
                    rkl=losses.reverse_kl(s, t, mask=mask, **kw).item())
    if kl_method == "dkd":
        return dict(tckd=losses.dkd(s, t, mask=mask, target_ids=targets, alpha=1.0, beta=0.0, **kw).item(),
                    nckd=losses.dkd(s, t, mask=mask, target_ids=targets, alpha=0.0, beta=1.0, **kw).item())
    return {}


# ---- sample sources (atkd.md §3) ----

def sample_responses(sample_source: str, prompts: list, *, gt: list, teacher_outputs: list = None, student=None,
                     teacher=None, generator: torch.Generator, eos_id: int, pad_id: int, max_seq_len: int,
                     student_request_ratio: float = 0.5, student_token_ratio: float = 0.5) -> tuple:
    """Continuations of `prompts` (token-id lists) for one micro-batch -> (responses, origin, token_sources).

    gt / teacher: the dataset answer / offline teacher output, each + EOS (given as `gt` / `teacher_outputs`).
    student: greedy continuation of the current student (≤ 256 new tokens, stops at and keeps EOS).
    mix_request_teacher / mix_request_gt: one draw per micro-batch from `generator`: with probability
      `student_request_ratio` the student continuation, else the teacher / gt sequence.
    mix_token: one greedy continuation (≤ 128 new tokens) in which each token comes from the student with
      probability `student_token_ratio`, else from the teacher; `token_sources` is 0 (student) / 1 (teacher)
      per response token. `origin` names where the batch came from ("gt", "teacher", "student", "mix_token").
    """
    check_choice("--sample_source", sample_source, SAMPLE_SOURCES)
    if sample_source.startswith("mix_request_"):
        if torch.rand((), generator=generator, device=generator.device).item() >= student_request_ratio:
            sample_source = sample_source.removeprefix("mix_request_")
        else:
            sample_source = "student"
    if sample_source == "gt":
        return gt, "gt", None
    if sample_source == "teacher":
        return teacher_outputs, "teacher", None
    kw = dict(temperature=0.0, eos_id=eos_id, pad_id=pad_id, padding="left", max_seq_len=max_seq_len,
              generator=generator)
    if sample_source == "student":
        return list(generate(student, prompts, ON_POLICY_MAX_NEW_TOKENS, **kw)), "student", None
    out = generate(student, prompts, MIX_TOKEN_MAX_NEW_TOKENS, teacher=teacher,
                   student_token_ratio=student_token_ratio, **kw)
    return list(out), "mix_token", out.sources


def collate(prompts: list, responses: list, pad_id: int, max_len: int) -> dict:
    """common.labels.causal_lm_batch of prompt + response cut at `max_len` tokens (the response's end goes):
    labels hold the response tokens, EOS included, and -100 on the prompt (masked by its length) and padding."""
    responses = [list(r)[:max(0, max_len - len(p))] for p, r in zip(prompts, responses)]
    return causal_lm_batch(prompts, responses, pad_id=pad_id)


def micro_batch_loss(student, teacher, batch: dict, kl_method: str, *, dtype="float32", normalizer=None,
                     vocab: int = None, fast: bool = True, **loss_options) -> tuple:
    """Teacher logits (no_grad), student logits, the kl_method loss -> (loss, student_logits, teacher_logits,
    targets); targets are aligned with the logits (position t predicts token t + 1). `vocab`: compare the first
    `vocab` logits only (vocabularies padded to different widths, e.g. Pythia sizes).

    fast (common.hf_training.lm_logits): the teacher under inference_mode, both models stopped before their
    heads, and the loss computes the logits KD_CHUNK_SIZE rows at a time, each chunk's divergence compiled
    where the vocabulary is wide (common.losses.compiled_chunks; the logits returned are
    common.losses.HeadLogits); else the full logits of both models, as the release computes them."""
    device = compute_device(student)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    targets, _ = targets_and_mask(batch["labels"].to(device), shift=True)
    teacher_logits = None
    if fast:
        with autocast(dtype, device), losses.compiled_chunks():
            if kl_method != "seqkd":
                teacher_logits = lm_logits(teacher, inputs, fast=True, frozen=True)[1].first(vocab)
            student_logits = lm_logits(student, inputs, fast=True)[1]
            if teacher_logits is not None:
                student_logits = student_logits.first(vocab)
            loss = kd_loss(kl_method, student_logits, teacher_logits, targets, normalizer=normalizer,
                           chunk_size=KD_CHUNK_SIZE, **loss_options)
        return loss, student_logits, teacher_logits, targets
    with autocast(dtype, device):
        if kl_method != "seqkd":
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits[..., :vocab]
        student_logits = student(**inputs).logits
    if teacher_logits is not None:
        student_logits = student_logits[..., :vocab]
    loss = kd_loss(kl_method, student_logits, teacher_logits, targets, normalizer=normalizer, **loss_options)
    return loss, student_logits, teacher_logits, targets


# ---- the run ----

def _step_items(n_items: int, step: int, steps_per_epoch: int, step_size: int, seed: int, shuffle: bool) -> list:
    """The item indices of global optimiser step `step`: epoch e in common.training.epoch_order(seed, e)."""
    epoch, k = divmod(step, steps_per_epoch)
    order = epoch_order(n_items, seed, epoch) if shuffle else list(range(n_items))
    return order[k * step_size:(k + 1) * step_size]


def _check_flags(task, setting, sample_source, kl_method, mode, evaluation_strategy, save_strategy,
                 lr_scheduler_type, ratios: dict, counts: dict):
    check_choice("--kl_method", kl_method, KL_METHODS)
    check_choice("--sample_source", sample_source, SAMPLE_SOURCES)
    check_choice("--setting", setting, ("vanilla", "reverse"))
    check_choice("--task", task, ("alpaca",))
    check_choice("--mode", mode, ("offline", "online"))
    check_choice("--save_strategy", save_strategy, ("no", "epoch", "steps"))
    check_choice("--lr_scheduler_type", lr_scheduler_type, ("cosine", "linear", "constant"))
    if evaluation_strategy != "no":
        raise UserError(f"--evaluation_strategy {evaluation_strategy!r}: training evaluates nothing (only 'no' is "
                        "accepted); evaluate the saved model with atkd/eval.py")
    for name, value in ratios.items():
        check_range(f"--{name}", value, 0, 1)
    for name, value in counts.items():
        check_range(f"--{name}", value, low=1)


def _log_step(record: dict, total_steps: int, metrics_path: Path) -> None:
    skip = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "targets", "generation_share", "sources"}
    parts = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                     if k not in skip)
    tqdm.write(f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} {parts} | lr {record['lr']:.3e} | "
           f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
           f"source {'+'.join(record['sources'])}")
    append_jsonl(str(metrics_path), record)


def main(student_model_path: str, teacher_model_path: str, data_path: str, output_dir: str,
         task: str = "alpaca", setting: str = "vanilla", sample_source: str = "gt", kl_method: str = "atkd",
         alpha: float = 0.2, beta: float = 1.0, gjsd_beta: float = 0.5, student_request_ratio: float = 0.5,
         student_token_ratio: float = 0.5, mode: str = "offline", num_train_epochs: float = 3, max_steps: int = -1,
         per_device_train_batch_size: int = 1, gradient_accumulation_steps: int = 2, learning_rate: float = 2e-5,
         weight_decay: float = 0.0, warmup_ratio: float = 0.03, lr_scheduler_type: str = "cosine",
         max_grad_norm: float = 1.0, model_max_length: int = 512, bf16: bool = False, tf32: bool = False,
         gradient_checkpointing: bool = False, seed: int = 42, logging_steps: int = 1, save_strategy: str = "no",
         save_steps: int = 500, lazy_preprocess: bool = True, allow_padded_vocab: bool = False,
         max_propose_num: int = 5, evaluation_strategy: str = "no", per_device_eval_batch_size: int = 1,
         run_name: str = None, chat_template: bool = False, fsdp: str = "", fast_kd: bool = True):
    """Distil `teacher_model_path` into `student_model_path` (flags and defaults of the release, atkd.md §6).

    output_dir gets model/ (the student, from_pretrained), metrics.jsonl, checkpoints/ (resume; the last one);
    --save_strategy epoch / steps also exports epoch-K/ after every epoch / step-N/ every --save_steps steps.
    Extras of ours: --gjsd_beta, --student_request_ratio / --student_token_ratio (the release's hidden 0.5s),
    --max_steps, --max_grad_norm, --seed, --save_steps (resume checkpoints), --allow_padded_vocab (teacher and
    student vocabularies padded to different widths: the first min(widths) logits are compared), --fast_kd
    (default; false: the release's full-logits step, see micro_batch_loss),
    --chat_template (prompts in the tokenizer's chat template: dataset prompts rendered in it, a teacher JSONL
    made by generate_data.py --chat_template True; no special tokens added to them).
    Accepted for compatibility, no effect: --max_propose_num (OSD's draft length), --per_device_eval_batch_size.
    --fsdp "full_shard auto_wrap" (HF Trainer's flag, as the release's launcher offered): student and teacher
    sharded with PyTorch FSDP (common/hf_training.py); add "offload" for CPU offload.
    """
    _check_flags(task, setting, sample_source, kl_method, mode, evaluation_strategy, save_strategy,
                 lr_scheduler_type, dict(alpha=alpha, gjsd_beta=gjsd_beta, student_request_ratio=student_request_ratio,
                                         student_token_ratio=student_token_ratio, warmup_ratio=warmup_ratio),
                 dict(per_device_train_batch_size=per_device_train_batch_size, model_max_length=model_max_length,
                      gradient_accumulation_steps=gradient_accumulation_steps, logging_steps=logging_steps,
                      save_steps=save_steps))
    check_range("--num_train_epochs", num_train_epochs, low=0)
    needs_teacher = kl_method != "seqkd" or sample_source == "mix_token"
    hf.check_model_folder(student_model_path, "--student_model_path")
    if needs_teacher:
        hf.check_model_folder(teacher_model_path, "--teacher_model_path")
    sharding = sharding_from_flag(fsdp)
    fast_kd = fast_kd and sharding == "ddp"  # FSDP shards the head (no weights to chunk with): the plain step
    lay = setup(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print0(f"run {run_name or out.name}: kl_method={kl_method} sample_source={sample_source} setting={setting}; "
           f"--max_propose_num {max_propose_num} has no effect (OSD's draft length)")
    if lay.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    dtype = "bfloat16" if bf16 else "float32"

    # data: the teacher JSONL for the offline teacher sources; prompts that leave no room for a target left out
    flags = ("--student_model_path", "--teacher_model_path")
    student_tokenizer = hf.load_tokenizer(student_model_path, flags[0])
    teacher_tokenizer = hf.load_tokenizer(teacher_model_path, flags[1]) if needs_teacher else None
    if needs_teacher:  # one vocabulary: the losses compare the two distributions token by token
        hf.check_tokenizers(student_tokenizer, teacher_tokenizer, flags)
    tokenizer = student_tokenizer if kl_method == "seqkd" else teacher_tokenizer
    items = load_training_data(data_path, teacher_output=sample_source in ("teacher", "mix_request_teacher"),
                               chat_tokenizer=tokenizer if chat_template else None)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def encoded(item):
        prompt, gt = encode(tokenizer, item["prompt"], item["output"], chat_template)
        teacher_out = (encode(tokenizer, item["prompt"], item["teacher_output"], chat_template)[1]
                       if "teacher_output" in item else None)
        return prompt, gt, teacher_out
    prompt_lengths = [len(x) for x in tokenizer([x["prompt"] for x in items], add_special_tokens=not chat_template).input_ids]
    kept = [x for x, n in zip(items, prompt_lengths) if n < model_max_length]
    if len(kept) < len(items):
        print0(f"{data_path}: {len(items) - len(kept)} of {len(items)} prompts fill --model_max_length "
               f"{model_max_length} (no room for a target): left out")
    items = kept if lazy_preprocess else [encoded(x) for x in kept]
    step_size = lay.dp_size * per_device_train_batch_size * gradient_accumulation_steps
    steps_per_epoch = len(items) // step_size
    if steps_per_epoch == 0:
        raise UserError(f"{data_path}: {len(items)} items do not fill one optimiser step of {step_size} "
                        "(ranks x per_device_train_batch_size x gradient_accumulation_steps)")
    total_steps = math.ceil(num_train_epochs * steps_per_epoch)
    if max_steps > 0:
        total_steps = min(total_steps, max_steps)

    # models: the student in fp32 (bf16 autocast with --bf16); the teacher frozen, in bf16 with --bf16
    student = hf.load_model(student_model_path, dtype="float32", device=load_device(lay, sharding),
                            flag="--student_model_path")
    teacher, vocab = None, None
    if needs_teacher:
        teacher = hf.load_model(teacher_model_path, dtype=dtype, device=load_device(lay, sharding), frozen=True,
                                flag="--teacher_model_path")
        vocab = hf.check_vocab(student, teacher, student_tokenizer, teacher_tokenizer,
                               allow_padded=allow_padded_vocab, flags=flags)
    student.config.use_cache = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(student)
    model = wrap_model(student, lay, sharding, dtype)  # DDP, or student sharded in place (before its optimizer)
    teacher = wrap_model(teacher, lay, sharding) if teacher is not None else None
    optimizer = adamw(student, learning_rate, weight_decay, betas=(0.9, 0.999))
    scheduler = lr_schedule(optimizer, lr_scheduler_type, math.ceil(warmup_ratio * total_steps), total_steps)
    state = load_checkpoint(str(out), lay, student, optimizer, scheduler) or dict(step=0)
    metrics_path = out / "metrics.jsonl"
    if state["step"]:
        print0(f"resumed from {out}/checkpoints at step {state['step']}")
    if lay.is_main and metrics_path.exists():  # records after the checkpoint are about to be redone
        write_jsonl([r for r in read_jsonl(str(metrics_path), drop_partial_last=True) if r["step"] <= state["step"]],
                    str(metrics_path))
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"{kl_method}/{sample_source}", disable=not lay.is_main)
    loss_options = dict(alpha=alpha, beta=beta, gjsd_beta=gjsd_beta, setting=setting, vocab=vocab)
    on_policy = sample_source not in ("gt", "teacher")  # the models that generate (FSDP gathers them whole)
    generators = (student, teacher if sample_source == "mix_token" else None) if on_policy else ()

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        # 1. this rank's micro-batches, each from its sample source (generated by the current student if asked)
        chosen = _step_items(len(items), step, steps_per_epoch, step_size, seed, shuffle=mode == "offline")
        micro_batches, generating = [], 0.0
        for m in range(gradient_accumulation_steps):
            first = (m * lay.dp_size + lay.dp_rank) * per_device_train_batch_size
            rows = [encoded(items[i]) if lazy_preprocess else items[i]
                    for i in chosen[first:first + per_device_train_batch_size]]
            prompts = [r[0] for r in rows]
            g0 = time.perf_counter()
            generator = torch.Generator().manual_seed(rank_seed(seed, step * gradient_accumulation_steps + m,
                                                                lay.dp_rank))
            with gathered(*generators):  # FSDP: whole weights while ranks generate different lengths
                responses, origin, _ = sample_responses(
                    sample_source, prompts, gt=[r[1] for r in rows], teacher_outputs=[r[2] for r in rows],
                    student=student, teacher=teacher, generator=generator, eos_id=eos, pad_id=pad,
                    max_seq_len=model_max_length, student_request_ratio=student_request_ratio,
                    student_token_ratio=student_token_ratio)
            generating += time.perf_counter() - g0
            micro_batches.append((collate(prompts, responses, pad, model_max_length), origin))
        # 2. the whole step's target count (all micro-batches, all ranks) normalises every micro-batch loss
        counts = torch.tensor([float(sum((b["labels"] != IGNORE_INDEX).sum() for b, _ in micro_batches)),
                               float(sum(b["attention_mask"].sum() for b, _ in micro_batches))], device=lay.device)
        n_targets, n_tokens = all_reduce_dp(counts).tolist()
        # 3. forward, loss, backward per micro-batch; DDP sums gradients once, at the last one
        log_now = (step + 1) % logging_steps == 0
        step_loss, terms = torch.zeros((), device=lay.device, dtype=torch.float64), {}
        for m, (batch, _) in enumerate(micro_batches):
            parts = {} if log_now and kl_method == "atkd" else None
            with grad_sync(model, m == gradient_accumulation_steps - 1):
                loss, s_logits, t_logits, targets = micro_batch_loss(model, teacher, batch, kl_method, dtype=dtype,
                                                                     normalizer=max(n_targets, 1.0), parts=parts,
                                                                     fast=fast_kd,
                                                                     **loss_options)
                loss.backward()
            step_loss += loss.detach()
            if log_now and kl_method in ("jsd", "dkd", "atkd"):
                n = int((targets != IGNORE_INDEX).sum())
                if kl_method == "atkd":
                    values = parts
                else:
                    with autocast(dtype, lay.device) if fast_kd else contextlib.nullcontext(), \
                            losses.compiled_chunks(fast_kd):
                        values = loss_terms(kl_method, s_logits, t_logits, targets,
                                            chunk_size=KD_CHUNK_SIZE if fast_kd else None)
                for k, v in values.items():
                    terms[k] = terms.get(k, 0.0) + (v if k.startswith("n_") else v * n)
                terms["_weight"] = terms.get("_weight", 0.0) + n
        # 4. clip, AdamW, schedule
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(optimizer, scheduler, max_grad_norm=max_grad_norm)
        step_loss = all_reduce_dp(step_loss).item()
        elapsed = time.perf_counter() - t0
        if log_now:
            if terms:  # token-weighted over micro-batches and ranks
                keys = sorted(terms)
                sums = dict(zip(keys, all_reduce_dp(torch.tensor([terms[k] for k in keys], device=lay.device,
                                                                 dtype=torch.float64)).tolist()))
                weight = max(sums.pop("_weight"), 1.0)
                terms = {k: int(v) if k.startswith("n_") else v / weight for k, v in sums.items()}
            if lay.is_main:
                _log_step(dict(step=step + 1, epoch=(step + 1) / steps_per_epoch, loss=step_loss, **terms, lr=lr,
                               grad_norm=grad_norm, tokens_per_s=n_tokens / elapsed, targets=int(n_targets),
                               generation_share=generating / elapsed,
                               sources=sorted({origin for _, origin in micro_batches})), total_steps, metrics_path)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        state["step"] = step + 1
        if state["step"] % save_steps == 0 and state["step"] < total_steps:
            save_checkpoint(str(out), state, lay, student, optimizer, scheduler)
        if save_strategy == "epoch" and state["step"] % steps_per_epoch == 0:
            export_model(student, tokenizer, str(out / f"epoch-{state['step'] // steps_per_epoch}"), lay)
        if save_strategy == "steps" and state["step"] % save_steps == 0 and state["step"] < total_steps:
            export_model(student, tokenizer, str(out / f"step-{state['step']}"), lay)
    bar.close()
    export_model(student, tokenizer, str(out / "model"), lay)
    shutdown()


if __name__ == "__main__":
    run_cli(main)
