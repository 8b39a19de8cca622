"""common.generation: parity with transformers.generate, sampling, stopping, and the mixed-sampling hooks."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from common.generation import generate, sampling_probs

V = 97
PROMPT_LENS = (5, 9, 3, 12)


def tiny_causal_lm(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                           eos_token_id=2)
        model = OPTForCausalLM(config)
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return model.eval()


def random_prompts(lens=PROMPT_LENS, vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def cut_at(rows, eos):
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def hf_greedy(hf_model, prompts, max_new_tokens, eos_id, pad_id=0):
    """transformers.generate on left-padded prompts with an attention mask (its recommended layout)."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = (ids != -1).long()
    for b, p in enumerate(prompts):
        mask[b, :longest - len(p)] = 0
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos_id, pad_token_id=pad_id)
    return cut_at(out[:, longest:].tolist(), eos_id)


def an_eos_that_stops_some_rows(model, prompts, max_new_tokens):
    """A token that greedy decoding emits mid-way in some row, so EOS handling is exercised."""
    free = generate(model, prompts, max_new_tokens)
    return free[0][max_new_tokens // 3]


class FixedDecoder:
    """A decoder whose next-token logits are fixed; counts its calls."""

    max_batch_size, device = None, torch.device("cpu")

    def __init__(self, logits, max_seq_len=None):
        self.logits, self.max_seq_len, self.calls = logits, max_seq_len, []

    def begin(self, batch_size, attention_mask):
        pass

    def __call__(self, tokens, start_pos):
        self.calls.append((tokens.shape[1], start_pos))
        return self.logits.expand(tokens.shape[0], -1)

    def end(self):
        pass


# ---- parity with transformers ----

@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_hf_adapter_greedy_equals_transformers_generate(family, padding):
    model = tiny_causal_lm(family)
    prompts = random_prompts()
    eos = an_eos_that_stops_some_rows(model, prompts, 16)
    ours = generate(model, prompts, 16, eos_id=eos, padding=padding)
    assert ours == hf_greedy(model, prompts, 16, eos)
    assert any(row[-1] == eos and len(row) < 16 for row in ours)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "mixtral"])
def test_tp1_greedy_equals_transformers_generate(family):
    from common.parallel import setup
    from tests.common.hf_oracle import ours_from_hf, tiny_hf_model
    setup(tp_size=1)
    hf = tiny_hf_model(family)  # mistral: a sliding window shorter than the sequences
    ours = ours_from_hf(hf, max_seq_len=64, max_batch_size=8)
    prompts = random_prompts(vocab=hf.config.vocab_size)
    eos = an_eos_that_stops_some_rows(hf, prompts, 16)
    out = generate(ours, prompts, 16, eos_id=eos)
    assert out == hf_greedy(hf, prompts, 16, eos)
    assert any(row[-1] == eos and len(row) < 16 for row in out)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tp1_left_padded_greedy_equals_transformers_generate(family):
    from common.parallel import setup
    from tests.common.hf_oracle import ours_from_hf, tiny_hf_model
    setup(tp_size=1)
    hf = tiny_hf_model(family)
    ours = ours_from_hf(hf, max_seq_len=64, max_batch_size=8)
    prompts = random_prompts(vocab=hf.config.vocab_size)
    eos = an_eos_that_stops_some_rows(hf, prompts, 16)
    assert generate(ours, prompts, 16, eos_id=eos, padding="left") == hf_greedy(hf, prompts, 16, eos)


