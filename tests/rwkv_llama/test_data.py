"""rwkv_llama/data.py: pre-shifted labels, user turns masked, padding masked by length, C4 interleave."""
import gzip
import json
import os

import pytest
import torch

from rwkv_llama.data import (IGNORE, chat_dataset, chat_example, collate, load_and_interleave_c4, read_rows,
                             text_batch, text_dataset)
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


def test_c4_interleave_is_round_robin_until_the_first_source_ends(tmp_path):
    for lang, texts in (("en", ["e1", "e2", "e3"]), ("zh", ["z1", "z2"])):
        os.makedirs(tmp_path / lang)
        with gzip.open(tmp_path / lang / "c4-train.00000.json.gz", "wt") as f:
            f.writelines(json.dumps(dict(text=x)) + "\n" for x in texts)
    assert load_and_interleave_c4(str(tmp_path), ["en", "zh"], "train") == ["e1", "z1", "e2", "z2"]
    with pytest.raises(ValueError, match="no validation files for language 'en'"):
        load_and_interleave_c4(str(tmp_path), ["en"], "validation")


def test_shipped_standins_load_as_fixed_shape_rows():
    t = tok()
    base = os.path.join(ROOT, "data/rwkv_llama")
    chats = chat_dataset(os.path.join(base, "ultrachat_standin/validation.jsonl"), t, 128)
    texts = load_and_interleave_c4(os.path.join(base, "c4_standin"), ["en", "gsm8k"], "validation")
    rows = text_dataset(texts, t, 128)
    assert len(chats) == 100 and len(rows) == 200
    for batch in (collate(chats[:4]), collate(rows[:4])):
        assert batch["input_ids"].shape == batch["labels"].shape == (4, 128)
        assert ((batch["labels"] != IGNORE).sum(1) > 0).all()
    assert all(r["standin"] for r in read_rows(os.path.join(base, "ultrachat_standin/train.jsonl")))


def test_a_bad_jsonl_line_names_the_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"messages": []}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 is not valid JSON"):
        read_rows(str(p))
