"""Every divergence and auxiliary loss the methods use (spec: losses.md; section numbers below refer to it).

Pairwise token divergences
--------------------------
    fn(student_logits, teacher_logits, *, mask, temperature=1.0, <own options>,
       chunk_size=None, normalizer=None, group=None, vocab_slice=None) -> scalar

* logits `[B, S, V]` in any float dtype, computed in fp32 (fp64 inputs stay fp64); `p = softmax(teacher/τ)`,
  `q = softmax(student/τ)`, no τ² factor. The teacher is detached.
* `mask` bool `[B, S]`: the positions that count. Only those rows are read, so padding costs nothing and
  whatever sits under masked positions (even NaN) changes nothing.
* Value: `Σ_{counted t} d_t / n_counted`, where `d_t` is the per-token divergence summed over the vocabulary;
  with `normalizer=N` it is `Σ d_t / N`. An empty mask gives a zero that keeps the graph.
* Vocabulary entries whose logit is -inf on either side contribute 0 (DistiLLM's convention, §1).
* Teacher and student vocabularies must match; `vocab_slice=k` compares the first k entries only
  (padding mismatches such as Qwen 151936 vs 152064).

Everything after the logits is keyword-only (`mask=`, `target_ids=`, `spans_a=`...), so two arguments of the
same shape cannot be swapped silently.

Targets and masks come aligned with the logits as the model returns them: `target_ids[b, t]` is the token that
position t predicts. For Hugging Face batches, `common.labels.targets_and_mask(labels, shift=True)` (causal LM:
position t predicts token t+1, the last position counts nothing) or `shift=False` (seq2seq decoder) gives
them, so pass the model's full logits and never slice `logits[:, :-1]`. A non-contiguous view still works:
rows are gathered by (batch, position) index, never by reshaping the whole tensor.

Index
-----
§2 pairwise, fn(student_logits, teacher_logits, *, mask, ...): forward_kl, reverse_kl, soft_cross_entropy,
    generalized_jsd(beta), fkl_rkl_mix(weight), symmetric_kl(weight), tvd, skew_forward_kl(alpha),
    skew_reverse_kl(alpha, detach_mixture).
§3 target-aware, fn(student_logits, teacher_logits, *, mask, target_ids, ...): dkd(alpha, beta, reverse),
    atkd(lam, reverse).
Student-only: cross_entropy(logits, *, target_ids, mask, chunk_size, normalizer, group);
HeadLogits(hidden, weight, bias=None) in place of any logits; compiled_chunks() context;
    token_log_probs(logits, *, target_ids, temperature, chunk_size, group) -> [B, S], 0 where the target is -100.
§4.1 mcc_span_kl(logits_a, logits_b, *, spans_a, spans_b, ...).
§4.2 fdd_loss(student_states, teacher_states, student_head, teacher_head, *, mask, ...), distill_layer_indices.
§4.3 velocity_field_loss(velocity_field, projector, student_states, teacher_states, *, mask, ...),
    contra_loss(velocity_field, projector, student_states, *, mask, k, ...).
§4.4 minillm_importance_weights, minillm_rewards, minillm_advantages(rewards, *, mask, ...),
    minillm_whiten(values, *, mask=None, width=None, ...), minillm_policy_loss(log_q, log_q_old, weights, advantages, *, mask, ...);
    L_reg is reverse_kl.
§4.5 hidden_mse(student_hidden, teacher_hidden, *, mask, ...), hidden_l2(..., *, mask=None, ...),
    attention_output_l2(..., *, mask=None).

Gradient accumulation and data parallel (README.md "Reductions"): a training loop passes
`normalizer = number of counted tokens in the whole optimiser step` (all micro-batches, summed over the DP
ranks). Then each micro-batch returns `Σ_{its tokens} d_t / N`, and the sum of the micro-batch losses (and of
their gradients) equals the loss of the whole step computed at once. Item-mean losses (`mcc_span_kl`) take the
number of items instead. `atkd` returns `(n_counted / N) · ATKD(micro-batch)`: its median split is per
micro-batch, as in the original, so a split step equals the whole step only when the splits coincide.

Chunking (`chunk_size=k`): the counted rows are processed k at a time. The value and the gradient of each
chunk are computed together during the forward (a custom autograd.Function), so at most k rows of fp32
vocabulary-sized intermediates exist at any time, forward and backward; the only full-size tensor is the
gradient of the logits themselves, in their own dtype. The backward scales that buffer in place, so a
chunked loss supports one backward (a second raises), and computes gradients whenever grad mode is on and
the logits require grad: evaluate logged-only losses under torch.no_grad(). Values and gradients equal the
unchunked path.

Logits from the head (`HeadLogits(hidden, weight, bias=None)`): wherever a loss takes logits it also takes the
head's input [B, S, D] and weight [V, D] (student, teacher or both; a LoRA head as two terms), so the logits
are computed from the counted rows only. With `chunk_size=k` that happens k rows at a time, and each chunk's
gradient goes straight on to the hidden states and the head weights (dz @ W and dzᵀ @ h, Liger-Kernel's fused
linear + loss in PyTorch): neither model's [B, S, V] logits ever exist, in any dtype. Under autocast the head
matmuls run in the autocast dtype (bf16), the divergence in fp32, and the gradients land in the inputs' own
dtype (fp32 master weights). `with compiled_chunks():` evaluates each chunk's divergence and its logit gradient
with torch.compile (the elementwise work over the vocabulary fused; opt-in, the first call compiles).

Vocab-parallel (`group=<process group>`): the logits are this rank's shard of the vocabulary, as
fairscale's `ColumnParallelLinear(..., gather_output=False)` returns them for the output head: rank r of the
group holds columns `[r·V/tp, (r+1)·V/tp)`; teacher and student must be sharded alike. Pass
`group=common.parallel.tp_group()` (fairscale's model-parallel group). Log-softmax uses an all-reduced
(detached) max and an all-reduced sum-exp; per-token partial sums over the local columns are all-reduced;
`target_ids` stay global ids and `p(g)` is read on the shard that owns g. Every rank returns the same value as
the gathered computation, and the gradient w.r.t. its local shard is the true partial derivative (not
multiplied by tp), so fairscale's backward all-reduce for the head input gives the right hidden-state
gradient. A HeadLogits takes this rank's rows of the head weight and the replicated hidden states, whose
gradient is all-reduced here (the full one on every rank). `group=None` (or a group of size 1) means
unsharded logits. Combine freely with `chunk_size`.
"""
import contextlib
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from common.labels import IGNORE_INDEX

