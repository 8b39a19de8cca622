"""Vocab-parallel losses (2 gloo processes, TP 2) equal the gathered computation, values and gradients
w.r.t. each rank's vocabulary shard (losses.md §5.10); also through fairscale's ColumnParallelLinear head, and
from HeadLogits (replicated hidden states, this rank's rows of the head weight) computed chunk by chunk."""
from functools import partial

import pytest
import torch

from tests.distributed import run_distributed

B, S, V, D = 3, 5, 14, 6  # V / 2 = 7 columns per rank

PAIRWISE = ["forward_kl", "reverse_kl", "soft_cross_entropy", "generalized_jsd", "fkl_rkl_mix", "tvd",
            "skew_forward_kl", "skew_reverse_kl", "skew_reverse_kl_detached"]
TARGET_AWARE = ["dkd", "dkd_reverse", "atkd", "atkd_reverse", "cross_entropy"]
CHUNKS = [None, 2]
HEAD_CASES = ["forward_kl", "generalized_jsd", "skew_reverse_kl_detached", "dkd_reverse", "atkd", "cross_entropy",
              "token_log_probs"]


def _loss_fns():
    from common import losses as L
    return {
        "forward_kl": L.forward_kl, "reverse_kl": L.reverse_kl, "soft_cross_entropy": L.soft_cross_entropy,
        "generalized_jsd": partial(L.generalized_jsd, beta=0.3), "fkl_rkl_mix": L.fkl_rkl_mix, "tvd": L.tvd,
        "skew_forward_kl": L.skew_forward_kl, "skew_reverse_kl": L.skew_reverse_kl,
        "skew_reverse_kl_detached": partial(L.skew_reverse_kl, detach_mixture=True),
        "dkd": L.dkd, "dkd_reverse": partial(L.dkd, reverse=True, alpha=0.5),
        "atkd": L.atkd, "atkd_reverse": partial(L.atkd, reverse=True),
        "cross_entropy": lambda zs, zt, temperature, **kw: L.cross_entropy(zs, **kw),
    }


