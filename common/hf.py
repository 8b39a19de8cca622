"""Hugging Face models for the methods that train `transformers` models: load, LoRA, vocabulary check.

    tokenizer = load_tokenizer(model_path)
    teacher_tokenizer = load_tokenizer(teacher_path, flag="--teacher_model_path")
    check_tokenizers(tokenizer, teacher_tokenizer)                               # the same tokens, before any model loads
    student = load_model(model_path, dtype="float32", device=lay.device)         # causal or seq2seq, by config
    teacher = load_model(teacher_path, frozen=True, device=lay.device, flag="--teacher_model_path")
    width = check_vocab(student, teacher, tokenizer, teacher_tokenizer, allow_padded=cfg.allow_padded_vocab)
    student = add_lora(student, r=16, alpha=64, dropout=0.1)                      # peft; None targets: peft's defaults
    merged = merge_lora(student)                                                 # a plain transformers model again
    student = keep_layers(teacher_copy, [0, 3, 6, 9])                             # a smaller student cut from a model
    out, logits = head_logits(student, **batch)  # logits as common.losses.HeadLogits: the head input and weights

    python -m common.hf keep_layers --model_path TEACHER --save_path STUDENT --layers 0,3,6,9

A frozen model is in eval mode with requires_grad off and keeps the dtype it was saved in (`dtype=None`),
as a teacher should. Everything loads from local folders only (nothing from the hub).
"""
import contextlib
import copy
import json
import os
import sys

import torch

from common.cli import UserError
from common.distributed import to_dtype


def check_model_folder(path, flag: str = "--model_path") -> str:
    """`path` if it is a transformers model folder, else a one-line UserError naming the flag, the path and the fix."""
    path = str(path)
    fix = "pass a folder written by save_pretrained (config.json with model_type, and the weights)"
    if not os.path.isdir(path):
        reason = "a file, not a folder" if os.path.exists(path) else "it does not exist"
        raise UserError(f"{flag} {path} is not a transformers model folder ({reason}): {fix}")
    config = os.path.join(path, "config.json")
    if not os.path.exists(config):
        if os.path.exists(os.path.join(path, "params.json")) or any(f.startswith("consolidated.") for f in os.listdir(path)):
            fix = f"this is a native consolidated.*.pth checkpoint; convert it with `python -m common.checkpoint_split export_hf --ckpt_dir {path} --save_path HF_DIR`"
        elif os.path.exists(os.path.join(path, "adapter_config.json")):
            fix = "this is a LoRA adapter alone; pass the merged model that common.hf_training.export_model writes"
        raise UserError(f"{flag} {path} is not a transformers model folder (no config.json): {fix}")
    try:
        with open(config) as f:
            fields = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{config}:{e.lineno} is not valid JSON ({e.msg}): {fix}") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise UserError(f"{flag} {path} is not a transformers model folder ({config} has no model_type): {fix}")
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        raise UserError(f"{flag} {path} is not a transformers model folder (config.json but no *.safetensors or "
                        f"pytorch_model*.bin weights): {fix}")
    return path


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def load_config(path, flag: str = "--model_path"):
    """The folder's transformers config (no weights read): what a command checks before it loads a model."""
    from transformers import AutoConfig

    path = check_model_folder(path, flag)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: transformers cannot read its config.json ({_first_line(e)})") from None


def load_model(path, dtype=None, device="cpu", frozen: bool = False, flag: str = "--model_path"):
    """A causal or encoder-decoder LM (chosen by its config) from a local folder.

    dtype: "float32" / "bfloat16" / "float16" / a torch.dtype, or None for the dtype it was saved in.
    frozen: eval mode and no gradients (a teacher).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = load_config(path, flag)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(str(path), dtype="auto" if dtype is None else to_dtype(dtype), local_files_only=True)
    model.to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def load_tokenizer(path, flag: str = "--model_path", model_folder: bool = True):
    """The folder's tokenizer; a tokenizer without a pad token pads with EOS (padding is never supervised).
    `model_folder=False`: the folder may hold the tokenizer alone."""
    from transformers import AutoTokenizer

    path = str(path)
    if model_folder:
        check_model_folder(path, flag)
    elif not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        reason = "it does not exist" if not os.path.exists(path) else "a file, not a folder" if not \
            os.path.isdir(path) else f"none of {', '.join(TOKENIZER_FILES)} in it"
        raise UserError(f"{flag} {path} is not a tokenizer folder ({reason}): pass a folder written by "
                        f"save_pretrained (e.g. the model's own)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: transformers cannot load its tokenizer ({_first_line(e)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_prompt(tokenizer, instruction: str, input: str = "") -> str:
    """One user turn (the instruction, then its input after a blank line) in the tokenizer's chat template, up
    to the assistant's header: the prompt an instruct model was tuned on. The text holds the template's own
    special tokens, so tokenise it with add_special_tokens=False."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; leave the chat-template "
                        "flag off (the plain instruction template is used)")
    user = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def vocab_width(model) -> int:
    """Number of logits the model outputs (its output embedding rows; may exceed the tokenizer's size)."""
    return model.get_output_embeddings().weight.shape[0]


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token")  # padding never reaches a loss, so pad may differ