def test_compiled_decode_equals_transformers_and_has_no_graph_break():
    """compile=True: the torch.compile'd static step (CUDA graphs on a GPU) decodes what transformers does."""
    from common.generation import _decode_step
    from common.parallel import setup
    from tests.common.hf_oracle import ours_from_hf, tiny_hf_model
    setup(tp_size=1)
    hf = tiny_hf_model("mistral")  # a sliding window shorter than the sequences
    ours = ours_from_hf(hf, max_seq_len=64, max_batch_size=8)
    prompts = random_prompts(vocab=hf.config.vocab_size)
    eos = an_eos_that_stops_some_rows(hf, prompts, 16)
    reference = hf_greedy(hf, prompts, 16, eos)
    eager = generate(ours, prompts, 16, eos_id=eos, return_logprobs=True)
    for padding in ("right", "left"):
        compiled = generate(ours, prompts, 16, eos_id=eos, padding=padding, compile=True, return_logprobs=True)
        assert compiled == reference
        for a, b in zip(compiled.logprobs, eager.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    # the kept cache holds the last call's keys: a smaller batch after it must not see them
    assert generate(ours, prompts[2:], 16, eos_id=eos, compile=True) == reference[2:]
    with torch.no_grad():  # one graph: a break would split the CUDA graph and bring launches back
        step = torch._dynamo.explain(_decode_step)(ours, torch.tensor([[5], [6]]), torch.tensor(20), None)
    assert step.graph_break_count == 0, step.break_reasons


def test_compiled_bfloat16_step_is_as_close_to_float32_as_the_eager_one():
    """On a GPU the compiled step runs in bf16: its rounding may differ from eager's, its accuracy may not."""
    from common.generation import _compiled_steps, _decode_step, as_decoder
    from common.parallel import setup
    from tests.common.hf_oracle import ours_from_hf, tiny_hf_model
    setup(tp_size=1)
    hf = tiny_hf_model("qwen2")  # q/k/v biases
    reference = ours_from_hf(hf, max_seq_len=32, max_batch_size=4)
    low = ours_from_hf(hf, max_seq_len=32, max_batch_size=4).to(torch.bfloat16)
    tokens = torch.randint(3, hf.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    as_decoder(low, compile=True)  # builds the compiled step
    with torch.no_grad():
        exact = reference(tokens)[:, -1]
        low(tokens[:, :11], start_pos=0, use_cache=True)
        eager = _decode_step(low, tokens[:, 11:], 11, None).float()
        compiled = _compiled_steps[None](low, tokens[:, 11:], torch.tensor(11), None).float()
    eager_error, compiled_error = (eager - exact).abs().max(), (compiled - exact).abs().max()
    assert 0 < eager_error < 0.5 and compiled_error < 2 * eager_error


def test_compile_is_refused_for_a_transformers_model():
    with pytest.raises(ValueError, match="compile=True applies to common.model.Transformer"):
        generate(tiny_causal_lm("llama"), random_prompts(), 4, compile=True)


# ---- sampling ----

def test_sampling_with_a_fixed_seed_is_reproducible():
    model = tiny_causal_lm("llama")
    prompts = random_prompts()
    a = generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=3)
    assert a == generate(model, prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a != generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=4)


def test_a_seed_per_prompt_draws_each_row_as_it_would_alone():
    model = tiny_causal_lm("llama")
    prompts = random_prompts((6, 6, 6))                 # equal lengths: no padding, the same logits alone or batched
    together = generate(model, prompts, 12, temperature=1.0, seed=[11, 12, 13])
    alone = [generate(model, [p], 12, temperature=1.0, seed=[s])[0] for p, s in zip(prompts, [11, 12, 13])]
    assert together == alone
    swapped = generate(model, prompts[::-1], 12, temperature=1.0, seed=[13, 12, 11])
    assert swapped == together[::-1] and together[0] != together[1]
    mixed = generate(model, prompts, 12, temperature=1.0, teacher=tiny_causal_lm("llama", seed=1),
                     student_token_ratio=0.5, seed=[11, 12, 13])     # the per-row source draw too
    assert mixed[0] == generate(model, prompts[:1], 12, temperature=1.0, teacher=tiny_causal_lm("llama", seed=1),
                                student_token_ratio=0.5, seed=[11])[0]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(model, prompts, 4, temperature=1.0, seed=[1, 2])


def test_temperature_zero_is_greedy_and_tiny_temperature_converges_to_it():
    model = tiny_causal_lm("llama")
    prompts = random_prompts()
    greedy = generate(model, prompts, 12, temperature=0.0)
    assert greedy == hf_greedy(model, prompts, 12, eos_id=-5)
    assert generate(model, prompts, 12, temperature=1e-4, seed=0) == greedy


def test_top_k_and_top_p_keep_the_specified_tokens():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    torch.testing.assert_close(sampling_probs(logits, 1.0), probs)
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_k=2), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top-p 0.6: token 1 is kept (mass before it 0.5 <= 0.6), token 2 dropped (0.7 > 0.6)
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.6), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.4), torch.tensor([[1.0, 0, 0, 0, 0]]))
    hot = sampling_probs(logits, 2.0)
    torch.testing.assert_close(hot, probs.sqrt() / probs.sqrt().sum())


def test_logprobs_are_those_of_the_sampling_distribution():
    model = tiny_causal_lm("llama")
    prompts = random_prompts()
    out = generate(model, prompts, 8, temperature=0.7, top_k=20, seed=0, return_logprobs=True)
    for prompt, new, lps in zip(prompts, out, out.logprobs):
        seq = torch.tensor([prompt + new])
        logits = model(seq).logits[0, len(prompt) - 1:-1]
        probs = sampling_probs(logits, 0.7, top_k=20)
        torch.testing.assert_close(torch.tensor(lps), probs.gather(-1, torch.tensor(new)[:, None])[:, 0].log(),
                                   atol=1e-4, rtol=1e-4)


