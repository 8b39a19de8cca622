"""Checkpoints: read (.pth/.bin/.safetensors, Hugging Face folders), split / merge for tensor parallelism,
Hugging Face <-> Meta conversion, LoRA merging, export to a `from_pretrained` folder.

Native layout: a folder with `consolidated.00.pth ... consolidated.{n-1:02d}.pth` (one flat dict of tensors
per TP rank, Meta names), `params.json` (ModelArgs.checkpoint_dict) and the tokenizer files.
Every file is written atomically (temporary name, then rename); every read is tensors-only.
"""
import glob
import json
import math
import os
import re
import shutil
from typing import Optional

import torch

from common.cli import UserError
from common.io import DROPPED, atomic_save, atomic_write_json, load_shard, read_tensors, shard_paths  # noqa: F401
from common.model import ModelArgs

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
COLUMN = {"wq", "wk", "wv", "w1", "w3", "output"}  # split on the output dim (0)
ROW = {"wo", "w2"}  # split on the input dim (1)
REPLICATED = {"attention_norm", "ffn_norm", "norm", "gate"}


# ---------------------------------------------------------------------------- tensor-parallel split rules

def split_dim(name: str) -> Optional[int]:
    """The dim a parameter is split on across TP ranks (None: replicated). Matches whole name components."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    if module.startswith(("lora_a_", "lora_b_")):
        target, is_a = module[len("lora_a_"):], module.startswith("lora_a_")
        if target in COLUMN:  # A replicated, B column-parallel
            return None if is_a else 0
        if target in ROW:  # A row-parallel, B replicated
            return 1 if is_a else None
    elif module == "tok_embeddings":  # ParallelEmbedding splits the embedding dim
        return 1
    elif module in COLUMN:
        return 0
    elif module in ROW:
        return 1
    elif module in REPLICATED:
        return None
    raise ValueError(f"no tensor-parallel split rule for parameter {name!r}; is this a llama/mistral/qwen2/mixtral "
                     "checkpoint in Meta names (convert Hugging Face folders by passing the folder)?")


def check_divisible(state: dict, n: int, args: Optional[ModelArgs], source: str) -> None:
    if args is not None:
        for what, k in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
            if k % n:
                raise UserError(f"{source}: {what}={k} is not divisible by n={n}; valid n divide "
                                f"gcd(n_heads, n_kv_heads) = {math.gcd(args.n_heads, args.n_kv_heads)}")
    sizes = {name: t.shape[d] for name, t in state.items() if (d := split_dim(name)) is not None}
    bad = [(k, tuple(state[k].shape), split_dim(k)) for k, s in sizes.items() if s % n]
    if bad:
        g = math.gcd(*sizes.values())
        valid = [d for d in range(1, min(g, 64) + 1) if g % d == 0]
        name, shape, dim = bad[0]
        raise UserError(f"{source}: {name} of shape {shape} cannot be split in {n} along dim {dim}; valid n: {valid}")


def split_state_dict(state: dict, n: int, args: Optional[ModelArgs] = None, source: str = "checkpoint") -> list:
    """Full state dict -> n shards: equal contiguous chunks, chunk i for rank i."""
    state = {k: v for k, v in state.items() if not k.endswith(DROPPED)}
    check_divisible(state, n, args, source)
    shards = [{} for _ in range(n)]
    for name, t in state.items():
        d = split_dim(name)
        chunks = [t] * n if d is None else torch.chunk(t, n, dim=d)
        for shard, c in zip(shards, chunks):
            shard[name] = c.clone()
    return shards


def merge_state_dicts(shards: list) -> dict:
    """n shards -> full state dict (inverse of split_state_dict)."""
    merged = {}
    for name in shards[0]:
        d = split_dim(name)
        merged[name] = shards[0][name].clone() if d is None else torch.cat([s[name] for s in shards], dim=d)
    return merged


def shard_for_rank(state: dict, tp_rank: int, tp_size: int) -> dict:
    return {k: (v if (d := split_dim(k)) is None else torch.chunk(v, tp_size, dim=d)[tp_rank]).clone()
            for k, v in state.items()}


# ---------------------------------------------------------------------------- Hugging Face <-> Meta

def permute_hf_to_meta(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rotate-half pairs (i, i + hd/2) -> interleaved pairs (2i, 2i+1): W_meta[h*hd + 2i + c] = W_hf[h*hd + c*hd/2 + i]."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


HF_TO_META = [  # (HF pattern, Meta template); q/k get permuted afterwards
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attention.wq.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attention.wk.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attention.wv.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight", r"layers.\1.feed_forward.gate.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", r"layers.\1.feed_forward.experts.\2.\3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]


def is_hf_state_dict(state: dict) -> bool:
    return any(k.startswith("model.") or k == "lm_head.weight" for k in state)


def hf_to_meta(state: dict, args: ModelArgs) -> dict:
    """Rename Hugging Face llama/mistral/qwen2/mixtral weights and undo the rotate-half q/k row order."""
    out = {}
    for name, t in state.items():
        if name.endswith("inv_freq"):
            continue
        fused = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if fused:  # transformers 5 in-memory Mixtral layout: [E, 2F, D] (gate then up) and [E, D, F]
            i, kind = fused.groups()
            for j in range(t.shape[0]):
                prefix = f"layers.{i}.feed_forward.experts.{j}"
                if kind == "gate_up_proj":
                    out[f"{prefix}.w1.weight"], out[f"{prefix}.w3.weight"] = t[j].chunk(2, dim=0)
                else:
                    out[f"{prefix}.w2.weight"] = t[j]
            continue
        for pattern, template in HF_TO_META:
            if re.fullmatch(pattern, name):
                new = re.sub(pattern, template, name)
                break
        else:
            raise ValueError(f"unknown Hugging Face parameter {name!r} (supported: llama, mistral, qwen2, mixtral)")
        if ".attention.wq." in new:
            t = permute_hf_to_meta(t, args.n_heads, args.head_dim)
        elif ".attention.wk." in new:
            t = permute_hf_to_meta(t, args.n_kv_heads, args.head_dim)
        out[new] = t.contiguous()
    if "output.weight" not in out:  # tied embeddings (small Qwen2): lm_head is the embedding matrix
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


META_TO_HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}
META_TO_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def meta_to_hf(state: dict, args: ModelArgs) -> dict:
    """Inverse of hf_to_meta, in the names `save_pretrained` writes (per-expert Mixtral names)."""
    out = {}
    for name, t in state.items():
        moe = re.fullmatch(r"layers\.(\d+)\.feed_forward\.(gate\.weight|experts\.\d+\.w[123]\.weight)", name)
        layer = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if moe:
            out[f"model.layers.{moe.group(1)}.block_sparse_moe.{moe.group(2)}"] = t
        elif layer and layer.group(2) in META_TO_HF_LAYER:
            i, module, param = layer.groups()
            if module == "attention.wq":
                t = permute_meta_to_hf(t, args.n_heads, args.head_dim)
            elif module == "attention.wk":
                t = permute_meta_to_hf(t, args.n_kv_heads, args.head_dim)
            out[f"model.layers.{i}.{META_TO_HF_LAYER[module]}.{param}"] = t.contiguous()
        elif name in META_TO_HF_TOP:
            out[META_TO_HF_TOP[name]] = t
        else:
            raise ValueError(f"cannot export parameter {name!r} (merge LoRA first)")
    return out


def hf_config(args: ModelArgs, max_position_embeddings: int = 4096):
    import transformers
    common = dict(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                  num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                  vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                  tie_word_embeddings=args.tie_word_embeddings, max_position_embeddings=max_position_embeddings)
    if args.n_experts:
        return transformers.MixtralConfig(num_local_experts=args.n_experts, num_experts_per_tok=args.n_experts_per_tok,
                                          sliding_window=args.sliding_window, **common)
    if args.qkv_bias:
        return transformers.Qwen2Config(use_sliding_window=args.sliding_window is not None,
                                        sliding_window=args.sliding_window, **common)
    if args.sliding_window is not None:
        return transformers.MistralConfig(sliding_window=args.sliding_window, **common)
    if args.rope_scaling:
        common["rope_scaling"] = dict(args.rope_scaling)
        common["max_position_embeddings"] = max(max_position_embeddings, 2 * args.rope_scaling["original_max_position_embeddings"])
    return transformers.LlamaConfig(**common)


# ---------------------------------------------------------------------------- whole checkpoints

def read_hf_folder(folder: str) -> tuple:
    """(Meta-named full state dict, ModelArgs) from a Hugging Face model folder."""
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        args = ModelArgs.from_hf_config(json.load(f), path=config_path)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) or \
        sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        raise UserError(f"{folder} has config.json but no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for path in files:
        state.update(read_tensors(path))
    return hf_to_meta(state, args), args


def read_native(ckpt_dir: str) -> tuple:
    """(full state dict, ModelArgs or None) from one of our shard folders, merging its shards."""
    shards = [read_tensors(p) for p in shard_paths(ckpt_dir)]
    params = os.path.join(ckpt_dir, "params.json")
    args = ModelArgs.from_params_json(params) if os.path.exists(params) else None
    return merge_state_dicts(shards), args


def read_checkpoint(ckpt_file) -> tuple:
    """Any supported input -> (full Meta-named state dict, ModelArgs or None, folder holding tokenizer files).

    `ckpt_file`: an HF model folder, one of our shard folders, one weights file, or several (a list, or
    comma-separated). Several `consolidated.*` files are TP shards (concatenated); other files are parts of
    one state dict (united). HF-named weights need the config.json that sits beside them.
    """
    paths = ckpt_file if isinstance(ckpt_file, (list, tuple)) else str(ckpt_file).split(",")
    paths = [os.path.expanduser(p.strip()) for p in paths if p.strip()]
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        if os.path.exists(os.path.join(folder, "config.json")):
            state, args = read_hf_folder(folder)
        elif shard_paths(folder):
            state, args = read_native(folder)
        else:
            raise UserError(f"{folder} has neither config.json (Hugging Face) nor consolidated.*.pth shards")
        return state, args, folder
    folder = os.path.dirname(paths[0])
    names = [os.path.basename(p) for p in paths]
    if len(paths) > 1 and all(n.startswith("consolidated.") for n in names):
        order = sorted(paths, key=lambda p: int(os.path.basename(p).split(".")[1]))
        state = merge_state_dicts([read_tensors(p) for p in order])
    else:
        state = {}
        for p in paths:
            state.update(read_tensors(p))
    args = None
    if is_hf_state_dict(state):
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise UserError(f"{paths[0]} holds Hugging Face names; its config.json (needed for the q/k "
                            f"permutation) is not beside it at {config_path}. Pass the model folder instead")
        with open(config_path) as f:
            args = ModelArgs.from_hf_config(json.load(f), path=config_path)
        state = hf_to_meta(state, args)
    elif os.path.exists(os.path.join(folder, "params.json")):
        args = ModelArgs.from_params_json(os.path.join(folder, "params.json"))
    return state, args, folder


def write_checkpoint(shards: list, args: Optional[ModelArgs], save_path: str, tokenizer_from: Optional[str] = None) -> None:
    """consolidated.{i:02d}.pth per shard, params.json, tokenizer files. Everything is written into a sibling
    folder first and swapped in at the end, so a checkpoint already at save_path (the source itself, when
    re-splitting in place) stays whole until the new one is complete; its other files are carried over."""
    save_path = os.path.abspath(save_path)
    staging = f"{save_path}.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        for i, shard in enumerate(shards):
            atomic_save(shard, os.path.join(staging, f"consolidated.{i:02d}.pth"))
        if args is not None:
            atomic_write_json(args.checkpoint_dict(), os.path.join(staging, "params.json"))
        if tokenizer_from:
            copy_tokenizer_files(tokenizer_from, staging)
        if os.path.isdir(save_path):
            old = set(shard_paths(save_path)) | {os.path.join(save_path, "params.json")}
            for name in os.listdir(save_path):
                if os.path.join(save_path, name) not in old and not os.path.exists(os.path.join(staging, name)):
                    _link_or_copy(os.path.join(save_path, name), os.path.join(staging, name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, save_path)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links where the filesystem allows (no data copied), else a copy; folders recursively."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(src, dst)


def _swap_in(staging: str, save_path: str) -> None:
    """Put the complete folder `staging` at save_path. An existing save_path is renamed aside first and deleted
    only once the new folder is in place (a crash between the two renames leaves both on disk, as
    `save_path.old.PID` and `save_path.tmp.PID`)."""
    if not os.path.exists(save_path):
        os.replace(staging, save_path)
        return
    aside = f"{save_path}.old.{os.getpid()}"
    os.replace(save_path, aside)
    os.replace(staging, save_path)
    shutil.rmtree(aside)


def copy_tokenizer_files(src: str, dst: str) -> list:
    if os.path.isfile(src):  # a single tokenizer.model
        shutil.copy(src, os.path.join(dst, "tokenizer.model" if src.endswith(".model") else os.path.basename(src)))
        return [src]
    copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
    for f in copied:
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    return copied


def merge_lora(state: dict, scale: float = 1.0) -> dict:
    """W + scale * B @ A (fp32, cast back) for every adapted module; works on a full dict or on one TP shard."""
    out = {k: v for k, v in state.items() if "lora_" not in k}
    for name in state:
        m = re.fullmatch(r"(.*?)lora_a_(\w+)\.weight", name)
        if m:
            prefix, target = m.groups()
            a, b = state[name].float(), state[f"{prefix}lora_b_{target}.weight"].float()
            base = f"{prefix}{target}.weight"
            out[base] = (out[base].float() + scale * b @ a).to(out[base].dtype)
    return out


def export_hf(ckpt_dir: str, out_dir: str, lora_scale: float = 1.0) -> str:
    """One of our checkpoints (any shard count, LoRA merged if present) -> a `from_pretrained` folder."""
    state, args = read_native(ckpt_dir)
    if args is None:
        raise UserError(f"{ckpt_dir}/params.json is needed to export (it gives the head counts)")
    state = merge_lora(state, lora_scale)
    if args.vocab_size <= 0:
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    tied = args.tie_word_embeddings and torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    args.tie_word_embeddings = tied
    hf = meta_to_hf(state, args)
    if tied:
        del hf["lm_head.weight"]
    os.makedirs(out_dir, exist_ok=True)
    atomic_save(hf, os.path.join(out_dir, "model.safetensors"))
    copy_tokenizer_files(ckpt_dir, out_dir)
    # config.json last and atomically: from_pretrained needs it, so a folder is loadable only once it is complete
    atomic_write_json(json.loads(hf_config(args).to_json_string()), os.path.join(out_dir, "config.json"))
    return out_dir


def random_checkpoint(args: ModelArgs, seed: int = 0) -> dict:
    """A randomly initialised state dict in our layout (transformers' init, std 0.02), for tests and demos."""
    import transformers
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(args))
    return hf_to_meta(hf.state_dict(), args)
