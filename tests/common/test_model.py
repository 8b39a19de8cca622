"""Our TP decoder against transformers on the same weights: HF folder -> checkpoint_split (n=1, 2) ->
load_model in 1 and 2 gloo processes -> logits and hidden states within 1e-4 (fp32)."""
import pytest
import torch

from common.checkpoint_split import split
from common.model import ModelArgs, Transformer, load_model
from common.parallel import setup
from tests.common.hf_oracle import FAMILIES, ours_from_hf, tiny_hf_model
from tests.distributed import run_distributed

LENGTHS = [12, 7, 3]  # right-padded batch of unequal lengths
ATOL = 1e-4


def batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)  # pad id 0
    for b, n in enumerate(LENGTHS):
        tokens[b, :n] = torch.randint(3, vocab, (n,), generator=g)
    return tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: the HF model and our checkpoint folders split for TP 1 and 2."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        hf = tiny_hf_model(family)
        hf.save_pretrained(root / "hf")
        split(str(root / "hf"), str(root / "tp1"), n=1)
        split(str(root / "hf"), str(root / "tp2"), n=2)
        out[family] = (hf, root)
    return out


def hf_reference(hf, tokens):
    """Each row alone, unpadded: what the padded batch must reproduce at its real positions."""
    with torch.no_grad():
        logits = [hf(tokens[b:b + 1, :n]).logits[0] for b, n in enumerate(LENGTHS)]
        hidden = hf(tokens[:1, :LENGTHS[0]], output_hidden_states=True).hidden_states
    return logits, [h[0] for h in hidden]


def assert_matches_hf(logits, hidden, reference):
    ref_logits, ref_hidden = reference
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(logits[b, :n], ref_logits[b], atol=ATOL, rtol=0)
    assert len(hidden) == len(ref_hidden)
    for ours, ref in zip(hidden, ref_hidden):
        torch.testing.assert_close(ours[0, :LENGTHS[0]], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_logits_and_hidden_states_equal_transformers(checkpoints, family):
    setup()
    hf, root = checkpoints[family]
    model = load_model(str(root / "tp1"), max_seq_len=32, max_batch_size=4)
    tokens = batch()
    with torch.no_grad():
        logits, hidden = model(tokens, return_hidden=True)
    assert logits.shape == (3, 12, 128)
    assert_matches_hf(logits, hidden, hf_reference(hf, tokens))


def _tp2_forward(dirs, tokens):
    setup(tp_size=2)
    out = {}
    for family, d in dirs.items():
        model = load_model(d, max_seq_len=32, max_batch_size=4)
        with torch.no_grad():
            logits, hidden = model(tokens, return_hidden=True)
        out[family] = {"logits": logits, "hidden": hidden}
    try:  # 3 heads cannot be split over 2 ranks
        Transformer(ModelArgs(dim=48, n_layers=1, n_heads=3, vocab_size=128, hidden_dim=96))
        out["head_error"] = "no error"
    except ValueError as e:
        out["head_error"] = str(e)
    return out


def test_tp2_logits_and_hidden_states_equal_transformers(checkpoints):
    tokens = batch()
    dirs = {f: str(root / "tp2") for f, (_, root) in checkpoints.items()}
    ranks = run_distributed(_tp2_forward, 2, dirs, tokens)
    for family, (hf, _) in checkpoints.items():
        reference = hf_reference(hf, tokens)
        for rank in ranks:  # full-vocabulary logits on every rank
            assert_matches_hf(rank[family]["logits"], rank[family]["hidden"], reference)
    assert all("n_heads=3 is not divisible by the tensor-parallel size 2" in r["head_error"] for r in ranks)


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
def test_cached_prefill_then_decode_equals_full_forward(family):
    """start_pos > 0 with S > 1 and S = 1, past the sliding window: the cache path sees what the full pass sees."""
    setup()
    model = ours_from_hf(tiny_hf_model(family), max_seq_len=32, max_batch_size=4)
    tokens = torch.randint(3, 128, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :6], start_pos=0, use_cache=True), model(tokens[:, 6:10], start_pos=6, use_cache=True)]
        parts += [model(tokens[:, t:t + 1], start_pos=t, use_cache=True) for t in range(10, 12)]
        # the static-shape step: tensor positions, the whole cache read under a mask
        parts += [model(tokens[:, t:t + 1], start_pos=torch.tensor(t), use_cache=True) for t in range(12, 14)]
        model.flush_cache()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)


