"""Per-GPU memory of the papers' settings under DDP, FSDP and FSDP with CPU offload, and which one each
script needs (`python -m common.memory_plan [--folder atkd] [--details]`).

Every setting of the folders' scripts/ (SETTINGS) is built from its models' published configs (CONFIGS: the
config.json fields that size a model) on the meta device: nothing is downloaded or allocated. Per GPU, at the
script's micro-batch, sequence length, accumulation and number of GPUs N:

    params       the student's fp32 master weights (every train.py loads it in fp32); FSDP: 1/N of them
    grads        fp32 gradients of the trainable weights; FSDP: 1/N
    optimizer    AdamW: two fp32 moments per trainable weight; Adafactor: factored second moments; FSDP: 1/N
    teacher      the frozen teacher in the dtype the script loads it in; FSDP: 1/N. A served teacher
                 (rwkv_llama's teacher servers) is not on the trainer: its outputs are (logits, hidden states)
    working      DDP: the gradient buckets (a flat copy of the gradients) and, under bf16 autocast, the bf16
                 weight copies autocast keeps for backward. FSDP: the gathered root (embeddings, head) and two
                 gathered blocks (the one running and the one prefetched) in the all-gather dtype, for student
                 and teacher, plus the unsharded fp32 gradients accumulated between micro-batches (accumulation
                 > 1; offload reduces every micro-batch instead)
    activations  the tensors saved for backward: per token and layer what transformers' blocks save (ACTIVATION,
                 counted with torch.autograd.graph.saved_tensors_hooks: tests/common/test_memory_plan.py checks
                 the count against a small model), plus the loss's logits; with gradient checkpointing each layer
                 keeps its input only, plus one layer recomputed at a time

FSDP + offload keeps params, grads, optimizer and teacher shards in CPU memory (shown as CPU GiB per GPU).
A mode fits where its total is at most 90 % of the GPU (the rest: CUDA context, allocator fragmentation,
communication buffers). Not counted: dropout masks, the generation KV caches of on-policy methods, the
contra_kd velocity field (small), temporaries of the unchunked loss beyond its inputs.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from common.cli import check_choice, run_cli

GiB = 2 ** 30

# Published config.json fields (Hugging Face hub model cards) of every model a script names.
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "opt-2.7b": dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "open_llama_3b_v2": dict(model_type="llama", hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                             max_position_embeddings=2048),
    "open_llama_7b_v2": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                             max_position_embeddings=2048),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "flan-t5-large": dict(model_type="t5", d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24,
                          num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False),
    "flan-t5-xl": dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                       num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False),
}
DISPLAY = {"gpt2": "GPT-2", "gpt2-medium": "GPT-2-medium", "gpt2-large": "GPT-2-large", "gpt2-xl": "GPT-2-XL",
           "opt-1.3b": "OPT-1.3B", "opt-2.7b": "OPT-2.7B", "opt-6.7b": "OPT-6.7B", "open_llama_3b_v2": "OpenLLaMA-3B",
           "open_llama_7b_v2": "OpenLLaMA-7B", "llama-2-7b": "LLaMA2-7B", "llama-2-13b": "LLaMA2-13B",
           "llama-3.1-8b": "Llama-3.1-8B", "flan-t5-large": "Flan-T5-large", "flan-t5-xl": "Flan-T5-XL"}


@dataclass
class Setting:
    script: str
    student: str                     # CONFIGS key
    teacher: Optional[str] = None    # CONFIGS key; None: no teacher
    gpus: int = 8
    batch: int = 1                   # per-GPU micro-batch (sequences)
    seq: tuple = (512,)              # (length,) or (encoder length, decoder length)
    accumulation: int = 1
    dtype: str = "float32"           # the student's compute dtype (bf16: autocast / FSDP bf16 all-gather)
    teacher_dtype: str = "float32"   # what the script loads the teacher in
    optimizer: str = "adamw"
    lora: int = 0                    # LoRA rank (peft's default targets); 0: full fine-tuning
    checkpointing: bool = False      # gradient checkpointing
    loss: str = "kd"                 # ce, kd (student and teacher logits), hidden (rwkv stage 1)
    served: bool = False             # the teacher runs in servers; the trainer receives its outputs (fp32)
    hybrid: bool = False             # rwkv_llama's student: every layer an RWKV-6 block, the rest frozen
    note: str = ""


SETTINGS = [
    Setting("atkd/scripts/distillation.sh", "opt-1.3b", "opt-6.7b", batch=1, seq=(512,), accumulation=2,
            dtype="bfloat16", teacher_dtype="bfloat16", checkpointing=True),
    Setting("atkd/scripts/distillation.sh", "opt-2.7b", "opt-6.7b", batch=1, seq=(512,), accumulation=2,
            dtype="bfloat16", teacher_dtype="bfloat16", checkpointing=True),
    Setting("atkd/scripts/distillation.sh", "llama-2-7b", "llama-2-13b", batch=1, seq=(512,), accumulation=2,
            dtype="bfloat16", teacher_dtype="bfloat16", checkpointing=True, note="LLaMA2 folders"),
    Setting("contra_kd/scripts/gpt2_sft_init.sh", "gpt2-xl", None, gpus=1, batch=4, accumulation=2, loss="ce",
            note="teacher SFT"),
    Setting("contra_kd/scripts/gpt2_baselines.sh", "gpt2", "gpt2-xl", gpus=1, batch=8, note="DistiLLM"),
    Setting("contra_kd/scripts/gpt2_baselines.sh", "gpt2", "gpt2-xl", gpus=1, batch=32,
            note="DistiLLM-2 (16 pairs)"),
    Setting("contra_kd/scripts/gpt2_contra.sh", "gpt2", "gpt2-xl", gpus=1, batch=16, note="DistiLLM+CONTRA"),
    Setting("contra_kd/scripts/llama_contra.sh", "open_llama_7b_v2", None, batch=16, dtype="bfloat16", lora=16,
            loss="ce", note="teacher SFT, openllama2"),
    Setting("contra_kd/scripts/llama_contra.sh", "open_llama_3b_v2", "open_llama_7b_v2", batch=16, dtype="bfloat16",
            lora=16, note="DistiLLM+CONTRA, openllama2"),
    Setting("contra_kd/scripts/llama_contra.sh", "llama-2-13b", None, batch=16, dtype="bfloat16", lora=16, loss="ce",
            note="teacher SFT, llama2"),
    Setting("contra_kd/scripts/llama_contra.sh", "llama-2-7b", "llama-2-13b", batch=16, dtype="bfloat16", lora=16,
            note="DistiLLM+CONTRA, llama2"),
    Setting("anli_reverse_kl/scripts/sft_teacher_xl.sh", "flan-t5-xl", None, batch=12, seq=(320, 350),
            accumulation=6, optimizer="adafactor", loss="ce"),
    Setting("anli_reverse_kl/scripts/sft_large.sh", "flan-t5-large", None, batch=12, seq=(320, 350),
            accumulation=6, optimizer="adafactor", loss="ce", note="also seqkd_large.sh"),
    Setting("anli_reverse_kl/scripts/kd_large.sh", "flan-t5-large", "flan-t5-xl", batch=12, seq=(320, 350),
            accumulation=6, optimizer="adafactor"),
    Setting("anli_reverse_kl/scripts/minillm_large_xl.sh", "flan-t5-large", "flan-t5-xl", batch=12, seq=(180, 180),
            accumulation=6),
    Setting("rwkv_llama/scripts/stage1_llama31_8b.sh", "llama-3.1-8b", "llama-3.1-8b", gpus=6, batch=3, seq=(2048,),
            dtype="bfloat16", checkpointing=True, loss="hidden", served=True, hybrid=True),
    Setting("rwkv_llama/scripts/stage2_llama31_8b.sh", "llama-3.1-8b", "llama-3.1-8b", gpus=6, batch=48, seq=(256,),
            accumulation=256, dtype="bfloat16", checkpointing=True, served=True, hybrid=True),
]
MODES = ("ddp", "fsdp", "fsdp_offload")


# ---------------------------------------------------------------------------- models on the meta device

def config_of(name_or_path):
    """A transformers config from a CONFIGS key or a model folder (config.json only; weights are not read)."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if name_or_path in CONFIGS:
        fields = dict(CONFIGS[name_or_path])
        return CONFIG_MAPPING[fields.pop("model_type")](**fields)
    return AutoConfig.from_pretrained(name_or_path, local_files_only=True)


