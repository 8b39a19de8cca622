"""anli_reverse_kl/minillm.py: MiniLLM rollout quantities on a tiny T5 and a tiny causal Llama, against a hand
computation."""
import math

import pytest
import torch

from anli_reverse_kl.minillm import (STORE_FIELDS, minillm_loss, rollout_quantities, sample_responses, score_rollouts,
                                    store_fields)
from tests.tiny import tiny_model

# two prompts of unequal length (right-padded) and sampled decoder tokens: 4 and 2 real tokens (EOS = 1)
PROMPTS = [[10, 11, 12, 13, 1], [20, 21, 1]]
TOKENS = [[40, 41, 42, 1], [50, 1, 0, 0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]


RESPONSES = [[t for t, m in zip(ts, ms) if m] for ts, ms in zip(TOKENS, MASK)]


@torch.no_grad()
def hand_log_probs(model, b, tau=1.0):
    """log prob of each sampled token at temperature tau, one prompt at a time, the decoder fed [start] + tokens
    by hand."""
    out = []
    for prompt, tokens, mask in zip(PROMPTS, TOKENS, MASK):
        n = sum(mask)
        dec = torch.tensor([[model.config.decoder_start_token_id] + tokens[: n - 1]])
        logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=dec).logits[0].double()
        logp = torch.log_softmax(logits / tau, -1)
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
    got = score_rollouts(student, teacher, PROMPTS, RESPONSES, pad_id=0, batch_size=1, alpha=alpha, gamma=gamma)
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


def test_scoring_temperature_as_released_student_and_mixture_at_tau_teacher_reward_at_one():
    """LMOps / the fork divide the scoring logits by --temperature (log q_old, the teacher inside the mixture
    weight); the reward's teacher log p is taken from the raw logits."""
    student, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1)
    tau, alpha = 0.7, 0.2
    got = score_rollouts(student, teacher, PROMPTS, RESPONSES, pad_id=0, temperature=tau, alpha=alpha)
    lq, lp, lp_tau = hand_log_probs(student, None, tau), hand_log_probs(teacher, None), hand_log_probs(teacher, None, tau)
    for b, n in enumerate([4, 2]):
        assert got["log_q_old"][b, :n].tolist() == pytest.approx(lq[b], abs=1e-5)
        assert got["log_p"][b, :n].tolist() == pytest.approx(lp[b], abs=1e-5)
        w = [math.exp(a) / ((1 - alpha) * math.exp(a) + alpha * math.exp(c)) for a, c in zip(lq[b], lp_tau[b])]
        assert got["weights"][b, :n].tolist() == pytest.approx(w, rel=1e-5)
        r = [(c - a) / 0.5 for a, c in zip(lq[b], lp[b])]
        assert got["rewards"][b, :n].tolist() == pytest.approx(r, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("whiten", ["release", "masked"])
def test_policy_loss_of_a_minibatch_whitens_as_chosen(whiten):
    """First PPO epoch (q_θ = q_old, so ρ = w): L_pg = masked mean of max(-A w, -A clip(w, 0.8, 1.2)) with A the
    raw advantages whitened over every entry of the [B, width] minibatch (release) or the store's masked ones."""
    student, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1)
    store = score_rollouts(student, teacher, PROMPTS, RESPONSES, pad_id=0, alpha=0.2)
    student.eval()
    width = 7
    got = minillm_loss(student, teacher, {k: store[k] for k in STORE_FIELDS}, whiten=whiten, width=width)["pg"]
    lq, lp = hand_log_probs(student, None), hand_log_probs(teacher, None)
    w, _, raw, masked = hand_quantities(lq, lp, 0.2, 0.95)
    if whiten == "release":
        flat = [a for row in raw for a in row] + [0.0] * (2 * width - 6)
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat) + 1e-8)
        adv = [[(a - mean) / std for a in row] for row in raw]
    else:
        adv = masked
    terms = [max(-a * x, -a * min(max(x, 0.8), 1.2)) for ws, As in zip(w, adv) for x, a in zip(ws, As)]
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)


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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_importance_weights_equal_those_the_sampler_recorded(temperature):
    student, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1)
    prompts = [[10, 11, 12, 13, 1], [20, 21, 1], [30, 1]]
    generations = sample_responses(student, teacher, prompts, max_new_tokens=6, alpha=0.2, eos_id=1, seed=0,
                                   temperature=temperature)
    store = score_rollouts(student, teacher, prompts, generations, pad_id=0, alpha=0.2, temperature=temperature)
    for b, recorded in enumerate(generations.weights):
        assert store["weights"][b, :len(recorded)].tolist() == pytest.approx(recorded, rel=1e-4)
        assert store["mask"][b].sum() == len(recorded) == len(generations[b])
    assert any(w != 1.0 for ws in generations.weights for w in ws)