def check_tokenizers(student_tokenizer, teacher_tokenizer, flags=("--model_path", "--teacher_model_path")) -> None:
    """The same vocabulary (every token at the same id) and the same BOS / EOS / UNK, else a UserError naming
    the two (`flags`: the student's and the teacher's model flags). Cheap: a command checks it before the models
    load; check_vocab checks it again."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    where = (f"the student's tokenizer ({f'{flags[0]} {student_tokenizer.name_or_path}'.strip()}) and the "
             f"teacher's ({f'{flags[1]} {teacher_tokenizer.name_or_path}'.strip()})")
    fix = "distil from a teacher that shares the student's tokenizer"
    if s_vocab != t_vocab:
        differ = sorted((i, tok) for tok, i in s_vocab.items() if t_vocab.get(tok) != i)
        example = f"e.g. {differ[0][1]!r} is {differ[0][0]} vs {t_vocab.get(differ[0][1])}" if differ else \
            f"the teacher has {len(set(t_vocab) - set(s_vocab))} more"
        raise UserError(f"{where} differ: {len(s_vocab)} vs {len(t_vocab)} tokens, {len(differ)} of the student's "
                        f"at other ids ({example}); {fix}")
    for name in SPECIAL_TOKENS:
        if getattr(student_tokenizer, name) != getattr(teacher_tokenizer, name):
            raise UserError(f"{where} have the same vocabulary but different {name} "
                            f"({getattr(student_tokenizer, name)!r} vs {getattr(teacher_tokenizer, name)!r}); {fix}")


def check_vocab(student, teacher, student_tokenizer, teacher_tokenizer, allow_padded: bool = False,
                flag: str = "--allow_padded_vocab", flags=("--model_path", "--teacher_model_path")) -> int:
    """The logit width both models share, after checking that they speak the same tokens (check_tokenizers).
    Equal widths pass. Different widths are an error unless `allow_padded` (rows past the tokenizer are
    padding, e.g. Qwen2.5 151936 vs 152064): then every tokenizer id must fit in both, and KD compares the first
    min(widths) logits. `flags`: the student's and the teacher's model flags, for the messages."""
    check_tokenizers(student_tokenizer, teacher_tokenizer, flags)
    s, t = vocab_width(student), vocab_width(teacher)
    if s == t:
        return s
    if not allow_padded:
        raise UserError(f"the teacher outputs {t} logits per token but the student {s}: use a teacher with the "
                        f"student's tokenizer, or pass {flag} if one is only padded (same tokenizer, extra rows)")
    if len(student_tokenizer) > min(s, t):
        raise UserError(f"{flag}: the tokenizer has {len(student_tokenizer)} tokens, more than the smaller vocabulary "
                        f"(teacher {t}, student {s}), so the two are not the same vocabulary padded")
    return min(s, t)


def add_lora(model, r: int, alpha: float, dropout: float = 0.0, target_modules=None):
    """Wrap `model` with peft LoRA adapters (only they train). `target_modules=None`: peft's defaults for the
    architecture (e.g. c_attn for GPT-2, q_proj/v_proj for Llama and OPT, q/v for T5)."""
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else TaskType.CAUSAL_LM
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task)
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    peft = sys.modules.get("peft")  # without peft imported nothing can be a PeftModel (and it is slow to import)
    return peft is not None and isinstance(model, peft.PeftModel)


def merge_lora(model):
    """A plain transformers model with W + (alpha/r) B A folded into each adapted weight. Works on a copy:
    the adapters of `model` stay as they are (export mid-training does not end LoRA training)."""
    if not is_lora(model):
        return model
    with torch.no_grad():
        return copy.deepcopy(model).merge_and_unload()


class _HeadInput(torch.nn.Module):
    """Stands in for the LM head during one forward and returns what the head would read."""

    def forward(self, x):
        self.seen = x
        return x


@contextlib.contextmanager
def _lm_head_bypassed(model):
    """Inside, `model` (plain, peft or DDP-wrapped) runs without its LM head; yields (head, stand-in)."""
    inner = getattr(model, "module", model)  # through DDP
    inner = inner.get_base_model() if is_lora(inner) else inner
    head = inner.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(inner).__name__} has no LM head (get_output_embeddings() is None): train it with "
                        f"--fast_kd false")
    stand_in = _HeadInput()
    inner.set_output_embeddings(stand_in)
    try:
        yield head, stand_in
    finally:
        inner.set_output_embeddings(head)


def _head_terms(head, hidden):
    """HeadLogits of `head` applied to `hidden`: a Linear, or a peft LoRA Linear (W h + s·B A dropout(h))."""
    from common.losses import HeadLogits

    if type(head) is torch.nn.Linear:
        return HeadLogits(hidden, head.weight, head.bias)
    base = getattr(head, "base_layer", None)
    if type(base) is torch.nn.Linear and hasattr(head, "lora_A") and not head.merged and not head.disable_adapters:
        terms, weights = [hidden], [base.weight]
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if head.use_dora.get(name) or head.lora_B[name].bias is not None:
                raise UserError(f"the LoRA head adapter {name!r} uses DoRA or a bias: train it with --fast_kd false")
            a = head.lora_A[name]
            terms.append(a(head.lora_dropout[name](hidden.to(a.weight.dtype))) * head.scaling[name])
            weights.append(head.lora_B[name].weight)
        return HeadLogits(tuple(terms), tuple(weights), base.bias)
    raise UserError(f"the LM head is a {type(head).__name__}, not a Linear (or a LoRA Linear): train it with "
                    f"--fast_kd false")


def head_logits(model, **inputs):
    """(output, HeadLogits): one forward of a causal or seq2seq LM that stops before its LM head, and the
    head's input with its weights, for a loss to compute the logits chunk by chunk (common.losses.HeadLogits).
    The head input is whatever the model hands its head: after the final norm, T5's d_model**-0.5 scaling of a
    tied head and the like included. `output.logits` is None. A model that changes the head's output afterwards
    (logit soft-capping, a logit scale) is refused, as is a head that is not a (LoRA) Linear."""
    with _lm_head_bypassed(model) as (head, stand_in):
        out = model(**inputs)
    if out.logits is not stand_in.seen:
        raise UserError(f"{type(getattr(model, 'module', model)).__name__} transforms its head's output "
                        f"(e.g. logit soft-capping or scaling), so its logits are not a linear head's: train it "
                        f"with --fast_kd false")
    hidden, out.logits = out.logits, None
    return out, _head_terms(head, hidden)


def keep_layers(model, layers):
    """Keep only the decoder blocks `layers` (indices, in order) of a Llama-family causal LM (`model.model.layers`:
    Llama, Mistral, Qwen2, SmolLM2), with its embeddings, final norm and (tied) head: a smaller student cut from a
    pretrained model. Edits `model` in place; each kept block gets its new index for the KV cache."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise UserError(f"keep_layers: {type(model).__name__} has no model.layers (a Llama-family decoder); "
                        f"cut its blocks by hand")
    layers = [int(i) for i in layers]
    n = len(blocks)
    if not layers or any(not 0 <= i < n for i in layers) or layers != sorted(set(layers)):
        raise UserError(f"--layers {layers}: give increasing, distinct block indices in [0, {n})")
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in layers)
    for new, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def save_kept_layers(model_path: str, save_path: str, layers) -> None:
    """keep_layers on the model in `model_path`, saved with its tokenizer to `save_path` (as saved: same dtype)."""
    try:
        layers = [int(x) for x in (layers if isinstance(layers, (list, tuple)) else str(layers).split(","))]
    except ValueError:
        typed = ",".join(map(str, layers)) if isinstance(layers, (list, tuple)) else layers
        raise UserError(f"--layers {typed}: give block indices, e.g. --layers 0,3,6,9") from None
    model = keep_layers(load_model(model_path, flag="--model_path"), layers)
    model.save_pretrained(save_path)
    load_tokenizer(model_path).save_pretrained(save_path)
    print(f"blocks {layers} of {model_path} -> {save_path} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    from common.cli import run_cli
    run_cli({"keep_layers": save_kept_layers})
