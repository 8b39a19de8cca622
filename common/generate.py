"""Generate continuations for a file of prompts with a native checkpoint (plain process or torchrun).

    python -m common.generate --ckpt_dir DIR --tokenizer PATH --prompts_file F.jsonl --out_file O.jsonl \
        [--max_new_tokens 256 --temperature 0 --top_p 1 --top_k 0 --max_batch_size 16 --max_seq_len 1024]
        [--compile]   # decode steps as a compiled graph (CUDA graphs on a GPU); the first batch compiles
    torchrun --nproc_per_node 4 -m common.generate ... --tp_size 2     # 2 TP groups of 2, prompts split over them

Prompts: JSONL (one item per line) or a JSON list; an item is a string or an object whose `--prompt_key`
field (default "prompt") holds the text. The output has one line per item, in input order: the item (a
string becomes {"prompt": ...}) plus "output" (decoded, EOS dropped) and "output_ids". Only global rank 0
writes. Prompts are sorted by length before batching, so each batch holds similar lengths and the
Meta-style loop forces few prompt tokens one at a time.
"""
import json
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES
from common.generation import generate
from common.io import read_jsonl
from common.model import load_model, model_args
from common.parallel import setup, shutdown
from common.tokenizer import load_tokenizer


def read_prompts(path: str, prompt_key: str = "prompt") -> tuple:
    """(items, texts) from a JSONL or JSON-list file; errors name the file and the item."""
    if path.endswith(".jsonl"):
        items = read_jsonl(path)
    else:
        if not os.path.isfile(path):
            raise UserError(f"--prompts_file {path}: no such file")
        with open(path) as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); a JSONL file needs the .jsonl "
                                f"suffix") from None
            if not isinstance(items, list):
                raise UserError(f"{path}: expected a JSON list of prompts (or use a .jsonl file)")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get(prompt_key), str):
            texts.append(item[prompt_key])
        else:
            raise UserError(f"{path}: item {i} is neither a string nor an object with a string {prompt_key!r} "
                            f"field (pass --prompt_key to choose the field)")
    return items, texts


def write_jsonl(records, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(ckpt_dir: str, tokenizer: str, prompts_file: str, out_file: str, max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, max_batch_size: int = 16,
         max_seq_len: int = 1024, tp_size: int = None, dtype: str = None, model_type: str = None,
         prompt_key: str = "prompt", bos: bool = True, seed: int = 1, compile: bool = False):
    """Generate for every prompt; returns the output records on global rank 0 (None elsewhere)."""
    dtype = check_choice("--dtype", dtype or ("bfloat16" if torch.cuda.is_available() else "float32"), DTYPES)
    for flag, value in (("--max_new_tokens", max_new_tokens), ("--max_batch_size", max_batch_size),
                        ("--max_seq_len", max_seq_len)):
        check_range(flag, value, low=1)
    if model_type is None and not os.path.isfile(os.path.join(ckpt_dir, "params.json")):
        raise UserError(f"--ckpt_dir {ckpt_dir}: no params.json (convert a model with `python -m "
                        f"common.checkpoint_split --ckpt_file MODEL --save_path {ckpt_dir}`, or pass --model_type)")
    if model_type is not None:
        model_args(model_type)  # a known type
    items, texts = read_prompts(prompts_file, prompt_key)
    tok = load_tokenizer(tokenizer)
    lay = setup(tp_size=tp_size, seed=seed, dtype=dtype)
    prompts = [tok.encode(t, bos=bos, eos=False) for t in texts]
    for i, p in enumerate(prompts):
        if len(p) >= max_seq_len:
            raise UserError(f"{prompts_file}: item {i} has {len(p)} prompt tokens, which leaves no room under "
                            f"--max_seq_len {max_seq_len}; shorten it or raise --max_seq_len")
    model = load_model(ckpt_dir, model_type=model_type, dtype=dtype, max_seq_len=max_seq_len,
                       max_batch_size=max_batch_size, device=lay.device)

    # this data-parallel group's share of the prompts, by length; every TP rank of the group sees the same
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))[lay.dp_rank::lay.dp_size]
    batches = [order[k:k + max_batch_size] for k in range(0, len(order), max_batch_size)]
    generator = torch.Generator(device=lay.device).manual_seed(seed + lay.dp_rank)  # same within a TP group
    mine = {}
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not lay.is_main):
        out = generate(model, [prompts[i] for i in batch], max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator, compile=compile)
        mine.update(zip(batch, out))

    if lay.world_size > 1:  # one copy per TP group is enough: gather from TP rank 0 of each group
        gathered = [None] * lay.world_size
        dist.all_gather_object(gathered, mine if lay.tp_rank == 0 else {})
        mine = {i: ids for part in gathered for i, ids in part.items()}
    shutdown()  # nothing distributed is left: rank 0 only writes the file
    if not lay.is_main:
        return None
    records = []
    for i, item in enumerate(items):
        record = dict(item) if isinstance(item, dict) else {"prompt": item}
        ids = mine[i]
        record["output"] = tok.decode(ids)
        record["output_ids"] = ids
        records.append(record)
    write_jsonl(records, out_file)
    print(f"wrote {len(records)} generations to {out_file}")
    return records


if __name__ == "__main__":
    run_cli(main)