@torch.no_grad()
def exact_reverse_kl(student, teacher, prompts, vocab=128):
    """KL[q ‖ p] over all two-token decoder outputs, exactly: Σ_y1 q(y1) [log q(y1)/p(y1) + KL(q(·|y1) ‖ p(·|y1))]."""
    total = 0.0
    for prompt in prompts:
        dec = torch.stack([torch.zeros(vocab, dtype=torch.long), torch.arange(vocab)], 1)  # [start, y1] for every y1
        ids = torch.tensor([prompt] * vocab)
        lq = torch.log_softmax(student(input_ids=ids, decoder_input_ids=dec).logits.double(), -1)
        lp = torch.log_softmax(teacher(input_ids=ids, decoder_input_ids=dec).logits.double(), -1)
        q1 = lq[0, 0].exp()
        total += float((q1 * (lq[0, 0] - lp[0, 0])).sum() + (q1 * (lq[:, 1].exp() * (lq[:, 1] - lp[:, 1])).sum(-1)).sum())
    return total / len(prompts)


@pytest.mark.parametrize("single_step_reg", [False, True])
def test_minillm_updates_lower_the_exact_reverse_kl_to_the_teacher_on_a_toy_problem(single_step_reg):
    student, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1)
    for m in (student, teacher):  # a random T5 head makes near one-hot distributions; soften both
        m.lm_head.weight.data *= 0.1
    prompts = [[10, 11, 12, 1], [20, 21, 22, 23, 1]]
    before = exact_reverse_kl(student, teacher, prompts)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for it in range(10):
        rollout_prompts = [p for p in prompts for _ in range(32)]
        responses = sample_responses(student, teacher, rollout_prompts, max_new_tokens=2, alpha=0.2, eos_id=None,
                                     seed=it)
        store = score_rollouts(student, teacher, rollout_prompts, responses, pad_id=0)
        for _ in range(2):  # PPO epochs
            terms = minillm_loss(student, teacher, {k: store[k] for k in STORE_FIELDS},
                                 single_step_reg=single_step_reg)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
    after = exact_reverse_kl(student, teacher, prompts)
    assert after < 0.5 * before, (before, after)


# ---- causal LMs (LMOps' original setting): prompt + response in one sequence ----

@torch.no_grad()
def hand_causal_log_probs(model, prompts, responses):
    """log prob of each response token from a forward over prompt + response alone (no padding), by hand."""
    out = []
    for prompt, response in zip(prompts, responses):
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        out.append([float(logp[len(prompt) - 1 + t, y]) for t, y in enumerate(response)])
    return out


def test_causal_rollout_scores_match_a_forward_over_each_unpadded_sequence():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    got = score_rollouts(student, teacher, PROMPTS, RESPONSES, pad_id=0, batch_size=1, alpha=0.2, gamma=0.95)
    lq, lp = hand_causal_log_probs(student, PROMPTS, RESPONSES), hand_causal_log_probs(teacher, PROMPTS, RESPONSES)
    w, r, raw, adv = hand_quantities(lq, lp, 0.2, 0.95)
    assert "decoder_input_ids" not in got and store_fields(got) == [k for k in STORE_FIELDS if "decoder" not in k]
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        at = got["mask"][b].nonzero().flatten().tolist()
        assert at == list(range(len(prompt) - 1, len(prompt) - 1 + len(response)))  # the positions scoring y
        assert got["targets"][b, at].tolist() == response
        assert got["log_q_old"][b, at].tolist() == pytest.approx(lq[b], abs=1e-5)
        assert got["log_p"][b, at].tolist() == pytest.approx(lp[b], abs=1e-5)
        assert got["weights"][b, at].tolist() == pytest.approx(w[b], rel=1e-5)
        assert got["advantages"][b, at].tolist() == pytest.approx(adv[b], rel=1e-4, abs=1e-5)


