"""common.cli: a UserError ends a fire command line with one line on stderr (rank 0 only) and exit code 1; any
other exception keeps its traceback."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from common.cli import UserError, run_cli

def main(kind: str = "user"):
    if kind == "user":
        raise UserError("--data-dir /nowhere: no train_0.idx; run prepare_data.py first")
    if kind == "bug":
        raise KeyError("a bug")
    print("ran")

run_cli(main)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "cli.py"
    path.write_text(SCRIPT.format(root=ROOT))
    return path


def run(script, kind, rank=None):
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    if rank is not None:
        env["RANK"] = str(rank)
    done = subprocess.run([sys.executable, str(script), "--kind", kind], env=env, capture_output=True, text=True)
    return done.returncode, done.stdout, [line for line in done.stderr.splitlines() if line.strip()]


def test_user_error_is_one_line_on_stderr_and_exit_code_1(script):
    code, out, err = run(script, "user")
    assert code == 1 and out == ""
    assert err == ["error: --data-dir /nowhere: no train_0.idx; run prepare_data.py first"]


def test_user_error_prints_from_rank_0_only_but_every_rank_exits_1(script):
    assert run(script, "user", rank=0)[2] == ["error: --data-dir /nowhere: no train_0.idx; run prepare_data.py first"]
    code, out, err = run(script, "user", rank=1)
    assert code == 1 and out == "" and err == []


def test_other_exceptions_keep_their_traceback_and_a_clean_run_exits_0(script):
    code, _, err = run(script, "bug")
    assert code == 1 and err[0].startswith("Traceback") and err[-1] == "KeyError: 'a bug'"
    assert run(script, "ok")[:2] == (0, "ran\n")


def test_user_error_is_a_value_error_for_library_callers():
    from common.cli import UserError
    assert issubclass(UserError, ValueError)
