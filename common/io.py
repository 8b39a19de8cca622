"""Files that survive a crash, and reads that never run pickled code. Imports neither fairscale nor the TP
model, so a Hugging Face-only run can use it.

    atomic_write_json({"step": 3}, "out/state.json")        # temporary name, then os.replace
    save_tensors({"w": w}, "out/w.safetensors")             # .safetensors, or .pt/.pth (torch.save)
    state = read_tensors("out/w.safetensors")               # tensors only (torch.load weights_only=True)
    with atomic_folder("out/export") as tmp:                # write into a sibling folder, swapped in on success
        model.save_pretrained(tmp)
    state = load_shard("ckpt", tp_rank=0, tp_size=1)        # this rank's consolidated.*.pth of a shard folder
    rows = read_jsonl("preds.jsonl")                        # a bad line names the file and the line number
    rows = read_jsonl("data.jsonl", fields=("prompt",))     # ... and a row without the field names it
    append_jsonl("preds.jsonl", row)                        # flushed per call: a resumed run skips len(rows)
    for row in iter_rows("c4-train.00000.json.gz"): ...      # one row at a time (.jsonl[.gz], .parquet, .json)

A reader never sees half a file: each write goes to `<path>.tmp.<pid>` and is renamed over `path`
(os.replace is atomic on POSIX). `append_jsonl` cannot be atomic; `read_jsonl(..., drop_partial_last=True)`
drops a last line cut short by a crash.
"""
import contextlib
import glob
import gzip
import json
import os
import re
import pickle
import shutil
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from common.cli import UserError


def _tmp(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary name, then rename (a .safetensors path holds a flat dict of tensors)."""
    tmp = _tmp(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, tmp, metadata={"format": "pt"})
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def save_tensors(tensors: dict, path: str) -> None:
    """A flat {name: tensor} -> `path` atomically; safetensors unless the name ends in .pt/.pth/.bin."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"save_tensors({path}): entries {bad[:5]} are not tensors")
    atomic_save(tensors, path)


def read_tensors(path: str) -> dict:
    """A flat {name: tensor} from one .pth/.bin/.pt (weights_only) or .safetensors file."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds more than tensors, so torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}). "
                        "Re-save just the state dict (torch.save(model.state_dict(), path)) or convert it to .safetensors") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))  # {"model": state_dict} / {"state_dict": ...}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)] if isinstance(obj, dict) else ["<not a dict>"]
    if bad:
        raise UserError(f"{path} is not a flat dict of tensors (offending entries: {bad[:5]}); save a state dict of tensors")
    return obj


def atomic_write_text(text: str, path: str) -> None:
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(obj, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=2), path)


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a fresh sibling folder to fill; on a clean exit it replaces `path`, on an error it is removed.

    Readers see the old folder or the new one, never a mix. POSIX cannot rename a folder over a non-empty
    one, so the old folder is first moved aside to `<path>.old.<pid>` and deleted after the swap; a crash
    in that instant leaves the old contents there, intact.
    """
    path = os.path.normpath(path)
    tmp, old = _tmp(path), f"{path}.old.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_jsonl(path: str, drop_partial_last: bool = False, fields=(), fix: str = "fix or delete that line") -> list:
    """One JSON value per non-empty line (a .gz path is read through gzip). `drop_partial_last`: ignore an
    unparsable last line (an append cut short by a crash) instead of raising. `fields`: every row must be an
    object holding them. Bad input is a UserError naming the file, the line, the field and `fix`."""
    return [row for _, row in numbered_jsonl(path, drop_partial_last, fields, fix)]


def numbered_jsonl(path: str, drop_partial_last: bool = False, fields=(), fix: str = "fix or delete that line") -> list:
    """read_jsonl's rows as (line number, value) pairs, for a reader whose own checks name the line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file" if not os.path.isdir(path) else f"{path} is a folder, not a JSONL file")
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path)) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if drop_partial_last and not any(rest.strip() for rest in lines[i:]):
                break
            raise _bad_line(path, i, e, fix) from None
        missing = [k for k in fields if not isinstance(row, dict) or k not in row]
        if missing:
            what = f"no field '{missing[0]}'" if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
            raise UserError(f"{path}:{i}: {what} (rows need {', '.join(fields)}); {fix}")
        rows.append((i, row))
    return rows


def _bad_line(path: str, line: int, e: json.JSONDecodeError, fix: str = "fix or delete that line") -> UserError:
    return UserError(f"{path}:{line} is not valid JSON ({e.msg}, column {e.colno}); {fix}")


def write_jsonl(rows, path: str) -> None:
    atomic_write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), path)


def append_jsonl(path: str, *rows) -> None:
    """Append rows and flush them to disk, so outputs written so far survive a crash."""
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") \
            from None
    return pq.ParquetFile(path)


def _json_list(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}, column {e.colno}); fix the file") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: a .json file holds a list of rows, this one a {type(rows).__name__}")
    return rows


def iter_rows(path: str) -> Iterator:
    """The rows of a .jsonl / .jsonl.gz / .json.gz (one JSON value per line), .parquet (dicts, one record batch
    at a time) or .json (a list, read whole) file, one at a time: memory stays bounded whatever the file's size."""
    if path.endswith(".parquet"):
        for batch in _parquet(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if path.endswith(".json"):
        yield from _json_list(path)
        return
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise _bad_line(path, i, e) from None


# shard folders of the TP model (common.checkpoint writes them; common.model loads them)

DROPPED = ("rope.freqs", "inv_freq")  # recomputed buffers


def shard_paths(ckpt_dir: str) -> list:
    """consolidated.*.pth|safetensors sorted by their number (so the old `consolidated.010.pth` names load too)."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "consolidated.*")):
        m = re.fullmatch(r"consolidated\.(\d+)\.(pth|safetensors)", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def load_shard(ckpt_dir: str, tp_rank: int, tp_size: int) -> dict:
    paths = shard_paths(ckpt_dir)
    if not paths:
        raise UserError(f"no consolidated.*.pth in {ckpt_dir}; make one with "
                        f"`python -m common.checkpoint_split --ckpt_file SRC --save_path {ckpt_dir} --n {tp_size}`")
    if len(paths) != tp_size:
        raise UserError(f"{ckpt_dir} holds {len(paths)} shards but the tensor-parallel size is {tp_size}: launch with "
                        f"--nproc_per_node {len(paths)} (or tp_size={len(paths)}), or re-split with `python -m "
                        f"common.checkpoint_split --ckpt_file {ckpt_dir} --save_path NEW_DIR --n {tp_size}`")
    state = read_tensors(paths[tp_rank])
    return {k: v for k, v in state.items() if not k.endswith(DROPPED)}
