"""Build the MCC-KD task files under data/ from the shared reference data (mcc_kd.md §2.1-2.3).

    python mcc_kd/build_data.py --source ../shared/data --output data

Writes, per task, the original repository's layout `data/<TASK>/{train,dev,test}.json`:

| Task  | train                                                            | dev / test                  |
|-------|------------------------------------------------------------------|-----------------------------|
| GSM8K | official train, output = [converted official solution] (1 each) | copied from MCC-KD          |
| SVAMP | copied from MCC-KD: 10 raw (unfiltered) teacher rationales       | copied from MCC-KD          |
| ASDiv | Mentor-KD chains grouped by question (about 3 each)              | copied from MCC-KD          |
| CSQA  | no rationales: `train_questions.json` (output "")                | copied from MCC-KD          |

plus labelled stand-ins for the tiny demo pipeline and tests: `data/SVAMP/{train,dev,test}_standin.json`
(the first items of the SVAMP train / dev / test files; the train stand-in comes from train only).
Every check that the spec states (GSM8K conversion reproduces the shipped dev/test, splits disjoint,
SVAMP text matches SVAMP.json) is asserted here.
"""
import json
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import check_choice, UserError, run_cli  # noqa: E402
from common.io import read_jsonl  # noqa: E402

STANDIN_SIZES = {"train": 40, "dev": 20, "test": 20}


def gsm8k_solution_to_cot(answer: str) -> tuple[str, str]:
    """Official GSM8K answer -> (MCC-KD rationale, label): drop <<calc>> annotations and replace the final
    '#### N' line by 'Therefore, the answer is N .' (reproduces all 1,319 shipped dev/test outputs)."""
    body, label = answer.rsplit("\n#### ", 1)
    label = label.strip()
    return re.sub(r"<<.*?>>", "", body) + f"\nTherefore, the answer is {label} .", label


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(items, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(items, f, indent=4, ensure_ascii=False)
        f.write("\n")
    tmp.replace(path)


def assert_disjoint(task, train, *others):
    seen = {x["instruction"] for items in others for x in items}
    shared = [x["instruction"] for x in train if x["instruction"] in seen]
    assert not shared, f"{task}: {len(shared)} train questions also in dev/test, e.g. {shared[0]!r}"


def build_gsm8k(src: Path, out: Path, report):
    dev, test = (read_json(src / f"mcc_kd/GSM8K/{s}.json") for s in ("dev", "test"))
    official_test = {}
    for x in read_jsonl(str(src / "gsm8k/test.jsonl")):
        official_test[x["question"] + "\n"] = gsm8k_solution_to_cot(x["answer"])
    for split, items in (("dev", dev), ("test", test)):
        for i, x in enumerate(items):
            assert official_test[x["instruction"]] == (x["output"], x["label"]), f"GSM8K {split} item {i} differs"
    train = []
    for x in read_jsonl(str(src / "gsm8k/train.jsonl")):
        cot, label = gsm8k_solution_to_cot(x["answer"])
        train.append({"instruction": x["question"] + "\n", "output": [cot], "label": label})
    assert_disjoint("GSM8K", train, dev, test)
    write_json(train, out / "GSM8K/train.json")
    copy_splits(src / "mcc_kd/GSM8K", out / "GSM8K", ("dev", "test"))
    report("GSM8K", train=len(train), rationales=len(train), dev=len(dev), test=len(test))


def build_svamp(src: Path, out: Path, report):
    splits = {s: read_json(src / f"mcc_kd/SVAMP/{s}.json") for s in ("train", "dev", "test")}
    answers = {f"{x['Body'].strip()} {x['Question'].strip()}\n": x["Answer"] for x in read_json(src / "svamp/SVAMP.json")}
    for split, items in splits.items():
        for i, x in enumerate(items):
            assert float(x["label"]) == answers[x["instruction"]], f"SVAMP {split} item {i} not in SVAMP.json"
    assert_disjoint("SVAMP", splits["train"], splits["dev"], splits["test"])
    copy_splits(src / "mcc_kd/SVAMP", out / "SVAMP", ("train", "dev", "test"))
    for split, n in STANDIN_SIZES.items():
        write_json(splits[split][:n], out / f"SVAMP/{split}_standin.json")
    report("SVAMP", train=len(splits["train"]), rationales=sum(len(x["output"]) for x in splits["train"]),
           dev=len(splits["dev"]), test=len(splits["test"]))


def build_asdiv(src: Path, out: Path, report):
    dev, test = (read_json(src / f"mcc_kd/ASDiv/{s}.json") for s in ("dev", "test"))
    skeleton = read_json(src / "asdiv/mentor_kd_skeleton_asdiv_train.json")
    split_labels = {x["input"]: x["answer"] for x in skeleton}
    grouped = OrderedDict()
    for x in read_json(src / "asdiv/mentor_kd_main_asdiv_3_train.json"):
        item = grouped.setdefault(x["input"], {"instruction": x["input"], "output": [], "label": x["answer"]})
        assert item["label"] == x["answer"] == split_labels[x["input"]], f"ASDiv label mismatch for {x['input']!r}"
        item["output"].append(x["chain"])
    train = list(grouped.values())
    assert_disjoint("ASDiv", train, dev, test)
    write_json(train, out / "ASDiv/train.json")
    copy_splits(src / "mcc_kd/ASDiv", out / "ASDiv", ("dev", "test"))
    report("ASDiv", train=len(train), rationales=sum(len(x["output"]) for x in train), dev=len(dev), test=len(test),
           train_questions_without_rationales=len(set(split_labels) - set(grouped)))


def build_csqa(src: Path, out: Path, report):
    dev, test = (read_json(src / f"mcc_kd/CSQA/{s}.json") for s in ("dev", "test"))
    train = []
    for x in read_json(src / "commonsenseqa/mentor_kd_skeleton_commonsense_qa_train.json"):
        label = x["answer"].strip()[0]  # "A. ignore" -> "A"
        assert label in "ABCDE", f"CSQA answer {x['answer']!r}"
        train.append({"instruction": x["input"], "output": "", "label": label})
    assert_disjoint("CSQA", train, dev, test)
    write_json(train, out / "CSQA/train_questions.json")
    copy_splits(src / "mcc_kd/CSQA", out / "CSQA", ("dev", "test"))
    report("CSQA", train=len(train), rationales=0, dev=len(dev), test=len(test))


def copy_splits(src_dir: Path, out_dir: Path, splits):
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        shutil.copyfile(src_dir / f"{split}.json", out_dir / f"{split}.json")  # byte-identical to the source


BUILDERS = {"GSM8K": build_gsm8k, "SVAMP": build_svamp, "ASDiv": build_asdiv, "CSQA": build_csqa}


def build(source: str = "../shared/data", output: str = "data", tasks: str = "GSM8K,SVAMP,ASDiv,CSQA"):
    """Build data/<TASK>/ files from `source` (the shared data folder) into `output`."""
    src, out = Path(source), Path(output)
    if not (src / "mcc_kd").is_dir():
        raise UserError(f"--source {src}: expected the shared data folder (with mcc_kd/, gsm8k/, svamp/, asdiv/, "
                        f"commonsenseqa/)")
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    for name in names:
        check_choice("--tasks", name, BUILDERS)

    def report(task, **counts):
        print(f"{task:6s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))

    for name in names:
        BUILDERS[name](src, out, report)


if __name__ == "__main__":
    run_cli(build)