def test_logits_processor_sees_the_sequence_and_changes_the_choice():
    model = tiny_causal_lm("gpt2")
    prompts = random_prompts()
    seen = []

    def ban_repeats(logits, tokens):
        seen.append(tokens.shape[1])
        return logits.scatter(-1, tokens, float("-inf"))  # no token of the sequence so far may come again

    out = generate(model, prompts, 10, logits_processor=ban_repeats)
    for prompt, new in zip(prompts, out):
        assert set(new).isdisjoint(prompt) and len(set(new)) == len(new)
    assert seen == list(range(min(PROMPT_LENS), max(PROMPT_LENS) + 10))


# ---- stopping and limits ----

def assert_stop_ids_end_rows(model, prompts, max_new_tokens):
    """An EOS and an extra stop id taken from free greedy outputs cut each row after its first of them."""
    free = generate(model, prompts, max_new_tokens)
    stop_a, stop_b = free[1][2], free[3][5]
    out = generate(model, prompts, max_new_tokens, eos_id=stop_a, stop_ids=[stop_b])
    for row, ref in zip(out, free):
        cut = next((i for i, t in enumerate(ref) if t in (stop_a, stop_b)), None)
        assert row == (ref if cut is None else ref[:cut + 1])


def test_stop_ids_end_a_row_and_are_kept():
    assert_stop_ids_end_rows(tiny_causal_lm("opt"), random_prompts(), 10)


def test_max_new_tokens_and_max_seq_len_cap_each_row():
    decoder = FixedDecoder(torch.zeros(V).index_fill(0, torch.tensor([4]), 1.0), max_seq_len=20)
    out = generate(decoder, [[1] * 3, [1] * 15], 8)
    assert [len(r) for r in out] == [8, 5]  # 15 + 5 = max_seq_len
    out = generate(decoder, [[1] * 3, [1] * 15], None)
    assert [len(r) for r in out] == [17, 5]
    assert [len(r) for r in generate(decoder, [[1] * 3, [1] * 6], 8, max_seq_len=10)] == [7, 4]
    calls = len(decoder.calls)
    assert generate(decoder, [[1] * 3], 0) == [[]] and len(decoder.calls) == calls  # no model call at all


def test_the_loop_exits_once_every_row_has_stopped():
    decoder = FixedDecoder(torch.zeros(V).index_fill(0, torch.tensor([4]), 1.0))
    out = generate(decoder, [[1, 2], [1, 2, 3, 5]], 50, eos_id=4)
    assert out == [[4], [4]]
    assert decoder.calls == [(2, 0), (1, 2), (1, 3)]  # prefill, then one position per step, no more
    decoder.calls = []  # no stop id: the loop ends when the longest prompt has its max_new_tokens (no host sync)
    assert generate(decoder, [[1] * 3, [1] * 6], 4) == [[4] * 4, [4] * 4]
    assert decoder.calls == [(3, 0)] + [(1, p) for p in range(3, 9)]


def test_an_overlong_prompt_is_an_error_naming_the_item():
    model = tiny_causal_lm("llama")  # max_position_embeddings 64
    with pytest.raises(ValueError, match="prompt 1 has 64 tokens"):
        generate(model, [[5] * 10, [5] * 64], 4)


def test_generation_restores_train_mode():
    model = tiny_causal_lm("gpt2").train()
    generate(model, random_prompts(), 3)
    assert model.training


# ---- command line ----