BINARY_PROB_FLOOR = 1e-12  # §3.1: clamp in the binary logs of TCKD (fp32 saturation gives log 0)
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Vocab-parallel primitives (Megatron's vocab-parallel cross-entropy pattern)

class _SumOverShards(torch.autograd.Function):
    """Local partial sums -> the total, replicated on every rank. Backward: identity, since every rank
    holds the full gradient of the (replicated) computation that follows."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReplicatedIntoShard(torch.autograd.Function):
    """A replicated value (the log-normaliser) entering shard-local terms. Backward: the gradient is the sum
    of what every shard's terms contribute."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sharded(group):
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _vocab_sum(x, group):
    total = x.sum(-1)
    return total if group is None else _SumOverShards.apply(total, group)


def _logsumexp(z, group):
    if group is None:
        return torch.logsumexp(z, -1)
    m = z.detach().amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row that is -inf everywhere
    return m + _SumOverShards.apply((z - m[:, None]).exp().sum(-1), group).log()


def _log_softmax(z, group):
    if group is None:
        return torch.log_softmax(z, -1)
    return z - _ReplicatedIntoShard.apply(_logsumexp(z, group), group)[:, None]


def _local_targets(target, v_local, group):
    """Global ids -> (column on this shard, clamped to be valid; whether this shard owns it)."""
    if group is None:
        return target, torch.ones_like(target, dtype=torch.bool)
    local = target - dist.get_rank(group) * v_local
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned


def _at_target(z, target, group):
    local, owned = _local_targets(target, z.shape[-1], group)
    picked = z.gather(-1, local[:, None]).squeeze(-1)
    return picked if group is None else _SumOverShards.apply(torch.where(owned, picked, 0.0), group)


def _target_log_prob(z, target, group):
    return _at_target(z, target, group) - _logsumexp(z, group)


def _without_target(z, target, group):
    """Logits with the target entry set to -inf: the non-target distribution of §3.1 (never divide by 1 - p(g))."""
    local, owned = _local_targets(target, z.shape[-1], group)
    hide = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, local[:, None], owned[:, None])
    return z.masked_fill(hide, NEG_INF)


# ----------------------------------------------------------------------------------------------------------
# Per-token divergences on rows: zs, zt are [n, V(_local)] logits already divided by τ; return d_t, shape [n]

def _log_probs(zs, zt, group):
    """log q, log p, and the entries that count (None = all). Entries with a -inf logit on either side count
    0 (§1); there the log-probabilities are replaced by 0 so that no inf or NaN reaches terms or gradients."""
    logq, logp = _log_softmax(zs, group), _log_softmax(zt, group)
    if not torch.compiler.is_compiling() and not (torch.isneginf(zs).any() or torch.isneginf(zt).any()):
        return logq, logp, None  # (compiled kernels always take the masked form: no data-dependent branch)
    keep = ~(torch.isneginf(zs) | torch.isneginf(zt))
    return logq.masked_fill(~keep, 0.0), logp.masked_fill(~keep, 0.0), keep


def _vocab_divergence(terms):
    """Per-token divergence Σ_v terms(log q, log p)_v."""
    def per_token(zs, zt, group=None):
        logq, logp, keep = _log_probs(zs, zt, group)
        t = terms(logq, logp)
        return _vocab_sum(t if keep is None else t.masked_fill(~keep, 0.0), group)
    return per_token


def _fkl_terms(logq, logp):
    return logp.exp() * (logp - logq)


def _rkl_terms(logq, logp):
    return logq.exp() * (logq - logp)


def _log(x):
    return math.log(x) if x > 0 else NEG_INF


def _mixed_terms(weight):
    def terms(logq, logp):
        return weight * _fkl_terms(logq, logp) + (1 - weight) * _rkl_terms(logq, logp)
    return terms


def _jsd_terms(beta):
    def terms(logq, logp):
        # GKD Eq. 1: log M = log(β p + (1-β) q), computed in log space; gradient flows through q inside M
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
        return beta * logp.exp() * (logp - logm) + (1 - beta) * logq.exp() * (logq - logm)
    return terms


def _tvd_terms(logq, logp):
    return 0.5 * (logp.exp() - logq.exp()).abs()


def _skew_forward_terms(alpha):
    def terms(logq, logp):
        logm = torch.logaddexp(logp + _log(alpha), logq + _log(1 - alpha))  # α p + (1-α) q
        return logp.exp() * (logp - logm)
    return terms


def _skew_reverse_terms(alpha, detach_mixture):
    def terms(logq, logp):
        logq_mix = logq.detach() if detach_mixture else logq  # DistiLLM-2 detaches the q inside the mixture
        logm = torch.logaddexp(logp + _log(1 - alpha), logq_mix + _log(alpha))  # (1-α) p + α q
        return logq.exp() * (logq - logm)
    return terms


def _soft_ce_terms(logq, logp):
    return -logp.exp() * logq


_forward_kl_rows = _vocab_divergence(_fkl_terms)
_reverse_kl_rows = _vocab_divergence(_rkl_terms)


def _binary_kl(log_a, log_b):
    """KL([a, 1-a] ‖ [b, 1-b]) from log a, log b; probabilities clamped at 1e-12 inside the logs (§3.1)."""
    a, b = log_a.exp(), log_b.exp()
    not_a, not_b = -torch.expm1(log_a), -torch.expm1(log_b)

    def clamped_log(x):
        return x.clamp_min(BINARY_PROB_FLOOR).log()
    return a * (clamped_log(a) - clamped_log(b)) + not_a * (clamped_log(not_a) - clamped_log(not_b))


def _decoupled_parts(zs, zt, target, group=None, *, reverse=False):
    """(TCKD_t, NCKD_t) per row (§3.1); reverse: TCKD^rev, NCKD^rev."""
    log_qg, log_pg = _target_log_prob(zs, target, group), _target_log_prob(zt, target, group)
    tckd = _binary_kl(log_qg, log_pg) if reverse else _binary_kl(log_pg, log_qg)
    non_target = (_reverse_kl_rows if reverse else _forward_kl_rows)
    nckd = non_target(_without_target(zs, target, group), _without_target(zt, target, group), group)
    return tckd, nckd


def _decoupled_rows(zs, zt, target, tckd_weight, nckd_weight, group=None, *, reverse=False):
    """tckd_weight·TCKD_t + nckd_weight·NCKD_t (§3.1); reverse: TCKD^rev, NCKD^rev."""
    tckd, nckd = _decoupled_parts(zs, zt, target, group, reverse=reverse)
    return tckd_weight * tckd + nckd_weight * nckd


def _cross_entropy_rows(zs, zt, target, group=None):
    return -_target_log_prob(zs, target, group)


# ----------------------------------------------------------------------------------------------------------
# Logits given by a linear head's input and weights

@dataclass(frozen=True)
class HeadLogits:
    """The logits `Σ_k hidden[k] @ weight[k].T (+ bias)` of a linear LM head, given by the head's input and
    weights: every loss here accepts it wherever it takes logits, and a chunked loss then computes the logits
    `chunk_size` rows at a time, so the full [B, S, V] tensor never exists (the head matmul fused with the
    divergence, as Liger-Kernel's fused linear losses).

    hidden [B, S, D]: what the head reads (after the final norm and any scaling the model applies, e.g. T5's
    d_model**-0.5); weight [V, D]: `lm_head.weight` (the embedding where tied); bias [V] or None. A LoRA head is
    two terms: hidden=(h, s·A(h)), weight=(W, B). With `group`, weight and bias are this rank's vocabulary shard
    (rows [r·V/tp, (r+1)·V/tp)) and hidden is replicated: its gradient is summed over the shards.
    The head matmuls run in the autocast dtype where autocast is on (bf16 weights cast once per call), else in
    the inputs' dtype; the divergence itself in fp32, as for logits.
    """
    hidden: object
    weight: object
    bias: Optional[torch.Tensor] = None

    @property
    def terms(self):
        hidden = tuple(self.hidden) if isinstance(self.hidden, (tuple, list)) else (self.hidden,)
        weight = tuple(self.weight) if isinstance(self.weight, (tuple, list)) else (self.weight,)
        if len(hidden) != len(weight) or any(h.shape[-1] != w.shape[-1] or w.shape[0] != weight[0].shape[0]
                                             or h.shape[:-1] != hidden[0].shape[:-1]
                                             for h, w in zip(hidden, weight)):
            raise ValueError(f"HeadLogits: hidden {[tuple(h.shape) for h in hidden]} and weight "
                             f"{[tuple(w.shape) for w in weight]} must pair up as [B, S, D_k] with [V, D_k]")
        return tuple(zip(hidden, weight))

    @property
    def shape(self):
        (h, w), *_ = self.terms
        return torch.Size((*h.shape[:-1], w.shape[0]))

    @property
    def device(self):
        return self.terms[0][0].device

    def dim(self):
        return len(self.shape)

    def tensors(self):
        """The tensors gradients go to, in a fixed order: hidden terms, weight terms, bias."""
        hidden, weight = zip(*self.terms)
        return hidden + weight + (() if self.bias is None else (self.bias,))

    def detach(self):
        detached = [t.detach() for t in self.tensors()]
        n = len(self.terms)
        return HeadLogits(tuple(detached[:n]), tuple(detached[n:2 * n]), detached[2 * n] if self.bias is not None else None)

    def matmul_dtype(self):
        device = self.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        dtype = self.terms[0][0].dtype
        for t in self.tensors():
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype


