"""RWKV-6 ("Finch", x060) blocks in plain PyTorch and the hybrid student: a transformers Llama whose listed
decoder layers are replaced by RWKV blocks initialised from the teacher's weights (spec §1, §2).

    student = build_hybrid(teacher, layers=[0, 2, 4], mode="block")   # or "llama_ffn", "att_only"
    logits = student(input_ids).logits                                # chunked wkv6 (training form)
    state = {}                                                         # recurrent form: per-layer cache
    student(ids[:, :1], rwkv_state=state); student(ids[:, 1:2], rwkv_state=state) ...

The RWKV state of a layer is (att_shift [B, d], wkv [B, H, N, N], ffn_shift [B, d]), overwritten each call
(as the original's HybridCache); kept attention layers use transformers' own KV cache.
"""
import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.cli import UserError

MODES = ("block", "llama_ffn", "att_only")


# ---------------------------------------------------------------------------------------------------------
# The RWKV-6 recurrence (spec §2.1, §2.4). Shapes: r, k, v, log_decay [B, T, H, N]; u [H, N]; S [B, H, N, N]
# with rows = key channels and columns = value channels.
#   y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t

def wkv6(r, k, v, log_decay, u, state=None, *, chunk_len: int = 32):
    """Chunked parallel form of the RWKV-6 recurrence; returns (y [B, T, H, N], S after the last position).

    Inside a chunk starting from S0, with A_t = sum_{m<=t} log_decay_m (spec §2.4):
      y_t = (r_t * e^{A_{t-1}}) S0 + sum_{s<t} (sum_c r_tc e^{A_{t-1,c} - A_sc} k_sc) v_s + (r_t . u k_t) v_t
    The exponent differences are formed directly (all <= 0 where used), never as e^A * e^-A.
    Computed in fp32; y is returned in the input dtype, the state in fp32.
    """
    B, T, H, N = r.shape
    dtype = r.dtype
    r, k, v, w = (t.float().transpose(1, 2) for t in (r, k, v, log_decay))  # [B, H, T, N]
    u = u.float()[None, :, None, :]
    S = r.new_zeros(B, H, N, N) if state is None else state.float()
    ys = []
    for start in range(0, T, chunk_len):
        rc, kc, vc, wc = (t[:, :, start:start + chunk_len] for t in (r, k, v, w))
        C = rc.shape[2]
        A = wc.cumsum(2)                      # A_t
        A_prev = A - wc                       # A_{t-1}
        y = (rc * A_prev.exp()) @ S
        diff = A_prev[:, :, :, None, :] - A[:, :, None, :, :]                  # [B, H, t, s, N]
        below = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)    # s < t
        diff = diff.masked_fill(~below[:, :, None], float("-inf"))
        att = (rc[:, :, :, None, :] * diff.exp() * kc[:, :, None, :, :]).sum(-1)  # [B, H, t, s]
        y = y + att @ vc + (rc * u * kc).sum(-1, keepdim=True) * vc
        A_last = A[:, :, -1:, :]                                                 # [B, H, 1, N]
        S = A_last.transpose(-1, -2).exp() * S + (kc * (A_last - A).exp()).transpose(-1, -2) @ vc
        ys.append(y)
    return torch.cat(ys, 2).transpose(1, 2).to(dtype), S


def wkv6_recurrent(r, k, v, log_decay, u, state=None):
    """The same recurrence one position at a time (generation); same signature and results as wkv6."""
    B, T, H, N = r.shape
    dtype = r.dtype
    r, k, v, w = (t.float() for t in (r, k, v, log_decay))
    u = u.float()[None, :, :, None]
    S = r.new_zeros(B, H, N, N) if state is None else state.float()
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                           # k_t^T v_t  [B, H, N, N]
        ys.append((r[:, t, :, None, :] @ (S + u * kv)).squeeze(2))
        S = w[:, t].exp()[..., None] * S + kv
    return torch.stack(ys, 1).to(dtype), S