def _vocab_parallel_worker():
    from common import losses as L
    from common.parallel import setup, tp_group
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    layout = setup(tp_size=2)
    group = tp_group()
    cols = slice(layout.tp_rank * V // 2, (layout.tp_rank + 1) * V // 2)
    gen = torch.Generator().manual_seed(0)  # the same full tensors on both ranks
    zs = 2 * torch.randn(B, S, V, generator=gen, dtype=torch.float64)
    zt = 2 * torch.randn(B, S, V, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, S, generator=gen) < 0.7
    g = torch.randint(0, V, (B, S), generator=gen)
    g[0] = torch.tensor([1, 8, 3, 12, 7])  # targets on both shards, including the first column of rank 1
    out = {}

    def run(fn, name, local, full_input, teacher_local, teacher_full, **kw):
        local = local.detach().clone().requires_grad_()
        full_input = full_input.detach().clone().requires_grad_()
        kw = dict(kw, mask=mask, **({"target_ids": g} if name in TARGET_AWARE else {}))
        gathered = fn(full_input, teacher_full, **kw)
        (grad_gathered,) = torch.autograd.grad(gathered, full_input)
        for chunk in CHUNKS:
            sharded = fn(local, teacher_local, group=group, chunk_size=chunk, **kw)
            (grad_sharded,) = torch.autograd.grad(sharded, local)
            out[f"{name}/{chunk}"] = dict(sharded=sharded.detach(), gathered=gathered.detach(),
                                          grad_sharded=grad_sharded, grad_gathered=grad_gathered[..., cols])

    for name, fn in _loss_fns().items():
        run(fn, name, zs[..., cols], zs, zt[..., cols], zt, temperature=1.6)

    # MCC span KL: both inputs sharded, gradients to both
    spans_a, spans_b = [[0, 2], [1, 4], [2, 2]], [[3, 5], [0, 3], [0, 0]]
    for chunk in CHUNKS:
        a_full, b_full = zs.clone().requires_grad_(), zt.clone().requires_grad_()
        a_loc, b_loc = zs[..., cols].clone().requires_grad_(), zt[..., cols].clone().requires_grad_()
        gathered = L.mcc_span_kl(a_full, b_full, spans_a=spans_a, spans_b=spans_b, temperature=1.3, eps=1e-3)
        sharded = L.mcc_span_kl(a_loc, b_loc, spans_a=spans_a, spans_b=spans_b, temperature=1.3, eps=1e-3, chunk_size=chunk,
                                group=group)
        ga, gb = torch.autograd.grad(gathered, [a_full, b_full])
        sa, sb = torch.autograd.grad(sharded, [a_loc, b_loc])
        out[f"mcc_span_kl/{chunk}"] = dict(sharded=sharded.detach(), gathered=gathered.detach(),
                                           grad_sharded=torch.cat([sa, sb]),
                                           grad_gathered=torch.cat([ga[..., cols], gb[..., cols]]))

    # token log-probs (MiniLLM's log q(y_t)) through the sharded log-normaliser; -100 targets give 0
    weights = torch.randn(B, S, generator=gen, dtype=torch.float64)
    targets = torch.where(mask, g, -100)
    for chunk in CHUNKS:
        local = zs[..., cols].clone().requires_grad_()
        full_input = zs.clone().requires_grad_()
        sharded = (L.token_log_probs(local, target_ids=targets, group=group, chunk_size=chunk) * weights).sum()
        gathered = (L.token_log_probs(full_input, target_ids=targets) * weights).sum()
        out[f"token_log_probs/{chunk}"] = dict(sharded=sharded.detach(), gathered=gathered.detach(),
                                               grad_sharded=torch.autograd.grad(sharded, local)[0],
                                               grad_gathered=torch.autograd.grad(gathered, full_input)[0][..., cols])

    # FDD with heads that return vocabulary shards
    hs = [torch.randn(B, S, D, generator=gen, dtype=torch.float64) for _ in range(3)]
    ht = [torch.randn(B, S, D, generator=gen, dtype=torch.float64) for _ in range(3)]
    w_s = torch.randn(V, D, generator=gen, dtype=torch.float64)
    w_t = torch.randn(V, D, generator=gen, dtype=torch.float64)
    w_full, w_loc = w_s.clone().requires_grad_(), w_s[cols].clone().requires_grad_()
    gathered = L.fdd_loss(hs, ht, lambda h: h @ w_full.T, lambda h: h @ w_t.T, mask=mask)
    sharded = L.fdd_loss(hs, ht, lambda h: h @ w_loc.T, lambda h: h @ w_t[cols].T, mask=mask, group=group)
    out["fdd_loss/None"] = dict(sharded=sharded.detach(), gathered=gathered.detach(),
                                grad_sharded=torch.autograd.grad(sharded, w_loc)[0],
                                grad_gathered=torch.autograd.grad(gathered, w_full)[0][cols])

    # fairscale's output head (ColumnParallelLinear, gather_output=False): the hidden-state gradient, which
    # fairscale all-reduces over the shards, must equal the gathered one (no factor tp)
    head = ColumnParallelLinear(D, V, bias=False, gather_output=False).double()
    with torch.no_grad():
        head.weight.copy_(w_s[cols])
    for chunk in CHUNKS:
        h = hs[0].clone().requires_grad_()
        h_full = hs[0].clone().requires_grad_()
        sharded = L.forward_kl(head(h), zt[..., cols], mask=mask, group=group, chunk_size=chunk)
        gathered = L.forward_kl(h_full @ w_s.T, zt, mask=mask)
        sharded.backward()
        (grad_full,) = torch.autograd.grad(gathered, h_full)
        out[f"column_parallel_head/{chunk}"] = dict(sharded=sharded.detach(), gathered=gathered.detach(),
                                                   grad_sharded=h.grad.clone(), grad_gathered=grad_full)
        head.weight.grad = None

    # HeadLogits: hidden replicated (garbage under masked positions), weights sharded by rows; the hidden-state
    # gradient is the full one on every rank, the weight gradient this rank's rows of the full one
    h_s = hs[1].clone()
    h_s[~mask] = float("nan")
    fns = _loss_fns()
    fns["token_log_probs"] = lambda s, t, mask, target_ids, temperature, **kw: (
        L.token_log_probs(s, target_ids=torch.where(mask, target_ids, -100), temperature=temperature, **kw)
        * weights).sum()
    for name in HEAD_CASES:
        fn = fns[name]
        kw = dict(mask=mask, temperature=1.4, **({"target_ids": g} if name in TARGET_AWARE + ["token_log_probs"]
                                                 else {}))
        h_full, w_full = torch.where(mask[..., None], h_s, 0.0).requires_grad_(), w_s.clone().requires_grad_()
        gathered = fn(h_full @ w_full.T, ht[1] @ w_t.T, **kw)
        grad_h, grad_w = torch.autograd.grad(gathered, [h_full, w_full])
        for chunk in CHUNKS:
            h, w = h_s.clone().requires_grad_(), w_s[cols].clone().requires_grad_()
            sharded = fn(L.HeadLogits(h, w), L.HeadLogits(ht[1], w_t[cols]), group=group, chunk_size=chunk, **kw)
            sh, sw = torch.autograd.grad(sharded, [h, w])
            out[f"head_logits/{name}/{chunk}"] = dict(sharded=sharded.detach(), gathered=gathered.detach(),
                                                     grad_sharded=torch.cat([sh.flatten(), sw.flatten()]),
                                                     grad_gathered=torch.cat([grad_h.flatten(),
                                                                              grad_w[cols].flatten()]))
    return out


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_vocab_parallel_worker, 2)


CASES = [f"{n}/{c}" for n in PAIRWISE + TARGET_AWARE + ["mcc_span_kl", "token_log_probs"] for c in CHUNKS] + \
    ["fdd_loss/None", "column_parallel_head/None", "column_parallel_head/2"] + \
    [f"head_logits/{n}/{c}" for n in HEAD_CASES for c in CHUNKS]


@pytest.mark.parametrize("case", CASES)
def test_vocab_parallel_equals_gathered_values_and_gradients(per_rank, case):
    for rank, results in enumerate(per_rank):
        r = results[case]
        torch.testing.assert_close(r["sharded"], r["gathered"], rtol=1e-12, atol=1e-13, msg=f"{case} rank {rank}")
        torch.testing.assert_close(r["grad_sharded"], r["grad_gathered"], rtol=1e-10, atol=1e-13,
                                   msg=f"{case} rank {rank}")
        assert r["grad_sharded"].abs().max() > 0


def test_each_rank_owns_a_different_gradient_shard(per_rank):
    a, b = per_rank[0]["forward_kl/None"]["grad_sharded"], per_rank[1]["forward_kl/None"]["grad_sharded"]
    assert a.shape == (B, S, V // 2) and not torch.allclose(a, b)