def test_generate_cli_writes_what_generate_returns_in_input_order(tmp_path):
    import json

    from common import generate as cli
    from common.checkpoint_split import split
    from common.parallel import setup
    from common.tokenizer import load_tokenizer, train_sentencepiece
    from tests.common.hf_oracle import ours_from_hf, tiny_hf_model
    texts = ["Mary has 3 apples.", "Paco buys 15 more pears and 7 plums, so he has", "So", "Allan"]
    sp = train_sentencepiece(texts * 4, str(tmp_path / "tok"), vocab_size=300)
    tok = load_tokenizer(sp)
    hf = tiny_hf_model("llama", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    hf.save_pretrained(tmp_path / "hf")
    split(str(tmp_path / "hf"), str(tmp_path / "ckpt"), n=1, tokenizer=sp)
    items = [{"prompt": t, "id": i} for i, t in enumerate(texts)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    cli.main(str(tmp_path / "ckpt"), sp, str(tmp_path / "p.jsonl"), str(tmp_path / "o.jsonl"), max_new_tokens=6,
             max_batch_size=3, max_seq_len=64)
    written = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    from fairscale.nn.model_parallel import initialize as fs_init
    # it ends by tearing the process groups down: exiting with live gloo threads can abort a finished run
    assert not torch.distributed.is_initialized() and not fs_init.model_parallel_is_initialized()
    setup()
    expected = generate(ours_from_hf(hf, max_seq_len=64, max_batch_size=4),
                        [tok.encode(t, bos=True, eos=False) for t in texts], 6, eos_id=tok.eos_id)
    assert [r["id"] for r in written] == list(range(len(texts)))
    assert [r["output_ids"] for r in written] == list(expected)
    assert [r["output"] for r in written] == [tok.decode(ids) for ids in expected]
    cli.main(str(tmp_path / "ckpt"), sp, str(tmp_path / "p.jsonl"), str(tmp_path / "c.jsonl"), max_new_tokens=6,
             max_batch_size=3, max_seq_len=64, compile=True)
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "o.jsonl").read_text()

    (tmp_path / "p.json").write_text(json.dumps(["Mary " * 70]))
    with pytest.raises(ValueError, match="item 0 has"):
        cli.main(str(tmp_path / "ckpt"), sp, str(tmp_path / "p.json"), str(tmp_path / "o2.jsonl"), max_seq_len=64)


# ---- mixed sampling hooks ----

def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def test_teacher_mixed_sampling_draws_from_the_mixture_and_returns_q_over_mix():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64)
    p = torch.tensor([0.0, 0.1, 0.1, 0.2, 0.6, 0.0], dtype=torch.float64)
    alpha = 0.2
    mix = (1 - alpha) * q + alpha * p
    student, teacher = FixedDecoder(q.float().log()), FixedDecoder(p.float().log())
    n = 4000
    out = generate(student, [[1]] * n, 3, temperature=1.0, teacher=teacher, teacher_mixed_alpha=alpha, seed=0,
                   return_logprobs=True)
    drawn = torch.tensor(out).flatten()
    counts = torch.bincount(drawn, minlength=6).double()
    assert counts[5] == 0
    assert chi_square_p_value(counts, mix) > 1e-3
    # the student alone would never draw tokens 3 and 4: the teacher share shows up
    assert abs(counts[3:5].sum() / counts.sum() - alpha * 0.8) < 0.02
    weights = torch.tensor(out.weights, dtype=torch.float64).flatten()
    torch.testing.assert_close(weights, (q / mix)[drawn], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64).flatten(), mix[drawn].log(),
                               rtol=1e-5, atol=1e-6)


def test_teacher_mixed_weights_match_both_models_on_the_generated_sequence():
    student, teacher = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    prompts = random_prompts()
    out = generate(student, prompts, 8, temperature=1.0, teacher=teacher, teacher_mixed_alpha=0.3, seed=2)
    for prompt, new, w in zip(prompts, out, out.weights):
        seq = torch.tensor([prompt + new])
        q = torch.softmax(student(seq).logits[0, len(prompt) - 1:-1], -1)
        p = torch.softmax(teacher(seq).logits[0, len(prompt) - 1:-1], -1)
        y = torch.tensor(new)[:, None]
        q_y, p_y = q.gather(-1, y)[:, 0], p.gather(-1, y)[:, 0]
        torch.testing.assert_close(torch.tensor(w), q_y / (0.7 * q_y + 0.3 * p_y), atol=1e-4, rtol=1e-4)


def test_mix_token_takes_each_token_from_the_chosen_model():
    student, teacher = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    prompts = random_prompts()
    out = generate(student, prompts, 12, teacher=teacher, student_token_ratio=0.5, seed=5)
    sources = torch.tensor([s for row in out.sources for s in row])
    assert 0 < sources.float().mean() < 1
    for prompt, new, src in zip(prompts, out, out.sources):
        seq = torch.tensor([prompt + new])
        picks = torch.stack([student(seq).logits[0, len(prompt) - 1:-1].argmax(-1),
                             teacher(seq).logits[0, len(prompt) - 1:-1].argmax(-1)])
        assert new == picks.gather(0, torch.tensor(src)[None])[0].tolist()


def test_mix_token_ratio_sets_the_share_of_student_tokens():
    student = FixedDecoder(torch.zeros(V).index_fill(0, torch.tensor([3]), 1.0))
    teacher = FixedDecoder(torch.zeros(V).index_fill(0, torch.tensor([5]), 1.0))
    out = generate(student, [[1]] * 500, 4, teacher=teacher, student_token_ratio=0.25, seed=0)
    tokens, sources = torch.tensor(out), torch.tensor(out.sources)
    assert torch.equal(tokens, torch.where(sources == 0, 3, 5))
    assert abs((sources == 0).float().mean().item() - 0.25) < 0.03