def _tensors(x):
    return x.tensors() if isinstance(x, HeadLogits) else (x,)


# ----------------------------------------------------------------------------------------------------------
# Evaluation over selected rows: plain autograd, or chunked with gradients filled in during the forward

def _compute_dtype(t):
    if isinstance(t, HeadLogits):
        dtype = torch.float32
        for x in t.tensors():
            dtype = torch.promote_types(dtype, x.dtype)
        return dtype
    return torch.promote_types(t.dtype, torch.float32)


def _rows(t, rows):
    """Rows of t [..., D] at flat positions `rows` (row-major over t.shape[:-1]), gathered by index tuple: t is
    never reshaped, so a non-contiguous view such as logits[:, :-1] is read in place instead of copied whole."""
    return t[torch.unravel_index(rows, t.shape[:-1])]


def _head_rows(head, rows, vocab, group):
    """Logits of a HeadLogits at flat positions `rows`, with autograd (the plain path)."""
    dtype = head.matmul_dtype()
    z = 0
    for h, w in head.terms:
        h = _rows(h, rows).to(dtype)
        if group is not None and h.requires_grad:
            h = _ReplicatedIntoShard.apply(h, group)  # replicated input: its gradient sums the shards' parts
        z = z + h @ w[:vocab].to(dtype).T
    return z if head.bias is None else z + head.bias[:vocab].to(dtype)


def _select_rows(t, rows, vocab, dtype, group=None):
    if isinstance(t, HeadLogits):
        return _head_rows(t, rows, vocab, group).to(dtype)
    return _rows(t[..., :vocab], rows).to(dtype)


def _rows_value(per_token, xi, yi, row_data, weight, temperature, group, dtype=None):
    """Σ_i weight_i · per_token(x_i / τ, y_i / τ, *row_data_i); rows cast to `dtype` first (when given)."""
    def scaled(z):
        if z is None:
            return z
        z = z if dtype is None else z.to(dtype)
        return z if temperature == 1 else z / temperature
    d = per_token(scaled(xi), scaled(yi), *row_data, group=group)
    return (d if weight is None else d * weight).sum()


_compiled = {"on": False, "fn": None}


@contextlib.contextmanager
def compiled_chunks(enabled: bool = True):
    """Within it, a chunked loss evaluates each chunk's value and logit gradient with torch.compile (the
    elementwise work over the vocabulary fused into a few passes; several times faster on CPU). Same values up
    to float rounding. Off by default: the first call of each loss compiles for seconds. Unsharded only
    (`group=None`); vocab-parallel losses stay eager."""
    before = _compiled["on"]
    _compiled["on"] = enabled
    try:
        yield
    finally:
        _compiled["on"] = before


def _chunk_kernel(group):
    if not _compiled["on"] or group is not None:
        return None
    if _compiled["fn"] is None:
        _compiled["fn"] = torch.compile(_rows_value, dynamic=True)
    return _compiled["fn"]


class _Side:
    """One input of a chunked loss (logits, or a HeadLogits): reads or computes `[n, vocab]` rows of logits
    without autograd and collects the gradients of its tensors chunk by chunk."""

    def __init__(self, x, vocab, group, needs_grad):
        self.x, self.vocab, self.group = x, vocab, group
        self.head = isinstance(x, HeadLogits)
        if self.head:
            self.dtype = x.matmul_dtype()
            self.weights = [w[:vocab].to(self.dtype) for _, w in x.terms]  # cast once per call, not per chunk
            self.bias = None if x.bias is None else x.bias[:vocab].to(self.dtype)
        self.grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if needs_grad and t.requires_grad
                      else None for t in _tensors(x)]
        self.needs_grad = any(g is not None for g in self.grads)

    def rows(self, idx):
        if not self.head:
            return _rows(self.x[..., :self.vocab], idx)
        self.inputs = [_rows(h, idx).to(self.dtype) for h, _ in self.x.terms]  # kept for the weight gradient
        z = sum(h @ w.T for h, w in zip(self.inputs, self.weights))
        return z if self.bias is None else z + self.bias

    def add_grad(self, idx, dz):
        if not self.head:
            buffer = self.grads[0]
            buffer.view(-1, buffer.shape[-1])[:, :self.vocab].index_add_(0, idx, dz.to(buffer.dtype))
            return
        dz = dz.to(self.dtype)
        n = len(self.weights)
        for k, (h, w) in enumerate(zip(self.inputs, self.weights)):
            grad_h, grad_w = self.grads[k], self.grads[n + k]
            if grad_h is not None:
                grad_h.view(-1, grad_h.shape[-1]).index_add_(0, idx, (dz @ w).to(grad_h.dtype))
            if grad_w is not None:
                grad_w[:self.vocab] += dz.T @ h
        if self.bias is not None and self.grads[-1] is not None:
            self.grads[-1][:self.vocab] += dz.sum(0)

    def finish(self):
        """Gradients of the whole call; a replicated hidden input's gradient summed over the vocabulary shards."""
        if self.head and self.group is not None:
            for grad_h in self.grads[:len(self.weights)]:
                if grad_h is not None:
                    dist.all_reduce(grad_h, group=self.group)
        return self.grads


