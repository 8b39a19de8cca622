"""Training text for the RWKV hybrids (spec §5), from local files only (JSONL, JSONL.gz, parquet with pyarrow).

Every loader emits fixed-shape rows {input_ids [L], labels [L], length} with **pre-shifted** labels
(labels[t] is the token at t+1, -100 where nothing is learnt) and padding masked by length; the trainer's CE
uses them without a second shift.

    chat:  rows {messages: [{role, content}, ...]} (UltraChat-200k)      -> chat_example / chat_dataset
    text:  per-language C4 folders, interleaved round-robin (c4 en/zh)  -> load_and_interleave_c4 + text_batch
"""
import glob
import json
import os
from typing import Optional

import torch

from common.cli import UserError
from common.io import read_jsonl

IGNORE = -100


def read_rows(path: str) -> list:
    """All rows of a .jsonl / .jsonl.gz / .json (a list) / .parquet file as dicts."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to JSONL")
        return pq.read_table(path).to_pylist()
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return read_jsonl(path)


def _tokens(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad(ids: list, labels: list, max_len: int, pad_id: int) -> dict:
    n = len(ids)
    return dict(input_ids=torch.tensor(ids + [pad_id] * (max_len - n)),
                labels=torch.tensor(labels + [IGNORE] * (max_len - n)), length=n)


def chat_example(messages: list, tokenizer, max_len: int = 4096, pad_id: Optional[int] = None) -> dict:
    """UltraChat format (spec §5): [BOS] then per message "Role : " + content + "\\n\\n", prefixes and user/system
    content masked, assistant content learnt; truncated to max_len, labels shifted left with EOS last."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    ids, labels = ([bos], [IGNORE]) if bos is not None else ([], [])
    for m in messages:
        role, content = m["role"], m["content"]
        if not content.endswith("\n\n"):
            content += "\n\n"
        prefix = {"user": "User : ", "assistant": "Assistant : "}.get(role, role.capitalize() + " : ")
        p, c = _tokens(tokenizer, prefix), _tokens(tokenizer, content)
        ids += p + c
        labels += [IGNORE] * len(p) + (c if role == "assistant" else [IGNORE] * len(c))
    ids, labels = ids[:max_len], labels[:max_len]
    labels = labels[1:] + [eos]          # pre-shift: the last real position learns EOS, even when truncated
    return _pad(ids, labels, max_len, eos if pad_id is None else pad_id)


def chat_dataset(paths, tokenizer, max_len: int = 4096, pad_id: Optional[int] = None) -> list:
    """Every conversation of the given files (train_gen + train_sft in the original), tokenised."""
    rows = []
    for path in [paths] if isinstance(paths, str) else paths:
        for i, row in enumerate(read_rows(path)):
            if "messages" not in row:
                raise UserError(f"{path}: row {i} has no 'messages' field (UltraChat rows are "
                                "{{messages: [{{role, content}}, ...]}})")
            rows.append(chat_example(row["messages"], tokenizer, max_len, pad_id))
    return rows


def load_and_interleave_c4(local_c4_dir: str, languages=("en", "zh"), split: str = "train") -> list:
    """Texts of {local_c4_dir}/{lang}/*{split}*.(jsonl|jsonl.gz|json.gz|parquet), interleaved round-robin
    across languages until the first one runs out (as datasets.interleave_datasets' default)."""
    sources = []
    for lang in languages:
        files = sorted(f for f in glob.glob(os.path.join(local_c4_dir, lang, f"*{split}*"))
                       if f.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".parquet")))
        if not files:
            raise UserError(f"--c4_data {local_c4_dir}: no {split} files for language {lang!r} "
                            f"(expected {os.path.join(local_c4_dir, lang, f'*{split}*.jsonl')})")
        sources.append([row["text"] for f in files for row in read_rows(f)])
    n = min(len(s) for s in sources)
    return [s[i] for i in range(n) for s in sources]


def text_batch(texts: list, tokenizer, max_len: int) -> dict:
    """The C4 collator: pad to max_len and truncate; labels[:, :-1] = ids[:, 1:], labels[:, -1] = EOS;
    positions past a row's length are -100, except its last real token's label (the first pad, EOS).
    (The original masked by ids == eos, which also hid real EOS tokens; ours masks by length.)"""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"]
    lengths = enc["attention_mask"].sum(1)
    eos = tokenizer.eos_token_id
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], eos)], 1)
    pos = torch.arange(max_len)[None]
    labels[pos == (lengths[:, None] - 1)] = eos
    labels[pos >= lengths[:, None]] = IGNORE
    return dict(input_ids=ids, labels=labels, lengths=lengths)


def text_dataset(texts: list, tokenizer, max_len: int) -> list:
    """Rows of text_batch, one per text (tokenised once, so the loader only stacks)."""
    out = []
    for start in range(0, len(texts), 256):
        b = text_batch(texts[start:start + 256], tokenizer, max_len)
        out += [dict(input_ids=i, labels=l, length=int(n)) for i, l, n in zip(b["input_ids"], b["labels"],
                                                                               b["lengths"])]
    return out


def collate(rows: list) -> dict:
    return dict(input_ids=torch.stack([r["input_ids"] for r in rows]),
                labels=torch.stack([r["labels"] for r in rows]),
                lengths=torch.tensor([r["length"] for r in rows]))
