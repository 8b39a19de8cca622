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
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import fire
import torch

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atkd import _interim  # noqa: E402
from atkd.data import encode, load_training_data  # noqa: E402
from common import losses  # noqa: E402
from common.generation import generate  # noqa: E402

IGNORE_INDEX = -100
KL_METHODS = ("forward", "reverse", "jsd", "gjsd", "dkd", "tvd", "atkd", "seqkd")
SAMPLE_SOURCES = ("gt", "teacher", "student", "mix_token", "mix_request_teacher", "mix_request_gt")
JSD_FORWARD_WEIGHT = 0.9  # OSD's fwd_loss_ratio: what the release's `jsd` ran (losses.md §2.4)
ON_POLICY_MAX_NEW_TOKENS = 256
MIX_TOKEN_MAX_NEW_TOKENS = 128


def check_choice(flag: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(valid)}")


# ---- losses (atkd.md §2) ----

def kd_loss(kl_method: str, student_logits, teacher_logits, labels, *, alpha: float = 0.2, beta: float = 1.0,
            gjsd_beta: float = 0.5, setting: str = "vanilla", normalizer=None):
    """The `kl_method` objective on logits [B, S, V] and labels aligned with them (-100 = not a target)."""
    mask, targets = labels != IGNORE_INDEX, labels.clamp(min=0)
    kw = dict(mask=mask, normalizer=normalizer)
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
        return losses.atkd(student_logits, teacher_logits, target_ids=targets, lam=alpha,
                           reverse=setting == "reverse", **kw)
    if kl_method == "seqkd":
        return losses.cross_entropy(student_logits, target_ids=targets, **kw)
    check_choice("kl_method", kl_method, KL_METHODS)


@torch.no_grad()
def loss_terms(kl_method: str, student_logits, teacher_logits, labels, *, setting: str = "vanilla") -> dict:
    """The parts of a compound loss, each a token mean over this micro-batch, for the log.

    jsd: fkl, rkl. dkd: tckd, nckd. atkd: the teacher-uncertainty split (losses.md §3.2), n_easy / n_hard and
    nckd_easy, tckd_hard, nckd_hard (so loss = λ·nckd_easy + (1-λ)·(tckd_hard + nckd_hard)).
    """
    mask, targets = labels != IGNORE_INDEX, labels.clamp(min=0)
    s, t = student_logits, teacher_logits
    reverse = setting == "reverse"
    if kl_method == "jsd":
        return dict(fkl=losses.forward_kl(s, t, mask=mask).item(), rkl=losses.reverse_kl(s, t, mask=mask).item())
    if kl_method == "dkd":
        return dict(tckd=losses.dkd(s, t, mask=mask, target_ids=targets, alpha=1.0, beta=0.0).item(),
                    nckd=losses.dkd(s, t, mask=mask, target_ids=targets, alpha=0.0, beta=1.0).item())
    if kl_method != "atkd" or not mask.any():
        return {}
    uncertainty = -torch.expm1(losses.token_log_probs(t, targets))  # UnC_t = 1 - p_t(g_t)
    hard = mask & (uncertainty >= torch.median(uncertainty[mask]))
    easy = mask & ~hard

    def part(subset, tckd, nckd):
        if not subset.any():
            return 0.0
        return losses.dkd(s, t, mask=subset, target_ids=targets, alpha=tckd, beta=nckd, reverse=reverse).item()
    return dict(n_easy=int(easy.sum()), n_hard=int(hard.sum()), nckd_easy=part(easy, 0.0, 1.0),
                tckd_hard=part(hard, 1.0, 0.0), nckd_hard=part(hard, 0.0, 1.0))


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
    check_choice("sample_source", sample_source, SAMPLE_SOURCES)
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
    """Right-padded input_ids / attention_mask, and labels aligned with the logits: labels[t] = x_{t+1} where
    x_{t+1} is a response token (EOS included), -100 elsewhere; the prompt is masked by its length."""
    seqs = [(p + r)[:max_len] for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
        labels[b, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):], dtype=torch.long)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def micro_batch_loss(student, teacher, batch: dict, kl_method: str, *, bf16: bool = False, normalizer=None,
                     **loss_options) -> tuple:
    """Teacher logits (no_grad), student logits, the kl_method loss -> (loss, student_logits, teacher_logits)."""
    device = next(student.parameters()).device
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    teacher_logits = None
    with autocast:
        if kl_method != "seqkd":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=attention).logits
        student_logits = student(input_ids=ids, attention_mask=attention).logits
    loss = kd_loss(kl_method, student_logits, teacher_logits, labels, normalizer=normalizer, **loss_options)
    return loss, student_logits, teacher_logits


# ---- the run ----

def _step_items(n_items: int, step: int, steps_per_epoch: int, step_size: int, seed: int, shuffle: bool) -> list:
    """The item indices of global optimiser step `step`: epoch e is a permutation seeded by (seed, e)."""
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle \
        else torch.arange(n_items)
    return order[k * step_size:(k + 1) * step_size].tolist()


