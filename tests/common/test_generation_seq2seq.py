"""common.generation on transformers encoder-decoders (T5): parity with transformers, sampling, stopping, the
mixed-sampling hooks with a T5 pair, the cache API, and `pad_rollouts` for decoders and encoder-decoders."""
import functools

import pytest
import torch

from common.generation import generate, pad_rollouts
from tests.common.test_generation import assert_stop_ids_end_rows, chi_square_p_value, cut_at, random_prompts
from tests.tiny import tiny_model

PROMPT_LENS = (5, 9, 3, 12, 7)
EOS = 1  # tests/tiny.py's T5 convention: pad 0 (also the decoder start token), eos 1


def tiny_t5(seed=0, **overrides):
    # the default init (factor 1) makes this tiny T5 emit token 0 at every step; factor 3 gives varied outputs
    return tiny_model("t5", seed=seed, **{"initializer_factor": 3.0, **overrides})


def hf_greedy(model, prompts, max_new_tokens, eos_id=EOS):
    """transformers.generate on right-padded encoder inputs with their mask; decoder start token dropped."""
    longest = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=0)
    assert (out[:, 0] == model.config.decoder_start_token_id).all()
    return cut_at(out[:, 1:].tolist(), eos_id)


def decoder_logits(model, prompt, new):
    """Teacher-forced decoder logits [len(new), V] of one prompt: position t scores new[t]."""
    start = model.config.decoder_start_token_id
    return model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + new[:-1]])).logits[0]


# ---- parity with transformers ----

def test_t5_greedy_equals_transformers_generate_on_prompts_of_unequal_lengths():
    model = tiny_t5()
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    ours = generate(model, prompts, 16, eos_id=EOS)
    reference = hf_greedy(model, prompts, 16)
    assert ours == reference
    assert any(row[-1] == EOS and len(row) < 16 for row in ours)  # EOS ends some rows early ...
    assert any(len(row) == 16 for row in ours)  # ... not all
    assert len({t for row in ours for t in row}) > 10  # varied outputs: a wrong mask or position would show
    # each prompt alone (no encoder padding) decodes the same: the mask hides the padding exactly
    assert [generate(model, [p], 16, eos_id=EOS)[0] for p in prompts] == reference


def test_t5_logprobs_are_log_softmax_of_transformers_logits_at_the_chosen_tokens():
    model = tiny_t5()
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    greedy = generate(model, prompts, 10, eos_id=EOS, return_logprobs=True)
    sampled = generate(model, prompts, 10, temperature=0.7, top_k=20, seed=0, return_logprobs=True)
    for prompt, new, lps, s_new, s_lps in zip(prompts, greedy, greedy.logprobs, sampled, sampled.logprobs):
        logits = decoder_logits(model, prompt, new)
        assert new == logits.argmax(-1).tolist()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        # this T5's logits reach ~165, where one fp32 ulp is 1.5e-5: a cached, padded batch and one unpadded
        # forward differ by a few ulps
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=1e-5)
        probs = torch.softmax(decoder_logits(model, prompt, s_new) / 0.7, -1)
        kept = probs >= probs.topk(20, -1).values[:, -1:]  # top-k by hand
        probs = probs * kept / (probs * kept).sum(-1, keepdim=True)
        expected = probs.gather(-1, torch.tensor(s_new)[:, None])[:, 0].log()
        torch.testing.assert_close(torch.tensor(s_lps), expected, atol=2e-4, rtol=1e-5)  # logits / 0.7 reach ~235


def test_t5_generation_passes_cache_objects_not_deprecated_tuples():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    seen = []
    for model, cache_type in ((tiny_t5(), EncoderDecoderCache), (tiny_model("llama"), DynamicCache)):
        forward = model.forward

        @functools.wraps(forward)
        def spy(*args, **kwargs):
            seen.append((cache_type, kwargs))
            return forward(*args, **kwargs)

        model.forward = spy
        generate(model, [[5, 6, 7], [8, 9]], 3)
    assert len(seen) == 3 + 4  # T5: 3 decoder steps; llama: prefill of [0, 2), then columns 2, 3, 4
    for cache_type, kwargs in seen:
        assert "past_key_values" not in kwargs and isinstance(kwargs["cache"], cache_type)


