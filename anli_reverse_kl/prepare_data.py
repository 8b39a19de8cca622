"""ANLI -> prompt / target items, binarised per round and split (anli_reverse_kl.md §2).

    python anli_reverse_kl/prepare_data.py --data_dir /path/to/facebook/anli/plain_text --tokenizer google/flan-t5-large \
        --save processed_data/anli
    python anli_reverse_kl/prepare_data.py --data_dir data/anli_standin --tokenizer runs/tiny/teacher0 --save ...

Reads, per round r ∈ {r1, r2, r3} and split ∈ {train, dev, test}, the parquet file of the public release
(`{split}_{r}-00000-of-00001.parquet`, needs pyarrow) or the same rows as JSONL (`{split}_{r}.jsonl`), and
writes `{save}/{r}/{split}_0.{bin,idx}` (MMIDIDX, contra_kd.md §2.3) whose item is

    prompt ⟂ target ⟂ uid ⟂ premise ⟂ hypothesis ⟂ label_word          (⟂ = the split marker)

with EOS closing prompt and target, plus `{save}/{r}/{split}.jsonl` with
`{uid, prompt, target, label, reason, prompt_tokens, target_tokens}` (label = the label word, reason the
cleaned reason or "") for evaluation. The train split is cleaned (§2.3: rows without a usable reason are
dropped; prompts over `max_prompt_length` tokens are dropped, as MiniLLM drops them); dev/test keep every
row, with target = the label word when the reason is empty or unusable. `--chat_template True` (ours, for a
causal instruct model such as SmolLM2-Instruct) puts each prompt in the tokenizer's chat template as one user
turn (common.hf.chat_prompt); the target is then the assistant's reply.
"""
import glob
import os
import re
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from common.binarized import best_dtype, read_split, write_indexed
from common.cli import UserError, check_range, run_cli
from common.io import iter_rows, numbered_jsonl, write_jsonl

LABEL_WORDS = ("entailment", "neutral", "contradiction")  # ANLI's label ids 0, 1, 2
OPTIONS = "OPTIONS:\n- entailment\n- contradiction\n- neutral"  # one plain string for every split (the fork's
# dev/test prompts had " * ".join(OPTIONS), which interleaves " * " between characters)
ROUNDS = ("r1", "r2", "r3")
SPLITS = ("train", "dev", "test")
REQUIRED = ("premise", "hypothesis", "label")
FIELDS = ("prompt", "target", "uid", "premise", "hypothesis", "label_word")  # the item's parts, in order

MARKUP = re.compile(r"nowiki|\bnli\b|\[/?i\]|\[/?b\]|<br\s*/?>|&quot;|&amp;|\{\{|\}\}", re.IGNORECASE)
PREFIX = re.compile(r"^\s*(hypothesis|premise|output|answer|reason|explanation)\s*:\s*", re.IGNORECASE)
MAX_WORD_REPEATS = 5
MIN_REASON_CHARS = 5


def build_prompt(premise: str, hypothesis: str) -> str:
    return f"{premise}\nCan we infer the following and why?\n{hypothesis}\n\n{OPTIONS}"


def clean_reason(reason: Optional[str]) -> Optional[str]:
    """The fork's reason refinement (§2.3); None when the reason is unusable.

    Our readings of the unverified details: the length rule counts characters; "word repeats" counts
    positions whose word equals the one before it (case-insensitive); markup words match whole words.
    """
    text = (reason or "").strip()
    while PREFIX.match(text):
        text = PREFIX.sub("", text, count=1).strip()
    if "." in text:
        text = text[: text.rindex(".") + 1]  # trim to the last full stop
    if MARKUP.search(text):
        return None
    words = re.findall(r"\w+", text.lower())
    if sum(a == b for a, b in zip(words, words[1:])) > MAX_WORD_REPEATS:
        return None
    sentences = [" ".join(s.lower().split()) for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if len(set(sentences)) < len(sentences):
        return None
    return text if len(text) >= MIN_REASON_CHARS else None


def make_target(label_word: str, reason: Optional[str]) -> str:
    return f"{label_word}:{reason}" if reason else label_word


def find_split_file(data_dir: str, split: str, round_: str) -> str:
    """`{split}_{round}.jsonl` or the release's `{split}_{round}-*.parquet` (also under `plain_text/`)."""
    candidates = []
    for folder in (data_dir, os.path.join(data_dir, "plain_text")):
        candidates += [os.path.join(folder, f"{split}_{round_}.jsonl")]
        candidates += sorted(glob.glob(os.path.join(folder, f"{split}_{round_}-*.parquet")))
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
        raise UserError(f"--data_dir {data_dir}: no {split}_{round_}.jsonl or {split}_{round_}-*.parquet; point "
                        f"--data_dir at facebook/anli's plain_text folder (or build the stand-in: python "
                        f"anli_reverse_kl/build_standin.py)")
    return found[0]


def read_rows(path: str) -> list:
    """Rows of one ANLI file (parquet or JSONL, read by common.io), checked: premise / hypothesis / label present,
    label in 0-2. A bad row is a UserError naming the file and its line (JSONL) or row (parquet), and the field."""
    if path.endswith(".parquet"):
        rows = list(iter_rows(path))
        where = [f"{path}: row {i}" for i in range(len(rows))]
    else:
        numbered = numbered_jsonl(path)
        rows, where = [row for _, row in numbered], [f"{path}:{i}" for i, _ in numbered]
    for row, at in zip(rows, where):
        for field in REQUIRED:
            if not isinstance(row, dict) or row.get(field) is None:
                raise UserError(f"{at}: no '{field}' field; ANLI rows need premise, hypothesis and label (uid and "
                                f"reason optional)")
        if isinstance(row["label"], bool) or row["label"] not in (0, 1, 2):
            raise UserError(f"{at}: field 'label' is {row['label']!r}; ANLI labels are 0 (entailment), "
                            f"1 (neutral), 2 (contradiction)")
    return rows


def make_items(rows: list, split: str, round_: str) -> tuple:
    """Prompt / target records; the train split keeps only rows with a usable reason. Returns (items, dropped)."""
    items, dropped = [], 0
    for i, row in enumerate(rows):
        reason = clean_reason(row.get("reason"))
        if split == "train" and reason is None:
            dropped += 1
            continue
        word = LABEL_WORDS[int(row["label"])]
        items.append(dict(uid=str(row.get("uid") or f"{split}_{round_}-{i}"), premise=row["premise"],
                          hypothesis=row["hypothesis"], label=word, reason=reason or "",
                          prompt=build_prompt(row["premise"], row["hypothesis"]), target=make_target(word, reason)))
    return items, dropped


def encode(tokenizer, text: str, eos: bool = False) -> list:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id] if eos else ids


