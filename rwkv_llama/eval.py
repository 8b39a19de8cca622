"""Held-out perplexity of a teacher or hybrid student, and greedy generation through the recurrent path.

    python -m rwkv_llama.eval --model_id TEACHER --ckpt_file out/stage2/student.safetensors \
        --val_data data/rwkv_llama/ultrachat_standin/validation.jsonl --output_dir out/eval_stage2
    python -m rwkv_llama.eval --model_id TEACHER --layers '[0,2]' ...   # the hybrid before distillation
    python -m rwkv_llama.eval --model_id TEACHER ...                      # the teacher itself

Writes {output_dir}/metrics.json (perplexity, CE, tokens, seconds; for a hybrid also kl_to_teacher) and
predictions.jsonl (prompt, greedy continuation). Perplexity is exp of the token-mean CE over the rows'
pre-shifted labels (no second shift). kl_to_teacher is the token mean of KL(teacher || model) over the same
label tokens (what stage 2's KL term trains): perplexity can fall below the teacher's by fitting the data's
format while the student drifts from the teacher, and this column shows the drift.
"""
import json
import math
import os
import sys
import time
from itertools import islice
from typing import Optional

import torch

from common import hf
from common.cli import UserError, check_range, run_cli
from common.io import atomic_write_json, iter_rows, write_jsonl
from common.losses import cross_entropy, forward_kl
from rwkv_llama.data import IGNORE, collate, encode
from rwkv_llama.model import build_hybrid, greedy_generate, head_size_for
from rwkv_llama.train import data_files, data_stream, load_student


def read_student_meta(ckpt_file: str) -> dict:
    """The layers, mode, head size and kv layout that train.py wrote beside a student's weights."""
    path = ckpt_file + ".json"
    if not os.path.isfile(ckpt_file) or not os.path.isfile(path):
        raise UserError(f"--ckpt_file {ckpt_file}: no such file, or no {os.path.basename(path)} beside it (train.py "
                        f"writes both: student.safetensors and student.safetensors.json)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); it is written by rwkv_llama/train.py") from None
    missing = [k for k in ("layers", "mode", "head_size", "kv_layout") if k not in meta]
    if missing:
        raise UserError(f"{path}: no field '{missing[0]}'; it is written by rwkv_llama/train.py")
    return meta


def build_model(model_id: str, ckpt_file: Optional[str] = None, layers=None, mode: str = "block",
                head_size: int = 64, kv_layout: str = "tile", seed: int = 42, teacher=None):
    """The teacher (no layers, no ckpt_file), a freshly initialised hybrid (layers; with train.py's --seed it is
    the student training starts from), or a trained student (ckpt_file; its layers and mode come from the .json
    written beside it). `teacher`: the already loaded teacher (build_hybrid copies it; it stays unchanged)."""
    if teacher is None:
        teacher = hf.load_model(model_id, dtype="float32", frozen=True, flag="--model_id")
    if ckpt_file:
        meta = read_student_meta(ckpt_file)
        layers, mode, head_size, kv_layout = meta["layers"], meta["mode"], meta["head_size"], meta["kv_layout"]
    if layers is None:
        return teacher
    torch.manual_seed(seed)
    student = build_hybrid(teacher, list(layers), mode, head_size=head_size_for(teacher.config.hidden_size, head_size),
                           kv_layout=kv_layout)
    if ckpt_file:
        load_student(student, ckpt_file)
    return student.eval()


