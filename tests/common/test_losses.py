"""common/losses.py against independent float64 implementations written here in probability space
(softmax by exp / sum, KL as Σ a·log(a / b)), plus the identities of losses.md §5.

Micro-batch convention under test: with normalizer = counted tokens of the whole step, the sum of the
micro-batch losses (and gradients) equals the whole-batch loss.
"""
import inspect
import math
import warnings
from functools import partial

import pytest
import torch

from common import losses as L
from common.labels import causal_lm_batch, targets_and_mask

B, S, V = 3, 6, 13


# ---------------------------------------------------------------------------------------------------------
# float64 references (probability space)

def probs(z, tau=1.0):
    e = torch.exp(z.double() / tau)
    return e / e.sum(-1, keepdim=True)


def kl(a, b):
    return (a * torch.log(a / b)).sum(-1)


def binary_kl(a, b):
    return a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b))


def non_target(p, g):
    """p(v) / (1 - p(g)) for v != g, with the target column removed."""
    keep = torch.ones_like(p, dtype=torch.bool).scatter_(-1, g[..., None], False)
    rest = p[keep].view(*p.shape[:-1], p.shape[-1] - 1)
    return rest / (1 - p.gather(-1, g[..., None]))


def ref_tckd_nckd(p, q, g, reverse=False):
    pg, qg = p.gather(-1, g[..., None])[..., 0], q.gather(-1, g[..., None])[..., 0]
    p_hat, q_hat = non_target(p, g), non_target(q, g)
    if reverse:
        return binary_kl(qg, pg), kl(q_hat, p_hat)
    return binary_kl(pg, qg), kl(p_hat, q_hat)


def ref_dkd(p, q, g, alpha=0.2, beta=1.0, reverse=False):
    tckd, nckd = ref_tckd_nckd(p, q, g, reverse)
    return alpha * tckd + beta * nckd


def ref_jsd(p, q, beta):
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_srkl(p, q, alpha, detach):
    q_in_mix = q.detach() if detach else q
    return (q * torch.log(q / ((1 - alpha) * p + alpha * q_in_mix))).sum(-1)


# name -> (library call, per-token reference d_t(p, q, g) of shape [B, S])
TOKEN_MEAN_CASES = {
    "forward_kl": (L.forward_kl, lambda p, q, g: kl(p, q)),
    "reverse_kl": (L.reverse_kl, lambda p, q, g: kl(q, p)),
    "soft_cross_entropy": (L.soft_cross_entropy, lambda p, q, g: -(p * torch.log(q)).sum(-1)),
    "generalized_jsd_0.5": (partial(L.generalized_jsd, beta=0.5), lambda p, q, g: ref_jsd(p, q, 0.5)),
    "generalized_jsd_0.1": (partial(L.generalized_jsd, beta=0.1), lambda p, q, g: ref_jsd(p, q, 0.1)),
    "generalized_jsd_0": (partial(L.generalized_jsd, beta=0.0), lambda p, q, g: kl(p, q)),
    "generalized_jsd_1": (partial(L.generalized_jsd, beta=1.0), lambda p, q, g: kl(q, p)),
    "fkl_rkl_mix": (L.fkl_rkl_mix, lambda p, q, g: 0.9 * kl(p, q) + 0.1 * kl(q, p)),
    "symmetric_kl": (L.symmetric_kl, lambda p, q, g: 0.5 * kl(p, q) + 0.5 * kl(q, p)),
    "symmetric_kl_0.3": (partial(L.symmetric_kl, weight=0.3), lambda p, q, g: 0.3 * kl(p, q) + 0.7 * kl(q, p)),
    "tvd": (L.tvd, lambda p, q, g: 0.5 * (p - q).abs().sum(-1)),
    "skew_forward_kl": (L.skew_forward_kl, lambda p, q, g: kl(p, 0.1 * p + 0.9 * q)),
    "skew_forward_kl_0.3": (partial(L.skew_forward_kl, alpha=0.3), lambda p, q, g: kl(p, 0.3 * p + 0.7 * q)),
    "skew_reverse_kl": (L.skew_reverse_kl, lambda p, q, g: ref_srkl(p, q, 0.1, False)),
    "skew_reverse_kl_detached": (partial(L.skew_reverse_kl, alpha=0.25, detach_mixture=True),
                                 lambda p, q, g: ref_srkl(p, q, 0.25, True)),
    "dkd": (L.dkd, lambda p, q, g: ref_dkd(p, q, g)),
    "dkd_reverse": (partial(L.dkd, alpha=0.7, beta=0.4, reverse=True),
                    lambda p, q, g: ref_dkd(p, q, g, 0.7, 0.4, True)),
}
TARGET_AWARE = {"dkd", "dkd_reverse", "atkd", "atkd_reverse"}
PAIRWISE = [name for name in TOKEN_MEAN_CASES if name not in TARGET_AWARE]


