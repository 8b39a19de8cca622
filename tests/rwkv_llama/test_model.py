"""rwkv_llama/model.py: the RWKV-6 recurrence in both forms against a step-by-step reference written here, and
the hybrid student against the transformers teacher."""
import pytest
import torch

from rwkv_llama.model import (RWKVBlock, TimeMixAttention, all_hidden_states, build_hybrid, greedy_generate,
                              wkv6, wkv6_recurrent)
from tests.tiny import tiny_model


def reference_wkv6(r, k, v, log_decay, u, state=None):
    """Spec §2.1 literally, per batch row, head and position, in float64."""
    B, T, H, N = r.shape
    r, k, v, w, u = (t.double() for t in (r, k, v, log_decay, u))
    S = torch.zeros(B, H, N, N, dtype=torch.float64) if state is None else state.double().clone()
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kv = torch.outer(k[b, t, h], v[b, t, h])                  # k_t^T v_t, rows = key channels
                y[b, t, h] = r[b, t, h] @ (S[b, h] + torch.diag(u[h]) @ kv)
                S[b, h] = torch.diag(w[b, t, h].exp()) @ S[b, h] + kv
    return y, S


def random_inputs(B=2, T=23, H=3, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_decay = -torch.exp(torch.randn(B, T, H, N, generator=g) - 1.0)   # -exp(w_t) <= 0
    u = torch.randn(H, N, generator=g) * 0.5
    state = torch.randn(B, H, N, N, generator=g)
    return r, k, v, log_decay, u, state


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_len", [1, 5, 16, 64])
def test_wkv6_chunked_and_recurrent_match_the_step_by_step_equations(with_state, chunk_len):
    r, k, v, w, u, s0 = random_inputs()          # T = 23 is not a multiple of 5 or 16
    s0 = s0 if with_state else None
    y_ref, s_ref = reference_wkv6(r, k, v, w, u, s0)
    y_c, s_c = wkv6(r, k, v, w, u, s0, chunk_len=chunk_len)
    y_r, s_r = wkv6_recurrent(r, k, v, w, u, s0)
    for y, s in ((y_c, s_c), (y_r, s_r)):
        torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_c, y_r, atol=1e-4, rtol=1e-4)


def test_wkv6_strong_decay_over_a_long_chunk_stays_finite():
    r, k, v, w, u, _ = random_inputs(T=64, seed=1)
    w = w * 40                                   # e^{-A} would overflow fp32 here
    y, s = wkv6(r, k, v, w, u, chunk_len=64)
    y_ref, s_ref = reference_wkv6(r, k, v, w, u)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    # |A| reaches ~1e3 here, so fp32 cumulative sums lose ~1e-4 in the exponent differences
    torch.testing.assert_close(y.double(), y_ref, atol=2e-3, rtol=2e-3)


def test_wkv6_state_carries_a_split_sequence():
    r, k, v, w, u, _ = random_inputs(T=20)
    y, s = wkv6(r, k, v, w, u, chunk_len=8)
    y1, s1 = wkv6(r[:, :7], k[:, :7], v[:, :7], w[:, :7], u, chunk_len=8)
    y2, s2 = wkv6(r[:, 7:], k[:, 7:], v[:, 7:], w[:, 7:], u, s1, chunk_len=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s, atol=1e-5, rtol=1e-5)


def test_hybrid_with_every_layer_kept_as_attention_equals_the_teacher():
    teacher = tiny_model("llama")
    student = build_hybrid(teacher, [], head_size=8)
    ids = torch.randint(4, 100, (2, 13))
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=0, rtol=0)


def test_all_hidden_states_equals_transformers_hidden_states_on_the_teacher():
    teacher = tiny_model("llama")
    ids = torch.randint(4, 100, (2, 9))
    logits, hidden = all_hidden_states(teacher, ids)
    out = teacher(ids, output_hidden_states=True)
    torch.testing.assert_close(hidden, torch.cat(out.hidden_states[1:], 0), atol=0, rtol=0)
    torch.testing.assert_close(logits, out.logits)


@pytest.mark.parametrize("layers", [[5], [-1], [0, 2]])
def test_a_layer_index_outside_the_model_is_a_clear_error(layers):
    with pytest.raises(ValueError, match=r"outside the model \(it has 2 decoder layers"):
        build_hybrid(tiny_model("llama"), layers, head_size=8)


@pytest.mark.parametrize("mode", ["block", "llama_ffn", "att_only"])
def test_modes_replace_the_listed_layers_and_train_only_the_rwkv_parts(mode):
    teacher = tiny_model("llama")
    student = build_hybrid(teacher, [1], mode, head_size=8)
    kept, replaced = student.model.layers
    assert type(kept) is type(teacher.model.layers[0])
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.1.") for n in trainable)
    if mode == "att_only":
        assert isinstance(replaced.self_attn, TimeMixAttention)
        assert all(".self_attn." in n for n in trainable)
    else:
        assert isinstance(replaced, RWKVBlock)
        assert any(".ffn." in n for n in trainable) == (mode == "block")
    # the teacher is untouched and frozen parts are bit-identical copies
    assert all(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight, atol=0, rtol=0)


