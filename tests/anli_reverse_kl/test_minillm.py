"""anli_reverse_kl/minillm.py: MiniLLM rollout quantities on a tiny T5, against a hand computation."""
import math

import pytest
import torch

from anli_reverse_kl.minillm import decoder_logits, rollout_quantities, score_rollout
from tests.tiny import tiny_model

# two prompts of unequal length (right-padded) and sampled decoder tokens: 4 and 2 real tokens (EOS = 1)
PROMPTS = [[10, 11, 12, 13, 1], [20, 21, 1]]
TOKENS = [[40, 41, 42, 1], [50, 1, 0, 0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]


def batch():
    ids = torch.tensor([p + [0] * (5 - len(p)) for p in PROMPTS])
    attn = torch.tensor([[1] * len(p) + [0] * (5 - len(p)) for p in PROMPTS])
    return ids, attn, torch.tensor(TOKENS), torch.tensor(MASK, dtype=torch.bool)


@torch.no_grad()
def hand_log_probs(model, b):
    """log prob of each sampled token, one prompt at a time, the decoder fed [start] + tokens by hand."""
    out = []
    for prompt, tokens, mask in zip(PROMPTS, TOKENS, MASK):
        n = sum(mask)
        dec = torch.tensor([[model.config.decoder_start_token_id] + tokens[: n - 1]])
        logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=dec).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        out.append([float(logp[t, tokens[t]]) for t in range(n)])
    return out


def hand_quantities(lq, lp, alpha, gamma, scaling=0.5, clip=100.0):
    """losses.md §4.4 written out per token in plain Python."""
    w = [[math.exp(a) / ((1 - alpha) * math.exp(a) + alpha * math.exp(b)) for a, b in zip(qs, ps)]
         for qs, ps in zip(lq, lp)]
    r = [[max(-clip, min(clip, (b - a) / scaling)) for a, b in zip(qs, ps)] for qs, ps in zip(lq, lp)]
    raw = []
    for rs in r:
        T, g, row = len(rs), 0.0, [0.0] * len(rs)
        for t in reversed(range(T)):
            g = rs[t] + gamma * g
            row[t] = g / (T - t)
        raw.append(row)
    flat = [a for row in raw for a in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat) + 1e-8)
    return w, r, raw, [[(a - mean) / std for a in row] for row in raw]


@pytest.mark.parametrize("alpha, gamma", [(0.2, 0.95), (0.5, 0.8)])
def test_rollout_quantities_on_tiny_t5_match_hand_computation(alpha, gamma):
    student, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1)
    ids, attn, tokens, mask = batch()
    got = score_rollout(student, teacher, ids, attn, tokens, mask, alpha=alpha, gamma=gamma)
    lq, lp = hand_log_probs(student, None), hand_log_probs(teacher, None)
    w, r, raw, adv = hand_quantities(lq, lp, alpha, gamma)
    for b, n in enumerate([4, 2]):
        assert got["log_q_old"][b, :n].tolist() == pytest.approx(lq[b], abs=1e-5)
        assert got["log_p"][b, :n].tolist() == pytest.approx(lp[b], abs=1e-5)
        assert got["weights"][b, :n].tolist() == pytest.approx(w[b], rel=1e-5)
        assert got["rewards"][b, :n].tolist() == pytest.approx(r[b], rel=1e-5, abs=1e-5)
        assert got["raw_advantages"][b, :n].tolist() == pytest.approx(raw[b], rel=1e-5, abs=1e-5)
        assert got["advantages"][b, :n].tolist() == pytest.approx(adv[b], rel=1e-4, abs=1e-5)
    assert (got["advantages"][1, 2:] == 0).all() and (got["weights"][1, 2:] == 1).all()


def test_no_teacher_mix_gives_unit_weights_and_gamma_one_gives_mean_remaining_reward():
    g = torch.Generator().manual_seed(0)
    lq, lp = -torch.rand(2, 5, generator=g) * 3, -torch.rand(2, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    q = rollout_quantities(lq, lp, mask, alpha=0.0, gamma=1.0)
    assert torch.allclose(q["weights"], torch.ones(2, 5))
    for b, n in enumerate([5, 3]):
        r = q["rewards"][b, :n]
        want = torch.stack([r[t:].mean() for t in range(n)])
        assert torch.allclose(q["raw_advantages"][b, :n], want, atol=1e-6)


def test_rewards_are_clipped_at_the_reward_clip():
    lq = torch.tensor([[0.0, -300.0]])
    lp = torch.tensor([[-300.0, 0.0]])
    q = rollout_quantities(lq, lp, torch.ones(1, 2, dtype=torch.bool))
    assert q["rewards"].tolist() == [[-100.0, 100.0]]


def test_decoder_logits_position_t_predicts_token_t_like_transformers_labels():
    model = tiny_model("t5", seed=3)
    ids, attn, tokens, mask = batch()
    labels = tokens.masked_fill(~mask, -100)
    ours = decoder_logits(model, ids, attn, labels)
    theirs = model(input_ids=ids, attention_mask=attn, labels=labels).logits
    assert torch.equal(ours, theirs)
