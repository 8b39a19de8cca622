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
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
