"""Known user errors end train.py / train_mcc.py / eval.py with one clear line on stderr and exit code 1."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST = os.path.join(ROOT, "data", "SVAMP", "test_standin.json")


def run(script, *args):
    done = subprocess.run([sys.executable, f"mcc_kd/{script}", *args], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, lines


@pytest.mark.parametrize("case", ["bad data file", "unknown task", "missing ckpt_dir"])
def test_user_errors_are_one_line_and_exit_code_1(tmp_path, case):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"instruction": "not a list"}))
    if case == "bad data file":
        code, lines = run("train_mcc.py", "--task", "SVAMP", "--ckpt_dir", str(tmp_path), "--save_dir", str(tmp_path / "s"),
                          "--train_file", str(bad), "--label_file", TEST)
        expected = f"error: {bad}: expected a JSON list of items, got dict"
    elif case == "unknown task":
        code, lines = run("eval.py", "--task", "SVAMPP", "--ckpt_dir", str(tmp_path), "--label_file", TEST)
        expected = "error: unknown task 'SVAMPP': --task must be one of"
    else:
        code, lines = run("eval.py", "--task", "SVAMP", "--ckpt_dir", str(tmp_path / "nope"), "--label_file", TEST)
        expected = f"error: --ckpt_dir {tmp_path / 'nope'}: no such checkpoint folder"
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(expected), lines
