"""LoRA: merged == unmerged, only adapters train, TP=2 adapter gradients equal TP=1's."""
import pytest
import torch

from common.checkpoint import hf_to_meta, merge_lora, shard_for_rank
from common.model import ModelArgs, Transformer, lora_scale, mark_only_lora_trainable, project
from common.parallel import layout, setup
from tests.common.hf_oracle import tiny_hf_model
from tests.distributed import run_distributed

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def full_lora_state(family="llama", rank=4, alpha=None, seed=0):
    """Base weights from a tiny HF model plus adapters with B != 0 (B = 0 at init would hide every bug)."""
    setup()
    hf = tiny_hf_model(family, seed=seed)
    args = ModelArgs.from_hf_config(hf.config.to_dict(), max_seq_len=32, max_batch_size=2, lora_rank=rank, lora_alpha=alpha)
    state = hf_to_meta(hf.state_dict(), args)
    model = Transformer(args)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.state_dict().items():
        if "lora_" in name:
            state[name] = torch.randn(p.shape, generator=g) * 0.3
    return args, state


def build(args, state):
    lay = layout()
    model = Transformer(args)
    model.load_state_dict(shard_for_rank(state, lay.tp_rank, lay.tp_size))
    return model


@pytest.mark.parametrize("family,alpha", [("llama", None), ("qwen2", 16.0), ("mixtral", None)])
def test_merged_equals_unmerged_logits(family, alpha):
    args, state = full_lora_state(family, alpha=alpha)
    tokens = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        unmerged = build(args, state)(tokens)
        base_args = ModelArgs(**{**vars(args), "lora_rank": -1, "lora_alpha": None})  # no adapters, no alpha
        merged = build(base_args, merge_lora(state, lora_scale(args.lora_rank, args.lora_alpha)))(tokens)
        base_only = build(base_args, {k: v for k, v in state.items() if "lora_" not in k})(tokens)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (base_only - unmerged).abs().max() > 1e-2  # the adapters matter


def test_adapters_on_all_seven_projections_and_the_head_only_they_train():
    setup()
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, lora_rank=4)
    model = Transformer(args)
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.0.{'attention' if t in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.lora_{ab}_{t}.weight"
                for t in TARGETS for ab in "ab"} | {"lora_a_output.weight", "lora_b_output.weight"}
    assert trainable == expected
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_b_" in n)  # B = 0 at init


def test_fp32_adapters_under_a_bf16_base():
    setup()
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=48, lora_rank=4)
    model = Transformer(args).to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1].startswith("lora_"):
            module.float()
    logits = model(torch.randint(0, 64, (1, 5)))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.layers[0].attention.lora_a_wq.weight.grad.dtype == torch.float32


def test_bf16_base_with_fp32_adapters_follows_the_fp32_formula():
    """The bf16 path runs the adapters' matmuls in bf16 on casts of their fp32 weights: y = W x + s B(A x) must
    still match the fp32 formula to bf16 rounding, with fp32 gradients that point the same way."""
    setup()
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=96, lora_rank=8, lora_alpha=16.0)
    model = Transformer(args)
    ffn = model.layers[0].feed_forward
    torch.nn.init.normal_(ffn.lora_b_w1.weight, std=0.2)  # B = 0 at init would hide a missing term
    ffn.w1.weight.data = ffn.w1.weight.data.to(torch.bfloat16)
    a, b, w = ffn.lora_a_w1.weight, ffn.lora_b_w1.weight, ffn.w1.weight
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    y = project(ffn, "w1", x, ffn.scale)
    assert y.dtype == torch.bfloat16
    a32, b32 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x32 = x.float()
    y32 = x32 @ w.float().T + lora_scale(args.lora_rank, args.lora_alpha) * (x32 @ a32.T) @ b32.T
    assert (y.float() - y32).abs().max() < 2e-2 * y32.abs().max()
    g = torch.randn_like(y32)
    (y.float() * g).sum().backward()
    (y32 * g).sum().backward()
    for got, want in ((a.grad, a32.grad), (b.grad, b32.grad)):
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def lora_grads(args, state, tokens, targets):
    model = build(args, state)
    mark_only_lora_trainable(model)
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _tp2_grads(args, state, tokens, targets):
    setup(tp_size=2)
    return lora_grads(args, state, tokens, targets)


def test_tp2_adapter_gradients_equal_tp1():
    args, state = full_lora_state("llama", alpha=8.0)
    tokens, targets = torch.randint(3, 128, (2, 9)), torch.randint(3, 128, (2, 9))
    reference = lora_grads(args, state, tokens, targets)
    ranks = run_distributed(_tp2_grads, 2, args, state, tokens, targets)
    for rank, grads in enumerate(ranks):
        expected = shard_for_rank(reference, rank, 2)
        assert grads.keys() == expected.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)
