import json

from common.standins import dolly_dev_without_test


def test_dolly_dev_without_test_keeps_dev_lines_byte_for_byte_minus_test_instructions(tmp_path):
    folder = tmp_path / "instruct" / "dolly"
    folder.mkdir(parents=True)
    test = [{"instruction": "Name a fruit.", "output": "Apple"}]
    dev = [{"instruction": "Name a fruit.", "input": "", "output": "Pear"},
           {"instruction": "Name a city.", "input": "ctx", "output": "Paris  é"},
           {"instruction": "Name a river.", "input": "", "output": "Nile"}]
    (folder / "valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in test))
    dev_lines = [json.dumps(dev[0]) + "\n", json.dumps(dev[1], ensure_ascii=False) + "\n", "\n",
                 json.dumps(dev[2], indent=None, separators=(",", ":")) + "\n"]
    (folder / "dev.jsonl").write_text("".join(dev_lines))
    lines, dropped = dolly_dev_without_test(str(tmp_path))
    assert lines == [dev_lines[1], dev_lines[3]] and dropped == 1