def _check_flags(task, setting, sample_source, kl_method, mode, evaluation_strategy, save_strategy,
                 lr_scheduler_type):
    check_choice("kl_method", kl_method, KL_METHODS)
    check_choice("sample_source", sample_source, SAMPLE_SOURCES)
    check_choice("setting", setting, ("vanilla", "reverse"))
    check_choice("task", task, ("alpaca",))
    check_choice("mode", mode, ("offline", "online"))
    check_choice("save_strategy", save_strategy, ("no", "epoch"))
    check_choice("lr_scheduler_type", lr_scheduler_type, ("cosine", "linear", "constant"))
    if evaluation_strategy != "no":
        raise ValueError(f"--evaluation_strategy {evaluation_strategy!r}: training evaluates nothing (only 'no' is "
                         "accepted); evaluate the saved model with atkd/eval.py")


def main(student_model_path: str, teacher_model_path: str, data_path: str, output_dir: str,
         task: str = "alpaca", setting: str = "vanilla", sample_source: str = "gt", kl_method: str = "atkd",
         alpha: float = 0.2, beta: float = 1.0, gjsd_beta: float = 0.5, student_request_ratio: float = 0.5,
         student_token_ratio: float = 0.5, mode: str = "offline", num_train_epochs: float = 3, max_steps: int = -1,
         per_device_train_batch_size: int = 1, gradient_accumulation_steps: int = 2, learning_rate: float = 2e-5,
         weight_decay: float = 0.0, warmup_ratio: float = 0.03, lr_scheduler_type: str = "cosine",
         max_grad_norm: float = 1.0, model_max_length: int = 512, bf16: bool = False, tf32: bool = False,
         gradient_checkpointing: bool = False, seed: int = 42, logging_steps: int = 1, save_strategy: str = "no",
         save_steps: int = 500, lazy_preprocess: bool = True, max_propose_num: int = 5,
         evaluation_strategy: str = "no", per_device_eval_batch_size: int = 1, run_name: str = None):
    """Distil `teacher_model_path` into `student_model_path` (flags and defaults of the release, atkd.md §6).

    Extras of ours: --gjsd_beta, --student_request_ratio / --student_token_ratio (the release's hidden 0.5s),
    --max_steps, --max_grad_norm, --seed, --save_steps (resume checkpoints, kept under output_dir/checkpoint).
    Accepted for compatibility, no effect: --max_propose_num (OSD's draft length), --per_device_eval_batch_size.
    """
    _check_flags(task, setting, sample_source, kl_method, mode, evaluation_strategy, save_strategy,
                 lr_scheduler_type)
    lay = _interim.setup(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _interim.print0(f"run {run_name or out.name}: kl_method={kl_method} sample_source={sample_source} "
                    f"setting={setting}; --max_propose_num {max_propose_num} has no effect (OSD's draft length)")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)

    # data: the teacher JSONL for the offline teacher sources; prompts that leave no room for a target dropped
    items = load_training_data(data_path, teacher_output=sample_source in ("teacher", "mix_request_teacher"))
    tokenizer = _interim.load_tokenizer(student_model_path if kl_method == "seqkd" else teacher_model_path,
                                        model_max_length)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def encoded(item):
        prompt, gt = encode(tokenizer, item["prompt"], item["output"])
        teacher_out = encode(tokenizer, item["prompt"], item["teacher_output"])[1] if "teacher_output" in item else None
        return prompt, gt, teacher_out
    prompt_lengths = [len(x) for x in tokenizer([x["prompt"] for x in items]).input_ids]
    kept = [x for x, n in zip(items, prompt_lengths) if n < model_max_length]
    if len(kept) < len(items):
        _interim.print0(f"{data_path}: {len(items) - len(kept)} of {len(items)} prompts fill --model_max_length "
                        f"{model_max_length} (no room for a target): left out")
    items = kept if lazy_preprocess else [encoded(x) for x in kept]
    step_size = lay.world_size * per_device_train_batch_size * gradient_accumulation_steps
    steps_per_epoch = len(items) // step_size
    if steps_per_epoch == 0:
        raise ValueError(f"{data_path}: {len(items)} items do not fill one optimiser step of {step_size} "
                         "(ranks x per_device_train_batch_size x gradient_accumulation_steps)")
    total_steps = math.ceil(num_train_epochs * steps_per_epoch)
    if max_steps > 0:
        total_steps = min(total_steps, max_steps)
    warmup_steps = math.ceil(warmup_ratio * total_steps)

    # models: student fp32 (bf16 autocast), teacher frozen in bf16 with --bf16
    student = _interim.load_causal_lm(student_model_path, torch.float32, lay.device)
    needs_teacher = kl_method != "seqkd" or sample_source == "mix_token"
    teacher = None
    if needs_teacher:
        teacher = _interim.load_causal_lm(teacher_model_path, torch.bfloat16 if bf16 else torch.float32, lay.device,
                                          frozen=True)
        _interim.check_vocab(student, teacher, student_model_path, teacher_model_path)
    student.config.use_cache = False
    if gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=learning_rate, betas=(0.9, 0.999))
    ckpt = str(out / "checkpoint")
    state = _interim.load_checkpoint(ckpt, student, optimizer) or dict(step=0)
    metrics_path = out / "metrics.jsonl"
    if state["step"]:
        _interim.print0(f"resumed from {ckpt} at step {state['step']}")
    if lay.is_main and metrics_path.exists():  # records of steps after the checkpoint are about to be redone
        import json
        rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= state["step"]))
    model = student
    if lay.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[lay.device] if lay.device.type == "cuda" else None)
    model.train()
    loss_options = dict(alpha=alpha, beta=beta, gjsd_beta=gjsd_beta, setting=setting)

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        torch.manual_seed(_interim.rank_seed(seed, step, lay.rank))  # dropout: the same on a resumed run
        chosen = _step_items(len(items), step, steps_per_epoch, step_size, seed, shuffle=mode == "offline")
        micro_batches, gen_time = [], 0.0
        for m in range(gradient_accumulation_steps):
            first = (m * lay.world_size + lay.rank) * per_device_train_batch_size
            rows = [items[i] if not lazy_preprocess else encoded(items[i])
                    for i in chosen[first:first + per_device_train_batch_size]]
            prompts = [r[0] for r in rows]
            g0 = time.perf_counter()
            generator = torch.Generator().manual_seed(
                _interim.rank_seed(seed, step * gradient_accumulation_steps + m, lay.rank))
            responses, origin, sources = sample_responses(
                sample_source, prompts, gt=[r[1] for r in rows], teacher_outputs=[r[2] for r in rows],
                student=student, teacher=teacher, generator=generator, eos_id=eos, pad_id=pad,
                max_seq_len=model_max_length, student_request_ratio=student_request_ratio,
                student_token_ratio=student_token_ratio)
            gen_time += time.perf_counter() - g0
            micro_batches.append((collate(prompts, responses, pad, model_max_length), origin, sources))
        counts = torch.tensor([float(sum((b["labels"] != IGNORE_INDEX).sum() for b, _, _ in micro_batches)),
                               float(sum(b["attention_mask"].sum() for b, _, _ in micro_batches))],
                              device=lay.device)
        n_targets, n_tokens = _interim.all_reduce_sum(counts).tolist()

        step_loss, terms, weight = 0.0, {}, 0
        for m, (batch, origin, sources) in enumerate(micro_batches):
            sync = nullcontext() if m == gradient_accumulation_steps - 1 or model is student else model.no_sync()
            with sync:
                loss, s_logits, t_logits = micro_batch_loss(model, teacher, batch, kl_method, bf16=bf16,
                                                            normalizer=max(n_targets, 1.0), **loss_options)
                (loss * lay.world_size).backward()  # DDP averages over ranks; the normaliser is already global
            step_loss += loss.item()
            if (step + 1) % logging_steps == 0 and kl_method in ("jsd", "dkd", "atkd"):
                n = int((batch["labels"] != IGNORE_INDEX).sum())
                for k, v in loss_terms(kl_method, s_logits.float(), t_logits.float(), batch["labels"].to(lay.device),
                                       setting=setting).items():
                    terms[k] = terms.get(k, 0) + (v if k.startswith("n_") else v * n)
                weight += n
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm).item()
        lr = _interim.lr_at(step, total_steps, warmup_steps, lr_scheduler_type, learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = _interim.all_reduce_sum(torch.tensor(step_loss, device=lay.device)).item()
        elapsed = time.perf_counter() - t0

        if terms:  # token-weighted over micro-batches and ranks
            keys = sorted(terms)
            sums = _interim.all_reduce_sum(torch.tensor([terms[k] for k in keys] + [weight], device=lay.device,
                                                        dtype=torch.float64)).tolist()
            terms = {k: int(v) if k.startswith("n_") else v / max(sums[-1], 1) for k, v in zip(keys, sums)}
        if (step + 1) % logging_steps == 0 and lay.is_main:
            record = dict(step=step + 1, epoch=(step + 1) / steps_per_epoch, loss=step_loss, **terms, lr=lr,
                          grad_norm=grad_norm, tokens_per_s=n_tokens / elapsed, targets=int(n_targets),
                          generation_share=gen_time / elapsed,
                          sources=sorted({origin for _, origin, _ in micro_batches}))
            parts = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in terms.items())
            _interim.print0(f"step {step + 1}/{total_steps} | loss {step_loss:.4f} {parts} | lr {lr:.3e} | "
                            f"grad_norm {grad_norm:.3f} | {n_tokens / elapsed:.0f} tok/s | "
                            f"source {'+'.join(record['sources'])}")
            with open(metrics_path, "a") as f:
                import json
                f.write(json.dumps(record) + "\n")
        if lay.is_main and (step + 1) % save_steps == 0 and step + 1 < total_steps:
            _interim.save_checkpoint(ckpt, student, optimizer, dict(step=step + 1))
        if save_strategy == "epoch" and (step + 1) % steps_per_epoch == 0 and lay.is_main:
            student.save_pretrained(out / f"epoch-{(step + 1) // steps_per_epoch}")
    if lay.is_main:
        student.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    _interim.shutdown()


if __name__ == "__main__":
    fire.Fire(main)