def _fla_wkv6(r, k, v, log_decay, u, state):
    """flash-linear-attention's chunked kernel (CUDA only, opt-in with RWKV_WKV=fla), on our [B, T, H, N]
    tensors. Its layout changed across fla versions, so it is chosen from the signature: `head_first` given
    explicitly where the function takes it (its default flipped from True to False); versions with `cu_seqlens`
    but no `head_first` take [B, T, H, N] only (0.5 raises on head_first); the oldest (RWKVinLLAMA's vendored
    copy) take [B, H, T, N] only."""
    import inspect

    from fla.ops.rwkv6 import chunk_rwkv6
    params = inspect.signature(chunk_rwkv6).parameters
    kw = dict(scale=1.0, initial_state=state, output_final_state=True)
    if "head_first" in params:
        return chunk_rwkv6(r, k, v, log_decay, u, head_first=False, **kw)
    if "cu_seqlens" in params:
        return chunk_rwkv6(r, k, v, log_decay, u, **kw)
    y, S = chunk_rwkv6(*(t.transpose(1, 2) for t in (r, k, v, log_decay)), u, **kw)
    return y.transpose(1, 2), S


# ---------------------------------------------------------------------------------------------------------
# Time-mix and channel-mix (RWKV_Tmix_x060, RWKV_CMix_x060)

@dataclass
class RWKVArgs:
    n_embd: int
    dim_ffn: int
    n_layer: int                # the teacher's layer count (sets the layer-dependent initialisation)
    head_size: int = 64         # head_size_a
    head_size_divisor: int = 8
    dropout: float = 0.0
    chunk_len: int = 32
    grad_cp: bool = False

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def mix_extra_dim(self) -> int:      # TIME_MIX_EXTRA_DIM
        return 64 if self.n_embd == 4096 else 32

    @property
    def decay_extra_dim(self) -> int:    # TIME_DECAY_EXTRA_DIM
        return 128 if self.n_embd == 4096 else 64


def _ratios(layer_id: int, n_layer: int):
    return layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer


def _token_shift(x, shift):
    """x_{t-1} - x_t, with x_{-1} = the cached last input (or zeros); also returns the new cached input."""
    prev = torch.zeros_like(x[:, :1]) if shift is None else shift[:, None].to(x.dtype)
    return torch.cat([prev, x[:, :-1]], 1) - x, x[:, -1]


class TimeMix(nn.Module):
    """RWKV-6 time-mix (spec §2.1); default initialisation as BlinkDL x060 (spec §2.3)."""

    def __init__(self, args: RWKVArgs, layer_id: int):
        super().__init__()
        d, E, E2 = args.n_embd, args.mix_extra_dim, args.decay_extra_dim
        if d % args.head_size:
            raise UserError(f"hidden size {d} is not a multiple of head_size {args.head_size}; pass a head_size "
                            "that divides it")
        self.n_head, self.head_size, self.chunk_len = args.n_head, args.head_size, args.chunk_len
        rho0, rho1 = _ratios(layer_id, args.n_layer)
        e = (torch.arange(d, dtype=torch.float32) / d)[None, None]
        self.time_maa_x = nn.Parameter(1.0 - e ** rho1)
        self.time_maa_w = nn.Parameter(1.0 - e ** rho1)
        self.time_maa_k = nn.Parameter(1.0 - e ** rho1)
        self.time_maa_v = nn.Parameter(1.0 - (e ** rho1 + 0.3 * rho0))
        self.time_maa_r = nn.Parameter(1.0 - e ** (0.5 * rho1))
        self.time_maa_g = nn.Parameter(1.0 - e ** (0.5 * rho1))
        self.time_maa_w1 = nn.Parameter(torch.empty(d, 5 * E).uniform_(-1e-4, 1e-4))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, E, d).uniform_(-1e-4, 1e-4))
        n = torch.arange(d, dtype=torch.float32) / (d - 1)
        self.time_decay = nn.Parameter((-6 + 5 * n ** (0.7 + 1.3 * rho0))[None, None])      # w_0
        self.time_decay_w1 = nn.Parameter(torch.empty(d, E2).uniform_(-1e-4, 1e-4))
        self.time_decay_w2 = nn.Parameter(torch.empty(E2, d).uniform_(-1e-4, 1e-4))
        zigzag = ((torch.arange(d) + 1) % 3 - 1) * 0.1
        self.time_faaaa = nn.Parameter((rho0 * (1 - n) + zigzag).reshape(self.n_head, self.head_size))  # u
        self.receptance = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, d, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, d, eps=1e-5 * args.head_size_divisor ** 2)

    def forward(self, x, state=None):
        """x [B, T, d]; state (att_shift, wkv) or None -> (out [B, T, d], new state)."""
        B, T, d = x.shape
        shift, S = (None, None) if state is None else state
        dx, new_shift = _token_shift(x, shift)
        xxx = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(xxx, self.time_maa_w2).view(5, B, T, d).unbind(0)
        xw = x + dx * (self.time_maa_w + mw)
        xk = x + dx * (self.time_maa_k + mk)
        xv = x + dx * (self.time_maa_v + mv)
        xr = x + dx * (self.time_maa_r + mr)
        xg = x + dx * (self.time_maa_g + mg)
        heads = (B, T, self.n_head, self.head_size)
        r, k, v = self.receptance(xr).view(heads), self.key(xk).view(heads), self.value(xv).view(heads)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_decay = -w.float().exp().view(heads)
        if T == 1:
            y, S = wkv6_recurrent(r, k, v, log_decay, self.time_faaaa, S)
        elif x.is_cuda and os.environ.get("RWKV_WKV") == "fla":
            y, S = _fla_wkv6(r, k, v, log_decay, self.time_faaaa, S)
        else:
            y, S = wkv6(r, k, v, log_decay, self.time_faaaa, S, chunk_len=self.chunk_len)
        y = self.ln_x(y.reshape(B * T, d)).view(B, T, d)
        return self.output(y * g), (new_shift, S)


