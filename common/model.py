"""One tensor-parallel decoder for LLaMA-1/2/3, Mistral, Qwen2 and Mixtral, on fairscale layers.

Native layout: Meta parameter names and interleaved RoPE pairs, as the Meta reference `model.py`.
Hugging Face checkpoints are renamed and q/k-permuted into it by `common.checkpoint`.

Per layer: x (replicated) -> wq/wk/wv give this rank's heads -> attention -> wo all-reduce ->
w1/w3 this rank's FFN slice -> w2 all-reduce. Norms, residuals and the router are replicated.
LoRA adapters (fp32, B = 0 at init) sit beside every projection and the output head, laid out so
each TP shard merges on its own as W_shard + s * B_shard @ A_shard.
"""
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from fairscale.nn.model_parallel.mappings import (copy_to_model_parallel_region, gather_from_model_parallel_region,
                                                  reduce_from_model_parallel_region)
from torch import nn

from common.cli import UserError
from common.io import load_shard


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    vocab_size: int = 32000
    n_kv_heads: Optional[int] = None  # None: multi-head attention
    head_dim: Optional[int] = None  # None: dim // n_heads
    hidden_dim: Optional[int] = None  # FFN width; None: Meta's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # LLaMA-3.1 "llama3" frequency rescaling
    qkv_bias: bool = False  # Qwen2
    sliding_window: Optional[int] = None  # Mistral
    n_experts: int = 0  # Mixtral: > 0 makes every FFN a top-k mixture of experts
    n_experts_per_tok: int = 2
    tie_word_embeddings: bool = False  # recorded for export; `output` holds its own copy
    # runtime, not part of a checkpoint
    max_seq_len: int = field(default=2048, metadata={"runtime": True})
    max_batch_size: int = field(default=32, metadata={"runtime": True})
    lora_rank: int = field(default=-1, metadata={"runtime": True})
    lora_alpha: Optional[float] = field(default=None, metadata={"runtime": True})  # None: scale 1 (the original)
    lora_init: str = field(default="xavier_normal", metadata={"runtime": True})  # or "kaiming_uniform"
    lora_dtype: str = field(default="float32", metadata={"runtime": True})

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            hidden = int((self.ffn_dim_multiplier or 1.0) * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def checkpoint_dict(self) -> dict:
        """What params.json holds: the architecture, without runtime fields."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}

    @classmethod
    def from_params_json(cls, path: str, **runtime) -> "ModelArgs":
        try:
            with open(path) as f:
                params = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path} not found: a checkpoint folder needs params.json (write one with "
                            "`python -m common.checkpoint_split`, or pass --model_type)") from None
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise UserError(f"{path} is missing the field(s) {missing}; add them (Meta params.json names: dim, "
                            "n_layers, n_heads, n_kv_heads, vocab_size, norm_eps, ...)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known}, **runtime)

    @classmethod
    def from_hf_config(cls, config: dict, path: str = "config.json", **runtime) -> "ModelArgs":
        """Map a Hugging Face config.json (llama, mistral, qwen2, mixtral) to our fields."""
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
        missing = [k for k in required if k not in config]
        if missing:
            raise UserError(f"{path} is missing the field(s) {missing} that a llama/mistral/qwen2/mixtral config has")
        model_type = config.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2", "mixtral"):
            raise UserError(f"{path}: model_type {model_type!r} is not supported (llama, mistral, qwen2, mixtral)")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})  # transformers 5 / 4 names
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"{path}: rope type {rope_type!r} is not supported (default, llama3)")
        window = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            window = None
        return cls(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"), head_dim=config.get("head_dim"),
            vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            qkv_bias=model_type == "qwen2", sliding_window=window,
            n_experts=config.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            n_experts_per_tok=config.get("num_experts_per_tok", 2),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), **runtime)


# The seed's model types (values from each family's released params.json / config.json), plus tiny ones.
MODEL_TYPES = {
    "llama-1-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6),
    "llama-1-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6),
    "llama-1-33b": dict(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6),  # 52 heads: tp in {1, 2, 4}
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                       rope_theta=500000.0),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                         rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, sliding_window=4096),
    "mistral-7b-instruct-v0.2": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                                     rope_theta=1e6),
    "mixtral-8x7b-instruct-v0.1": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                                       rope_theta=1e6, n_experts=8, n_experts_per_tok=2),
    "qwen-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=151936, norm_eps=1e-6,
                    rope_theta=1e6, qkv_bias=True),
    "qwen-14b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13696, vocab_size=152064, norm_eps=1e-6,
                     rope_theta=1e6, qkv_bias=True),
    "qwen-72b": dict(dim=8192, n_layers=80, n_heads=64, hidden_dim=24576, vocab_size=152064, norm_eps=1e-6,
                     rope_theta=1e6, qkv_bias=True),
    # tests and demos
    "tiny-llama": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512),
    "tiny-mistral": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512, sliding_window=8),
    "tiny-qwen": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512, qkv_bias=True),
    "tiny-mixtral": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=512, n_experts=4),
}
for _name in ("qwen-7b", "qwen-14b", "qwen-72b"):
    MODEL_TYPES[_name + "-chat"] = MODEL_TYPES[_name]


def model_args(model_type: str, **runtime) -> ModelArgs:
    """Registry lookup; a `lora-` prefix names the same architecture trained with LoRA."""
    base = model_type[len("lora-"):] if model_type.startswith("lora-") else model_type
    if base not in MODEL_TYPES:
        raise UserError(f"unknown model_type {model_type!r}; known: {', '.join(MODEL_TYPES)} (optionally 'lora-' prefixed)")
    lora = runtime.get("lora_rank", -1) > 0
    if model_type.startswith("lora-") and not lora:
        raise UserError(f"model_type {model_type!r} needs --lora_rank > 0")
    if lora and not model_type.startswith("lora-"):
        raise UserError(f"lora_rank={runtime['lora_rank']} with model_type {model_type!r}: use 'lora-{model_type}' "
                        "for LoRA, or --lora_rank -1 for full fine-tuning")
    return ModelArgs(**MODEL_TYPES[base], **runtime)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling:  # LLaMA-3.1: long wavelengths divided by `factor`, a smooth ramp in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = (old_len / wavelen - low) / (high - low)
        ramp = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > old_len / low, freqs / factor, freqs)
        middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        freqs = torch.where(middle, ramp, freqs)
    return freqs


def rope_table(head_dim: int, end: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """[end, hd/2, 2]: cos and sin of each position's angle per frequency (fp32)."""
    angles = torch.outer(torch.arange(end, dtype=torch.float32), rope_frequencies(head_dim, theta, scaling))
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x [B, S, H, hd]; adjacent dims (2i, 2i+1) rotate as one complex number (Meta convention) by rope [S, hd/2, 2].
    Computed in fp32; the result in `dtype` (default x's)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # real arithmetic: inductor fuses it, and generates no code for complex ops
        (x0, x1), (cos, sin) = pairs.unbind(-1), rope[None, :, None].unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).to(dtype or x.dtype)
    # eager: one complex multiply, the fewest kernels per call
    rotated = torch.view_as_complex(pairs) * torch.view_as_complex(rope)[None, :, None]
    return torch.view_as_real(rotated).flatten(3).to(dtype or x.dtype)


def attention_mask(seq_len: int, start_pos, kv_len: int, sliding_window: Optional[int], device) -> torch.Tensor:
    """Bool [S, kv_len]: query i (absolute start_pos+i) sees key j iff j <= i and j > i - window."""
    q = (start_pos + torch.arange(seq_len, device=device))[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    allowed = k <= q
    if sliding_window:  # transformers: W keys including the query's own
        allowed &= k > q - sliding_window
    return allowed


# ---- LoRA: y = W x + s * B(A(x)), adapters in fp32 (lora_dtype); names lora_a_<target>, lora_b_<target> ----

def _lora_init(weight: torch.Tensor, how: str) -> torch.Tensor:
    if how == "xavier_normal":  # the paper-era original
        return nn.init.xavier_normal_(weight)
    if how == "kaiming_uniform":  # nn.Linear's default, used by the later framework
        return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    raise ValueError(f"lora_init must be 'xavier_normal' or 'kaiming_uniform', got {how!r}")


def add_lora(module: nn.Module, target: str, in_features: int, out_features: int, kind: str, args: ModelArgs):
    """Attach the A/B pair for `module.<target>`; `kind` is the base layer's parallel style.

    column (and the gathered output head): A replicated, B column-parallel -> B's shard pairs with W's rows.
    row: A row-parallel on the local input slice (its output all-reduced), B replicated.
    """
    r, dtype = args.lora_rank, getattr(torch, args.lora_dtype)
    init_a = lambda w: _lora_init(w, args.lora_init)  # noqa: E731 (fairscale inits the full matrix, keeps a slice)
    if kind == "row":
        a = RowParallelLinear(in_features, r, bias=False, input_is_parallel=True, init_method=init_a)
        b = nn.Linear(r, out_features, bias=False)
    else:
        a = nn.Linear(in_features, r, bias=False)
        init_a(a.weight.data)
        b = ColumnParallelLinear(r, out_features, bias=False, gather_output=False, init_method=nn.init.zeros_)
    nn.init.zeros_(b.weight)
    setattr(module, f"lora_a_{target}", a.to(dtype))
    setattr(module, f"lora_b_{target}", b.to(dtype))


def lora_scale(lora_rank: int, lora_alpha: Optional[float]) -> float:
    """The adapter's scale: 1 (the original) unless an alpha is given, then alpha / rank."""
    if lora_alpha is not None and not (lora_rank or 0) > 0:
        raise UserError(f"--lora_alpha {lora_alpha} needs the adapters' --lora_rank (> 0) to give the scale alpha / rank")
    return 1.0 if lora_alpha is None else float(lora_alpha) / int(lora_rank)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x). Without autograd the parallel layers run as plain matmuls (+ the all-reduce of a row-parallel
    one): fairscale's region functions are autograd Functions whose per-call cost dominates a decode step of a
    small model, and its reduce calls ctx.mark_dirty, which torch.compile cannot trace."""
    if torch.is_grad_enabled():
        return layer(x)
    if isinstance(layer, ColumnParallelLinear) and layer.gather_output:
        return layer(x)
    y = F.linear(x, layer.weight)  # column: this rank's output slice; row (input_is_parallel): a partial sum
    if isinstance(layer, RowParallelLinear) and fs_init.get_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(y, group=fs_init.get_model_parallel_group())
    return y if layer.bias is None else y + layer.bias


def project(module: nn.Module, target: str, x: torch.Tensor, scale: float) -> torch.Tensor:
    """module.<target>(x), plus the LoRA update s·B(A(x)) when the module has one."""
    adapters = module._modules  # a dict lookup: getattr on a missing submodule raises inside nn.Module (slow)
    y = linear(adapters[target], x)
    a = adapters.get(f"lora_a_{target}")
    if a is None:
        return y
    b = adapters[f"lora_b_{target}"]
    if not torch.is_grad_enabled():  # generation: small activations, cast them, keep the adapters in fp32
        return y + linear(b, scale * linear(a, x.to(a.weight.dtype))).to(y.dtype)
    # Training: the adapters' matmuls run in the activations' dtype on casts of their (fp32) weights (gradients
    # still reach the fp32 weights), and one in-place addmm adds s·(A x) Bᵀ into the base output. The parallel layout is
    # fairscale's: column, A replicated and its output's gradient summed over ranks; row, A's output all-reduced.
    low = F.linear(x, a.weight.to(x.dtype))
    low = (reduce_from_model_parallel_region if isinstance(a, RowParallelLinear) else copy_to_model_parallel_region)(low)
    y.flatten(0, -2).addmm_(low.flatten(0, -2), b.weight.to(x.dtype).t(), alpha=scale)  # in place: no copy of y
    return y


def _identity(w):
    return w  # base weights come from the checkpoint


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        tp = fs_init.get_model_parallel_world_size()
        self.args, self.scale = args, lora_scale(args.lora_rank, args.lora_alpha)
        self.n_local_heads, self.n_local_kv_heads = args.n_heads // tp, args.n_kv_heads // tp
        self.head_dim = args.head_dim
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        col = dict(gather_output=False, init_method=_identity, bias=args.qkv_bias)
        self.wq = ColumnParallelLinear(args.dim, q_out, **col)
        self.wk = ColumnParallelLinear(args.dim, kv_out, **col)
        self.wv = ColumnParallelLinear(args.dim, kv_out, **col)
        self.wo = RowParallelLinear(q_out, args.dim, bias=False, input_is_parallel=True, init_method=_identity)
        if args.lora_rank > 0:
            for t, n_in, n_out in (("wq", args.dim, q_out), ("wk", args.dim, kv_out), ("wv", args.dim, kv_out)):
                add_lora(self, t, n_in, n_out, "column", args)
            add_lora(self, "wo", q_out, args.dim, "row", args)
        self.cache_k = self.cache_v = None  # [max_batch, n_local_kv_heads, max_seq_len, head_dim]
        self.cache_finite = False  # every position holds a number (what a static step, reading them all, needs)

    def forward(self, x, rope, start_pos, use_cache: bool, mask: Optional[torch.Tensor], lengths=None):
        """lengths (a list): x [1, N, D] holds rows of these lengths one after another (`Transformer.hidden`)."""
        B, S, _ = x.shape
        q = project(self, "wq", x, self.scale).view(B, S, self.n_local_heads, self.head_dim)
        k = project(self, "wk", x, self.scale).view(B, S, self.n_local_kv_heads, self.head_dim)
        v = project(self, "wv", x, self.scale).view(B, S, self.n_local_kv_heads, self.head_dim)
        # Training on a CPU: attention in fp32 from RoPE on. PyTorch's CPU attention kernel is faster in fp32
        # than in bf16 (forward + backward at [4, 9, 224, 64]: 23 vs 31 ms of CPU time) and exact.
        training = torch.is_grad_enabled() and x.device.type == "cpu" and not use_cache
        dtype = torch.float32 if training else x.dtype
        q, k, v = apply_rotary_emb(q, rope, dtype), apply_rotary_emb(k, rope, dtype), v.to(dtype)
        if lengths is not None:
            out = self.attend_rows(q[0], k[0], v[0], lengths)
            return project(self, "wo", out.reshape(1, S, -1).to(x.dtype), self.scale)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, hd]
        if use_cache:
            if self.cache_k is None:
                self.allocate_cache(k.dtype, k.device, zeros=isinstance(start_pos, torch.Tensor))
            if isinstance(start_pos, torch.Tensor):  # static step: write at a tensor position, read the whole cache
                if not self.cache_finite:  # unwritten positions are masked, but 0 * NaN = NaN: zero them (once)
                    self.cache_k[:, :, int(start_pos) + S:] = 0
                    self.cache_v[:, :, int(start_pos) + S:] = 0
                    self.cache_finite = True
                # index_put_ on the whole cache: a write into the [:B] view would make torch.compile copy that view
                at = (torch.arange(B, device=x.device)[:, None, None], torch.arange(k.shape[1], device=x.device)[:, None],
                      start_pos + torch.arange(S, device=x.device))
                self.cache_k.index_put_(at, k)
                self.cache_v.index_put_(at, v)
                kv_len = self.args.max_seq_len
            else:
                self.cache_k[:B, :, start_pos:start_pos + S] = k
                self.cache_v[:B, :, start_pos:start_pos + S] = v
                kv_len = start_pos + S
            k, v = self.cache_k[:B, :, :kv_len], self.cache_v[:B, :, :kv_len]
        out = self.attend(q, k, v, mask)
        return project(self, "wo", out.transpose(1, 2).reshape(B, S, -1).to(x.dtype), self.scale)

    def allocate_cache(self, dtype, device, zeros: bool) -> None:
        """K/V caches [max_batch, n_local_kv_heads, max_seq_len, head_dim]. zeros for the static step, which reads
        unwritten positions (masked, but 0 * NaN = NaN); else uninitialised: a step reads only what was written,
        and memory is touched only where it is (zero-filling a whole cache per call cost a small batch 10 %)."""
        shape = (self.args.max_batch_size, self.n_local_kv_heads, self.args.max_seq_len, self.head_dim)
        make = torch.zeros if zeros else torch.empty
        self.cache_k, self.cache_v = make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device)
        self.cache_finite = zeros

    def attend_rows(self, q, k, v, lengths):
        """Causal attention within each row of packed q, k, v [N, H, hd] (rows of `lengths`, one after another):
        no padding computed, and each row's own positions."""
        window, out = self.args.sliding_window, []
        for q_row, k_row, v_row in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            n = q_row.shape[0]
            if n == 0:
                continue
            mask = attention_mask(n, 0, n, window, q.device) if window and n > window else None
            out.append(self.attend(q_row.transpose(0, 1)[None], k_row.transpose(0, 1)[None], v_row.transpose(0, 1)[None],
                                   mask)[0].transpose(0, 1))
        return torch.cat(out) if out else q.new_zeros(q.shape)  # every row empty: nothing to attend

    def attend(self, q, k, v, mask):
        """softmax(q kᵀ / √hd + mask) v on [B, H, S, hd]; causal without a mask. GQA: query head h reads KV head
        h // (n_heads / n_kv_heads); softmax accumulates in fp32."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=self.n_local_heads != self.n_local_kv_heads)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.scale = lora_scale(args.lora_rank, args.lora_alpha)
        self.w1 = ColumnParallelLinear(args.dim, args.hidden_dim, bias=False, gather_output=False, init_method=_identity)
        self.w3 = ColumnParallelLinear(args.dim, args.hidden_dim, bias=False, gather_output=False, init_method=_identity)
        self.w2 = RowParallelLinear(args.hidden_dim, args.dim, bias=False, input_is_parallel=True, init_method=_identity)
        if args.lora_rank > 0:
            add_lora(self, "w1", args.dim, args.hidden_dim, "column", args)
            add_lora(self, "w3", args.dim, args.hidden_dim, "column", args)
            add_lora(self, "w2", args.hidden_dim, args.dim, "row", args)

    def forward(self, x):
        h = F.silu(project(self, "w1", x, self.scale)) * project(self, "w3", x, self.scale)
        return project(self, "w2", h, self.scale)


class MoEFeedForward(nn.Module):
    """Mixtral: a replicated router picks the top-k experts per token; weights = softmax over those k logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.n_experts_per_tok
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args) for _ in range(args.n_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router = F.softmax(self.gate(x).float(), dim=-1)  # fp32, as transformers
        weights, chosen = router.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # Routing is identical on every TP rank (replicated router and input), so all ranks call the same
        # experts in the same order and each expert's w2 all-reduce lines up.
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        return out.view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, start_pos, use_cache, mask, lengths=None):
        h = x + self.attention(self.attention_norm(x), rope, start_pos, use_cache, mask, lengths)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        tp = fs_init.get_model_parallel_world_size()
        for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("hidden_dim", args.hidden_dim),
                        ("vocab_size", args.vocab_size), ("dim", args.dim)):
            if n % tp:
                raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {tp}; use a tp_size "
                                 f"that divides it")
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_identity)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, gather_output=False,
                                           init_method=_identity)
        if args.lora_rank > 0:
            add_lora(self, "output", args.dim, args.vocab_size, "column", args)
        self.scale = lora_scale(args.lora_rank, args.lora_alpha)
        # a plain attribute, not a buffer: Module.to(bfloat16) would round the angles' cos / sin
        self.rope = rope_table(args.head_dim, 2 * args.max_seq_len, args.rope_theta, args.rope_scaling)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, use_cache: bool = False,
                return_hidden: bool = False, gather_logits: bool = True, logits_to_keep: int = 0,
                key_mask: Optional[torch.Tensor] = None):
        """tokens [B, S] -> logits [B, S, V] (this rank's vocabulary slice if not gather_logits).

        With use_cache, K/V of these positions are written at [start_pos, start_pos + S) and attention reads
        the cache up to start_pos + S. return_hidden adds the transformers-convention hidden states:
        the embedding output, each layer's output, the last one replaced by the final-normed output.
        logits_to_keep=k computes the head for the last k positions only (generation needs one).
        key_mask [B, start_pos + S] (False on padding) lets left-padded rows ignore their padding; positions
        stay the shared columns, which RoPE does not mind (scores depend on position differences only).

        Static shapes (what torch.compile and CUDA graphs replay): with `start_pos` a 0-d long tensor
        (use_cache only) attention reads the whole cache, masked past start_pos + S, so every decode step
        has the same shapes; key_mask then has max_seq_len columns. The caller keeps start_pos + S in range.
        """
        B, S = tokens.shape
        static = isinstance(start_pos, torch.Tensor)
        if static and not use_cache:
            raise ValueError("a tensor start_pos is the static cached step: pass use_cache=True")
        if use_cache and (B > self.args.max_batch_size or (not static and start_pos + S > self.args.max_seq_len)):
            raise ValueError(f"batch {B} x positions {start_pos + S} exceed the cache "
                             f"({self.args.max_batch_size} x {self.args.max_seq_len}); raise max_batch_size / max_seq_len")
        h = self.tok_embeddings(tokens)
        if self.rope.device != tokens.device:
            self.rope = self.rope.to(tokens.device)
        rope = self.rope[start_pos + torch.arange(S, device=tokens.device)] if static else \
            self.rope[start_pos:start_pos + S]
        window = self.args.sliding_window
        kv_len = self.args.max_seq_len if static else start_pos + S
        needs_mask = static or (start_pos > 0 and S > 1) or (window is not None and start_pos + S > window)
        mask = attention_mask(S, start_pos, kv_len, window, tokens.device) if needs_mask or key_mask is not None else None
        if key_mask is not None:  # [B, 1, S, L]; a padding query sees itself, so no row is fully masked (NaN)
            own = torch.arange(kv_len, device=tokens.device)[None, :] == \
                (start_pos + torch.arange(S, device=tokens.device))[:, None]
            mask = (mask[None] & (key_mask[:, None, :].bool() | own[None]))[:, None]
        hidden = [h]
        for layer in self.layers:
            h = layer(h, rope, start_pos, use_cache, mask)
            hidden.append(h)
        h = self.norm(h)
        # contiguous: on a strided [B, 1, D] view matmul expands the head to [B, D, V] and copies it (seconds)
        logits = self.head(h[:, -logits_to_keep:].contiguous() if logits_to_keep else h)
        if gather_logits:
            logits = gather_from_model_parallel_region(logits)
        if return_hidden:
            hidden[-1] = h
            return logits, hidden
        return logits

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states -> this rank's vocabulary slice of the logits (LoRA included)."""
        return project(self, "output", h, self.scale)

    def head_logits(self, h: torch.Tensor):
        """The head as a `common.losses.HeadLogits` on the final-normed states h [B, S, D] (this rank's vocabulary
        slice; with LoRA the second term s·A(h) against B): a loss computes the logits of the rows it reads, in
        chunks, and sends their gradients on to h and the adapters."""
        from common.losses import HeadLogits  # losses does not import the model
        if not hasattr(self, "lora_a_output"):
            return HeadLogits(h, self.output.weight)
        with torch.autocast(h.device.type, dtype=h.dtype, enabled=h.dtype != self.lora_a_output.weight.dtype):
            low_rank = self.scale * F.linear(h, self.lora_a_output.weight)
        return HeadLogits((h, low_rank), (self.output.weight, self.lora_b_output.weight))

    def hidden(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training: the final-normed hidden states [B, S, D] that `head` reads, without the head (a loss computes
        it on the rows it reads, in chunks: see `head_logits`). Only positions < lengths[b] (default S) are
        computed, the rest are 0: under causal attention neither right padding nor anything after a row's last
        position a loss reads changes an earlier position. The computed positions run packed, one row after
        another ([1, N, D] through the projections, each row's own causal attention), at the positions forward
        gives them (0, 1, ...)."""
        B, S = tokens.shape
        if self.rope.device != tokens.device:
            self.rope = self.rope.to(tokens.device)
        lengths = torch.full((B,), S) if lengths is None else torch.as_tensor(lengths).cpu().clamp(0, S)
        keep = torch.arange(S)[None, :] < lengths[:, None]
        index = keep.flatten().nonzero().flatten().to(tokens.device)  # the computed positions: [N]
        h = self.tok_embeddings(tokens.flatten()[index][None])  # [1, N, D]
        rope = self.rope[index % S]  # each position's own angle
        for layer in self.layers:
            h = layer(h, rope, 0, False, None, lengths.tolist())
        h = self.norm(h)[0]
        return h.new_zeros(B * S, h.shape[-1]).index_copy(0, index, h).view(B, S, -1)

    def flush_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def load_model(ckpt_dir: str, model_type: Optional[str] = None, lora_rank: int = -1, dtype=None,
               max_seq_len: int = 2048, max_batch_size: int = 32, lora_alpha: Optional[float] = None,
               lora_init: str = "xavier_normal", device=None, params_file: Optional[str] = None) -> Transformer:
    """Build the model for this rank's TP slot and load its shard `consolidated.{tp_rank:02d}.pth`.

    The architecture comes from `params_file` (default `ckpt_dir/params.json`) when `model_type` is None, else
    from the registry.
    LoRA adapters (lora_rank > 0) are freshly initialised and the only trainable parameters.
    """
    from common.parallel import to_dtype
    runtime = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size, lora_rank=lora_rank,
                   lora_alpha=lora_alpha, lora_init=lora_init)
    if model_type is None:
        args = ModelArgs.from_params_json(params_file or os.path.join(ckpt_dir, "params.json"), **runtime)
    else:
        args = model_args(model_type, **runtime)
    state = load_shard(ckpt_dir, fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size())
    if args.vocab_size <= 0:  # Meta's llama-1/2 params.json leaves it to the tokenizer (-1)
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    dtype = to_dtype(dtype) if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    with torch.device(device):
        model = Transformer(args)
    model.to(dtype)
    for name, module in model.named_modules():  # adapters stay fp32 (lora_dtype) under an fp16/bf16 base
        if name.rsplit(".", 1)[-1].startswith("lora_"):
            module.to(getattr(torch, args.lora_dtype))
    load_state(model, state, os.path.join(ckpt_dir, f"consolidated.{fs_init.get_model_parallel_rank():02d}.pth"))
    if args.lora_rank > 0:
        mark_only_lora_trainable(model)
    return model


def load_state(model: Transformer, state: dict, source: str) -> None:
    """Strict load of base weights (LoRA adapters may be absent); errors list what is wrong."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and "lora_" not in k]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{source} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                        f"shape mismatches {wrong[:8]}. Check params.json / --model_type and that the shards were "
                        f"split for this tensor-parallel size")
    model.load_state_dict(state, strict=False)
