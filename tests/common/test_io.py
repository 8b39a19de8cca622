"""common.io: atomic files and folders, tensors-only reads, JSONL with errors that name file and line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from common.io import (append_jsonl, atomic_folder, atomic_write_json, atomic_write_text, iter_rows,
                       read_jsonl, read_tensors, save_tensors, write_jsonl)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_io_imports_neither_fairscale_nor_the_tp_model():
    code = "import sys, common.io; print(sorted(m for m in sys.modules if m.startswith(('fairscale', 'common.'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['common.cli', 'common.io']"  # common.cli: UserError, no other import


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_saved_tensors_read_back_bit_exact_and_leave_no_temporary_file(tmp_path, name):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).t()}  # c non-contiguous
    save_tensors(tensors, str(tmp_path / name))
    back = read_tensors(str(tmp_path / name))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert os.listdir(tmp_path) == [name]


class NotATensor:
    pass


def test_pickle_with_more_than_tensors_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"model\.pth holds more than tensors.*weights_only=True"):
        read_tensors(str(path))
    torch.save({"w": torch.zeros(2), "step": "seven"}, path)
    with pytest.raises(ValueError, match=r"not a flat dict of tensors.*step"):
        read_tensors(str(path))
    with pytest.raises(ValueError, match=r"entries \['step'\] are not tensors"):
        save_tensors({"w": torch.zeros(2), "step": 7}, str(tmp_path / "x.safetensors"))


def test_atomic_text_and_json_replace_the_file_whole(tmp_path):
    path = str(tmp_path / "state.json")
    atomic_write_text("old", path)
    atomic_write_json({"step": 3}, path)
    assert json.loads(open(path).read()) == {"step": 3} and os.listdir(tmp_path) == ["state.json"]


def test_atomic_folder_swaps_in_new_contents_and_keeps_the_old_ones_on_error(tmp_path):
    out = str(tmp_path / "export")
    with atomic_folder(out) as tmp:
        assert not os.path.exists(out)  # nothing visible until the writer finishes
        open(os.path.join(tmp, "a.txt"), "w").write("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            open(os.path.join(tmp, "b.txt"), "w").write("2")
            raise RuntimeError("crash while writing")
    assert os.listdir(out) == ["a.txt"] and os.listdir(tmp_path) == ["export"]
    with atomic_folder(out) as tmp:
        open(os.path.join(tmp, "c.txt"), "w").write("3")
    assert os.listdir(out) == ["c.txt"] and os.listdir(tmp_path) == ["export"]  # old contents gone, no leftovers


def test_jsonl_round_trip_and_append(tmp_path):
    path = str(tmp_path / "preds.jsonl")
    write_jsonl([{"id": 0, "text": "é"}], path)
    append_jsonl(path, {"id": 1}, {"id": 2})
    assert [r["id"] for r in read_jsonl(path)] == [0, 1, 2]


def test_bad_jsonl_line_names_file_and_line_and_a_cut_last_line_can_be_dropped(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": 0}\n\n{"id": 1\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"preds\.jsonl:3 is not valid JSON"):
        read_jsonl(str(path))
    path.write_text('{"id": 0}\n{"id": 1, "te')  # a crash during append
    with pytest.raises(ValueError, match=r"preds\.jsonl:2"):
        read_jsonl(str(path))
    assert read_jsonl(str(path), drop_partial_last=True) == [{"id": 0}]


def test_read_jsonl_reads_gzip_files(tmp_path):
    import gzip
    path = str(tmp_path / "rows.jsonl.gz")
    with gzip.open(path, "wt") as f:
        f.write('{"id": 0}\n\n{"id": 1}\n')
    assert read_jsonl(path) == [{"id": 0}, {"id": 1}]


def test_iter_rows_streams_jsonl_gzip_and_json_lists(tmp_path):
    import gzip

    rows = [{"text": f"row {i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + "\n" + json.dumps(rows[3]))
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    for name, want in (("a.jsonl", rows[:4]), ("b.json.gz", rows), ("c.json", rows)):
        stream = iter_rows(str(tmp_path / name))
        assert next(stream) == rows[0]                     # a generator: nothing read past what is asked
        assert [rows[0], *stream] == want
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        list(iter_rows(str(tmp_path / "bad.jsonl")))