class ChannelMix(nn.Module):
    """RWKV-6 channel-mix (spec §2.2): sigma(W_r x_r) * W_v(relu(W_k x_k)^2)."""

    def __init__(self, args: RWKVArgs, layer_id: int):
        super().__init__()
        _, rho1 = _ratios(layer_id, args.n_layer)
        e = (torch.arange(args.n_embd, dtype=torch.float32) / args.n_embd)[None, None]
        self.time_maa_k = nn.Parameter(1.0 - e ** rho1)
        self.time_maa_r = nn.Parameter(1.0 - e ** rho1)
        self.key = nn.Linear(args.n_embd, args.dim_ffn, bias=False)
        self.receptance = nn.Linear(args.n_embd, args.n_embd, bias=False)
        self.value = nn.Linear(args.dim_ffn, args.n_embd, bias=False)

    def forward(self, x, shift=None):
        dx, new_shift = _token_shift(x, shift)
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * self.value(k), new_shift


class LlamaFFN(nn.Module):
    """The teacher's (frozen) SwiGLU MLP in the channel-mix slot (is_llama_ffn); keeps no token shift."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, shift=None):
        return self.mlp(x), shift


# ---------------------------------------------------------------------------------------------------------
# Replacement layers. Both take the decoder-layer call of transformers' LlamaModel and read/write their
# recurrent state in the `rwkv_state` dict passed through the model's kwargs (None in training).

class RWKVBlock(nn.Module):
    """x = x + TimeMix(LN1(x)); x = x + ChannelMix(LN2(x)) with fresh LayerNorms; ln0 on layer 0 (spec §1.1)."""

    def __init__(self, args: RWKVArgs, layer_id: int, ffn: Optional[nn.Module] = None):
        super().__init__()
        d = args.n_embd
        self.layer_id, self.grad_cp = layer_id, args.grad_cp
        self.ln0 = nn.LayerNorm(d) if layer_id == 0 else None
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = TimeMix(args, layer_id)
        self.ffn = ChannelMix(args, layer_id) if ffn is None else ffn
        self.drop0, self.drop1 = nn.Dropout(args.dropout), nn.Dropout(args.dropout)

    def _forward(self, x, att_state, ffn_shift):
        if self.ln0 is not None:
            x = self.ln0(x)
        a, att_state = self.att(self.ln1(x), att_state)
        x = self.drop0(x + a)
        f, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return self.drop1(x + f), att_state, ffn_shift

    def forward(self, hidden_states, *args, rwkv_state: Optional[dict] = None, **kwargs):
        att_state, ffn_shift = None, None
        if rwkv_state is not None and self.layer_id in rwkv_state:
            att_shift, wkv, ffn_shift = rwkv_state[self.layer_id]
            att_state = (att_shift, wkv)
        if self.grad_cp and self.training and torch.is_grad_enabled():
            x, att_state, ffn_shift = checkpoint(self._forward, hidden_states, att_state, ffn_shift,
                                                 use_reentrant=False)
        else:
            x, att_state, ffn_shift = self._forward(hidden_states, att_state, ffn_shift)
        if rwkv_state is not None:
            rwkv_state[self.layer_id] = tuple(None if t is None else t.detach() for t in (*att_state, ffn_shift))
        return x


class TimeMixAttention(nn.Module):
    """The RWKV-6 time-mix in a LlamaDecoderLayer's self_attn slot (is_rwkv_att_only): ignores the mask,
    positions and KV cache; returns (out, None) as LlamaAttention does."""

    def __init__(self, args: RWKVArgs, layer_id: int):
        super().__init__()
        self.layer_id, self.grad_cp = layer_id, args.grad_cp
        self.att = TimeMix(args, layer_id)

    def forward(self, hidden_states, *args, rwkv_state: Optional[dict] = None, **kwargs):
        state = None if rwkv_state is None else rwkv_state.get(self.layer_id)
        if self.grad_cp and self.training and torch.is_grad_enabled():
            out, state = checkpoint(self.att, hidden_states, state, use_reentrant=False)
        else:
            out, state = self.att(hidden_states, state)
        if rwkv_state is not None:
            rwkv_state[self.layer_id] = tuple(t.detach() for t in state)
        return out, None


# ---------------------------------------------------------------------------------------------------------
# Initialisation from the teacher (spec §1.2) and the hybrid student

def _copy_attention(att: TimeMix, attn: nn.Module, n_share: int, kv_layout: str) -> None:
    """receptance <- q_proj, key/value <- k_proj/v_proj widened to d, output <- o_proj (HF rotate-half rows)."""
    with torch.no_grad():
        att.receptance.weight.copy_(attn.q_proj.weight)
        for dst, src in ((att.key, attn.k_proj), (att.value, attn.v_proj)):
            w = src.weight
            if kv_layout == "tile":  # [kv0..kv7, kv0..kv7, ...]: query head h pairs with KV head h mod n_kv
                w = w.repeat(n_share, 1)
            else:  # query head h pairs with KV head h // n_share, as Llama's repeat_kv does
                w = w.view(-1, attn.head_dim, w.shape[1]).repeat_interleave(n_share, 0).reshape(-1, w.shape[1])
            dst.weight.copy_(w)
        att.output.weight.copy_(attn.o_proj.weight)


def rwkv_args_from(config, head_size: int = 64, dropout: float = 0.0, chunk_len: int = 32,
                   grad_cp: bool = False) -> RWKVArgs:
    return RWKVArgs(n_embd=config.hidden_size, dim_ffn=config.intermediate_size,
                    n_layer=config.num_hidden_layers, head_size=head_size, dropout=dropout, chunk_len=chunk_len,
                    grad_cp=grad_cp)


def check_layers(layers, n_layer: int, source: str = "RWKV.layers") -> list:
    layers = sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise UserError(f"{source}: layer index {bad} is outside the model (it has {n_layer} decoder layers, "
                        f"0..{n_layer - 1}); list only indices in that range")
    return layers


def build_hybrid(teacher, layers, mode: str = "block", *, head_size: int = 64, kv_layout: str = "tile",
                 dropout: float = 0.0, chunk_len: int = 32, grad_cp: bool = False):
    """A copy of the transformers Llama `teacher` with decoder layers `layers` replaced (spec §1.1):

    mode "block": full RWKV block (fresh LayerNorms, channel-mix from up/down_proj), trainable;
    mode "llama_ffn": RWKV block whose channel-mix is the teacher's LlamaMLP, frozen;
    mode "att_only": LlamaDecoderLayer kept, only self_attn swapped for the time-mix.
    Everything else (embeddings, kept layers, final norm, head) is a frozen copy of the teacher.
    kv_layout "tile" (original) or "interleave" (Llama's own query-to-KV pairing).
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {mode!r}")
    if kv_layout not in ("tile", "interleave"):
        raise UserError(f"kv_layout must be 'tile' or 'interleave', got {kv_layout!r}")
    config = teacher.config
    layers = check_layers(layers, config.num_hidden_layers)
    args = rwkv_args_from(config, head_size, dropout, chunk_len, grad_cp)
    n_share = config.num_attention_heads // config.num_key_value_heads
    student = copy.deepcopy(teacher)
    student.requires_grad_(False)
    student.config.rwkv_layers = layers
    student.config.rwkv_mode = mode
    # kept attention layers size their masks from a full-attention cache layer, never an RWKV one
    student.config.use_cache = False     # a cache is asked for explicitly (greedy_generate); all-RWKV has no KV
    student.config.layer_types = ["linear_attention" if i in layers else "full_attention"
                                  for i in range(config.num_hidden_layers)]
    for i in layers:
        old = student.model.layers[i]
        if mode == "att_only":
            new = TimeMixAttention(args, i)
            _copy_attention(new.att, old.self_attn, n_share, kv_layout)
            old.self_attn = new
            new.requires_grad_(True)
            continue
        ffn = LlamaFFN(old.mlp) if mode == "llama_ffn" else None
        new = RWKVBlock(args, i, ffn)
        _copy_attention(new.att, old.self_attn, n_share, kv_layout)
        if ffn is None:
            with torch.no_grad():
                new.ffn.key.weight.copy_(old.mlp.up_proj.weight)      # gate_proj is dropped
                new.ffn.value.weight.copy_(old.mlp.down_proj.weight)
        new.requires_grad_(True)
        if ffn is not None:
            ffn.requires_grad_(False)
        student.model.layers[i] = new.to(next(teacher.parameters()).dtype)
    return student


def rwkv_modules(model) -> list:
    """The replaced layers (RWKVBlock or TimeMixAttention) of a hybrid, in layer order."""
    return [m for m in model.model.modules() if isinstance(m, (RWKVBlock, TimeMixAttention))]


def all_hidden_states(model, input_ids, attention_mask=None, **kwargs):
    """(logits, hidden): hidden = cat(outputs of decoder layers 0..n-2, final-normed output) [n*B, L, D] —
    transformers' `hidden_states[1:]`, also for hybrids whose RWKV blocks its output hooks do not see."""
    outputs = []
    inner = getattr(model, "module", model).model           # through a DDP wrapper
    hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in inner.layers[:-1]]
    hooks.append(inner.norm.register_forward_hook(lambda m, a, o: outputs.append(o)))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, torch.cat(outputs, 0)