# ---- sampling and stopping ----

def test_t5_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_t5()
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    a = generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=3)
    assert a == generate(model, prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a != generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=4)


def test_t5_stop_ids_and_eos_end_a_row_and_are_kept():
    model = tiny_t5()
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    assert_stop_ids_end_rows(model, prompts, 12)
    # max_seq_len caps the decoder sequence (start token included), whatever the prompt lengths
    assert [len(r) for r in generate(model, prompts, 12, max_seq_len=5)] == [4] * len(prompts)
    assert [len(r) for r in generate(model, prompts, None, max_seq_len=7)] == [6] * len(prompts)


def test_t5_teacher_must_be_an_encoder_decoder_with_the_same_start_token():
    with pytest.raises(ValueError, match="both be decoders or both be encoder-decoders"):
        generate(tiny_t5(), [[5, 6]], 3, temperature=1.0, teacher=tiny_model("llama"), teacher_mixed_alpha=0.2)
    with pytest.raises(ValueError, match="different tokens"):
        generate(tiny_t5(), [[5, 6]], 3, temperature=1.0, teacher=tiny_t5(decoder_start_token_id=3),
                 teacher_mixed_alpha=0.2)


# ---- mixed sampling with a T5 pair ----

def test_t5_teacher_mixed_sampling_draws_from_the_mixture_and_returns_q_over_mix():
    """Two-token samples over an 8-token vocabulary: the joint counts fit the mixture (chi-square), not the
    student alone; each weight and log-prob equals q(y) / mix(y) and log mix(y) computed from both models."""
    student, teacher = tiny_t5(seed=0, vocab_size=8), tiny_t5(seed=1, vocab_size=8)
    alpha, temperature, n = 0.3, 0.8, 3000
    prompt = [3, 5, 2, 7]
    out = generate(student, [prompt] * n, 2, temperature=temperature, teacher=teacher, teacher_mixed_alpha=alpha,
                   seed=0, return_logprobs=True)
    assert all(len(row) == 2 for row in out)

    def probs(model, first):  # [8] at position 0 and [8, 8] at position 1 given each first token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt] * 8),
                           decoder_input_ids=torch.tensor([[0, y] for y in range(8)])).logits / temperature
        return torch.softmax(logits.double(), -1)[0, 0] if first else torch.softmax(logits.double(), -1)[:, 1]

    q0, p0, q1, p1 = probs(student, True), probs(teacher, True), probs(student, False), probs(teacher, False)
    mix0, mix1 = (1 - alpha) * q0 + alpha * p0, (1 - alpha) * q1 + alpha * p1
    joint_mix, joint_q = mix0[:, None] * mix1, q0[:, None] * q1
    drawn = torch.tensor(list(out))
    counts = torch.bincount(drawn[:, 0] * 8 + drawn[:, 1], minlength=64).double()

    def pooled_p_value(probs):  # cells with fewer than 5 expected draws pooled into one (chi-square validity)
        probs = probs.flatten()
        small = probs * n < 5
        return chi_square_p_value(torch.cat([counts[~small], counts[small].sum()[None]]),
                                  torch.cat([probs[~small], probs[small].sum()[None]]))

    assert pooled_p_value(joint_mix) > 1e-3
    assert pooled_p_value(joint_q) < 1e-6  # the test can tell the mixture from the student alone

    y0, y1 = drawn[:, 0], drawn[:, 1]
    expected_w = torch.stack([q0[y0] / mix0[y0], q1[y0, y1] / mix1[y0, y1]], 1)
    expected_lp = torch.stack([mix0[y0].log(), mix1[y0, y1].log()], 1)
    torch.testing.assert_close(torch.tensor(out.weights, dtype=torch.float64), expected_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64), expected_lp, atol=1e-5, rtol=1e-5)


