"""rwkv_llama/data.py: pre-shifted labels, user turns masked, padding masked by length, C4 interleave; streams
sharded per rank, tokenised lazily, resumable, in memory bounded by the shuffle window whatever the corpus."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from common.cli import UserError
from common.io import iter_rows
from rwkv_llama.data import (IGNORE, c4_stream, chat_example, chat_stream, collate, encode, rank_batches,
                             text_batch)
from tests.tiny import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tok():
    t = char_tokenizer()
    t.pad_token = t.eos_token       # as the trainer sets it
    return t


def test_chat_example_masks_user_turns_and_prefixes_and_shifts_labels_once():
    t = tok()
    msgs = [dict(role="user", content="hi"), dict(role="assistant", content="yo\n\n"),
            dict(role="system", content="s")]
    ex = chat_example(msgs, t, max_len=64)
    text = "User : hi\n\nAssistant : yo\n\nSystem : s\n\n"
    ids = [t.bos_token_id] + t(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    assert ex["length"] == n and ex["input_ids"][:n].tolist() == ids
    assert (ex["input_ids"][n:] == t.eos_token_id).all()       # pad = eos when unset
    start = len("<s>User : hi\n\nAssistant : ".replace("<s>", "x"))     # index of "y" in ids
    learnt = {i: int(l) for i, l in enumerate(ex["labels"]) if l != IGNORE}
    # labels[t] = ids[t+1] exactly on the assistant content "yo\n\n", plus EOS at the last real position
    assert learnt == {**{i - 1: ids[i] for i in range(start, start + 4)}, n - 1: t.eos_token_id}


def test_chat_example_truncated_row_learns_eos_at_its_last_position():
    t = tok()
    ex = chat_example([dict(role="user", content="q"), dict(role="assistant", content="a long answer")], t, 26)
    assert ex["length"] == 26 and int(ex["labels"][-1]) == t.eos_token_id
    assert int(ex["labels"][-2]) == int(ex["input_ids"][-1])


def test_text_batch_labels_are_the_next_token_and_padding_is_masked_by_length():
    t = tok()
    b = text_batch(["abc</s>d", "abcdefghij"], t, 8)     # a real EOS inside the first text stays learnt
    ids, labels = b["input_ids"], b["labels"]
    n0 = len(t("abc</s>d", add_special_tokens=False)["input_ids"])
    assert b["lengths"].tolist() == [n0, 8]
    assert labels[0, :n0 - 1].tolist() == ids[0, 1:n0].tolist()
    assert int(labels[0, n0 - 1]) == t.eos_token_id and (labels[0, n0:] == IGNORE).all()
    assert labels[1, :7].tolist() == ids[1, 1:].tolist() and int(labels[1, 7]) == t.eos_token_id


def write_c4(root, texts_by_lang, split="train"):
    for lang, texts in texts_by_lang.items():
        os.makedirs(root / lang, exist_ok=True)
        with gzip.open(root / lang / f"c4-{split}.00000.json.gz", "wt") as f:
            f.writelines(json.dumps(dict(text=x)) + "\n" for x in texts)


def test_c4_interleave_is_round_robin_until_the_first_source_ends(tmp_path):
    write_c4(tmp_path, {"en": ["e1", "e2", "e3"], "zh": ["z1", "z2"]})
    stream = c4_stream(str(tmp_path), ["en", "zh"], "train")
    assert list(stream) == ["e1", "z1", "e2", "z2"] and stream.n_rows == 4
    capped = c4_stream(str(tmp_path), ["en", "zh"], "train", max_rows=3)
    assert list(capped) == ["e1", "z1", "e2"] and capped.n_rows == 3
    with pytest.raises(UserError, match="no validation files for language 'en'"):
        c4_stream(str(tmp_path), ["en"], "validation")


def test_shipped_standins_stream_as_fixed_shape_rows():
    t = tok()
    base = os.path.join(ROOT, "data/rwkv_llama")
    chats = chat_stream(os.path.join(base, "ultrachat_standin/validation.jsonl"))
    texts = c4_stream(os.path.join(base, "c4_standin"), ["en", "gsm8k"], "validation")
    assert chats.n_rows == len(list(chats)) == 100 and texts.n_rows == len(list(texts)) == 200
    for stream in (chats, texts):
        batch = next(rank_batches(stream, t, 128, 4))
        assert batch["input_ids"].shape == batch["labels"].shape == (4, 128)
        assert ((batch["labels"] != IGNORE).sum(1) > 0).all()
    assert all(r["standin"] for r in iter_rows(os.path.join(base, "ultrachat_standin/train.jsonl")))


def test_a_bad_jsonl_line_names_the_file_and_line_and_a_row_without_the_field_too(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"messages": []}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 is not valid JSON"):
        list(chat_stream(str(p)))
    p.write_text('{"messages": []}\n{"text": "hi"}\n')
    with pytest.raises(UserError, match=r"x.jsonl: row 2 has no 'messages' field"):
        list(chat_stream(str(p)))


def texts_of(batches, t):
    """The text behind every row of the batches, in order."""
    return [t.decode(ids[:n]) for b in batches for ids, n in zip(b["input_ids"], b["lengths"])]


def numbered(tmp_path, n):
    write_c4(tmp_path, {"en": [f"r{i}" for i in range(n)]})
    return c4_stream(str(tmp_path), ["en"], "train")


def test_one_window_is_the_whole_epoch_permuted_as_the_map_style_loader_did(tmp_path):
    t, stream = tok(), numbered(tmp_path, 23)
    got = texts_of(rank_batches(stream, t, 8, 4, epoch=2, seed=5), t)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(5 + 2)).tolist()
    assert got == [f"r{i}" for i in perm[:20]]                   # drop_last: 5 batches of 4
    b = next(rank_batches(stream, t, 8, 4, epoch=2, seed=5))
    torch.testing.assert_close(b, collate([encode(f"r{i}", t, 8) for i in perm[:4]]))


@pytest.mark.parametrize("window", [7, 1000])
def test_ranks_share_each_step_equally_and_a_resumed_epoch_continues_the_same_stream(tmp_path, window):
    t, stream = tok(), numbered(tmp_path, 43)
    kw = dict(epoch=1, seed=3, shuffle_buffer=window)
    ranks = [list(rank_batches(stream, t, 8, 2, dp_rank=r, dp_size=3, **kw)) for r in range(3)]
    assert [len(b) for b in ranks] == [43 // 6] * 3                # every rank the same number of micro-batches
    steps = [[texts_of([ranks[r][k]], t) for r in range(3)] for k in range(7)]
    seen = [x for step in steps for part in step for x in part]
    assert len(set(seen)) == len(seen) == 42                        # each row at most once per epoch
    one = texts_of(rank_batches(stream, t, 8, 6, **kw), t)          # one rank with all the rows of a step
    assert one == [x for step in steps for part in step for x in part]
    for r in range(3):                                              # resumed at micro-batch 4: the same tail
        assert texts_of(rank_batches(stream, t, 8, 2, dp_rank=r, dp_size=3, start=4, **kw), t) == \
            texts_of(ranks[r][4:], t)
    other_epoch = texts_of(rank_batches(stream, t, 8, 6, epoch=2, seed=3, shuffle_buffer=window), t)
    assert other_epoch != one                                      # each epoch its own order


def test_only_this_ranks_rows_of_the_batches_it_yields_are_tokenised(tmp_path):
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(t, name)

        def __call__(self, texts, **kw):
            calls.extend(texts)
            return t(texts, **kw)
    t, stream = tok(), numbered(tmp_path, 40)
    batches = list(rank_batches(stream, Counting(), 8, 2, dp_rank=1, dp_size=4, start=3))
    assert len(batches) == 2 and sorted(calls) == sorted(texts_of(batches, t))


MEMORY_PROBE = """
import json, sys
from tests.tiny import char_tokenizer
from rwkv_llama.data import c4_stream, rank_batches