def ref_atkd(p, q, g, mask, lam=0.2, reverse=False):
    tckd, nckd = ref_tckd_nckd(p, q, g, reverse)
    pg = p.gather(-1, g[..., None])[..., 0]
    unc = (1 - pg)[mask]
    tau_med = unc.sort().values[(unc.numel() - 1) // 2]  # lower median
    hard = unc >= tau_med
    easy = ~hard
    tckd, nckd = tckd[mask], nckd[mask]

    def mean(x, subset):
        return x[subset].mean() if subset.any() else x.new_zeros(())
    return lam * mean(nckd, easy) + (1 - lam) * (mean(tckd, hard) + mean(nckd, hard))


def call(name, zs, zt, mask, g, **kw):
    fn = TOKEN_MEAN_CASES[name][0] if name in TOKEN_MEAN_CASES else {
        "atkd": L.atkd, "atkd_reverse": partial(L.atkd, reverse=True, lam=0.3)}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generalized_jsd's endpoint warning, tested on its own
        if name in TARGET_AWARE:
            return fn(zs, zt, mask=mask, target_ids=g, **kw)
        return fn(zs, zt, mask=mask, **kw)


def reference(name, zs, zt, mask, g, tau=1.0):
    p, q = probs(zt, tau), probs(zs, tau)
    if name == "atkd":
        return ref_atkd(p, q, g, mask)
    if name == "atkd_reverse":
        return ref_atkd(p, q, g, mask, lam=0.3, reverse=True)
    d = TOKEN_MEAN_CASES[name][1](p, q, g)
    return d[mask].sum() / mask.sum()


def make_inputs(seed, b=B, s=S, v=V, scale=2.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(b, s, v, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    zt = (scale * torch.randn(b, s, v, generator=gen, dtype=torch.float64)).to(dtype)
    mask = torch.rand(b, s, generator=gen) < 0.6
    mask[0, 0], mask[-1, -1] = True, False
    g = torch.randint(0, v, (b, s), generator=gen)
    return zs, zt, mask, g


ALL_CASES = list(TOKEN_MEAN_CASES) + ["atkd", "atkd_reverse"]


# ---------------------------------------------------------------------------------------------------------
# Values and gradients against the float64 references (§5.11), plain and chunked (§5.10)

@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("tau", [1.0, 1.7])
@pytest.mark.parametrize("name", ALL_CASES)
def test_loss_matches_float64_reference_values_and_gradients(name, tau, chunk_size):
    zs, zt, mask, g = make_inputs(seed=sum(map(ord, name)))
    got = call(name, zs, zt, mask, g, temperature=tau, chunk_size=chunk_size)
    want = reference(name, zs, zt, mask, g, tau)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad_got,) = torch.autograd.grad(got, zs)
    (grad_want,) = torch.autograd.grad(want, zs)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-9, atol=1e-12)
    assert grad_got[~mask].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd_0.5", "dkd", "skew_reverse_kl"])
def test_low_precision_logits_are_computed_in_fp32(name, chunk_size, dtype):
    zs, zt, mask, g = make_inputs(seed=7, dtype=dtype)
    got = call(name, zs, zt, mask, g, chunk_size=chunk_size)
    assert got.dtype == torch.float32
    (grad,) = torch.autograd.grad(got, zs)
    assert grad.dtype == dtype
    zs64 = zs.detach().double().requires_grad_()
    want = reference(name, zs64, zt.double(), mask, g)
    (grad_want,) = torch.autograd.grad(want, zs64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad_want, rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)


# ---------------------------------------------------------------------------------------------------------
# §5.1 - §5.7 identities

@pytest.mark.parametrize("name", [n for n in ALL_CASES if n != "soft_cross_entropy"])
def test_divergence_is_zero_for_identical_inputs_and_positive_otherwise(name):
    zs, zt, mask, g = make_inputs(seed=3, scale=6.0)
    same = call(name, zt.clone().requires_grad_(), zt, mask, g)
    assert abs(same.item()) < 1e-12
    differ = call(name, zs, zt, mask, g)
    assert differ.item() > 1e-3
    if name == "tvd":
        assert differ.item() <= 1
    if name.startswith("skew"):
        alpha = {"skew_forward_kl": 0.1, "skew_forward_kl_0.3": 0.3, "skew_reverse_kl": 0.1,
                 "skew_reverse_kl_detached": 0.25}[name]
        assert differ.item() <= -math.log(alpha)
    if name == "generalized_jsd_0.5":
        assert differ.item() <= math.log(2)


def test_tvd_skew_and_jsd_reach_their_upper_bounds_on_disjoint_supports():
    zt = torch.full((1, 1, 4), -60.0, dtype=torch.float64)
    zs = zt.clone()
    zt[..., 0], zs[..., 1] = 60.0, 60.0  # p and q on different tokens
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert L.tvd(zs, zt, mask=mask).item() == pytest.approx(1.0, abs=1e-9)
    assert L.generalized_jsd(zs, zt, mask=mask, beta=0.5).item() == pytest.approx(math.log(2), abs=1e-9)
    assert L.skew_forward_kl(zs, zt, mask=mask, alpha=0.1).item() == pytest.approx(-math.log(0.1), abs=1e-9)
    assert L.skew_reverse_kl(zs, zt, mask=mask, alpha=0.1).item() == pytest.approx(-math.log(0.1), abs=1e-9)


def test_reverse_kl_is_forward_kl_with_roles_swapped_and_soft_ce_is_kl_plus_entropy():
    zs, zt, mask, _ = make_inputs(seed=4)
    torch.testing.assert_close(L.reverse_kl(zs, zt, mask=mask), L.forward_kl(zt, zs, mask=mask), rtol=1e-12, atol=0)
    p = probs(zt)
    entropy = -(p * p.log()).sum(-1)[mask].mean()
    torch.testing.assert_close(L.soft_cross_entropy(zs, zt, mask=mask) - L.forward_kl(zs, zt, mask=mask), entropy,
                               rtol=1e-12, atol=1e-12)


def test_skew_kls_reduce_to_kl_at_alpha_0_and_vanish_at_alpha_1():
    zs, zt, mask, _ = make_inputs(seed=5)
    fkl, rkl = L.forward_kl(zs, zt, mask=mask), L.reverse_kl(zs, zt, mask=mask)
    torch.testing.assert_close(L.skew_forward_kl(zs, zt, mask=mask, alpha=0.0), fkl, rtol=1e-12, atol=0)
    torch.testing.assert_close(L.skew_reverse_kl(zs, zt, mask=mask, alpha=0.0), rkl, rtol=1e-12, atol=0)
    assert abs(L.skew_forward_kl(zs, zt, mask=mask, alpha=1.0).item()) < 1e-14
    assert abs(L.skew_reverse_kl(zs, zt, mask=mask, alpha=1.0).item()) < 1e-14


def test_skew_reverse_kl_detached_mixture_keeps_the_value_and_changes_the_gradient():
    zs, zt, mask, _ = make_inputs(seed=6)
    a = L.skew_reverse_kl(zs, zt, mask=mask, alpha=0.3)
    b = L.skew_reverse_kl(zs, zt, mask=mask, alpha=0.3, detach_mixture=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    (ga,), (gb,) = torch.autograd.grad(a, zs), torch.autograd.grad(b, zs)
    assert (ga - gb).abs().max() > 1e-4


def test_generalized_jsd_limits_symmetry_and_endpoint_convention():
    zs, zt, mask, _ = make_inputs(seed=8)
    fkl, rkl = L.forward_kl(zs, zt, mask=mask), L.reverse_kl(zs, zt, mask=mask)
    with pytest.warns(UserWarning, match="discontinuous"):
        small = L.generalized_jsd(zs, zt, mask=mask, beta=1e-5)
    with pytest.warns(UserWarning, match="discontinuous"):
        large = L.generalized_jsd(zs, zt, mask=mask, beta=1 - 1e-5)
    torch.testing.assert_close(small / 1e-5, fkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(large / 1e-5, rkl, rtol=1e-3, atol=0)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(L.generalized_jsd(zs, zt, mask=mask, beta=0.0), fkl, rtol=1e-12, atol=0)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(L.generalized_jsd(zs, zt, mask=mask, beta=1.0), rkl, rtol=1e-12, atol=0)
    torch.testing.assert_close(L.generalized_jsd(zs, zt, mask=mask, beta=0.3),
                               L.generalized_jsd(zt, zs, mask=mask, beta=0.7),
                               rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.generalized_jsd(zs, zt, mask=mask, beta=0.5)


def test_fkl_rkl_mix_endpoints_are_forward_and_reverse_kl():
    zs, zt, mask, _ = make_inputs(seed=9)
    torch.testing.assert_close(L.fkl_rkl_mix(zs, zt, mask=mask, weight=1.0), L.forward_kl(zs, zt, mask=mask),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(L.fkl_rkl_mix(zs, zt, mask=mask, weight=0.0), L.reverse_kl(zs, zt, mask=mask),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("reverse", [False, True])
def test_tckd_plus_uncertainty_times_nckd_is_kl_per_token(reverse):
    zs, zt, mask, g = make_inputs(seed=10, scale=3.0)
    zs = zs.detach()
    p, q = probs(zt), probs(zs)
    weight_side = q if reverse else p
    for b in range(B):
        for t in range(S):
            one = torch.zeros(B, S, dtype=torch.bool)
            one[b, t] = True
            tckd = L.dkd(zs, zt, mask=one, target_ids=g, alpha=1.0, beta=0.0, reverse=reverse)
            nckd = L.dkd(zs, zt, mask=one, target_ids=g, alpha=0.0, beta=1.0, reverse=reverse)
            kl_t = (L.reverse_kl if reverse else L.forward_kl)(zs, zt, mask=one)
            unc = 1 - weight_side[b, t, g[b, t]]
            torch.testing.assert_close(tckd + unc * nckd, kl_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_tckd_stays_finite_when_fp32_probabilities_saturate(reverse):
    zs, zt, mask, g = make_inputs(seed=27, dtype=torch.float32)
    zt = zt.scatter(-1, g[..., None], 200.0)  # p(g) == 1 and 1 - p(g) == 0 in fp32
    zs = zs.detach().scatter(-1, g[..., None], 150.0).requires_grad_()
    out = L.dkd(zs, zt, mask=mask, target_ids=g, reverse=reverse)
    (grad,) = torch.autograd.grad(out, zs)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["forward_kl", "tvd", "generalized_jsd_0.1", "skew_reverse_kl", "dkd", "atkd"])
def test_loss_at_temperature_equals_loss_at_one_on_scaled_logits(name):
    zs, zt, mask, g = make_inputs(seed=11)
    torch.testing.assert_close(call(name, zs, zt, mask, g, temperature=2.5),
                               call(name, zs / 2.5, zt / 2.5, mask, g), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# §5.8 masks and padding, §5.9 micro-batches, §1 empty mask, -inf entries, vocabulary checks

@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name", ALL_CASES)
def test_masked_positions_and_padding_length_change_nothing(name, chunk_size):
    zs, zt, mask, g = make_inputs(seed=12)
    base = call(name, zs, zt, mask, g, chunk_size=chunk_size)
    (base_grad,) = torch.autograd.grad(base, zs)
    junk_s, junk_t = zs.detach().clone(), zt.clone()
    junk_s[~mask], junk_t[~mask] = float("nan"), float("inf")
    pad = 4  # longer padding: extra positions with garbage, mask False
    junk_s = torch.cat([junk_s, 1e4 * torch.randn(B, pad, V, dtype=torch.float64)], 1).requires_grad_()
    junk_t = torch.cat([junk_t, torch.randn(B, pad, V, dtype=torch.float64)], 1)
    junk_mask = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1)
    junk_g = torch.cat([torch.where(mask, g, -100), torch.full((B, pad), -100)], 1)
    got = call(name, junk_s, junk_t, junk_mask, junk_g, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(got, junk_s)
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    torch.testing.assert_close(grad[:, :S], base_grad, rtol=0, atol=0)
    assert grad[:, S:].abs().max() == 0


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", list(TOKEN_MEAN_CASES))
def test_micro_batches_with_step_normalizer_sum_to_the_whole_batch(name, chunk_size):
    zs, zt, mask, g = make_inputs(seed=13, b=4)
    mask[:1], mask[1:] = True, False  # uneven token counts (6 and 4): per-micro-batch means would differ
    mask[1, :2], mask[3, 3:5] = True, True
    whole = call(name, zs, zt, mask, g, chunk_size=chunk_size)
    (whole_grad,) = torch.autograd.grad(whole, zs)
    n_step = mask.sum()
    parts = [call(name, zs[i:j], zt[i:j], mask[i:j], g[i:j], chunk_size=chunk_size, normalizer=n_step)
             for i, j in [(0, 1), (1, 4)]]
    (split_grad,) = torch.autograd.grad(sum(parts), zs)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-10, atol=1e-14)
    averaged = sum(call(name, zs[i:j], zt[i:j], mask[i:j], g[i:j]) for i, j in [(0, 1), (1, 4)]) / 2
    assert abs(averaged.item() - whole.item()) > 1e-6  # the convention the originals used is not the same


def test_atkd_with_step_normalizer_weights_the_micro_batch_by_its_token_count():
    zs, zt, mask, g = make_inputs(seed=14)
    own = L.atkd(zs, zt, mask=mask, target_ids=g)
    torch.testing.assert_close(L.atkd(zs, zt, mask=mask, target_ids=g, normalizer=40), own * mask.sum() / 40,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", ALL_CASES)
def test_empty_mask_gives_a_graph_connected_zero_not_nan(name, chunk_size):
    zs, zt, _, g = make_inputs(seed=15)
    zs_inf = zs.detach().clone()
    zs_inf[..., 0] = float("-inf")
    zs_inf.requires_grad_()
    empty = torch.zeros(B, S, dtype=torch.bool)
    out = call(name, zs_inf, zt, empty, g, chunk_size=chunk_size)
    assert out.item() == 0 and out.requires_grad
    (grad,) = torch.autograd.grad(out, zs_inf)
    assert grad.abs().max() == 0


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", PAIRWISE)
def test_entries_with_minus_inf_logits_contribute_nothing(name, chunk_size):
    zs, zt, mask, g = make_inputs(seed=16)
    dead = [2, 7]  # masked vocabulary entries on both sides: the loss is the one over the other entries
    alive = [v for v in range(V) if v not in dead]
    zs_inf, zt_inf = zs.detach().clone(), zt.clone()
    zs_inf[..., dead], zt_inf[..., dead] = float("-inf"), float("-inf")
    zs_inf.requires_grad_()
    got = call(name, zs_inf, zt_inf, mask, g, chunk_size=chunk_size)
    want = call(name, zs[..., alive], zt[..., alive], mask, g)
    (grad,) = torch.autograd.grad(got, zs_inf)
    (grad_want,) = torch.autograd.grad(want, zs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[..., alive], grad_want[..., alive], rtol=1e-10, atol=1e-14)
    assert grad[..., dead].abs().max() == 0


def test_one_sided_minus_inf_entries_are_zeroed_not_infinite():
    zs, zt, mask, _ = make_inputs(seed=17)
    zt_inf = zt.clone()
    zt_inf[..., 0] = float("-inf")  # teacher rules out token 0; RKL would be +inf there without the convention
    out = L.reverse_kl(zs, zt_inf, mask=mask)
    (grad,) = torch.autograd.grad(out, zs)
    assert torch.isfinite(out) and torch.isfinite(grad).all()


def test_vocabulary_mismatch_raises_naming_both_sizes_and_vocab_slice_compares_the_common_part():
    zs, zt, mask, g = make_inputs(seed=18)
    padded_teacher = torch.cat([zt, torch.randn(B, S, 3, dtype=torch.float64)], -1)
    with pytest.raises(ValueError, match=rf"{V}.*{V + 3}"):
        L.forward_kl(zs, padded_teacher, mask=mask)
    for chunk_size in [None, 4]:
        got = L.forward_kl(zs, padded_teacher, mask=mask, vocab_slice=V, chunk_size=chunk_size)
        torch.testing.assert_close(got, L.forward_kl(zs, zt, mask=mask), rtol=1e-12, atol=0)
        padded_student = torch.cat([zs.detach(), torch.randn(B, S, 2, dtype=torch.float64)], -1).requires_grad_()
        got = L.dkd(padded_student, padded_teacher, mask=mask, target_ids=g, vocab_slice=V, chunk_size=chunk_size)
        want = L.dkd(zs, zt, mask=mask, target_ids=g)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        (grad,), (grad_want,) = torch.autograd.grad(got, padded_student), torch.autograd.grad(want, zs)
        torch.testing.assert_close(grad[..., :V], grad_want, rtol=1e-10, atol=1e-14)
        assert grad[..., V:].abs().max() == 0


def test_counted_target_out_of_range_is_an_error():
    zs, zt, mask, g = make_inputs(seed=19)
    g = g.clone()
    g[0, 0] = -100
    with pytest.raises(ValueError, match="target ids"):
        L.dkd(zs, zt, mask=mask, target_ids=g)


# ---------------------------------------------------------------------------------------------------------
# Chunking specifics

@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("name", ["forward_kl", "tvd", "skew_forward_kl", "dkd_reverse", "atkd"])
def test_chunked_equals_unchunked_in_fp32_under_a_scaled_backward(name, chunk_size):
    zs, zt, mask, g = make_inputs(seed=20, dtype=torch.float32)
    plain = call(name, zs, zt, mask, g, temperature=1.3)
    chunked = call(name, zs, zt, mask, g, temperature=1.3, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-7)
    (plain_grad,) = torch.autograd.grad(3.0 * plain + zs.square().sum(), zs)
    (chunked_grad,) = torch.autograd.grad(3.0 * chunked + zs.square().sum(), zs)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_two_chunked_losses_on_the_same_logits_accumulate_gradients():
    zs, zt, mask, _ = make_inputs(seed=21)
    plain = L.forward_kl(zs, zt, mask=mask) + 0.5 * L.tvd(zs, zt, mask=mask)
    chunked = L.forward_kl(zs, zt, mask=mask, chunk_size=3) + 0.5 * L.tvd(zs, zt, mask=mask, chunk_size=5)
    torch.testing.assert_close(torch.autograd.grad(chunked, zs)[0], torch.autograd.grad(plain, zs)[0],
                               rtol=1e-10, atol=1e-14)


def test_chunked_loss_refuses_a_second_backward():
    zs, zt, mask, _ = make_inputs(seed=22)
    out = L.forward_kl(zs, zt, mask=mask, chunk_size=2)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        out.backward()


def test_chunked_loss_without_grad_computes_only_the_value():
    zs, zt, mask, _ = make_inputs(seed=23)
    with torch.no_grad():
        out = L.forward_kl(zs, zt, mask=mask, chunk_size=2)
    assert not out.requires_grad
    torch.testing.assert_close(out, L.forward_kl(zs, zt, mask=mask).detach(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Full (unshifted) logits with targets from Hugging Face labels, and non-contiguous views: chunks read only
# their own rows (losses.md §1 "Chunking"; issue 9: no caller slices logits[:, :-1], and a view is not copied)

def allocations(fn):
    """Sizes in bytes of the CPU allocations made while fn runs, largest first. The profiler's memory events
    include allocations inside kernels (a contiguous copy made by reshape, index or to)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), reverse=True)


def labelled_logits(seed, b=4, v=512):
    """Student and teacher logits [b, T, v] of a right-padded causal batch, with its (targets, mask)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [(5, 27), (9, 3), (1, 20), (14, 12)][:b]  # the first is the longest: T = 32
    ids = [torch.randint(0, v, (p + r,), generator=gen).tolist() for p, r in lengths]
    batch = causal_lm_batch([x[:p] for x, (p, _) in zip(ids, lengths)], [x[p:] for x, (p, _) in zip(ids, lengths)],
                            pad_id=0)
    targets, mask = targets_and_mask(batch["labels"], shift=True)
    shape = (*targets.shape, v)
    zs = (2 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    zt = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return zs, zt, targets, mask


def scalar_loss(name, zs, zt, targets, mask, chunk_size):
    if name == "token_log_probs":  # a weighted sum, so that each position (b, t) gets its own incoming gradient
        batch, seq = targets.shape
        weights = torch.arange(1.0, batch + 1, dtype=torch.float64)[:, None] * torch.cos(torch.arange(seq))
        return (L.token_log_probs(zs, target_ids=targets, temperature=1.3, chunk_size=chunk_size) * weights).sum()
    if name == "cross_entropy":
        return L.cross_entropy(zs, target_ids=targets, mask=mask, chunk_size=chunk_size)
    return call(name, zs, zt, mask, targets, temperature=1.3, chunk_size=chunk_size)


@pytest.mark.parametrize("view", [False, True])
@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd_0.5", "dkd", "atkd", "cross_entropy",
                                  "token_log_probs"])
def test_chunked_loss_on_unshifted_logits_equals_plain_and_never_copies_the_logits(name, view):
    zs, zt, targets, mask = labelled_logits(seed=sum(map(ord, name)))
    plain = scalar_loss(name, zs, zt, targets, mask, None)
    (plain_grad,) = torch.autograd.grad(plain, zs)
    # the last position counts nothing, so the view logits[:, :-1] (not contiguous) must give the same loss
    x, y, tg, m = (zs[:, :-1], zt[:, :-1], targets[:, :-1], mask[:, :-1]) if view else (zs, zt, targets, mask)
    assert x.is_contiguous() != view
    logits_bytes = x.numel() * x.element_size()
    out = {}

    def forward_backward():
        out["loss"] = scalar_loss(name, x, y, tg, m, 8)
        out["grad"] = torch.autograd.grad(out["loss"], zs)[0]
    big = [n for n in allocations(forward_backward) if n >= logits_bytes / 4]
    # the only logits-sized tensors: the gradient itself, plus autograd's slice backward into the base of a view
    assert len(big) == 1 + view, (big, logits_bytes)
    torch.testing.assert_close(out["loss"], plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["grad"], plain_grad, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # the value alone allocates nothing of the logits' size
        assert max(allocations(lambda: scalar_loss(name, x, y, tg, m, 8))) < logits_bytes / 4


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_token_log_probs_give_zero_at_minus_100_without_reading_those_logits(chunk_size):
    zs, _, mask, g = make_inputs(seed=28)
    targets = torch.where(mask, g, -100)
    junk = zs.detach().clone()
    junk[~mask] = float("nan")  # never read
    junk.requires_grad_()
    got = L.token_log_probs(junk, target_ids=targets, temperature=1.5, chunk_size=chunk_size)
    want = torch.where(mask, torch.log(probs(zs, 1.5)).gather(-1, g[..., None])[..., 0], 0.0)
    assert got.shape == (B, S) and (got[~mask] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    weights = torch.randn(B, S, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * weights).sum(), junk)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), zs)
    torch.testing.assert_close(grad, grad_want, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="target ids"):
        L.token_log_probs(zs, target_ids=torch.where(mask, g, -1), chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------------------
# Masks, targets and spans are keyword-only

def test_every_mask_target_and_span_parameter_is_keyword_only():
    checked = 0
    for name, fn in vars(L).items():
        if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != L.__name__:
            continue
        for param in inspect.signature(fn).parameters.values():
            if param.name in ("mask", "target_ids", "spans_a", "spans_b"):
                assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({param.name})"
                checked += 1
    assert checked >= 25


def test_mask_or_targets_passed_positionally_raise_type_error():
    zs, zt, mask, g = make_inputs(seed=29)
    h = [torch.zeros(B, S, 4)]
    positional_calls = [lambda fn=fn: fn(zs, zt, mask) for fn in (
        L.forward_kl, L.reverse_kl, L.soft_cross_entropy, L.generalized_jsd, L.fkl_rkl_mix, L.symmetric_kl, L.tvd,
        L.skew_forward_kl, L.skew_reverse_kl, L.hidden_mse, L.hidden_l2, L.attention_output_l2)] + [
        lambda: L.dkd(zs, zt, mask, g), lambda: L.atkd(zs, zt, mask, g),
        lambda: L.dkd(zs, zt, g, mask=mask),  # the old dkd order: targets where the mask was
        lambda: L.cross_entropy(zs, g, mask), lambda: L.token_log_probs(zs, g),
        lambda: L.mcc_span_kl(zs, zt, SPANS_A[:B], SPANS_B[:B]),
        lambda: L.fdd_loss(h, h, None, None, mask), lambda: L.velocity_field_loss(None, None, h, h, mask),
        lambda: L.contra_loss(None, None, h, mask, k=1.0), lambda: L.minillm_advantages(zs[..., 0], mask),
        lambda: L.minillm_whiten(zs[..., 0], mask),
        lambda: L.minillm_policy_loss(zs[..., 0], zs[..., 0], zs[..., 0], zs[..., 0], mask)]
    for positional in positional_calls:
        with pytest.raises(TypeError, match="positional argument"):
            positional()


# ---------------------------------------------------------------------------------------------------------
# ATKD specifics

@pytest.mark.parametrize("chunk_size, reverse", [(None, False), (3, True)])
def test_atkd_returns_its_split_and_parts_from_the_same_pass(chunk_size, reverse):
    zs, zt, mask, g = make_inputs(seed=26)
    p, q = probs(zt), probs(zs)
    tckd, nckd = ref_tckd_nckd(p, q, g, reverse)
    unc = (1 - p.gather(-1, g[..., None])[..., 0])[mask]
    hard = unc >= unc.sort().values[(unc.numel() - 1) // 2]
    loss, parts = L.atkd(zs, zt, mask=mask, target_ids=g, reverse=reverse, chunk_size=chunk_size,
                         return_parts=True)
    torch.testing.assert_close(loss, ref_atkd(p, q, g, mask, reverse=reverse), rtol=1e-10, atol=1e-12)
    assert (parts["n_easy"], parts["n_hard"]) == (int((~hard).sum()), int(hard.sum())) and parts["n_easy"] > 0
    assert parts["nckd_easy"] == pytest.approx(nckd[mask][~hard].mean().item(), rel=1e-10)
    assert parts["tckd_hard"] == pytest.approx(tckd[mask][hard].mean().item(), rel=1e-10)
    assert parts["nckd_hard"] == pytest.approx(nckd[mask][hard].mean().item(), rel=1e-10)
    assert loss.item() == pytest.approx(0.2 * parts["nckd_easy"] + 0.8 * (parts["tckd_hard"] + parts["nckd_hard"]))


def test_atkd_ties_go_to_hard_and_an_empty_easy_subset_contributes_zero():
    zs, _, mask, g = make_inputs(seed=24)
    zt = torch.zeros(B, S, V, dtype=torch.float64)  # uniform teacher: every UnC equal -> all tokens hard
    lam = 0.2
    got = L.atkd(zs, zt, mask=mask, target_ids=g, lam=lam)
    want = (1 - lam) * L.dkd(zs, zt, mask=mask, target_ids=g, alpha=1.0, beta=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_atkd_reverse_keeps_the_teacher_split():
    zs, zt, mask, g = make_inputs(seed=25)
    # a student split would differ: with reverse=True only the divergences flip, as the reference does
    p, q = probs(zt), probs(zs)
    student_split = ref_atkd(q, p, g, mask, reverse=False)  # "swap the logits" including the split
    got = L.atkd(zs, zt, mask=mask, target_ids=g, reverse=True)
    torch.testing.assert_close(got, ref_atkd(p, q, g, mask, reverse=True), rtol=1e-10, atol=1e-12)
    assert abs(got.item() - student_split.item()) > 1e-6


# ---------------------------------------------------------------------------------------------------------
# cross_entropy and token_log_probs

@pytest.mark.parametrize("chunk_size", [None, 3])
def test_cross_entropy_matches_torch_and_token_log_probs_match_log_softmax(chunk_size):
    zs, _, mask, g = make_inputs(seed=26)
    got = L.cross_entropy(zs, target_ids=g, mask=mask, chunk_size=chunk_size)
    want = -torch.log(probs(zs).gather(-1, g[..., None])[..., 0])[mask].mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(want, zs)[0],
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(L.token_log_probs(zs, target_ids=g, temperature=2.0),
                               torch.log(probs(zs, 2.0)).gather(-1, g[..., None])[..., 0], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# §4.1 MCC-KD span KL

SPANS_A = [[0, 3], [2, 4], [1, 1], [3, 6]]
SPANS_B = [[2, 5], [0, 2], [4, 4], [0, 3]]


def ref_mcc(za, zb, spans_a, spans_b, tau=1.0, max_seq_len=None, reduction="item", eps=0.0):
    per_item, tokens = [], []
    for (sa, ea), (sb, eb), a, b in zip(spans_a, spans_b, za, zb):
        if ea == sa or (max_seq_len is not None and max(ea, eb) >= max_seq_len):
            continue
        if eps:  # HEAD's KLDivLoss(estimate logits, target logits, T) = KL(powmax(q_T + eps) ‖ powmax(q_1 + eps))
            def powmax(x):
                return x / (x.sum(-1, keepdim=True) + eps)

            def head_kl(est, tgt):
                e, t = powmax(probs(est) + eps), powmax(probs(tgt, tau) + eps)
                return (t * (t.log() - e.log())).sum(-1)
            d = 0.5 * (head_kl(a[sa:ea], b[sb:eb]) + head_kl(b[sb:eb], a[sa:ea]))
        else:
            qa, qb = probs(a[sa:ea], tau), probs(b[sb:eb], tau)
            d = 0.5 * (kl(qa, qb) + kl(qb, qa))
        per_item.append(d.mean())
        tokens.append(d)
    if not per_item:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(per_item).mean() if reduction == "item" else torch.cat(tokens).mean()


def mcc_inputs(seed=30):
    gen = torch.Generator().manual_seed(seed)
    za = (2 * torch.randn(4, 7, V, generator=gen, dtype=torch.float64)).requires_grad_()
    zb = (2 * torch.randn(4, 7, V, generator=gen, dtype=torch.float64)).requires_grad_()
    return za, zb


@pytest.mark.parametrize("options", [
    dict(), dict(temperature=2.0), dict(max_seq_len=6), dict(chunk_size=2, temperature=0.8),
    dict(reduction="token"), dict(reduction="token", eps=7e-5, chunk_size=3),
    dict(reduction="token", eps=7e-5, temperature=1.3), dict(eps=0.01, temperature=0.7)])
def test_mcc_span_kl_matches_reference_with_gradients_to_both_passes(options):
    za, zb = mcc_inputs()
    got = L.mcc_span_kl(za, zb, spans_a=SPANS_A, spans_b=SPANS_B, **options)
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    ref_options["tau"] = ref_options.pop("temperature", 1.0)
    want = ref_mcc(za, zb, SPANS_A, SPANS_B, **ref_options)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads_got = torch.autograd.grad(got, [za, zb])
    grads_want = torch.autograd.grad(want, [za, zb])
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert a.abs().max() > 0


def test_mcc_span_kl_is_symmetric_zero_on_agreement_and_checks_spans():
    za, zb = mcc_inputs(31)
    torch.testing.assert_close(L.mcc_span_kl(za, zb, spans_a=SPANS_A, spans_b=SPANS_B),
                               L.mcc_span_kl(zb, za, spans_a=SPANS_B, spans_b=SPANS_A),
                               rtol=1e-12, atol=0)
    same_b = za.detach().clone()
    for i, ((sa, ea), (sb, eb)) in enumerate(zip(SPANS_A, SPANS_B)):
        same_b[i, sb:eb] = za[i, sa:ea].detach()
    assert abs(L.mcc_span_kl(za, same_b, spans_a=SPANS_A, spans_b=SPANS_B).item()) < 1e-14
    with pytest.raises(ValueError, match="equal lengths"):
        L.mcc_span_kl(za, zb, spans_a=[[0, 3]] * 4, spans_b=[[0, 2]] * 4)
    out = L.mcc_span_kl(za, zb, spans_a=SPANS_A, spans_b=SPANS_B, max_seq_len=2)  # every span ends too late
    assert out.item() == 0 and out.requires_grad


def test_mcc_span_kl_normalizer_counts_items_of_the_step():
    za, zb = mcc_inputs(32)
    whole = L.mcc_span_kl(za, zb, spans_a=SPANS_A, spans_b=SPANS_B)
    n_items = 3  # item 2 has an empty span
    parts = L.mcc_span_kl(za[:2], zb[:2], spans_a=SPANS_A[:2], spans_b=SPANS_B[:2], normalizer=n_items) + \
        L.mcc_span_kl(za[2:], zb[2:], spans_a=SPANS_A[2:], spans_b=SPANS_B[2:], normalizer=n_items)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# §4.2 FDD

def fdd_setup(seed=40, d_s=5, d_t=6, layers=3):
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, S, d_s, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(layers)]
    ht = [torch.randn(B, S, d_t, generator=gen, dtype=torch.float64) for _ in range(layers)]
    ws = torch.randn(V, d_s, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(V, d_t, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, S, generator=gen) < 0.6
    mask[0, 0] = True
    return hs, ht, ws, wt, mask


def ref_fdd(hs, ht, ws, wt, mask, tau=2.0):
    zs = [h[mask] @ ws.T for h in hs]
    zt = [h[mask] @ wt.T for h in ht]
    traj = torch.stack([kl(probs(t, tau), probs(s, tau)).mean() for s, t in zip(zs, zt)]).mean()
    ls, lt = [torch.log(probs(z)) for z in zs], [torch.log(probs(z)) for z in zt]
    der = []
    for i in range(1, len(zs)):
        a, b = ls[i] - ls[i - 1], lt[i] - lt[i - 1]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        der.append((1 - cos).mean())
    return traj + (torch.stack(der).mean() if der else 0.0)


@pytest.mark.parametrize("layers", [1, 3])
def test_fdd_loss_matches_reference_with_gradients_to_states_and_head(layers):
    hs, ht, ws, wt, mask = fdd_setup(layers=layers)
    got = L.fdd_loss(hs, ht, lambda h: h @ ws.T, lambda h: h @ wt.T, mask=mask)
    want = ref_fdd(hs, ht, ws, wt, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, hs + [ws]), torch.autograd.grad(want, hs + [ws])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fdd_loss_is_zero_for_a_copy_of_the_teacher_and_empty_mask_is_zero():
    _, ht, _, wt, mask = fdd_setup()
    out = L.fdd_loss([h.clone() for h in ht], ht, lambda h: h @ wt.T, lambda h: h @ wt.T, mask=mask)
    assert abs(out.item()) < 1e-12
    hs, ht, ws, wt, _ = fdd_setup()
    empty = L.fdd_loss(hs, ht, lambda h: h @ ws.T, lambda h: h @ wt.T,
                       mask=torch.zeros(B, S, dtype=torch.bool))
    assert empty.item() == 0 and empty.requires_grad


def test_distill_layer_indices_match_the_spec_table():
    assert L.distill_layer_indices(48) == [6, 13, 20, 27, 34, 41]
    assert L.distill_layer_indices(12) == [1, 3, 5, 6, 8, 10]
    assert L.distill_layer_indices(40) == [5, 11, 17, 22, 28, 34]
    assert L.distill_layer_indices(32) == [4, 9, 13, 18, 22, 27]
    assert L.distill_layer_indices(26) == [3, 7, 11, 14, 18, 22]


# ---------------------------------------------------------------------------------------------------------
# §4.3 CONTRA-KD

class TinyVelocityField(torch.nn.Module):
    def __init__(self, d_t, layers):
        super().__init__()
        self.inp, self.layer, self.out = torch.nn.Linear(d_t + 1, 8), torch.nn.Embedding(layers, 8), torch.nn.Linear(8, d_t)

    def forward(self, z, t, j):
        return self.out(torch.tanh(self.inp(torch.cat([z, t[:, None]], -1)) + self.layer(j)))


def contra_setup(seed=50, d_s=4, d_t=6, layers=2):
    torch.manual_seed(seed)
    projector = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(d_s, d_t))
    field = TinyVelocityField(d_t, layers)
    hs = [torch.randn(B, S, d_s, requires_grad=True) for _ in range(layers)]
    ht = [torch.randn(B, S, d_t) for _ in range(layers)]
    mask = torch.rand(B, S) < 0.6
    mask[0, 0] = True
    return projector, field, hs, ht, mask


def test_velocity_field_loss_matches_reference_and_trains_field_and_projector():
    projector, field, hs, ht, mask = contra_setup()
    t = torch.rand(B)
    got = L.velocity_field_loss(field, projector, hs, ht, mask=mask, t=t)
    losses = []
    for j, (h_s, h_t) in enumerate(zip(hs, ht)):
        y_s, y_t = projector(h_s[mask]), h_t[mask]
        tt = t[:, None].expand(B, S)[mask]
        y = (1 - tt[:, None]) * y_s + tt[:, None] * y_t
        v = field(y, tt, torch.full((y.shape[0],), j))
        losses.append(((v - (y_t - y_s)) ** 2).mean(-1).mean())
    want = torch.stack(losses).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = list(projector.parameters()) + list(field.parameters())
    assert torch.autograd.grad(got, hs, allow_unused=True, retain_graph=True) == (None, None)  # student frozen
    grads = torch.autograd.grad(got, params)
    for a, b in zip(grads, torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(g.abs().max() > 0 for g in grads)


def test_velocity_field_loss_is_zero_for_the_exact_velocity():
    projector, _, hs, ht, mask = contra_setup(51)
    exact = [(h_t[mask] - projector(h_s[mask])).detach() for h_s, h_t in zip(hs, ht)]
    out = L.velocity_field_loss(lambda z, t, j: exact[int(j[0])], projector, hs, ht, mask=mask)
    assert abs(out.item()) < 1e-10


def test_contra_loss_matches_reference_and_vanishes_without_flow():
    projector, field, hs, _, mask = contra_setup(52)
    k = 0.4
    got = L.contra_loss(field, projector, hs, mask=mask, k=k)
    losses = []
    for j, h_s in enumerate(hs):
        a = projector(h_s[mask])
        target = (a + k * field(a, torch.zeros(a.shape[0]), torch.full((a.shape[0],), j))).detach()
        cos = (a * target).sum(-1) / (a.norm(dim=-1) * target.norm(dim=-1))
        losses.append(1 - cos.mean())
    want = torch.stack(losses).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, hs), torch.autograd.grad(want, hs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert 0 < got.item() <= 2
    assert abs(L.contra_loss(lambda z, t, j: torch.zeros_like(z), projector, hs, mask=mask, k=k).item()) < 1e-6
    assert abs(L.contra_loss(lambda z, t, j: 3.0 * z, projector, hs, mask=mask, k=k).item()) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# §4.4 MiniLLM

def minillm_inputs(seed=60):
    gen = torch.Generator().manual_seed(seed)
    log_p = torch.log(torch.rand(3, 5, generator=gen, dtype=torch.float64))
    log_q_old = torch.log(torch.rand(3, 5, generator=gen, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return log_p, log_q_old, mask


def test_minillm_importance_weights_and_rewards():
    log_p, log_q_old, _ = minillm_inputs()
    w = L.minillm_importance_weights(log_q_old, log_p, alpha=0.2)
    torch.testing.assert_close(w, log_q_old.exp() / (0.8 * log_q_old.exp() + 0.2 * log_p.exp()), rtol=1e-12, atol=0)
    assert torch.equal(L.minillm_importance_weights(log_q_old, log_p, alpha=0.0), torch.ones_like(w))
    r = L.minillm_rewards(log_p, log_q_old)
    torch.testing.assert_close(r, (log_p - log_q_old) / 0.5, rtol=1e-12, atol=0)
    assert L.minillm_rewards(torch.tensor([0.0, -500.0]), torch.tensor([-500.0, 0.0])).tolist() == [100.0, -100.0]


def test_minillm_advantages_are_length_normalised_discounted_returns():
    log_p, log_q_old, mask = minillm_inputs(61)
    r = L.minillm_rewards(log_p, log_q_old)
    for gamma in [1.0, 0.95]:
        got = L.minillm_advantages(r, mask=mask, gamma=gamma)
        for b in range(3):
            n = int(mask[b].sum())
            for t in range(5):
                if t >= n:
                    assert got[b, t] == 0
                    continue
                g_t = sum(gamma ** (k - t) * r[b, k] for k in range(t, n))
                assert got[b, t].item() == pytest.approx((g_t / (n - t)).item(), rel=1e-12)
    mean_remaining = L.minillm_advantages(r, mask=mask, gamma=1.0)
    assert mean_remaining[0, 2].item() == pytest.approx(r[0, 2:].mean().item(), rel=1e-12)


def test_minillm_whiten_as_released_counts_every_padded_entry():
    """LMOps whiten() per PPO minibatch: mean and population variance over all B x width entries of the padded
    advantages (zeros under padding, and in the columns up to the padded width), every entry whitened."""
    log_p, log_q_old, mask = minillm_inputs(63)
    raw = L.minillm_advantages(L.minillm_rewards(log_p, log_q_old), mask=mask)
    width = 8
    padded = [[raw[b, t].item() if t < raw.shape[1] else 0.0 for t in range(width)] for b in range(3)]
    flat = [x for row in padded for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat) + 1e-8)
    got = L.minillm_whiten(raw, width=width)
    want = [[(padded[b][t] - mean) / std for t in range(5)] for b in range(3)]
    assert got.tolist() == [pytest.approx(row, rel=1e-12) for row in want]
    masked = L.minillm_whiten(raw, mask=mask)
    assert (got - masked)[mask].abs().max() > 0.1  # the two conventions differ on a padded batch
    assert L.minillm_whiten(raw).tolist() == [pytest.approx(r, rel=1e-12) for r in
                                              ((raw - raw.mean()) / (raw.var(unbiased=False) + 1e-8).sqrt()).tolist()]


def test_minillm_whiten_and_policy_loss():
    log_p, log_q_old, mask = minillm_inputs(62)
    adv = L.minillm_whiten(L.minillm_advantages(L.minillm_rewards(log_p, log_q_old), mask=mask), mask=mask)
    assert adv[mask].mean().abs() < 1e-12
    assert adv[mask].var(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert (adv[~mask] == 0).all()
    w = L.minillm_importance_weights(log_q_old, log_p)
    first_epoch = L.minillm_policy_loss(log_q_old, log_q_old, w, adv, mask=mask)  # q_θ = q_old, so ρ = w
    torch.testing.assert_close(first_epoch, torch.maximum(-adv * w, -adv * w.clamp(0.8, 1.2))[mask].mean(),
                               rtol=1e-12, atol=0)
    log_q = (log_q_old + 0.4 * torch.randn(3, 5, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64)).requires_grad_()
    got = L.minillm_policy_loss(log_q, log_q_old, w, adv, mask=mask)
    rho = (log_q.detach() - log_q_old).exp() * w
    want = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2))[mask].mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(got, log_q)
    # d/dlog q of -A·ρ is -A·ρ where the unclipped branch is the max; the clipped branch has no gradient
    unclipped_wins = (-adv * rho) >= (-adv * rho.clamp(0.8, 1.2))
    assert not unclipped_wins[mask].all()  # the data exercise the clip
    expected = torch.where(mask & unclipped_wins, -adv * rho, 0.0) / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# §4.5 hidden-state alignment

def test_hidden_mse_keeps_masked_zeros_in_the_denominator_unless_counted_only():
    gen = torch.Generator().manual_seed(70)
    layers, d = 3, 4
    s = torch.randn(layers * B, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(layers * B, S, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, S, generator=gen) < 0.5
    mask[0, 0] = True
    sq = torch.zeros((), dtype=torch.float64)
    for layer in range(layers):
        for b in range(B):
            sq = sq + ((s[layer * B + b] - t[layer * B + b]) ** 2)[mask[b]].sum()
    torch.testing.assert_close(L.hidden_mse(s, t, mask=mask), sq / s.numel(), rtol=1e-12, atol=0)
    torch.testing.assert_close(L.hidden_mse(s, t, mask=mask, counted_only=True), sq / (layers * mask.sum() * d),
                               rtol=1e-12, atol=0)


def test_hidden_l2_and_attention_output_l2():
    gen = torch.Generator().manual_seed(71)
    s = [torch.randn(B, S, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t = [torch.randn(B, S, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    mask = torch.rand(B, S, generator=gen) < 0.5
    mask[0, 0] = True
    per_layer = [torch.sqrt(((a - b) ** 2).sum(-1))[mask].mean() / 2.0 for a, b in zip(s, t)]
    torch.testing.assert_close(L.hidden_l2(s[0], t[0], mask=mask), per_layer[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(L.attention_output_l2(s, t, mask=mask), (per_layer[0] + per_layer[1]) / 2, rtol=1e-12, atol=0)
    same = L.hidden_l2(t[0].clone().requires_grad_(), t[0])
    assert same.item() == 0
    (grad,) = torch.autograd.grad(L.hidden_l2(s[0], s[0].detach().clone()), s[0])
    assert torch.isfinite(grad).all()