def test_t5_mix_token_takes_each_token_from_the_chosen_model():
    student, teacher = tiny_t5(seed=0), tiny_t5(seed=1)
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    out = generate(student, prompts, 10, teacher=teacher, student_token_ratio=0.5, seed=5)
    sources = torch.tensor([s for row in out.sources for s in row])
    assert 0 < sources.float().mean() < 1
    for prompt, new, src in zip(prompts, out, out.sources):
        picks = torch.stack([decoder_logits(student, prompt, new).argmax(-1),
                             decoder_logits(teacher, prompt, new).argmax(-1)])
        assert new == picks.gather(0, torch.tensor(src)[None])[0].tolist()


# ---- rollouts back into training tensors ----

PROMPTS, RESPONSES = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
LOGPROBS, WEIGHTS = [[-0.1, -0.2], [-0.3, -0.4, -0.5]], [[0.5, 2.0], [1.5, 0.25, 0.75]]


def test_pad_rollouts_of_a_decoder_match_a_hand_built_batch():
    r = pad_rollouts(PROMPTS, RESPONSES, pad_id=0, logprobs=LOGPROBS, weights=WEIGHTS)
    assert r.input_ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert r.targets.tolist() == [[6, 7, 9, 10, 0], [11, 12, 13, 0, 0]]  # position t scores token t + 1
    assert r.response_mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    torch.testing.assert_close(r.logprobs, torch.tensor([[0, 0, -0.1, -0.2, 0], [-0.3, -0.4, -0.5, 0, 0]]))
    torch.testing.assert_close(r.weights, torch.tensor([[1, 1, 0.5, 2.0, 1], [1.5, 0.25, 0.75, 1, 1]]))
    assert r.decoder_input_ids is None and set(r.model_inputs()) == {"input_ids", "attention_mask"}


def test_pad_rollouts_of_an_encoder_decoder_match_a_hand_built_batch():
    r = pad_rollouts(PROMPTS, RESPONSES, pad_id=0, decoder_start_id=0, logprobs=LOGPROBS)
    assert r.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert r.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert r.decoder_input_ids.tolist() == [[0, 9, 0], [0, 11, 12]]
    assert r.decoder_attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.targets.tolist() == [[9, 10, 0], [11, 12, 13]]  # no shift
    assert r.response_mask.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(r.logprobs, torch.tensor([[-0.1, -0.2, 0], [-0.3, -0.4, -0.5]]))
    assert r.weights is None
    with pytest.raises(ValueError, match="logprobs of response 1 has 2 values for its 3 tokens"):
        pad_rollouts(PROMPTS, RESPONSES, pad_id=0, logprobs=[[-0.1, -0.2], [-0.3, -0.4]])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_pad_rollouts_scores_each_sampled_token_at_its_logits_position(family):
    """One forward on the padded batch gives, at the response mask, the log-probs the sampler recorded."""
    model = tiny_t5() if family == "t5" else tiny_model("llama")
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    eos = generate(model, prompts, 8, temperature=1.0, seed=1)[0][3]  # a stop that ends some rows early
    out = generate(model, prompts, 8, temperature=1.0, eos_id=eos, seed=1, return_logprobs=True)
    assert len({len(row) for row in out}) > 1  # responses of unequal lengths
    start = model.config.decoder_start_token_id if family == "t5" else None
    r = pad_rollouts(prompts, out, pad_id=0, decoder_start_id=start)
    logits = model(**r.model_inputs()).logits
    scored = torch.log_softmax(logits, -1).gather(-1, r.targets[..., None])[..., 0]
    # T5's logits reach ~165 here (fp32 ulp 1.5e-5): the padded forward and the cached steps differ by a few ulps
    torch.testing.assert_close(scored[r.response_mask], r.logprobs[r.response_mask], atol=1e-4, rtol=1e-5)
    assert int(r.response_mask.sum()) == sum(map(len, out))


def test_t5_with_peft_lora_generates_what_the_merged_model_does():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_t5(), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)).eval()
    prompts = random_prompts(PROMPT_LENS, vocab=100)
    adapted = generate(model, prompts, 10, eos_id=EOS)
    merged = model.merge_and_unload()
    assert adapted == generate(merged, prompts, 10, eos_id=EOS)
    assert adapted != generate(tiny_t5(), prompts, 10, eos_id=EOS)  # the adapters change the output