def meta_model(config, lora_rank: int = 0, hybrid: bool = False):
    """The model train.py would build from `config` (LoRA through common.hf.add_lora; rwkv_llama's all-RWKV
    hybrid), with parameters on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from common import hf

    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
        if hybrid:
            from rwkv_llama.model import build_hybrid, head_size_for

            model = build_hybrid(model, list(range(config.num_hidden_layers)), "block",
                                 head_size=head_size_for(config.hidden_size))
        if lora_rank > 0:
            model = hf.add_lora(model, r=lora_rank, alpha=2 * lora_rank)
    return model


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def optimizer_bytes(params, optimizer: str) -> int:
    """fp32 optimiser states: AdamW's two moments; transformers' Adafactor (beta1 None, as anli_reverse_kl
    runs it): a row and a column second moment per matrix, a full one per vector."""
    if optimizer == "adamw":
        return 8 * _numel(params)
    if optimizer == "adafactor":
        return 4 * sum(p.shape[:-1].numel() + p.shape[:-2].numel() * p.shape[-1] if p.dim() >= 2 else p.numel()
                       for p in params)
    raise ValueError(f"optimizer must be adamw or adafactor, got {optimizer!r}")


def _largest_block(model) -> int:
    from common.hf_training import fsdp_blocks

    return max(_numel(b.parameters()) for b in fsdp_blocks(model))


def _root(model) -> int:
    from common.hf_training import fsdp_blocks

    return _numel(model.parameters()) - sum(_numel(b.parameters()) for b in fsdp_blocks(model))


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_states(student, teacher=None, *, lora_rank: int = 0, mode: str = "ddp", gpus: int = 1,
                 optimizer: str = "adamw", teacher_dtype: str = "float32", hybrid: bool = False) -> dict:
    """Bytes per GPU of the student's fp32 parameters, its gradients and optimiser states and the teacher's
    parameters under `mode` over `gpus` ranks (the shards' share under FSDP; on the CPU under offload).
    `student` / `teacher`: a CONFIGS key, a model folder or a meta model."""
    model = student if isinstance(student, torch.nn.Module) else meta_model(config_of(student), lora_rank, hybrid)
    trainable = [p for p in model.parameters() if p.requires_grad]
    share = 1 if mode == "ddp" else gpus
    out = {"params": 4 * _numel(model.parameters()) / share, "grads": 4 * _numel(trainable) / share,
           "optimizer": optimizer_bytes(trainable, optimizer) / share, "teacher": 0.0}
    if teacher is not None:
        t = teacher if isinstance(teacher, torch.nn.Module) else meta_model(config_of(teacher))
        out["teacher"] = BYTES[teacher_dtype] * _numel(t.parameters()) / share
    return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def measured_bytes(model, optimizer, teacher=None) -> dict:
    """Bytes this rank holds now of parameters, gradients, optimiser states and teacher parameters, read from
    the tensors themselves (their local shards under FSDP): what model_states plans. A sharded teacher's root,
    which FSDP keeps gathered after its forward (model_states counts it as working memory), is resharded first."""
    from common.hf_training import is_fsdp

    if teacher is not None and is_fsdp(teacher):
        teacher.reshard()
    params = list(model.parameters())
    return {"params": sum(_local(p).nbytes for p in params),
            "grads": sum(_local(p.grad).nbytes for p in params if p.grad is not None),
            "optimizer": sum(_local(v).nbytes for state in optimizer.state.values() for v in state.values()
                             if torch.is_tensor(v)),
            "teacher": sum(_local(p).nbytes for p in teacher.parameters()) if teacher is not None else 0}


# ---------------------------------------------------------------------------- activations

# Elements a decoder layer saves for backward per token, as counted with saved_tensors_hooks on transformers'
# blocks (fp32, sdpa attention: q, k, v, the output and its log-sum-exp, no attention matrix): the norms' inputs
# and outputs, the projections' inputs, the MLP's hidden activations (SwiGLU 4, ReLU 1, GELU-tanh 5 per unit).
ACTIVATION = {
    "llama": lambda c: (8 * c.hidden_size + 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
                        + 4 * c.intermediate_size + c.num_attention_heads + 2),
    "opt": lambda c: 8 * c.hidden_size + c.ffn_dim + c.num_attention_heads + 4,
    "gpt2": lambda c: 10 * c.n_embd + 5 * (c.n_inner or 4 * c.n_embd) + c.n_head + 4,
}
# Bytes per saved element in bf16: measured saved bytes of pure-bf16 blocks over their fp32 element counts
# (RMSNorm and T5's norms keep fp32 copies).
BF16_BYTES = {"llama": 2.25, "opt": 2.0, "gpt2": 2.0, "t5": 2.6}
RWKV_CHUNK = 32  # rwkv_llama's chunk_len: wkv6 keeps chunk x chunk decay products per head, in fp32


def _rwkv_block(c) -> tuple:
    """(elements at the activation dtype, fp32 elements) per token of one RWKV-6 block (time-mix + channel-mix)."""
    return 37 * c.hidden_size + 2 * c.intermediate_size, 2 * c.hidden_size * RWKV_CHUNK


def layer_activations(config, tokens: int, dtype: str = "float32", *, dec_tokens: int = 0, seq: int = 0,
                      enc_seq: int = 0, attention_probs: bool = False, hybrid: bool = False) -> list:
    """Bytes each layer saves for backward for `tokens` tokens (T5: encoder tokens, and `dec_tokens` decoder
    tokens), as a list with one entry per layer. attention_probs: T5's attention with its position bias also
    saves the softmax (heads x seq per token; enc_seq / seq: the encoder's and decoder's lengths) where no fused
    kernel takes a bias (CPU)."""
    family = config.model_type
    element = 4 if dtype == "float32" else BF16_BYTES.get(family, 2.0)
    if hybrid:
        low, fp32 = _rwkv_block(config)
        return [tokens * (low * element + fp32 * 4)] * config.num_hidden_layers
    if family == "t5":
        h, f, heads = config.d_model, config.d_ff, config.num_heads
        probs = attention_probs * heads
        enc = tokens * (10 * h + 7 * f + 2 + probs * enc_seq)
        dec = dec_tokens * (15 * h + 7 * f + 9 + probs * seq) + tokens * 2 * h  # + the cross-attention keys, values
        return [enc * element] * config.num_layers + [dec * element] * config.num_decoder_layers
    return [tokens * ACTIVATION[family](config) * element] * config.num_hidden_layers


def hidden_size(config) -> int:
    return getattr(config, "d_model", None) or config.hidden_size


def activations(setting: Setting, student, checkpointing: bool) -> float:
    """Bytes of one micro-batch's saved activations and loss inputs (see the module docstring)."""
    config = student.config
    element = 4 if setting.dtype == "float32" else 2
    b = setting.batch
    seq2seq = config.is_encoder_decoder
    tokens = b * setting.seq[0]
    dec_tokens = b * setting.seq[-1] if seq2seq else tokens
    layers = layer_activations(config, tokens, setting.dtype, dec_tokens=dec_tokens if seq2seq else 0,
                               seq=setting.seq[-1], enc_seq=setting.seq[0], hybrid=setting.hybrid)
    h = hidden_size(config)
    if checkpointing:  # each layer's input (the residual stream), one layer recomputed at a time
        saved = element * h * (tokens * (config.num_layers if seq2seq else len(layers))
                                + (dec_tokens * config.num_decoder_layers if seq2seq else 0)) + max(layers)
    else:
        saved = sum(layers)
    vocab = config.vocab_size
    head = dec_tokens * vocab * (element + 4)  # the logits and their fp32 log-softmax
    if setting.loss == "kd":  # the teacher's logits and fp32 probabilities
        head += dec_tokens * vocab * ((4 if setting.served else BYTES[setting.teacher_dtype]) + 4)
    if setting.loss == "hidden":  # the served teacher's logits and every layer's hidden states, fp32
        head += dec_tokens * 4 * (vocab + config.num_hidden_layers * h)
    return saved + head


# ---------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    setting: Setting
    parts: dict = field(default_factory=dict)   # mode -> {name: bytes}; "cpu": bytes in CPU memory

    def gpu(self, mode: str, checkpointing: Optional[bool] = None) -> float:
        p = self.parts[mode]
        ckpt = self.setting.checkpointing if checkpointing is None else checkpointing
        return sum(v for k, v in p.items() if k not in ("cpu", "activations", "activations_ckpt")) + \
            p["activations_ckpt" if ckpt else "activations"]

    def needs(self, gpu_gib: float, checkpointing: Optional[bool] = None) -> Optional[str]:
        for mode in MODES:
            if mode in self.parts and self.gpu(mode, checkpointing) <= 0.9 * gpu_gib * GiB:
                return mode
        return None


def plan(setting: Setting) -> Plan:
    """Bytes per GPU of `setting` under DDP, FSDP and FSDP + offload."""
    config = config_of(setting.student)
    student = meta_model(config, setting.lora, setting.hybrid)
    teacher = None if setting.teacher is None or setting.served else meta_model(config_of(setting.teacher))
    n, bf16 = setting.gpus, setting.dtype != "float32"
    trainable = _numel(p for p in student.parameters() if p.requires_grad)
    acts = activations(setting, student, False)
    acts_ckpt = activations(setting, student, True)
    out = Plan(setting)
    for mode in MODES:
        if mode != "ddp" and setting.optimizer == "adafactor":
            continue  # transformers' Adafactor does not run on sharded (DTensor) parameters
        states = model_states(student, teacher, mode="ddp" if mode == "ddp" else "fsdp", gpus=n,
                              optimizer=setting.optimizer, teacher_dtype=setting.teacher_dtype)
        parts = dict(states)
        gather = 2 if bf16 else 4
        if mode == "ddp":
            parts["working"] = (4 * trainable if n > 1 else 0) + (2 * _numel(student.parameters()) if bf16 else 0)
        else:
            parts["working"] = gather * (_root(student) + 2 * _largest_block(student))
            if teacher is not None:
                parts["working"] += BYTES[setting.teacher_dtype] * (_root(teacher) + 2 * _largest_block(teacher))
            if setting.accumulation > 1 and mode == "fsdp":
                parts["working"] += 4 * trainable
        if mode == "fsdp_offload":
            parts["cpu"] = sum(parts.pop(k) for k in ("params", "grads", "optimizer", "teacher"))
            parts["working"] += 4 * _largest_block(student)  # one block's unsharded gradients before offloading
        parts["activations"], parts["activations_ckpt"] = acts, acts_ckpt
        out.parts[mode] = parts
    return out


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _name(s: Setting) -> str:
    lora = f" LoRA r{s.lora}" if s.lora else ""
    teacher = f" <- {DISPLAY[s.teacher]}{' (served)' if s.served else ''}" if s.teacher else ""
    student = f"{DISPLAY[s.student]} hybrid" if s.hybrid else DISPLAY[s.student]
    return f"{student}{lora}{teacher}" + (f"; {s.note}" if s.note else "")


def table(plans: list, gpu_gib=(40, 80)) -> str:
    """A Markdown table: per script, GiB per GPU under each mode (the script's checkpointing; the other
    setting in brackets) and the first mode that fits each GPU size."""
    head = ["script", "setting", "GPUs", "micro-batch x length", "DDP GiB", "FSDP GiB", "FSDP+offload GiB (CPU)"]
    head += [f"needs @{g} GB" for g in gpu_gib]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in plans:
        s = p.setting
        cells = [s.script.split("/scripts/")[0] + "/" + os.path.basename(s.script), _name(s), str(s.gpus),
                 f"{s.batch} x {'+'.join(map(str, s.seq))}" + (f", GA {s.accumulation}" if s.accumulation > 1 else "")
                 + (", ckpt" if s.checkpointing else "")]
        for mode in MODES:
            if mode not in p.parts:
                cells.append("n/a (Adafactor)")
                continue
            text = f"{_gib(p.gpu(mode))} [{_gib(p.gpu(mode, not s.checkpointing))}]"
            if mode == "fsdp_offload":
                text += f" ({_gib(p.parts[mode]['cpu'])})"
            cells.append(text)
        for g in gpu_gib:
            need = p.needs(g)
            other = p.needs(g, True) if not s.checkpointing else None
            cells.append((need or "none") + ("" if need or not other else f" (with checkpointing: {other})"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def details_of(p: Plan) -> str:
    names = ("params", "grads", "optimizer", "teacher", "working", "activations", "activations_ckpt", "cpu")
    lines = [f"{p.setting.script}: {_name(p.setting)}",
             "  mode          " + " ".join(f"{n:>16}" for n in names)]
    for mode, parts in p.parts.items():
        lines.append(f"  {mode:<13} " + " ".join(f"{_gib(parts.get(n, 0)):>16}" for n in names))
    return "\n".join(lines)


def main(folder: str = None, details: bool = False):
    """The table over every setting (or one method folder's), then each setting's parts with --details."""
    folders = sorted({s.script.split("/")[0] for s in SETTINGS})
    if folder is not None:
        check_choice("--folder", folder.rstrip("/"), folders)
    plans = [plan(s) for s in SETTINGS if folder is None or s.script.split("/")[0] == folder.rstrip("/")]
    print("GiB per GPU under the script's gradient checkpointing setting [the other setting]; a mode fits at "
          "<= 90 % of the GPU.\n")
    print(table(plans))
    if details:
        for p in plans:
            print("\n" + details_of(p))


if __name__ == "__main__":
    run_cli(main)