class _ChunkedRowSum(torch.autograd.Function):
    """Σ over rows of a per-token loss, evaluated `chunk_size` rows at a time. Each chunk's gradient is
    computed right away and added into buffers shaped like the inputs (the logits, or a head's hidden states
    and weights); backward only scales them."""

    @staticmethod
    def forward(ctx, plan, *tensors):
        per_token, x, y, x_rows, y_rows, row_data, weight, temperature, group, vocab, chunk_size, needs = plan
        dtype = _compute_dtype(x)
        sides = [_Side(x, vocab, group, needs[0])] + ([] if y is None else [_Side(y, vocab, group, needs[1])])
        kernel = _chunk_kernel(group)
        total = torch.zeros((), dtype=dtype, device=x.device)
        for start in range(0, x_rows.numel(), chunk_size):
            part = slice(start, start + chunk_size)
            idx = [x_rows[part]] + ([] if y is None else [y_rows[part]])
            data = ([d[part] for d in row_data], None if weight is None else weight[part], temperature, group)
            if kernel is None:  # fp32 copies of the rows as the leaves
                z = [side.rows(i).to(dtype).requires_grad_(side.needs_grad) for side, i in zip(sides, idx)]
                with torch.enable_grad() if any(needs) else nullcontext():
                    value = _rows_value(per_token, z[0], z[1] if y is not None else None, *data)
            else:  # the rows in their own dtype as the leaves, cast inside the compiled kernel
                z = [side.rows(i).requires_grad_(side.needs_grad) for side, i in zip(sides, idx)]
                with torch.enable_grad() if any(needs) else nullcontext():
                    value = kernel(per_token, z[0], z[1] if y is not None else None, *data, dtype=dtype)
            todo = [(side, i, leaf) for side, i, leaf in zip(sides, idx, z) if side.needs_grad]
            if todo:
                grads = torch.autograd.grad(value, [leaf for _, _, leaf in todo])
                for (side, i, _), g in zip(todo, grads):
                    side.add_grad(i, g)
            total += value.detach()
        ctx.grads = [g for side in sides for g in side.finish()]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("a chunked loss supports a single backward (its gradient buffer is consumed); "
                               "use chunk_size=None to backward twice")
        grads, ctx.grads = ctx.grads, None
        return (None,) + tuple(None if g is None else g.mul_(grad_total) for g in grads)


def _sum_over_rows(per_token, x, y, x_rows, y_rows, row_data=(), weight=None, *, temperature=1.0,
                   chunk_size=None, group=None, vocab=None):
    """Σ_i weight_i · per_token(x[x_rows[i]] / τ, y[y_rows[i]] / τ, *row_data[i]) over flattened [*, V] rows of
    logits or HeadLogits; gradients reach x and y where they require grad."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        dtype = _compute_dtype(x)
        xi = _select_rows(x, x_rows, vocab, dtype, group)
        yi = None if y is None else _select_rows(y, y_rows, vocab, dtype, group)
        return _rows_value(per_token, xi, yi, row_data, weight, temperature, group)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and any(t.requires_grad for t in _tensors(x)),
             grad_on and y is not None and any(t.requires_grad for t in _tensors(y))]
    plan = (per_token, x, y, x_rows, y_rows, tuple(row_data), weight, temperature, group, vocab, int(chunk_size),
            needs)
    tensors = _tensors(x) + (() if y is None else _tensors(y))
    return _ChunkedRowSum.apply(plan, *tensors)


def _graph_zero(t):
    """0 that keeps the graph (§1: an empty mask must not give NaN); x[..., :0] reads no value, so even
    -inf logits cannot turn it into NaN."""
    return sum(x[..., :0].sum() for x in _tensors(t)).to(_compute_dtype(t))


def _divide(total, count, normalizer):
    if normalizer is not None:
        return total / normalizer
    return total / count if count else total


def _counted_rows(mask):
    return mask.reshape(-1).nonzero().squeeze(1)


def _check_pair(student_logits, teacher_logits, mask, vocab_slice, group):
    """Validates shapes; returns the number of vocabulary columns compared."""
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(f"logits must be [B, S, V]; got student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    if student_logits.shape[:2] != teacher_logits.shape[:2] or tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and mask "
                         f"{tuple(mask.shape)} must agree on [B, S]")
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_slice is not None:
        if group is not None:
            raise ValueError("vocab_slice is not supported with vocab-parallel (sharded) logits")
        if not 0 < vocab_slice <= min(v_s, v_t):
            raise ValueError(f"vocab_slice={vocab_slice} must be in [1, min(student {v_s}, teacher {v_t})]")
        return int(vocab_slice)
    if v_s != v_t:
        raise ValueError(f"student vocabulary size {v_s} != teacher vocabulary size {v_t}"
                         f"{' (per shard)' if group is not None else ''}; if the difference is padding, pass "
                         f"vocab_slice={min(v_s, v_t)}")
    return v_s


def _counted_targets(target_ids, mask, rows, vocab, group):
    if target_ids is None or tuple(target_ids.shape) != tuple(mask.shape):
        raise ValueError(f"target_ids must be [B, S] like the mask {tuple(mask.shape)}")
    targets = target_ids.reshape(-1)[rows].long()
    v_global = vocab * (1 if group is None else dist.get_world_size(group))
    if targets.numel() and (targets.min() < 0 or targets.max() >= v_global):
        raise ValueError(f"counted target ids must lie in [0, {v_global}); got [{int(targets.min())}, "
                         f"{int(targets.max())}] (mask out ignored positions such as -100)")
    return targets


def _token_mean(per_token, student_logits, teacher_logits, mask, *, temperature, chunk_size, normalizer, group,
                vocab_slice, target_ids=None):
    group = _sharded(group)
    vocab = _check_pair(student_logits, teacher_logits, mask, vocab_slice, group)
    mask = mask.bool()
    rows = _counted_rows(mask)
    if rows.numel() == 0:
        return _graph_zero(student_logits)
    row_data = () if target_ids is None else (_counted_targets(target_ids, mask, rows, vocab, group),)
    total = _sum_over_rows(per_token, student_logits, teacher_logits.detach(), rows, rows, row_data,
                           temperature=temperature, chunk_size=chunk_size, group=group, vocab=vocab)
    return total / (rows.numel() if normalizer is None else normalizer)


# ----------------------------------------------------------------------------------------------------------
# §2: pairwise divergences

def forward_kl(student_logits, teacher_logits, *, mask, temperature=1.0, chunk_size=None, normalizer=None,
               group=None, vocab_slice=None):
    """§2.1 KL(p ‖ q), the true KL (0 at p = q); soft_cross_entropy is the H(p)-offset variant."""
    return _token_mean(_forward_kl_rows, student_logits, teacher_logits, mask, temperature=temperature,
                       chunk_size=chunk_size, normalizer=normalizer, group=group, vocab_slice=vocab_slice)


def reverse_kl(student_logits, teacher_logits, *, mask, temperature=1.0, chunk_size=None, normalizer=None,
               group=None, vocab_slice=None):
    """§2.2 KL(q ‖ p). Also MiniLLM's single-step term L_reg (§4.4)."""
    return _token_mean(_reverse_kl_rows, student_logits, teacher_logits, mask, temperature=temperature,
                       chunk_size=chunk_size, normalizer=normalizer, group=group, vocab_slice=vocab_slice)


def soft_cross_entropy(student_logits, teacher_logits, *, mask, temperature=1.0, chunk_size=None,
                       normalizer=None, group=None, vocab_slice=None):
    """§2.1 -Σ p log q = KL(p ‖ q) + H(p): what MiniLLM/DistiLLM log as "KD"; same gradient as forward_kl."""
    return _token_mean(_vocab_divergence(_soft_ce_terms), student_logits, teacher_logits, mask,
                       temperature=temperature, chunk_size=chunk_size, normalizer=normalizer, group=group,
                       vocab_slice=vocab_slice)


