"""anli_reverse_kl/prepare_data.py: ANLI rows -> prompt/target items, MMIDIDX round trip, cleaning, bad input."""
import json
import os
import struct

import numpy as np
import pytest

from anli_reverse_kl import prepare_data as prep
from tests.tiny import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDIN = os.path.join(ROOT, "data", "anli_standin")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def test_prompt_holds_the_plain_options_string_and_target_is_label_colon_reason():
    prompt = prep.build_prompt("A man sleeps.", "A person rests.")
    assert prompt == ("A man sleeps.\nCan we infer the following and why?\nA person rests.\n\n"
                      "OPTIONS:\n- entailment\n- contradiction\n- neutral")
    assert " * " not in prompt
    assert prep.make_target("entailment", "Sleeping is resting.") == "entailment:Sleeping is resting."
    assert prep.make_target("neutral", None) == "neutral"


@pytest.mark.parametrize("reason, cleaned", [
    ("The man is asleep. and then", "The man is asleep."),                      # trimmed to the last full stop
    ("output: The man is asleep.", "The man is asleep."),                       # prefix stripped
    ("Hypothesis: output: It says so.", "It says so."),
    ("It is <nowiki>odd</nowiki>.", None),                                       # markup
    ("The [i]man[/i] sleeps.", None),
    ("An nli example.", None),
    ("It is unlikely he sleeps.", "It is unlikely he sleeps."),                  # 'nli' inside a word is fine
    ("no no no no no no no it is.", None),                                       # 6 immediate repeats > 5
    ("no no no no no no it is.", "no no no no no no it is."),                    # 5 repeats are allowed
    ("He sleeps. He sleeps.", None),                                             # repeated sentence
    ("Yes.", None),                                                              # shorter than 5 characters
    ("", None), (None, None),
])
def test_clean_reason_follows_the_refinement_rules(reason, cleaned):
    assert prep.clean_reason(reason) == cleaned


def test_train_split_drops_rows_without_a_usable_reason_but_dev_keeps_every_row():
    rows = [dict(uid="a", premise="P.", hypothesis="H.", label=0, reason="It follows from P."),
            dict(uid="b", premise="P.", hypothesis="H.", label=2, reason=""),
            dict(uid="c", premise="P.", hypothesis="H.", label=1, reason="<br>bad markup.")]
    train, dropped = prep.make_items(rows, "train", "r1")
    assert [it["uid"] for it in train] == ["a"] and dropped == 2
    dev, dropped = prep.make_items(rows, "dev", "r1")
    assert [it["target"] for it in dev] == ["entailment:It follows from P.", "contradiction", "neutral"]
    assert dropped == 0


def test_binarised_items_round_trip_to_the_tokens_written(tmp_path, tok_dir):
    prep.main(data_dir=STANDIN, tokenizer=tok_dir, save=str(tmp_path), rounds="r1", splits="train,dev",
              max_prompt_length=1000)
    tok = char_tokenizer()
    for split in ("train", "dev"):
        records = [json.loads(line) for line in open(tmp_path / "r1" / f"{split}.jsonl")]
        rows = [json.loads(line) for line in open(os.path.join(STANDIN, f"{split}_r1.jsonl"))]
        items = prep.read_items(str(tmp_path / "r1"), split)
        assert len(items) == len(records) == (len(rows) if split == "dev" else len(prep.make_items(rows, split,
                                                                                                   "r1")[0]))
        by_uid = {r["uid"]: r for r in rows}
        for item, rec in zip(items, records):
            row = by_uid[rec["uid"]]
            assert item["prompt"] == rec["prompt_tokens"] == tok.encode(rec["prompt"]) + [tok.eos_token_id]
            assert item["target"] == rec["target_tokens"] == tok.encode(rec["target"]) + [tok.eos_token_id]
            assert tok.decode(item["uid"]) == rec["uid"]
            assert tok.decode(item["premise"]) == row["premise"]
            assert tok.decode(item["hypothesis"]) == row["hypothesis"]
            assert tok.decode(item["label_word"]) == rec["label"] == prep.LABEL_WORDS[row["label"]]