def test_causal_importance_weights_equal_those_the_left_padded_sampler_recorded():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    prompts = [[10, 11, 12, 13], [20, 21], [30]]
    generations = sample_responses(student, teacher, prompts, max_new_tokens=6, alpha=0.2, eos_id=1, seed=0, pad_id=0)
    store = score_rollouts(student, teacher, prompts, generations, pad_id=0, alpha=0.2)
    for b, recorded in enumerate(generations.weights):
        at = store["mask"][b].nonzero().flatten()
        assert store["weights"][b, at].tolist() == pytest.approx(recorded, rel=1e-4)
        assert len(at) == len(recorded) == len(generations[b])
    assert any(w != 1.0 for ws in generations.weights for w in ws)



@torch.no_grad()
def exact_causal_reverse_kl(student, teacher, prompts, vocab=128):
    """KL[q ‖ p] over all two-token continuations, exactly (the causal twin of exact_reverse_kl)."""
    total = 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt + [y1] for y1 in range(vocab)])  # every first token, then the next one's law
        lq = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
        lp = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
        first_q, first_p = lq[0, len(prompt) - 1], lp[0, len(prompt) - 1]
        q1 = first_q.exp()
        second = (lq[:, -1].exp() * (lq[:, -1] - lp[:, -1])).sum(-1)
        total += float((q1 * (first_q - first_p)).sum() + (q1 * second).sum())
    return total / len(prompts)


@pytest.mark.parametrize("single_step_reg", [False, True])
def test_minillm_updates_lower_the_exact_reverse_kl_of_a_causal_student(single_step_reg):
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    for m in (student, teacher):
        m.lm_head.weight.data *= 5.0  # a random tiny Llama is near uniform; sharpen both so there is KL to remove
    prompts = [[10, 11, 12], [20, 21, 22, 23]]
    before = exact_causal_reverse_kl(student, teacher, prompts)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for it in range(10):
        rollout_prompts = [p for p in prompts for _ in range(32)]
        responses = sample_responses(student, teacher, rollout_prompts, max_new_tokens=2, alpha=0.2, eos_id=None,
                                     seed=it, pad_id=0)
        store = score_rollouts(student, teacher, rollout_prompts, responses, pad_id=0)
        for _ in range(2):
            terms = minillm_loss(student, teacher, {k: store[k] for k in store_fields(store)},
                                 single_step_reg=single_step_reg)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
    after = exact_causal_reverse_kl(student, teacher, prompts)
    assert after < 0.75 * before, (before, after)  # 0.60 -> 0.42 (policy gradient alone) / 0.27 (with L_reg)


def test_causal_policy_loss_whitens_the_response_entries_as_the_release_holds_them():
    """The release whitens [B, width] response advantages; a causal store holds them after each prompt, and its
    L_pg must equal the hand formula over the responses alone (prompt positions do not count)."""
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    store = score_rollouts(student, teacher, PROMPTS, RESPONSES, pad_id=0, alpha=0.2)
    student.eval()
    width = 7
    got = minillm_loss(student, teacher, {k: store[k] for k in store_fields(store)}, width=width)["pg"]
    lq, lp = hand_causal_log_probs(student, PROMPTS, RESPONSES), hand_causal_log_probs(teacher, PROMPTS, RESPONSES)
    w, _, raw, _ = hand_quantities(lq, lp, 0.2, 0.95)
    flat = [a for row in raw for a in row] + [0.0] * (2 * width - 6)
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat) + 1e-8)
    terms = [max(-(a - mean) / std * x, -(a - mean) / std * min(max(x, 0.8), 1.2))
             for ws, As in zip(w, raw) for x, a in zip(ws, As)]
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)
