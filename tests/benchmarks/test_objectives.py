"""benchmarks/objectives.py on a tiny random pair: every row trains through its own folder in the same item order,
the table, JSON and figure are written, and a rerun redoes only what is missing."""
import json
import math

import numpy as np
import pytest

from benchmarks import objectives
from tests.tiny import char_tokenizer, tiny_model

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
SETTINGS = dict(steps=2, batch_size=2, eval_items=3, warmup_steps=1, max_length=96, max_prompt_length=64,
                curve_points=2, dev_items=2, eval_batch_size=3, student_layers="0,3", num_distill_layers=2,
                velocity_width=16, lr=1e-3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair") / "teacher"
    tok = char_tokenizer()
    tok.chat_template = CHAT
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    model.lm_head.weight.data *= 10  # a random tiny Llama is near uniform: sharpen it so the KLs have a scale
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_sign_flip_test_of_paired_differences():
    assert objectives.sign_flip_p([0.0] * 10) == 1.0
    assert objectives.sign_flip_p([0.5 + 0.01 * k for k in range(20)]) < 1e-3  # all one sign: 2 of 2^20 flips
    assert objectives.sign_flip_p([1.0, -1.0] * 10) > 0.9


def test_every_row_runs_on_a_tiny_pair_and_a_rerun_redoes_only_what_is_missing(teacher, tmp_path):
    out = tmp_path / "run"
    objectives.main(out=str(out), model_dir=teacher, seeds=1, **SETTINGS)
    report = json.loads((out / "objectives.json").read_text())
    summary, refs = report["summary"], report["references"]
    assert list(summary) == list(objectives.ROWS)
    assert max(refs["teacher"]["fwd_kl"] + refs["teacher"]["rev_kl"]) < 1e-4  # the teacher against itself
    assert min(refs["start"]["fwd_kl"]) > 0.01  # the cut student, warmed up
    for row, entry in summary.items():
        assert all(math.isfinite(entry[m]["mean"]) for m in objectives.METRICS), row
        assert [k for k, _ in entry["curve"]] == [0, 1, 2], row
        assert entry["steps_per_s"] > 0 and entry["peak_mib"] >= 0
        result = report["results"][row]["0"]
        assert len(result["fwd_kl"]) == len(result["rouge_l"]) == len(result["samples"]) == 3
        assert entry["curve"][-1][1] == pytest.approx(np.mean(result["fwd_kl"]))
        assert not any(p.is_dir() for p in (out / "runs" / row / "seed-0").iterdir())  # weights cleaned up
    text = (out / "objectives.md").read_text()
    assert all(label in text for label, _, _ in objectives.ROWS.values())
    assert (out / "objectives.png").read_bytes()[:4] == b"\x89PNG"

    # every folder meets the same items in the same order (its own shuffle undone by the file's order)
    from anli_reverse_kl.prepare_data import read_items
    from anli_reverse_kl.train import item_order
    from common.training import epoch_order
    from contra_kd.data import InstructionSplit

    data = out / "data" / "seed-0"
    tok = char_tokenizer()
    atkd = [tok.encode(json.loads(line)["instruction"]) for line in open(data / "atkd" / "train.jsonl")]
    gt = InstructionSplit(str(data / "contra_kd" / "gt"), "train")
    contra = [gt[i][0] for i in epoch_order(len(gt), 0, 0)]
    anli = read_items(str(data / "anli_reverse_kl"), "train")
    minillm = [anli[i]["prompt"] for i in item_order(len(anli), 0, len(anli), 0)]
    assert atkd == contra == minillm and len({tuple(p) for p in atkd}) == 4
    teacher_outputs = InstructionSplit(str(data / "contra_kd" / "distillm2" / "tgo"), "train")
    assert [teacher_outputs[i][0] for i in epoch_order(len(gt), 0, 0)] == atkd

    # a rerun with one result removed and a second seed for two rows redoes only those
    results = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*/seed-0.json")}
    (out / "results" / "fkl" / "seed-0.json").unlink()
    objectives.main(out=str(out), model_dir=teacher, seeds=2, rows="sft,fkl", **SETTINGS)
    for p, mtime in results.items():
        assert (p.stat().st_mtime_ns == mtime) == (p.parent.name != "fkl"), p
    assert (out / "results" / "sft" / "seed-1.json").exists() and (out / "results" / "fkl" / "seed-1.json").exists()
    report = json.loads((out / "objectives.json").read_text())
    assert report["summary"]["fkl"]["fwd_kl"]["vs_sft"]["pairs"] == 2 * 3
    with pytest.raises(ValueError, match=r"holds a run with other settings \(steps 2 -> 3\)"):
        objectives.main(out=str(out), model_dir=teacher, seeds=1, **dict(SETTINGS, steps=3))


def test_rows_that_need_responses_added_to_a_folder_first_run_without_them(teacher, tmp_path):
    from common.training import epoch_order
    from contra_kd.data import InstructionSplit

    out = tmp_path / "run"
    objectives.main(out=str(out), model_dir=teacher, seeds=1, rows="sft", **SETTINGS)
    data = out / "data" / "seed-0" / "contra_kd"
    assert not (data / "distillm2").exists() and not (out / "prep" / "tgo").exists()
    objectives.main(out=str(out), model_dir=teacher, seeds=1, rows="sft,seqkd", **SETTINGS)
    assert (out / "results" / "seqkd" / "seed-0.json").exists()
    gt, tgo = InstructionSplit(str(data / "gt"), "train"), InstructionSplit(str(data / "distillm2" / "tgo"), "train")
    order = epoch_order(len(gt), 0, 0)
    assert [tgo[i][0] for i in order] == [gt[i][0] for i in order]  # the teacher's responses to the same prompts
