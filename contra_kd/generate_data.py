"""Sample responses of a model to a processed Dolly split: the teacher outputs (TGO) and student outputs (SGO) of
DistiLLM-2 (contra_kd.md §5.5), or SeqKD's teacher-written training set (§5.1). Our own sampling loop
(common/generation.py), no vLLM.

    python contra_kd/generate_data.py --model-path TEACHER --data-dir processed_data/dolly/full/gpt2 \
        --save processed_data/dolly_distillm2/gpt2/tgo               # then --model-path INIT ... /sgo
    torchrun --nproc_per_node N contra_kd/generate_data.py ...      # prompts sharded over processes

Writes `{save}/train_0.{bin,idx}` (prompt ⟂ sampled response, the `full` layout) and `train.jsonl` (the source
record with `output` = the sampled text and `reference` = the original output); the `valid` split is copied
unchanged, so dev selection still scores against the ground truth. Sampling: temperature 1, top-p 0.95 (the
CONTRA Dolly adaptation; SeqKD: --top-p 1), at most --max-new-tokens new tokens (default max_length -
max_prompt_length; CONTRA's DistiLLM-2 scripts sample 512, training then cuts prompt + response to
--max-length), per-rank seed = seed + rank. `--type distillm2`'s --data-dir is the folder holding `tgo/` and
`sgo/`.
"""
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common import hf
from common.binarized import split_marker, write_indexed
from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES, gather_object, print0, setup, shutdown
from common.generation import generate
from common.io import write_jsonl
from contra_kd.data import InstructionSplit


def main(model_path: str, data_dir: str, save: str, max_length: int = 512, max_prompt_length: int = 256,
         max_new_tokens: int = None, temperature: float = 1.0, top_p: float = 0.95, batch_size: int = 16,
         seed: int = 42, dtype: str = "float32"):
    check_choice("--dtype", dtype, DTYPES)
    check_range("--batch-size", batch_size, low=1)
    check_range("--max-prompt-length", max_prompt_length, low=1)
    check_range("--max-length", max_length, low=max_prompt_length + 1)  # room for a response
    if max_new_tokens is not None:
        check_range("--max-new-tokens", max_new_tokens, low=1)
    hf.check_model_folder(model_path, "--model-path")
    data = InstructionSplit(data_dir, "train")
    if data.records is None:
        raise UserError(f"--data-dir {data_dir}: train.jsonl is missing; re-run contra_kd/prepare_data.py")
    lay = setup(seed)
    tokenizer = hf.load_tokenizer(model_path, flag="--model-path")
    model = hf.load_model(model_path, dtype=dtype, device=lay.device, frozen=True, flag="--model-path")
    mine = list(range(lay.dp_rank, len(data), lay.dp_size))
    gen = torch.Generator(device=lay.device).manual_seed(seed + lay.dp_rank)
    responses = {}
    for start in tqdm(range(0, len(mine), batch_size), desc="sampling", disable=not lay.is_main):
        chunk = mine[start:start + batch_size]
        prompts = [data[i][0][-max_prompt_length:] for i in chunk]
        out = generate(model, prompts, max_new_tokens or max_length - max_prompt_length, temperature=temperature,
                       top_p=top_p,
                       top_k=0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, padding="left",
                       generator=gen)
        responses.update({i: list(r) for i, r in zip(chunk, out)})
    parts = gather_object(responses, lay)
    if lay.is_main:
        responses = {k: v for part in parts for k, v in part.items()}
        os.makedirs(save, exist_ok=True)
        marker = split_marker(data.tokens.dtype)
        write_indexed(os.path.join(save, "train_0"), (data[i][0] + [marker] + responses[i] for i in range(len(data))),
                      data.tokens.dtype)
        records = [dict(r, output=tokenizer.decode(responses[i], skip_special_tokens=True).strip(),
                        reference=r["output"]) for i, r in enumerate(data.records)]
        write_jsonl(records, os.path.join(save, "train.jsonl"))
        k = 0
        while os.path.exists(os.path.join(data_dir, f"valid_{k}.idx")):
            for ext in ("bin", "idx"):
                shutil.copyfile(os.path.join(data_dir, f"valid_{k}.{ext}"), os.path.join(save, f"valid_{k}.{ext}"))
            k += 1
        if os.path.exists(os.path.join(data_dir, "valid.jsonl")):
            shutil.copyfile(os.path.join(data_dir, "valid.jsonl"), os.path.join(save, "valid.jsonl"))
        print0(f"{len(records)} sampled responses of {model_path} -> {save} (valid split copied from {data_dir})")
    shutdown()


if __name__ == "__main__":
    run_cli(main)