def test_index_file_matches_the_mmidx_byte_layout(tmp_path, tok_dir):
    prep.main(data_dir=STANDIN, tokenizer=tok_dir, save=str(tmp_path), rounds="r2", splits="test")
    prefix = tmp_path / "r2" / "test_0"
    raw = open(f"{prefix}.idx", "rb").read()
    magic, version, code, n, d = struct.unpack_from("<9sQBQQ", raw)
    assert (magic, version, code, d) == (b"MMIDIDX\x00\x00", 1, 8, 1)  # 8 = uint16 (vocabulary < 65,500)
    off = 9 + 8 + 1 + 8 + 8
    sizes = np.frombuffer(raw, np.int32, n, off)
    pointers = np.frombuffer(raw, np.int64, n, off + 4 * n)
    assert np.frombuffer(raw, np.int64, d, off + 12 * n).tolist() == [0]
    assert len(raw) == off + 12 * n + 8 * d
    assert pointers.tolist() == [2 * int(s) for s in np.concatenate([[0], np.cumsum(sizes)[:-1]])]
    data = np.fromfile(f"{prefix}.bin", np.uint16)
    assert data.size == sizes.sum()
    first = data[: sizes[0]]
    assert (first == 65535).sum() == len(prep.FIELDS) - 1  # ⟂ written as -1 wraps to the uint16 maximum
    assert first.tolist()[: first.tolist().index(65535)] == prep.read_items(str(tmp_path / "r2"), "test")[0]["prompt"]


def test_parquet_and_jsonl_give_the_same_items(tmp_path, tok_dir):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in open(os.path.join(STANDIN, "dev_r3.jsonl"))]
    (tmp_path / "pq" / "plain_text").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "plain_text" / "dev_r3-00000-of-00001.parquet")
    prep.main(data_dir=str(tmp_path / "pq"), tokenizer=tok_dir, save=str(tmp_path / "a"), rounds="r3", splits="dev")
    prep.main(data_dir=STANDIN, tokenizer=tok_dir, save=str(tmp_path / "b"), rounds="r3", splits="dev")
    for name in ("dev_0.bin", "dev_0.idx", "dev.jsonl"):
        assert (tmp_path / "a" / "r3" / name).read_bytes() == (tmp_path / "b" / "r3" / name).read_bytes()


@pytest.mark.parametrize("field", ["premise", "hypothesis", "label"])
def test_row_missing_a_field_names_file_row_and_field(tmp_path, field):
    rows = [dict(uid="a", premise="P.", hypothesis="H.", label=0, reason="")] * 3
    rows = rows[:2] + [{k: v for k, v in rows[2].items() if k != field}]
    write_jsonl(tmp_path / "dev_r1.jsonl", rows)
    with pytest.raises(ValueError, match=rf"dev_r1\.jsonl:3: no '{field}' field"):
        prep.read_rows(str(tmp_path / "dev_r1.jsonl"))


@pytest.mark.parametrize("label", [3, -1, "entailment", True])
def test_label_outside_0_to_2_is_a_clear_error(tmp_path, label):
    write_jsonl(tmp_path / "train_r2.jsonl", [dict(uid="a", premise="P.", hypothesis="H.", label=label)])
    with pytest.raises(ValueError, match=r"train_r2\.jsonl:1: field 'label' is .* ANLI labels are 0"):
        prep.read_rows(str(tmp_path / "train_r2.jsonl"))


def test_missing_split_file_says_how_to_get_it(tmp_path):
    with pytest.raises(ValueError, match="no test_r1.jsonl or test_r1-.*parquet"):
        prep.find_split_file(str(tmp_path), "test", "r1")


def test_chat_template_prompts_are_the_tokenizers_own_user_turn_then_eos(tmp_path, smollm2_dir):
    """--chat_template True (the REAL=1 causal pair): each prompt's ids are transformers' apply_chat_template of
    one user turn with the generation prompt, closed by EOS as every prompt (a causal model reads it without)."""
    from transformers import AutoTokenizer

    prep.main(data_dir=STANDIN, tokenizer=smollm2_dir, save=str(tmp_path), rounds="r1", splits="dev",
              chat_template=True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [json.loads(line) for line in open(os.path.join(STANDIN, "dev_r1.jsonl"))]
    items = prep.make_items(rows, "dev", "r1")[0]
    records = [json.loads(line) for line in open(tmp_path / "r1" / "dev.jsonl")]
    assert len(records) == len(items) > 0
    for item, rec in zip(items, records):
        want = tok.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=True,
                                       add_generation_prompt=True)["input_ids"]
        assert rec["prompt_tokens"] == want + [tok.eos_token_id]
        assert rec["target_tokens"] == tok.encode(item["target"], add_special_tokens=False) + [tok.eos_token_id]