@pytest.mark.parametrize("kv_layout", ["tile", "interleave"])
def test_time_mix_weights_are_copied_from_the_teacher_attention(kv_layout):
    teacher = tiny_model("llama")                 # 4 query heads of 8, 2 KV heads: n_share = 2
    student = build_hybrid(teacher, [0], head_size=8, kv_layout=kv_layout)
    att, attn, mlp = student.model.layers[0].att, teacher.model.layers[0].self_attn, teacher.model.layers[0].mlp
    k = attn.k_proj.weight.view(2, 8, 32)
    kv_heads = [0, 1, 0, 1] if kv_layout == "tile" else [0, 0, 1, 1]
    torch.testing.assert_close(att.key.weight.view(4, 8, 32), k[kv_heads], atol=0, rtol=0)
    torch.testing.assert_close(att.receptance.weight, attn.q_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(att.output.weight, attn.o_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(student.model.layers[0].ffn.key.weight, mlp.up_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(student.model.layers[0].ffn.value.weight, mlp.down_proj.weight, atol=0, rtol=0)
    assert student.model.layers[0].ln0 is not None


@pytest.mark.parametrize("layers,mode", [([0, 1], "block"), ([1], "block"), ([0], "llama_ffn"), ([1], "att_only")])
def test_token_by_token_recurrent_path_gives_the_chunked_logits(layers, mode):
    teacher = tiny_model("llama", num_hidden_layers=3)
    student = build_hybrid(teacher, layers, mode, head_size=8, chunk_len=4).eval()
    ids = torch.randint(4, 100, (1, 11))
    full = student(ids).logits
    from transformers import DynamicCache
    has_attention = len(layers) < 3
    cache = DynamicCache(config=student.config) if has_attention else None
    state, steps = {}, []
    for t in range(11):  # prompt of 3 read at once, then one token at a time
        a, b = (0, 3) if t == 0 else (t + 2, t + 3)
        if b > 11:
            break
        steps.append(student(ids[:, a:b], position_ids=torch.arange(a, b)[None], cache=cache,
                             use_cache=has_attention, rwkv_state=state).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_argmax_of_full_forwards():
    teacher = tiny_model("llama")
    student = build_hybrid(teacher, [0], head_size=8).eval()
    prompt = [3, 40, 41, 42]
    out = greedy_generate(student, prompt, 6)
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(student(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_gradient_checkpointing_gives_the_same_gradients():
    teacher = tiny_model("llama")
    ids = torch.randint(4, 100, (2, 10))
    grads = []
    for grad_cp in (False, True):
        torch.manual_seed(0)
        student = build_hybrid(teacher, [0, 1], head_size=8, grad_cp=grad_cp).train()
        student(ids).logits.square().mean().backward()
        grads.append([p.grad for p in student.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _fake_fla(monkeypatch, style):
    """A stand-in `fla.ops.rwkv6.chunk_rwkv6` with the signature and layout of one fla generation, computing
    with the reference recurrence: "vendored" (RWKVinLLAMA's copy: [B, H, T, N] only), "head_first" (the
    parameter, default True), "time_first" (0.5: [B, T, H, N] only, head_first refused)."""
    import sys
    import types

    def compute(r, k, v, w, u, initial_state, time_first):
        if not time_first:
            r, k, v, w = (t.transpose(1, 2) for t in (r, k, v, w))
        y, S = reference_wkv6(r, k, v, w, u, initial_state)
        return (y if time_first else y.transpose(1, 2)).float(), S.float()

    if style == "vendored":
        def chunk_rwkv6(r, k, v, g, u, scale=None, initial_state=None, output_final_state=False, checkpoint_level=0,
                        training=True):
            return compute(r, k, v, g, u, initial_state, time_first=False)
    elif style == "head_first":
        def chunk_rwkv6(r, k, v, g, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                        head_first=True):
            return compute(r, k, v, g, u, initial_state, time_first=not head_first)
    else:
        def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                        cu_seqlens_cpu=None, **kwargs):
            if "head_first" in kwargs:
                raise DeprecationWarning("head_first has been removed")
            return compute(r, k, v, w, u, initial_state, time_first=True)
    module = types.ModuleType("fla.ops.rwkv6")
    module.chunk_rwkv6 = chunk_rwkv6
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv6", module)


@pytest.mark.parametrize("style", ["vendored", "head_first", "time_first"])
def test_fla_call_passes_the_layout_each_fla_version_expects(monkeypatch, style):
    from rwkv_llama.model import _fla_wkv6

    _fake_fla(monkeypatch, style)
    r, k, v, log_decay, u, state = random_inputs(T=7, H=2, N=4)  # T != H, so a swapped layout cannot pass
    y, S = _fla_wkv6(r, k, v, log_decay, u, state)
    y_ref, S_ref = reference_wkv6(r, k, v, log_decay, u, state)
    torch.testing.assert_close(y, y_ref.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S, S_ref.float(), atol=1e-4, rtol=1e-4)