def test_static_step_ignores_stale_cache_and_honours_the_key_mask():
    """Positions past start_pos hold another sequence's keys; left padding masks the first columns."""
    setup()
    model = ours_from_hf(tiny_hf_model("llama"), max_seq_len=16, max_batch_size=2)
    tokens = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 16)), start_pos=0, use_cache=True)  # fills every position
        model(tokens[:, :7], start_pos=0, use_cache=True)
        static = model(tokens[:, 7:], start_pos=torch.tensor(7), use_cache=True)
        model.flush_cache()
        full = model(tokens)[:, 7:]
        key_mask = torch.ones(2, 16, dtype=torch.bool)
        key_mask[1, :3] = False  # row 1: three padding tokens first
        model(tokens[:, :7], start_pos=0, use_cache=True, key_mask=key_mask[:, :7])
        padded = model(tokens[:, 7:], start_pos=torch.tensor(7), use_cache=True, key_mask=key_mask)
        model.flush_cache()
        unpadded = model(tokens[1:, 3:])[:, -1]
    torch.testing.assert_close(static, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1:, -1], unpadded, atol=ATOL, rtol=0)


def test_static_step_after_an_uninitialised_cache_reads_no_garbage():
    """The eager path allocates its cache uninitialised; a static step reads every position (masked, 0 * NaN = NaN)."""
    setup()
    model = ours_from_hf(tiny_hf_model("llama"), max_seq_len=16, max_batch_size=2)
    tokens = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.allocate_cache(torch.float32, "cpu", zeros=False)
            layer.attention.cache_k.fill_(float("nan"))
            layer.attention.cache_v.fill_(float("nan"))
        model(tokens[:, :7], start_pos=0, use_cache=True)
        static = model(tokens[:, 7:], start_pos=torch.tensor(7), use_cache=True)
        model.flush_cache()
        full = model(tokens)[:, 7:]
    torch.testing.assert_close(static, full, atol=ATOL, rtol=0)


def test_cache_overflow_is_a_clear_error():
    setup()
    model = ours_from_hf(tiny_hf_model("llama"), max_seq_len=8, max_batch_size=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, 9, dtype=torch.long), use_cache=True)


def test_meta_ffn_width_rule_and_registry():
    assert ModelArgs(dim=4096).hidden_dim == 11008  # LLaMA-7B
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096).hidden_dim == 28672
    from common.model import model_args
    assert model_args("lora-llama-1-7b", lora_rank=8).norm_eps == 1e-6
    assert model_args("llama-2-7b").norm_eps == 1e-5
    with pytest.raises(ValueError, match="lora_rank"):
        model_args("lora-llama-1-7b")
    with pytest.raises(ValueError, match="unknown model_type"):
        model_args("llama-9-1b")


def test_bfloat16_model_with_fp32_adapters_tracks_float32(checkpoints):
    setup()
    _, root = checkpoints["llama"]
    tokens = batch()
    reference = load_model(str(root / "tp1"), max_seq_len=32, max_batch_size=4)(tokens)
    low = load_model(str(root / "tp1"), dtype="bfloat16", lora_rank=4, max_seq_len=32, max_batch_size=4)
    assert low.tok_embeddings.weight.dtype == torch.bfloat16 and low.lora_a_output.weight.dtype == torch.float32
    logits = low(tokens)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hidden_of_the_computed_positions_equals_transformers(checkpoints, family):
    """The training path: each row's positions < its length, packed, through every layer (mistral's window is
    shorter than the rows) -> the final-normed states transformers gives each row alone, 0 after; the head on
    them gives transformers' logits."""
    setup()
    hf, root = checkpoints[family]
    model = load_model(str(root / "tp1"), max_seq_len=32, max_batch_size=4)
    tokens = batch()
    lengths = [10, 7, 0]  # shorter than a row (its end is never read), a whole row, an empty row
    hidden = model.hidden(tokens, lengths=lengths)
    assert hidden.shape == (3, 12, 64)
    ref_logits, _ = hf_reference(hf, tokens)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            ref_hidden = hf(tokens[b:b + 1, :n], output_hidden_states=True).hidden_states[-1][0] if n else None
        if n:
            torch.testing.assert_close(hidden[b, :n], ref_hidden, atol=ATOL, rtol=0)
            torch.testing.assert_close(model.head(hidden[b, :n]), ref_logits[b][:n], atol=ATOL, rtol=0)
        assert not hidden[b, n:].any()