@torch.no_grad()
def greedy_generate(model, prompt_ids, max_new_tokens: int, eos_id: Optional[int] = None) -> list:
    """Greedy decoding of one prompt through the recurrent path: the prompt is read once (chunked form),
    then one token per step with the RWKV state cache and transformers' KV cache for kept attention layers."""
    from transformers import DynamicCache

    has_attention = any(t == "full_attention" for t in getattr(model.config, "layer_types", ["full_attention"]))
    cache = DynamicCache(config=model.config) if has_attention else None
    state: dict = {}
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=next(model.parameters()).device)[None]
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    logits = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=has_attention, rwkv_state=state).logits
    out = []
    for _ in range(max_new_tokens):
        nxt = logits[0, -1].argmax()
        out.append(int(nxt))
        if eos_id is not None and out[-1] == eos_id:
            break
        pos = pos[:, -1:] + 1
        logits = model(input_ids=nxt.view(1, 1), position_ids=pos, cache=cache, use_cache=has_attention,
                       rwkv_state=state).logits
    return out


def head_size_for(hidden_size: int, preferred: int = 64) -> int:
    """head_size_a = 64 when it divides the hidden size, else the largest divisor below it (tiny models)."""
    return max(h for h in range(1, preferred + 1) if hidden_size % h == 0)