@torch.no_grad()
def perplexity(model, rows, micro_bsz: int = 4, max_batches: Optional[int] = None, teacher=None) -> dict:
    """Token-mean CE and perplexity over the label tokens of `rows` (any iterable, consumed lazily) in
    micro-batches, the first `max_batches` of them; with `teacher`, also the token-mean KL(teacher || model) on
    the same tokens."""
    from tqdm import tqdm

    total, kl, count = 0.0, 0.0, 0
    rows = iter(rows)
    batches = (collate(chunk) for chunk in iter(lambda: list(islice(rows, micro_bsz)), []))
    for b in tqdm(islice(batches, max_batches), total=max_batches, desc="perplexity", file=sys.stdout):
        attn = (torch.arange(b["input_ids"].shape[1])[None] < b["lengths"][:, None]).long()
        logits = model(input_ids=b["input_ids"], attention_mask=attn).logits
        mask = b["labels"] != IGNORE
        total += float(cross_entropy(logits, target_ids=b["labels"].clamp(min=0), mask=mask, normalizer=1.0))
        if teacher is not None:
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=attn).logits
            kl += float(forward_kl(logits, t_logits, mask=mask, normalizer=1.0))
        count += int(mask.sum())
    ce = total / max(count, 1)
    out = dict(perplexity=math.exp(ce), ce=ce, tokens=count)
    if teacher is not None:
        out["kl_to_teacher"] = kl / max(count, 1)
    return out


def chat_prompts(path: str, n: int) -> list:
    """The first user turn of each conversation, in the training format, ready for "Assistant : "."""
    out = []
    for row in islice(iter_rows(path), n):
        user = row["messages"][0]["content"]
        out.append(f"User : {user}" + ("" if user.endswith("\n\n") else "\n\n") + "Assistant : ")
    return out


def main(model_id: str, ckpt_file: Optional[str] = None, layers=None, mode: str = "block", head_size: int = 64,
         kv_layout: str = "tile", val_data: Optional[str] = None, c4_data: Optional[str] = None,
         languages=("en", "zh"), max_seq_length: int = 512, micro_bsz: int = 4, max_batches: Optional[int] = None,
         n_prompts: int = 4, max_new_tokens: int = 32, output_dir: str = "out/rwkv_llama_eval", label: str = "",
         seed: int = 42):
    if bool(val_data) == bool(c4_data):
        raise UserError("pass exactly one of --val_data (UltraChat-style JSONL) or --c4_data DIR (validation split)")
    for path in data_files(val_data):
        if not os.path.isfile(str(path)):
            raise UserError(f"--val_data {path}: no such file (UltraChat-style JSONL, JSONL.gz, JSON or parquet)")
    if c4_data and not os.path.isdir(c4_data):
        raise UserError(f"--c4_data {c4_data}: no such folder (one subfolder per language with *validation* files)")
    for flag, value in (("--max_seq_length", max_seq_length), ("--micro_bsz", micro_bsz), ("--head_size", head_size),
                        ("--max_batches", max_batches)):
        if value is not None:
            check_range(flag, value, low=1)
    if ckpt_file:
        read_student_meta(ckpt_file)
    hf.check_model_folder(model_id, "--model_id")
    stream = data_stream(val_data, c4_data, languages, "validation")
    stream.n_rows                       # every row read and checked once before the model loads
    t0 = time.perf_counter()
    tokenizer = hf.load_tokenizer(model_id, flag="--model_id")
    tokenizer.pad_token = tokenizer.eos_token
    teacher = hf.load_model(model_id, dtype="float32", frozen=True, flag="--model_id")
    model = build_model(model_id, ckpt_file, layers, mode, head_size, kv_layout, seed, teacher=teacher)
    rows = (encode(raw, tokenizer, max_seq_length) for raw in stream)     # in file order, tokenised as consumed
    metrics = dict(label=label, **perplexity(model, rows, micro_bsz, max_batches,
                                             teacher=None if model is teacher else teacher))
    predictions = []
    if val_data and n_prompts:
        for prompt in chat_prompts(val_data, n_prompts):
            bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
            ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = greedy_generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_token_id)
            predictions.append(dict(prompt=prompt, prediction=tokenizer.decode(out, skip_special_tokens=True)))
    metrics["seconds"] = time.perf_counter() - t0
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(metrics, os.path.join(output_dir, "metrics.json"))
    write_jsonl(predictions, os.path.join(output_dir, "predictions.jsonl"))
    kl = f", KL(teacher || model) {metrics['kl_to_teacher']:.4f}" if "kl_to_teacher" in metrics else ""
    print(f"{label or model_id}: perplexity {metrics['perplexity']:.3f}{kl} over {metrics['tokens']} tokens "
          f"({metrics['seconds']:.1f}s)", flush=True)


if __name__ == "__main__":
    run_cli(main)