def rss_kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

t = char_tokenizer(); t.pad_token = t.eos_token
stream = c4_stream(sys.argv[1], ["en"], "train")
n = stream.n_rows
next(rank_batches(stream, t, 32, 4, shuffle_buffer=256))            # warm up
base = rss_kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")                      # VmHWM := VmRSS
batches = sum(1 for _ in rank_batches(stream, t, 32, 4, dp_size=8, shuffle_buffer=256))
growth = rss_kib("VmHWM:") - base
held = list(stream)                                                 # what the old loader did: every text at once
print(json.dumps(dict(rows=n, batches=batches, growth_kib=growth, held_kib=rss_kib("VmRSS:") - base)))
"""


def test_an_epoch_over_a_corpus_larger_than_the_memory_allowed_for_it(tmp_path):
    """64 MiB of text (gzip: a few hundred KiB on disk) read, sharded and tokenised in a fresh process whose
    resident memory may grow by 16 MiB: the old loader held every text (and every tokenised row) at once."""
    text = ("the quick brown fox jumps over the lazy dog " * 92)[:4096]
    n = 64 * 1024 * 1024 // len(text)
    os.makedirs(tmp_path / "en")
    with gzip.open(tmp_path / "en" / "c4-train.00000.json.gz", "wt", compresslevel=1) as f:
        for i in range(n):
            f.write(json.dumps(dict(text=f"{i} {text}")) + "\n")
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["rows"] == n and got["batches"] == n // 32
    assert got["growth_kib"] < 16 * 1024 < got["held_kib"], got       # the probe does see a held corpus
