"""common/losses.py on HeadLogits (the logits given by a linear head's input and weights, computed chunk by chunk):
every loss equals the same loss on the plain logits `hidden @ weight.T`, values and gradients w.r.t. the hidden
states and the head weights, with masks, temperature and garbage under masked positions (float64, so equality is
to rounding). Then the bf16 autocast fast path against fp32 (tolerances stated at the test) and the compiled
per-chunk kernel against the eager one. Vocab-parallel HeadLogits: tests/common/test_losses_parallel.py.
"""
from functools import partial

import pytest
import torch

from common import losses as L
from tests.common.test_losses import ALL_CASES, B, S, V, call

D = 5


def head_inputs(seed, dtype=torch.float64, bias=False, lora_rank=0):
    """Student and teacher heads: hidden [B, S, D] with NaN under masked positions, weights [V, D]; the
    student's tensors require grad. Returns (student HeadLogits, teacher HeadLogits, mask, targets)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, S, generator=gen) < 0.6
    mask[0, 0], mask[-1, -1] = True, False
    g = torch.randint(0, V, (B, S), generator=gen)

    def head(requires_grad):
        hidden, weight = [randn(B, S, D)], [randn(V, D)]
        if lora_rank:  # LoRA: a second term s·A(h) [B, S, r] with B [V, r]
            hidden.append(0.5 * randn(B, S, lora_rank))
            weight.append(randn(V, lora_rank))
        for h in hidden:
            h[~mask] = float("nan")  # garbage under masked positions: never read
        tensors = hidden + weight + ([0.3 * randn(V)] if bias else [])
        for t in tensors:
            t.requires_grad_(requires_grad)
        n = len(hidden)
        return L.HeadLogits(tuple(tensors[:n]), tuple(tensors[n:2 * n]), tensors[2 * n] if bias else None)
    return head(True), head(False), mask, g


def plain_logits(head, mask):
    """hidden @ weight.T (+ bias) with the garbage rows zeroed (the reference may read every row)."""
    z = sum(torch.where(mask[..., None], h, 0.0) @ w.T for h, w in head.terms)
    return z if head.bias is None else z + head.bias


def loss(name, s, t, mask, g, **kw):
    if name == "cross_entropy":
        return L.cross_entropy(s, target_ids=g, mask=mask, **{k: v for k, v in kw.items() if k != "temperature"})
    if name == "token_log_probs":
        weights = torch.linspace(-1, 2, B * S, dtype=torch.float64).view(B, S)
        return (L.token_log_probs(s, target_ids=torch.where(mask, g, -100), **kw) * weights).sum()
    return call(name, s, t, mask, g, **kw)


def grads(value, head):
    tensors = [x for x in head.tensors() if x.requires_grad]
    return torch.autograd.grad(value, tensors)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name", ALL_CASES + ["cross_entropy", "token_log_probs"])
def test_every_loss_on_head_logits_equals_the_loss_on_plain_logits(name, chunk_size):
    student, teacher, mask, g = head_inputs(seed=sum(map(ord, name)))
    want = loss(name, plain_logits(student, mask), plain_logits(teacher, mask), mask, g, temperature=1.7)
    got = loss(name, student, teacher, mask, g, temperature=1.7, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for gg, gw, x in zip(grads(got, student), grads(want, student), student.tensors()):
        assert not gg.isnan().any()
        torch.testing.assert_close(gg, gw, rtol=1e-9, atol=1e-12)
    (h_grad, *_) = grads(loss(name, student, teacher, mask, g, chunk_size=chunk_size), student)
    assert (h_grad[~mask] == 0).all() and h_grad[mask].abs().max() > 0


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name", ["forward_kl", "skew_reverse_kl", "dkd", "atkd"])
def test_head_logits_mix_with_plain_logits_on_either_side(name, chunk_size):
    student, teacher, mask, g = head_inputs(seed=40)
    zs, zt = plain_logits(student, mask), plain_logits(teacher, mask)
    want = loss(name, zs, zt, mask, g)
    # student from its head, teacher logits as a tensor (e.g. received from a teacher server)
    got = loss(name, student, zt, mask, g, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for gg, gw in zip(grads(got, student), grads(want, student)):
        torch.testing.assert_close(gg, gw, rtol=1e-9, atol=1e-12)
    # student logits as a tensor, teacher from its head
    zs_leaf = zs.detach().requires_grad_()
    got = loss(name, zs_leaf, teacher, mask, g, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, zs_leaf)[0],
                               torch.autograd.grad(loss(name, zs_leaf, zt, mask, g), zs_leaf)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("form", ["bias", "lora"])
def test_biased_and_two_term_lora_heads_equal_their_plain_logits(form, chunk_size):
    student, teacher, mask, g = head_inputs(seed=41, bias=form == "bias", lora_rank=3 if form == "lora" else 0)
    want = L.generalized_jsd(plain_logits(student, mask), plain_logits(teacher, mask), mask=mask, beta=0.3)
    got = L.generalized_jsd(student, teacher, mask=mask, beta=0.3, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_grads, want_grads = grads(got, student), grads(want, student)
    assert len(got_grads) == (3 if form == "bias" else 4)
    for gg, gw in zip(got_grads, want_grads):
        torch.testing.assert_close(gg, gw, rtol=1e-9, atol=1e-12)


def test_vocab_slice_reads_the_first_rows_of_both_heads():
    student, teacher, mask, _ = head_inputs(seed=42)
    wide = L.HeadLogits(teacher.hidden, (torch.cat([teacher.weight[0], torch.randn(4, D, dtype=torch.float64)]),))
    want = L.reverse_kl(plain_logits(student, mask), plain_logits(teacher, mask), mask=mask)
    got = L.reverse_kl(student, wide, mask=mask, vocab_slice=V, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (_, w_grad) = grads(got, student)
    torch.testing.assert_close(w_grad, grads(want, student)[1], rtol=1e-9, atol=1e-12)


def test_chunked_head_loss_accumulates_into_existing_gradients_and_scales_with_the_backward():
    student, teacher, mask, _ = head_inputs(seed=43)
    plain = 3.0 * L.forward_kl(plain_logits(student, mask), plain_logits(teacher, mask), mask=mask)
    want = grads(plain + L.tvd(plain_logits(student, mask), plain_logits(teacher, mask), mask=mask), student)
    chunked = 3.0 * L.forward_kl(student, teacher, mask=mask, chunk_size=2) + L.tvd(student, teacher, mask=mask,
                                                                                   chunk_size=5)
    for gg, gw in zip(grads(chunked, student), want):
        torch.testing.assert_close(gg, gw, rtol=1e-9, atol=1e-12)


def test_empty_mask_on_head_logits_is_a_graph_connected_zero():
    student, teacher, _, _ = head_inputs(seed=44)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for chunk_size in (None, 3):
        out = L.forward_kl(student, teacher, mask=mask, chunk_size=chunk_size)
        assert out.item() == 0 and out.requires_grad
        assert all(g.abs().max() == 0 for g in grads(out, student))


def test_head_logits_without_grad_compute_only_the_value():
    student, teacher, mask, _ = head_inputs(seed=45)
    with torch.no_grad():
        out = L.forward_kl(student, teacher, mask=mask, chunk_size=2)
    assert not out.requires_grad
    torch.testing.assert_close(out, L.forward_kl(plain_logits(student, mask), plain_logits(teacher, mask),
                                                 mask=mask).detach(), rtol=1e-12, atol=0)


def test_mismatched_head_terms_are_an_error():
    h = torch.randn(B, S, D)
    with pytest.raises(ValueError, match="pair up"):
        L.forward_kl(L.HeadLogits(h, torch.randn(V, D + 1)), torch.randn(B, S, V), mask=torch.ones(B, S, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# The fast path's precision: bf16 matmuls under autocast, fp32 divergence, against fp32 throughout

def real_scale_heads(seed, v=96, d=32):
    """Logit scales like a trained LM's (std ~3); student fp32 (master weights), teacher in bf16."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(2, 16, d, generator=gen).requires_grad_()
    w_s = (torch.randn(v, d, generator=gen) / d ** 0.5 * 3).requires_grad_()
    h_t, w_t = torch.randn(2, 16, d, generator=gen), torch.randn(v, d, generator=gen) / d ** 0.5 * 3
    mask = torch.rand(2, 16, generator=gen) < 0.8
    return h_s, w_s, h_t, w_t, mask


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_bf16_autocast_head_loss_is_the_fp32_loss_within_bf16_tolerance(name):
    """Tolerance: bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2 %) on the matmul inputs and on the
    logits each side rounds to; the divergence and its sums run in fp32. We allow 2 % of the value and of the
    largest gradient entry, about ten bf16 roundings."""
    fn = partial(L.generalized_jsd, beta=0.5) if name == "generalized_jsd" else getattr(L, name)
    h_s, w_s, h_t, w_t, mask = real_scale_heads(seed=50)
    want = fn(h_s @ w_s.T, h_t @ w_t.T, mask=mask)
    want_grads = torch.autograd.grad(want, [h_s, w_s])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(L.HeadLogits(h_s, w_s), L.HeadLogits(h_t.bfloat16(), w_t.bfloat16()), mask=mask, chunk_size=7)
    assert got.dtype == torch.float32
    got_grads = torch.autograd.grad(got, [h_s, w_s])
    assert [x.dtype for x in got_grads] == [torch.float32, torch.float32]  # into the fp32 master tensors
    torch.testing.assert_close(got, want, rtol=0.02, atol=1e-4)
    for gg, gw in zip(got_grads, want_grads):
        torch.testing.assert_close(gg, gw, rtol=0, atol=0.02 * gw.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# The compiled per-chunk kernel (torch.compile) computes what the eager one does

@pytest.mark.parametrize("name", ["forward_kl", "atkd"])
def test_compiled_chunks_equal_eager_chunks(name):
    student, teacher, mask, g = head_inputs(seed=60)
    eager = loss(name, student, teacher, mask, g, temperature=1.3, chunk_size=4)
    eager_grads = grads(eager, student)
    with L.compiled_chunks():
        compiled = loss(name, student, teacher, mask, g, temperature=1.3, chunk_size=4)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    for gc, ge in zip(grads(compiled, student), eager_grads):
        torch.testing.assert_close(gc, ge, rtol=1e-9, atol=1e-12)