def generalized_jsd(student_logits, teacher_logits, *, mask, beta=0.5, temperature=1.0, chunk_size=None,
                    normalizer=None, group=None, vocab_slice=None):
    """§2.3 GKD Eq. 1: β·KL(p ‖ M) + (1-β)·KL(q ‖ M), M = β p + (1-β) q.

    TRL's endpoint convention: β = 0 returns forward KL and β = 1 reverse KL. Inside (0, 1) the value shrinks
    like β·FKL near 0 and (1-β)·RKL near 1, so the loss scale jumps at the endpoints: never compare runs across
    that jump (warned below 0.01 and above 0.99).
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta < 0.01 or beta > 0.99:
        warnings.warn(f"generalized_jsd(beta={beta}): the loss scale is discontinuous at beta 0 and 1 "
                      "(forward/reverse KL there, ~beta·FKL or ~(1-beta)·RKL just inside)", stacklevel=2)
    terms = _fkl_terms if beta == 0 else _rkl_terms if beta == 1 else _jsd_terms(beta)
    return _token_mean(_vocab_divergence(terms), student_logits, teacher_logits, mask, temperature=temperature,
                       chunk_size=chunk_size, normalizer=normalizer, group=group, vocab_slice=vocab_slice)


def fkl_rkl_mix(student_logits, teacher_logits, *, mask, weight=0.9, temperature=1.0, chunk_size=None,
                normalizer=None, group=None, vocab_slice=None):
    """§2.4 weight·FKL + (1-weight)·RKL: ATKD's `--kl_method jsd` (OSD's fwd_loss_ratio 0.9); not a JS divergence."""
    return _token_mean(_vocab_divergence(_mixed_terms(weight)), student_logits, teacher_logits, mask,
                       temperature=temperature, chunk_size=chunk_size, normalizer=normalizer, group=group,
                       vocab_slice=vocab_slice)


def symmetric_kl(student_logits, teacher_logits, *, mask, weight=0.5, temperature=1.0, chunk_size=None,
                 normalizer=None, group=None, vocab_slice=None):
    """§2.5 weight·FKL + (1-weight)·RKL (DistiLLM, torchtune sym_kd_ratio)."""
    return fkl_rkl_mix(student_logits, teacher_logits, mask=mask, weight=weight, temperature=temperature,
                       chunk_size=chunk_size, normalizer=normalizer, group=group, vocab_slice=vocab_slice)


def tvd(student_logits, teacher_logits, *, mask, temperature=1.0, chunk_size=None, normalizer=None, group=None,
        vocab_slice=None):
    """§2.6 ½ Σ_v |p - q|, in [0, 1]; averaged over counted positions only (ATKD's release averaged the others)."""
    return _token_mean(_vocab_divergence(_tvd_terms), student_logits, teacher_logits, mask,
                       temperature=temperature, chunk_size=chunk_size, normalizer=normalizer, group=group,
                       vocab_slice=vocab_slice)


def skew_forward_kl(student_logits, teacher_logits, *, mask, alpha=0.1, temperature=1.0, chunk_size=None,
                    normalizer=None, group=None, vocab_slice=None):
    """§2.7 DistiLLM SKL: KL(p ‖ α p + (1-α) q), gradient through q inside the mixture. (DistiLLM's code
    returns the cross-entropy, offset by H(p).)"""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _token_mean(_vocab_divergence(_skew_forward_terms(alpha)), student_logits, teacher_logits, mask,
                       temperature=temperature, chunk_size=chunk_size, normalizer=normalizer, group=group,
                       vocab_slice=vocab_slice)


def skew_reverse_kl(student_logits, teacher_logits, *, mask, alpha=0.1, detach_mixture=False, temperature=1.0,
                    chunk_size=None, normalizer=None, group=None, vocab_slice=None):
    """§2.8 DistiLLM SRKL: KL(q ‖ (1-α) p + α q). detach_mixture=True is DistiLLM-2 (q inside the mixture
    detached: same value, different gradient)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _token_mean(_vocab_divergence(_skew_reverse_terms(alpha, detach_mixture)), student_logits,
                       teacher_logits, mask, temperature=temperature, chunk_size=chunk_size, normalizer=normalizer,
                       group=group, vocab_slice=vocab_slice)


# ----------------------------------------------------------------------------------------------------------
# §3: target-aware losses (target_ids[b, t] = g_t, the token position t predicts)

def dkd(student_logits, teacher_logits, *, mask, target_ids, alpha=0.2, beta=1.0, reverse=False, temperature=1.0,
        chunk_size=None, normalizer=None, group=None, vocab_slice=None):
    """§3.1 α·mean_t TCKD_t + β·mean_t NCKD_t (ATKD's defaults); NCKD not weighted by 1 - p(g).

    Per token FKL_t = TCKD_t + (1 - p_t(g_t))·NCKD_t. reverse=True: TCKD^rev = KL(b^S ‖ b^T),
    NCKD^rev = KL(q̂ ‖ p̂), and RKL_t = TCKD^rev_t + (1 - q_t(g_t))·NCKD^rev_t.
    """
    def per_token(zs, zt, target, group=None):
        return _decoupled_rows(zs, zt, target, alpha, beta, group, reverse=reverse)
    return _token_mean(per_token, student_logits, teacher_logits, mask, temperature=temperature,
                       chunk_size=chunk_size, normalizer=normalizer, group=group, vocab_slice=vocab_slice,
                       target_ids=target_ids)


def atkd(student_logits, teacher_logits, *, mask, target_ids, lam=0.2, reverse=False, temperature=1.0,
         chunk_size=None, normalizer=None, group=None, vocab_slice=None, return_parts=False):
    """§3.2 λ·mean_E NCKD + (1-λ)·(mean_H TCKD + mean_H NCKD).

    UnC_t = 1 - p_t(g_t) from the teacher; split at the lower median over the counted tokens of this
    micro-batch (ties go to hard); each subset averaged over its own size, an empty one contributes 0.
    reverse=True uses TCKD^rev, NCKD^rev with the same teacher split. With `normalizer=N` the result is
    (n_counted / N)·ATKD, so micro-batch losses add up weighted by their token counts.
    return_parts=True returns (loss, parts): the split and its terms from the same pass, for the log:
    n_easy, n_hard (ints) and nckd_easy, tckd_hard, nckd_hard (detached subset means; 0 for an empty subset).
    """
    group = _sharded(group)
    vocab = _check_pair(student_logits, teacher_logits, mask, vocab_slice, group)
    mask = mask.bool()
    rows = _counted_rows(mask)
    n = rows.numel()
    if n == 0:
        zero = _graph_zero(student_logits)
        parts = dict(n_easy=0, n_hard=0, nckd_easy=0.0, tckd_hard=0.0, nckd_hard=0.0)
        return (zero, parts) if return_parts else zero
    targets = _counted_targets(target_ids, mask, rows, vocab, group)
    teacher = teacher_logits.detach()
    dtype = _compute_dtype(student_logits)
    with torch.no_grad():
        step = n if chunk_size is None else int(chunk_size)
        log_pg = torch.cat([
            _target_log_prob(_select_rows(teacher, rows[i:i + step], vocab, dtype) / temperature,
                             targets[i:i + step], group) for i in range(0, n, step)])
        uncertainty = -torch.expm1(log_pg)
        hard = uncertainty >= torch.median(uncertainty)
        n_hard = hard.sum().to(dtype)
        hard_weight = (1 - lam) / n_hard.clamp_min(1)  # an empty subset contributes 0
        easy_weight = lam / (n - n_hard).clamp_min(1)
        tckd_weight = torch.where(hard, hard_weight, 0.0).to(dtype)
        nckd_weight = torch.where(hard, hard_weight, easy_weight).to(dtype)

    sums = torch.zeros(3, dtype=dtype, device=student_logits.device)  # Σ_easy NCKD, Σ_hard TCKD, Σ_hard NCKD

    def per_token(zs, zt, target, w_tckd, w_nckd, is_hard, group=None):
        tckd, nckd = _decoupled_parts(zs, zt, target, group, reverse=reverse)
        if return_parts:  # each row passes through here once, chunked or not
            with torch.no_grad():
                sums.add_(torch.stack([torch.where(is_hard, 0.0, nckd).sum(), torch.where(is_hard, tckd, 0.0).sum(),
                                       torch.where(is_hard, nckd, 0.0).sum()]))
        return w_tckd * tckd + w_nckd * nckd
    value = _sum_over_rows(per_token, student_logits, teacher, rows, rows,
                           (targets, tckd_weight, nckd_weight, hard), temperature=temperature,
                           chunk_size=chunk_size, group=group, vocab=vocab)
    value = value if normalizer is None else value * (n / normalizer)
    if not return_parts:
        return value
    n_hard = int(hard.sum())
    means = (sums / torch.tensor([max(n - n_hard, 1), max(n_hard, 1), max(n_hard, 1)], dtype=dtype,
                                 device=sums.device)).tolist()
    return value, dict(n_easy=n - n_hard, n_hard=n_hard, nckd_easy=means[0], tckd_hard=means[1], nckd_hard=means[2])


def cross_entropy(logits, *, target_ids, mask, chunk_size=None, normalizer=None, group=None):
    """Token-mean -log q(g_t) with this module's reduction, chunking and vocab-parallel conventions
    (target_ids already aligned with the logits: no shift)."""
    group = _sharded(group)
    _check_pair(logits, logits, mask, None, group)
    mask = mask.bool()
    rows = _counted_rows(mask)
    if rows.numel() == 0:
        return _graph_zero(logits)
    targets = _counted_targets(target_ids, mask, rows, logits.shape[-1], group)
    total = _sum_over_rows(_cross_entropy_rows, logits, None, rows, None, (targets,), chunk_size=chunk_size,
                           group=group, vocab=logits.shape[-1])
    return total / (rows.numel() if normalizer is None else normalizer)


def token_log_probs(logits, *, target_ids, temperature=1.0, chunk_size=None, group=None):
    """log softmax(logits / τ)[b, t, target_ids[b, t]] in fp32, shape of target_ids (e.g. log q_θ(y_t) for
    MiniLLM). Positions whose target is -100 give 0 and their logits are not read. chunk_size=k: k rows of fp32
    at a time, forward and backward (the backward recomputes each chunk's softmax from its saved normaliser,
    and a HeadLogits' rows from its hidden states)."""
    group = _sharded(group)
    if tuple(logits.shape[:-1]) != tuple(target_ids.shape):
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must be the logits' shape {tuple(logits.shape)} "
                         "without the vocabulary dim")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    counted = target_ids != IGNORE_INDEX
    rows = _counted_rows(counted)
    targets = _counted_targets(target_ids, counted, rows, logits.shape[-1], group)
    if chunk_size is None:
        z = _select_rows(logits, rows, logits.shape[-1], _compute_dtype(logits), group) / temperature
        picked = _target_log_prob(z, targets, group)
    else:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        plan = (logits, rows, targets, temperature, group, int(chunk_size))
        picked = _ChunkedTargetLogProb.apply(plan, *_tensors(logits))
    return picked.new_zeros(target_ids.shape).masked_scatter(counted, picked)


class _ChunkedTargetLogProb(torch.autograd.Function):
    """log q(g) on the given rows, `chunk_size` rows at a time. The backward recomputes each chunk:
    ∂ log q(g) / ∂z = (onehot(g) - softmax(z / τ)) / τ, from the log-normaliser kept by the forward."""

    @staticmethod
    def forward(ctx, plan, *tensors):
        logits, rows, targets, temperature, group, chunk_size = plan
        dtype, vocab = _compute_dtype(logits), logits.shape[-1]
        side = _Side(logits, vocab, group, needs_grad=False)
        picked = torch.empty(rows.numel(), dtype=dtype, device=logits.device)
        log_norm = torch.empty_like(picked)
        for start in range(0, rows.numel(), chunk_size):
            part = slice(start, start + chunk_size)
            z = side.rows(rows[part]).to(dtype) / temperature
            log_norm[part] = _logsumexp(z, group)
            picked[part] = _at_target(z, targets[part], group) - log_norm[part]
        ctx.plan, ctx.log_norm = plan, log_norm
        ctx.needs = [t.requires_grad for t in tensors]
        return picked

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_picked):
        logits, rows, targets, temperature, group, chunk_size = ctx.plan
        dtype, vocab = _compute_dtype(logits), logits.shape[-1]
        side = _Side(logits, vocab, group, needs_grad=True)
        side.grads = [g if needed else None for g, needed in zip(side.grads, ctx.needs)]
        for start in range(0, rows.numel(), chunk_size):
            part = slice(start, start + chunk_size)
            z = side.rows(rows[part]).to(dtype) / temperature
            g = -(z - ctx.log_norm[part, None]).exp()
            local, owned = _local_targets(targets[part], vocab, group)
            g.scatter_add_(-1, local[:, None], owned[:, None].to(dtype))  # + onehot(g) on the shard that owns g
            g *= grad_picked[part, None] / temperature
            side.add_grad(rows[part], g)
        return (None,) + tuple(side.finish())


# ----------------------------------------------------------------------------------------------------------
# §4.1 MCC-KD

def _symmetric_kl_rows(za, zb, group=None):
    la, lb, keep = _log_probs(za, zb, group)
    # KL(a ‖ b) + KL(b ‖ a) = Σ (a - b)(log a - log b)
    t = 0.5 * (la.exp() - lb.exp()) * (la - lb)
    return _vocab_sum(t if keep is None else t.masked_fill(~keep, 0.0), group)


def _mcc_head_rows(eps, temperature):
    """HEAD's KLDivLoss, both directions: ½[KL(s_T(b) ‖ s_1(a)) + KL(s_T(a) ‖ s_1(b))] with the smoothed
    s_τ(z) = (softmax(z/τ) + eps) / (Σ_v (softmax(z/τ) + eps) + eps) (its powmax); τ on the target side only."""
    def per_token(za, zb, group=None):
        v_global = za.shape[-1] * (1 if group is None else dist.get_world_size(group))
        log_norm = math.log1p(v_global * eps + eps)

        def smoothed(z, tau):
            return torch.log(_log_softmax(z / tau, group).exp() + eps) - log_norm
        ea, eb, ta, tb = smoothed(za, 1.0), smoothed(zb, 1.0), smoothed(za, temperature), smoothed(zb, temperature)
        return 0.5 * _vocab_sum(tb.exp() * (tb - ea) + ta.exp() * (ta - eb), group)
    return per_token


def mcc_span_kl(logits_a, logits_b, *, spans_a, spans_b, temperature=1.0, max_seq_len=None, reduction="item",
                eps=0.0, chunk_size=None, normalizer=None, group=None):
    """§4.1 MCC-KD span consistency: ½[mean_i (1/ℓ_i) Σ_k KL(q^a ‖ q^b) + mean_i (1/ℓ_i) Σ_k KL(q^b ‖ q^a)].

    logits_a, logits_b [B, S, V]: two student passes; spans_a, spans_b [B, 2] = (start, end) logit positions
    of each item's answer span, equal lengths within an item. Items with an empty span, or whose span ends at or
    beyond `max_seq_len`, are skipped. T on both sides, gradients to both, no eps, no T² (defaults).
    The HEAD-code variant: reduction="token" (token mean over all span tokens) and eps > 0, which switches to
    HEAD's KLDivLoss (its powmax smoothing, (q + eps) / (Σ(q + eps) + eps), and T on the target side only;
    HEAD uses eps = 7e-5). normalizer: number of items (reduction="item") or span tokens ("token") in the
    optimiser step.
    """
    if reduction not in ("item", "token"):
        raise ValueError(f"reduction must be 'item' or 'token', got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    group = _sharded(group)
    _check_pair(logits_a, logits_b, torch.ones(logits_a.shape[:2], dtype=torch.bool, device=logits_a.device), None, group)
    device = logits_a.device
    spans_a = torch.as_tensor(spans_a, dtype=torch.long, device=device).reshape(-1, 2)
    spans_b = torch.as_tensor(spans_b, dtype=torch.long, device=device).reshape(-1, 2)
    n_items, seq = logits_a.shape[:2]
    if spans_a.shape[0] != n_items or spans_b.shape[0] != n_items:
        raise ValueError(f"need one span per item: {n_items} items, {spans_a.shape[0]} and {spans_b.shape[0]} spans")
    lengths = spans_a[:, 1] - spans_a[:, 0]
    if (lengths < 0).any() or (spans_b[:, 1] < spans_b[:, 0]).any():
        raise ValueError(f"spans must be (start, end) with start <= end: a {spans_a.tolist()}, b {spans_b.tolist()}")
    unequal = (lengths != spans_b[:, 1] - spans_b[:, 0]).nonzero().flatten().tolist()
    if unequal:
        raise ValueError(f"answer spans of a pair must have equal lengths; items {unequal} differ: "
                         f"a {spans_a[unequal].tolist()}, b {spans_b[unequal].tolist()}")
    valid = lengths > 0
    if max_seq_len is not None:
        valid &= (spans_a[:, 1] < max_seq_len) & (spans_b[:, 1] < max_seq_len)
    spans = torch.cat([spans_a, spans_b])[valid.repeat(2)]
    if spans.numel() and (spans.min() < 0 or spans[:, 1].max() > seq):
        raise ValueError(f"spans must lie in [0, {seq}], got {spans.tolist()}")
    items = valid.nonzero().flatten()
    if items.numel() == 0:
        return _graph_zero(logits_a) + _graph_zero(logits_b)
    lens = lengths[items]
    item_of_token = torch.repeat_interleave(torch.arange(items.numel(), device=device), lens)
    offset = torch.arange(int(lens.sum()), device=device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    rows_a = items[item_of_token] * seq + spans_a[items, 0][item_of_token] + offset
    rows_b = items[item_of_token] * seq + spans_b[items, 0][item_of_token] + offset
    weight = (1.0 / lens.to(_compute_dtype(logits_a)))[item_of_token] if reduction == "item" else None
    per_token, scale = (_mcc_head_rows(eps, temperature), 1.0) if eps else (_symmetric_kl_rows, temperature)
    total = _sum_over_rows(per_token, logits_a, logits_b, rows_a, rows_b, weight=weight,
                           temperature=scale, chunk_size=chunk_size, group=group, vocab=logits_a.shape[-1])
    count = items.numel() if reduction == "item" else rows_a.numel()
    return total / (count if normalizer is None else normalizer)


# ----------------------------------------------------------------------------------------------------------
# §4.2 FDD

def distill_layer_indices(n_layers, num_distill_layers=6):
    """int(linspace(0, L, LD + 2))[1:-1] on HF hidden_states indices (0 = embeddings):
    GPT-2 XL 48 -> [6, 13, 20, 27, 34, 41], base 12 -> [1, 3, 5, 6, 8, 10]."""
    return [int(i) for i in np.linspace(0, n_layers, num_distill_layers + 2)[1:-1]]


def _cosine_rows(a, b, group):
    # as F.cosine_similarity: x·y / sqrt(max(‖x‖²‖y‖², eps²)), eps 1e-8; sums over (sharded) vocabulary
    dot, aa, bb = _vocab_sum(a * b, group), _vocab_sum(a * a, group), _vocab_sum(b * b, group)
    return dot / (aa * bb).clamp_min(1e-16).sqrt()


def fdd_loss(student_states, teacher_states, student_head, teacher_head, *, mask, temperature=2.0,
             normalizer=None, group=None):
    """§4.2 L_FDD = mean_i traj_i + mean_{i≥1} der_i.

    student_states, teacher_states: the paired hidden states, one [B, S, D] tensor per distilled layer (pick
    them with distill_layer_indices); heads: each model's own LM head ([..., D] -> [..., V]; no final norm).
    traj_i = token-mean KL(softmax(z^T_i/τ) ‖ softmax(z^S_i/τ)), τ = 2; der_i = token-mean
    [1 - cos(Δ log softmax(z^S), Δ log softmax(z^T))] between consecutive pairs at τ = 1. Only counted rows
    go through the heads; teacher terms under no_grad. With group, the heads return vocab shards.
    """
    group = _sharded(group)
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"need equally many (>= 1) student and teacher states, got {len(student_states)} "
                         f"and {len(teacher_states)}")
    rows = _counted_rows(mask.bool())  # with none, the terms below are empty sums: a 0 that keeps the graph
    trajectory, derivative, previous = 0.0, 0.0, None
    for h_s, h_t in zip(student_states, teacher_states):
        z_s = student_head(_rows(h_s, rows))
        z_s = z_s.to(_compute_dtype(z_s))
        with torch.no_grad():
            z_t = teacher_head(_rows(h_t.detach(), rows))
            z_t = z_t.to(_compute_dtype(z_t))
        trajectory = trajectory + _forward_kl_rows(z_s / temperature, z_t / temperature, group).sum()
        log_q, log_p = _log_softmax(z_s, group), _log_softmax(z_t, group)
        if previous is not None:
            derivative = derivative + (1 - _cosine_rows(log_q - previous[0], log_p - previous[1], group)).sum()
        previous = (log_q, log_p)
    n_pairs = len(student_states)
    total = trajectory / n_pairs + (derivative / (n_pairs - 1) if n_pairs > 1 else 0.0)
    return _divide(total, rows.numel(), normalizer)


# ----------------------------------------------------------------------------------------------------------
# §4.3 CONTRA-KD. velocity_field(z [n, d_T], t [n], j LongTensor [n]) -> [n, d_T]; projector [n, d_S] -> [n, d_T].
# Both run in fp32 on the counted rows only (they act per token).

def velocity_field_loss(velocity_field, projector, student_states, teacher_states, *, mask, t=None, generator=None,
                        normalizer=None):
    """§4.3 rectified-flow loss L_RF = (1/LD) Σ_j token-mean mean_features (v(Y_t, t, j) - (y_T - y_S))².

    y_S = projector(h^S_j), y_T = h^T_j, Y_t = (1-t) y_S + t y_T with one t ~ U(0, 1) per sequence shared by all
    layers (`t` [B] to fix it). Student and teacher states are detached; gradients reach the velocity field
    and the projector (through both y_S occurrences). mask: the attention mask.
    """
    rows = _counted_rows(mask.bool())  # with none, the terms below are empty sums: a 0 that keeps the graph
    batch, seq = mask.shape
    if t is None:
        t = torch.rand(batch, generator=generator, device=mask.device if generator is None else generator.device)
    token_t = t.to(mask.device, torch.float32)[rows // seq]
    total = 0.0
    for j, (h_s, h_t) in enumerate(zip(student_states, teacher_states)):
        y_s = projector(_rows(h_s.detach(), rows).float()).float()
        y_t = _rows(h_t.detach(), rows).float()
        y = (1 - token_t[:, None]) * y_s + token_t[:, None] * y_t
        v = velocity_field(y, token_t, torch.full_like(rows, j)).float()
        total = total + (v - (y_t - y_s)).pow(2).mean(-1).sum()
    return _divide(total / len(student_states), rows.numel(), normalizer)


def contra_loss(velocity_field, projector, student_states, *, mask, k, normalizer=None):
    """§4.3 L_CONTRA = (1/LD) Σ_j [1 - token-mean cos(a_j, sg(a_j + k·v(a_j, 0, j)))], a_j = projector(h^S_j).

    Gradients reach the student (and the projector unless frozen by the caller); the Euler target is computed
    under no_grad. k = (epoch+1)/E in the code's curriculum. mask: response tokens. Values in [0, 2].
    """
    rows = _counted_rows(mask.bool())  # with none, the terms below are empty sums: a 0 that keeps the graph
    total = 0.0
    for j, h_s in enumerate(student_states):
        a = projector(_rows(h_s, rows).float()).float()
        with torch.no_grad():
            target = a + k * velocity_field(a, a.new_zeros(a.shape[0]), torch.full_like(rows, j)).float()
        total = total + (1 - F.cosine_similarity(a, target, dim=-1, eps=1e-8)).sum()
    return _divide(total / len(student_states), rows.numel(), normalizer)


# ----------------------------------------------------------------------------------------------------------
# §4.4 MiniLLM policy-gradient terms (as the released code computes them). Inputs are per-token values of the
# sampled response tokens, [B, T], with `mask` marking response tokens (right padding). L_reg is reverse_kl.

def minillm_importance_weights(log_q_old, log_p, *, alpha=0.2):
    """w_t = q_old(y_t) / p̃(y_t), p̃ = (1-α) q_old + α p (teacher-mixed sampling); α = 0 gives 1."""
    log_mix = torch.logaddexp(log_q_old + _log(1 - alpha), log_p + _log(alpha))
    return (log_q_old - log_mix).exp()


def minillm_rewards(log_p, log_q_old, *, reward_scaling=0.5, clip=100.0):
    """r_t = clip((log p(y_t) - log q_old(y_t)) / reward_scaling, -clip, clip)."""
    return ((log_p - log_q_old) / reward_scaling).clamp(-clip, clip)


def minillm_advantages(rewards, *, mask, gamma=0.95, length_normalize=True):
    """A_t = G_t / (T - t), G_t = r_t + γ G_{t+1} (current token included), T - t = response tokens from t to
    the end inclusive. Before whitening; 0 outside the mask."""
    mask = mask.to(rewards.dtype)
    r = rewards * mask
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    returns = returns * mask
    if not length_normalize:
        return returns
    remaining = mask.flip(1).cumsum(1).flip(1)
    return returns / remaining.clamp_min(1)


def minillm_whiten(values, *, mask=None, width=None, group=None, eps=1e-8):
    """(A - mean) / sqrt(var + eps), population variance, the statistics all-reduced over `group`.

    mask=None is the release (LMOps `whiten()` inside `ppo_loss`, called per PPO minibatch): the statistics
    run over every entry of the padded [B, width] tensor, padding zeros included; entries beyond
    values.shape[1] up to `width` (the release's padded response width) count as zeros; every entry of the
    result is whitened. With `mask`: over the masked entries only, 0 outside the mask (our option)."""
    if mask is None:
        extra = 0 if width is None else width - values.shape[1]
        if extra < 0:
            raise ValueError(f"width {width} is narrower than the values' {values.shape[1]} columns")
        stats = torch.stack([values.sum(), values.new_tensor(float(values.numel() + values.shape[0] * extra))])
    else:
        mask = mask.to(values.dtype)
        stats = torch.stack([(values * mask).sum(), mask.sum()])
    if _sharded(group) is not None:
        dist.all_reduce(stats, group=group)
    mean = stats[0] / stats[1]
    if mask is None:  # the implicit zero columns add (0 - mean)² each
        sq = ((values - mean) ** 2).sum() + values.shape[0] * extra * mean ** 2
    else:
        sq = ((values - mean) ** 2 * mask).sum()
    if _sharded(group) is not None:
        dist.all_reduce(sq, group=group)
    whitened = (values - mean) * torch.rsqrt(sq / stats[1] + eps)
    return whitened if mask is None else whitened * mask


def minillm_policy_loss(log_q, log_q_old, weights, advantages, *, mask, clip_range=0.2, normalizer=None):
    """L_pg = masked-mean max(-A ρ, -A clip(ρ, 1-ε, 1+ε)), ρ = exp(log q_θ - log q_old)·w."""
    mask = mask.bool()
    ratio = (log_q - log_q_old.detach()).exp() * weights.detach()
    advantages = advantages.detach()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    total = torch.where(mask, loss, 0.0).sum()
    return total / (mask.sum() if normalizer is None else normalizer) if mask.any() else total


# ----------------------------------------------------------------------------------------------------------
# §4.5 hidden-state alignment (RWKV stages)

def hidden_mse(student_hidden, teacher_hidden, *, mask, counted_only=False):
    """Stage 1 as coded: [n_layers·B, L, D] layer-major states, mask [B, L] (labels != -100) repeated per layer;
    mean over all elements of ((S - T)·m)², masked zeros in the denominator; counted_only divides by the
    counted elements instead."""
    if student_hidden.shape != teacher_hidden.shape or student_hidden.shape[0] % mask.shape[0]:
        raise ValueError(f"student {tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)} must match "
                         f"and hold a whole number of layers of the batch {tuple(mask.shape)}")
    dtype = _compute_dtype(student_hidden)
    m = mask.to(dtype).repeat(student_hidden.shape[0] // mask.shape[0], 1)[..., None]
    sq = ((student_hidden.to(dtype) - teacher_hidden.detach().to(dtype)) * m).pow(2).sum()
    if not counted_only:
        return sq / student_hidden.numel()
    counted = m.sum() * student_hidden.shape[-1]
    return sq / counted if counted > 0 else sq


def hidden_l2(student_hidden, teacher_hidden, *, mask=None, normalizer=None):
    """MOHAWK form: mean over tokens of ‖S_t - T_t‖₂ / √D (all tokens when mask is None)."""
    dtype = _compute_dtype(student_hidden)
    dist_per_token = torch.linalg.vector_norm(student_hidden.to(dtype) - teacher_hidden.detach().to(dtype), dim=-1)
    dist_per_token = dist_per_token / math.sqrt(student_hidden.shape[-1])
    if mask is None:
        mask = torch.ones(dist_per_token.shape, dtype=torch.bool, device=dist_per_token.device)
    mask = mask.bool()
    total = torch.where(mask, dist_per_token, 0.0).sum()
    if normalizer is None and not mask.any():
        return total
    return total / (mask.sum() if normalizer is None else normalizer)


def attention_output_l2(student_outputs, teacher_outputs, *, mask=None):
    """Per layer ‖a^T - a^S‖₂ / √D averaged over tokens, then mean over layers."""
    if len(student_outputs) != len(teacher_outputs) or not student_outputs:
        raise ValueError(f"need equally many (>= 1) layers, got {len(student_outputs)} and {len(teacher_outputs)}")
    return sum(hidden_l2(s, t, mask=mask) for s, t in zip(student_outputs, teacher_outputs)) / len(student_outputs)