def write_split(items: list, tokenizer, folder: str, split: str, max_prompt_length: Optional[int]) -> int:
    """Tokenise and write `{folder}/{split}_0.{bin,idx}` + `{split}.jsonl`; returns the overlong items dropped."""
    sequences, records, overlong = [], [], 0
    for item in items:
        prompt, target = encode(tokenizer, item["prompt"], eos=True), encode(tokenizer, item["target"], eos=True)
        if split == "train" and max_prompt_length and len(prompt) > max_prompt_length:
            overlong += 1
            continue
        parts = [prompt, target] + [encode(tokenizer, item[k]) for k in ("uid", "premise", "hypothesis", "label")]
        sequences.append([t for k, part in enumerate(parts) for t in ([-1] if k else []) + part])
        records.append(dict(uid=item["uid"], prompt=item["prompt"], target=item["target"], label=item["label"],
                            reason=item["reason"], prompt_tokens=prompt, target_tokens=target))
    write_tokenized(folder, split, sequences, records, len(tokenizer))
    return overlong


def write_tokenized(folder: str, split: str, sequences: list, records: list, vocab_size: int) -> None:
    """`{folder}/{split}_0.{bin,idx}` from the items' token sequences (⟂ written as -1) and `{split}.jsonl`."""
    os.makedirs(folder, exist_ok=True)
    write_indexed(os.path.join(folder, f"{split}_0"), sequences, best_dtype(vocab_size))
    write_jsonl(records, os.path.join(folder, f"{split}.jsonl"))


def read_items(folder: str, split: str, flag: str = "--data_dir") -> list:
    """The binarised items back as dicts of token-id lists, keyed by FIELDS."""
    data = read_split(folder, split, flag, "write it with anli_reverse_kl/prepare_data.py")
    items = []
    for i in range(len(data)):
        seq = np.asarray(data[i]).astype(np.int64)
        cuts = np.flatnonzero(seq == data.marker)
        if len(cuts) != len(FIELDS) - 1:
            raise UserError(f"{flag} {folder}: {split} item {i} has {len(cuts) + 1} parts, want {len(FIELDS)} "
                            f"({' ⟂ '.join(FIELDS)}); re-run anli_reverse_kl/prepare_data.py")
        parts = np.split(seq, cuts)
        parts = [parts[0]] + [p[1:] for p in parts[1:]]  # each later part opens with the marker
        items.append({k: p.tolist() for k, p in zip(FIELDS, parts)})
    return items


def main(data_dir: str = "data/anli_standin", tokenizer: str = None, save: str = "processed_data/anli",
         rounds: str = "r1,r2,r3", splits: str = "train,dev,test", max_prompt_length: int = 320,
         chat_template: bool = False):
    from common.hf import chat_prompt, load_tokenizer

    if tokenizer is None:
        raise UserError("--tokenizer: give a tokenizer folder (the teacher's; teacher and student must share it)")
    check_range("--max_prompt_length", max_prompt_length, low=1)
    rounds = rounds.split(",") if isinstance(rounds, str) else list(rounds)
    splits = splits.split(",") if isinstance(splits, str) else list(splits)
    for name, values, valid in (("--rounds", rounds, ROUNDS), ("--splits", splits, SPLITS)):
        if not values or any(v not in valid for v in values):
            raise UserError(f"{name} {','.join(map(str, values))}: give a comma list of {', '.join(valid)}")
    # every file is read and checked before anything is written
    found = {(r, split): find_split_file(data_dir, split, r) for r in rounds for split in splits}
    rows_of = {key: read_rows(path) for key, path in found.items()}
    tok = load_tokenizer(tokenizer, flag="--tokenizer", model_folder=False)
    if tok.eos_token_id is None:
        raise UserError(f"--tokenizer {tokenizer}: the tokenizer has no EOS token; targets end with EOS")
    for r in rounds:
        for split in splits:
            path, rows = found[r, split], rows_of[r, split]
            items, dropped = make_items(rows, split, r)
            if chat_template:
                items = [dict(item, prompt=chat_prompt(tok, item["prompt"])) for item in items]
            overlong = write_split(items, tok, os.path.join(save, r), split, max_prompt_length)
            print(f"{r} {split}: {len(rows)} rows from {path} -> {len(items) - overlong} items "
                  f"({dropped} without a usable reason, {overlong} prompts over {max_prompt_length} tokens)")


if __name__ == "__main__":
    run_cli(main)
