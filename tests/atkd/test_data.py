import json

import pytest

from atkd import generate_data
from atkd.data import DataError, encode, load_training_data, train_prompt
from tests.tiny import char_tokenizer, save_tiny


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_alpaca_record_renders_the_released_training_template(tmp_path):
    path = _write_json(tmp_path / "a.json", [{"instruction": "Add", "input": "1 2", "output": "3"},
                                             {"instruction": "Hi", "input": "", "output": "Hello"},
                                             {"instruction": "No input field", "output": "ok"}])
    items = load_training_data(path)
    assert items[0] == {"prompt": "Human:\nAdd 1 2\n\nAssistant:\n", "output": "3"}
    assert items[1]["prompt"] == "Human:\nHi \n\nAssistant:\n"  # the release's trailing space, kept
    assert items[2]["prompt"] == train_prompt("No input field")


def test_shipped_standin_loads():
    items = load_training_data("data/atkd/alpaca_gpt4_standin.json")
    assert len(items) == 997 and all(x["prompt"].startswith("Human:\n") for x in items)


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_missing_field_names_file_item_and_field(tmp_path, field):
    records = [{"instruction": "a", "input": "", "output": "b"}] * 2 + [{"instruction": "a", "input": ""}]
    records = [dict(r) for r in records]
    records[2] = {"instruction": "a", "output": "b"}
    del records[2][field]
    path = _write_json(tmp_path / "bad.json", records)
    with pytest.raises(DataError, match=rf"bad.json: item 2: missing field '{field}'"):
        load_training_data(path)


def test_teacher_sources_need_the_teacher_jsonl(tmp_path):
    path = _write_json(tmp_path / "a.json", [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(DataError, match="generate_data.py"):
        load_training_data(path, teacher_output=True)
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text(json.dumps({"instruction": "Human:\na \n\nAssistant:\n", "output": "b"}) + "\n")
    with pytest.raises(DataError, match=r"g.jsonl:1: missing field 'teacher_output'"):
        load_training_data(jsonl, teacher_output=True)


def test_encode_masks_by_prompt_length_and_ends_the_response_with_eos():
    tok = char_tokenizer()
    prompt_ids, response_ids = encode(tok, "Human:\nx \n\nAssistant:\n", "ok")
    assert tok.decode(prompt_ids) == "Human:\nx \n\nAssistant:\n"
    assert response_ids == tok("ok", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_generate_data_writes_one_line_per_item_and_resumes(tmp_path):
    teacher = save_tiny("opt", tmp_path / "teacher")
    data = _write_json(tmp_path / "a.json", [{"instruction": f"q{i}", "input": "", "output": f"a{i}"}
                                             for i in range(5)])
    out = tmp_path / "gen.jsonl"
    generate_data.main(teacher, str(data), str(out), max_new_tokens=6, batch_size=2)
    full = out.read_text().splitlines()
    assert len(full) == 5
    assert [json.loads(x)["instruction"] for x in full] == [x["prompt"] for x in load_training_data(data)]
    assert load_training_data(out, teacher_output=True)[3]["output"] == "a3"

    out.write_text("\n".join(full[:2]) + "\n" + full[2][:7])  # killed while writing line 3
    generate_data.main(teacher, str(data), str(out), max_new_tokens=6, batch_size=2)
    assert out.read_text().splitlines() == full


def test_generate_data_rejects_a_teacher_jsonl_of_another_data_file(tmp_path):
    data = _write_json(tmp_path / "a.json", [{"instruction": "q", "input": "", "output": "a"}])
    out = tmp_path / "gen.jsonl"
    out.write_text(json.dumps({"instruction": "Human:\nother \n\nAssistant:\n", "teacher_output": "t",
                               "output": "a"}) + "\n")
    with pytest.raises(DataError, match=r"gen.jsonl: line 1: field 'instruction' does not match item 0 of"):
        generate_data.main("unused", str(data), str(out))
