import json
import os

import numpy as np
import pytest

from common.binarized import IndexedTokens
from contra_kd.data import (ChunkSplit, InstructionSplit, build_prompt, read_records, tokenize_record)
from contra_kd.prepare_data import dolly, pretrain
from tests.tiny import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("path", ["instruct/dolly/valid.jsonl", "instruct/self-inst/valid.jsonl",
                                  "instruct/sinst/11_/valid.jsonl", "contra_kd/dolly_standin/train.jsonl"])
def test_template_reproduces_every_shipped_prompt_field(path):
    with open(os.path.join(DATA, path)) as f:
        records = [json.loads(line) for line in f]
    assert all(build_prompt(r["instruction"], r.get("input", "")) == r["prompt"] for r in records)


def test_standins_share_no_record_with_each_other_and_no_instruction_with_the_dolly_test_set():
    def key(r):
        return r["instruction"], r["input"], r["output"]
    train, dev = (read_records(f"{DATA}/contra_kd/dolly_standin/{split}.jsonl") for split in ("train", "dev"))
    test = {r["instruction"] for r in read_records(f"{DATA}/instruct/dolly/valid.jsonl")}
    assert len(train) == 897 and len(dev) == 100
    assert not {key(r) for r in train} & {key(r) for r in dev}
    assert not {r["instruction"] for r in train + dev} & test


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_dolly_full_items_are_prompt_marker_response_eos_and_long_prompts_are_dropped(tmp_path, tokenizer_dir,
                                                                                      capsys):
    records = read_records(f"{DATA}/contra_kd/dolly_standin/train.jsonl")[:12]
    _write_jsonl(tmp_path / "train.jsonl", records)
    _write_jsonl(tmp_path / "dev.jsonl", records[:3])
    max_prompt = sorted(len(r["prompt"]) for r in records)[8]  # char tokenizer: one token per character
    dolly(str(tmp_path), str(tmp_path / "out"), tokenizer_dir, "tiny", max_prompt_length=max_prompt)
    kept = [r for r in records if len(r["prompt"]) <= max_prompt]
    assert f"dolly train: {len(kept)} items, {len(records) - len(kept)} dropped" in capsys.readouterr().out

    tok = char_tokenizer()
    full = InstructionSplit(str(tmp_path / "out/full/tiny"), "train")
    raw = IndexedTokens(str(tmp_path / "out/full/tiny/train_0"))
    assert raw.dtype == np.uint16 and len(full) == len(kept) and full.records == kept
    for i, record in enumerate(kept):
        prompt_ids, response_ids = tokenize_record(tok, record)
        assert raw[i].tolist() == prompt_ids + [65535] + response_ids
        assert full[i] == (prompt_ids, response_ids)
        assert tok.decode(response_ids[:-1]) == record["output"] and response_ids[-1] == tok.eos_token_id
    prompts = InstructionSplit(str(tmp_path / "out/prompt/tiny"), "train")
    assert [prompts[i] for i in range(len(prompts))] == [(full[i][0], None) for i in range(len(full))]
    valid = InstructionSplit(str(tmp_path / "out/full/tiny"), "valid")
    assert valid.records == [r for r in records[:3] if len(r["prompt"]) <= max_prompt]


def test_dolly_reads_minillm_raw_layout_with_databricks_fields(tmp_path, tokenizer_dir):
    raw = [{"instruction": f"q{i}", "context": "ctx" if i % 2 else "", "response": f"a{i}", "category": "qa"}
           for i in range(5)]
    _write_jsonl(tmp_path / "raw.jsonl", raw)
    dolly(str(tmp_path), str(tmp_path / "out"), tokenizer_dir, "tiny", dev_num=2)
    train = InstructionSplit(str(tmp_path / "out/full/tiny"), "train")
    assert [r["instruction"] for r in train.records] == ["q2", "q3", "q4"]
    assert train.records[1]["prompt"] == build_prompt("q3", "ctx") and train.records[1]["output"] == "a3"


def test_pretrain_chunks_are_the_eos_joined_documents_cut_to_length(tmp_path, tokenizer_dir):
    docs = ["first doc<@x(x!>second line", "another one", "", "x" * 40]
    (tmp_path / "owt.txt").write_text("\n".join(docs) + "\n")
    pretrain(str(tmp_path / "owt.txt"), str(tmp_path / "out"), tokenizer_dir, "tiny", max_length=16, dev_num=1,
             train_num=100, train_num_name="all")
    tok = char_tokenizer()
    stream = []
    for d in docs:
        if d:
            stream += tok.encode(d.replace("<@x(x!>", "\n"), add_special_tokens=False) + [tok.eos_token_id]
    folder = str(tmp_path / "out/tiny/16/all")
    valid, train = ChunkSplit(folder, "valid"), ChunkSplit(folder, "train")
    chunks = [valid[0]] + [train[i] for i in range(len(train))]
    assert len(valid) == 1 and all(len(c) == 16 for c in chunks)
    assert sum(chunks, []) == stream[:16 * (len(stream) // 16)]


def test_missing_dolly_files_name_the_folder_and_the_layouts(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match=r"neither train\.jsonl \+ dev\.jsonl \(DSKD\) nor raw\.jsonl"):
        dolly(str(tmp_path), str(tmp_path / "out"), tokenizer_dir, "tiny")
