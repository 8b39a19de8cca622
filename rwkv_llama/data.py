"""Training text for the RWKV hybrids (spec §5), streamed from local files (JSONL, JSONL.gz, parquet with pyarrow).

Every row becomes {input_ids [L], labels [L], length} with **pre-shifted** labels (labels[t] is the token at
t+1, -100 where nothing is learnt) and padding masked by length; the trainer's CE uses them without a second
shift.

    chat:  rows {messages: [{role, content}, ...]} (UltraChat-200k)     -> chat_stream, chat_example
    text:  per-language C4 folders, interleaved round-robin (c4 en/zh) -> c4_stream, text_batch
    for batch in rank_batches(stream, tokenizer, L, micro_bsz, epoch=e, seed=s, dp_rank=r, dp_size=n): ...

Nothing is held: a Stream reads its files row by row (once up front to count and check them, then once per
epoch), rank_batches keeps one shuffle window of raw rows and tokenises only this rank's rows, one micro-batch
at a time, so memory is bounded by the window whatever the corpus size (the paper's C4 mix is 0.74B tokens).
"""
import glob
import os
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Optional

import torch

from common.cli import UserError
from common.io import iter_rows

IGNORE = -100


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


def collate(rows: list) -> dict:
    return dict(input_ids=torch.stack([r["input_ids"] for r in rows]),
                labels=torch.stack([r["labels"] for r in rows]),
                lengths=torch.tensor([r["length"] for r in rows]))


# ---------------------------------------------------------------------------------------------------------
# Streams

@dataclass
class Stream:
    """The rows of one split, read lazily in file order: one source (UltraChat-style files, field "messages")
    or several (C4 languages, field "text") interleaved round-robin until the first runs out, as
    datasets.interleave_datasets; `max_rows` ends it early (quick runs). Yields each row's field."""
    sources: list               # per source, its files in order
    field: str
    max_rows: Optional[int] = None

    def __iter__(self):
        sources = [self._read(files) for files in self.sources]
        n = 0
        while True:
            one_round = [next(source, None) for source in sources]
            if any(x is None for x in one_round):
                return
            for x in one_round:
                if self.max_rows is not None and n >= self.max_rows:
                    return
                yield x
                n += 1

    def _read(self, files):
        for path in files:
            for i, row in enumerate(iter_rows(path), 1):
                if not isinstance(row, dict) or row.get(self.field) is None:
                    raise UserError(f"{path}: row {i} has no {self.field!r} field (expected "
                                    f"{EXPECTED[self.field]})")
                yield row[self.field]

    @cached_property
    def n_rows(self) -> int:
        """len(list(self)), from one pass that keeps nothing (each source only as far as max_rows needs) and
        checks every row: a malformed line or a row without the field stops a run before its models load."""
        need = None if self.max_rows is None else -(-self.max_rows // len(self.sources))
        counts = [sum(1 for _ in islice(self._read(files), need)) for files in self.sources]
        n = min(counts) * len(counts)
        return n if self.max_rows is None else min(n, self.max_rows)


EXPECTED = {"messages": "UltraChat rows are {messages: [{role, content}, ...]}", "text": "C4 rows are {text: ...}"}


def chat_stream(paths, max_rows: Optional[int] = None) -> Stream:
    """Every conversation of the given files, in order (train_gen + train_sft in the original)."""
    return Stream([[paths] if isinstance(paths, str) else list(paths)], "messages", max_rows)


def c4_stream(local_c4_dir: str, languages=("en", "zh"), split: str = "train",
              max_rows: Optional[int] = None) -> Stream:
    """Texts of {local_c4_dir}/{lang}/*{split}*.(jsonl|jsonl.gz|json.gz|parquet), the languages interleaved."""
    sources = []
    for lang in [languages] if isinstance(languages, str) else languages:
        files = sorted(f for f in glob.glob(os.path.join(local_c4_dir, lang, f"*{split}*"))
                       if f.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".parquet")))
        if not files:
            raise UserError(f"--c4_data {local_c4_dir}: no {split} files for language {lang!r} "
                            f"(expected {os.path.join(local_c4_dir, lang, f'*{split}*.jsonl')})")
        sources.append(files)
    return Stream(sources, "text", max_rows)


def encode(raw, tokenizer, max_len: int) -> dict:
    """One row of a stream as a training row: a C4 text (the C4 collator's rule) or a conversation."""
    if isinstance(raw, str):
        b = text_batch([raw], tokenizer, max_len)
        return dict(input_ids=b["input_ids"][0], labels=b["labels"][0], length=int(b["lengths"][0]))
    return chat_example(raw, tokenizer, max_len)


def rank_batches(stream: Stream, tokenizer, max_len: int, micro_bsz: int, *, epoch: int = 0, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, shuffle_buffer: int = 10_000, start: int = 0):
    """This rank's collated micro-batches of one epoch, from micro-batch `start` on.

    The stream is cut into windows of `shuffle_buffer` rows, each permuted by one generator seeded with
    seed + epoch (a stream within one window is permuted whole, as a map-style loader would); each run of
    dp_size * micro_bsz permuted rows is one micro-batch on every rank, rank r taking its r-th micro_bsz rows.
    An incomplete last run is dropped, so every rank yields stream.n_rows // (dp_size * micro_bsz) batches
    (DDP and the teacher server's lockstep need equal counts). Only this rank's rows from micro-batch `start`
    on are tokenised: a resumed run passes the micro-batches already done and continues the same stream."""
    generator = torch.Generator().manual_seed(seed + epoch)
    group, position, mine = dp_size * micro_bsz, 0, []
    rows = iter(stream)
    while window := list(islice(rows, shuffle_buffer)):
        for i in torch.randperm(len(window), generator=generator).tolist():
            batch, slot = divmod(position, group)
            position += 1
            if batch < start:
                continue
            if slot // micro_bsz == dp_rank:
                mine.append(encode(window[i], tokenizer, max_len))
            if slot == group - 1:
                yield collate(mine)
                mine = []
