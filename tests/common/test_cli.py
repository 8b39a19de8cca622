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


def test_typed_flags_convert_what_fire_parsed_and_refuse_the_wrong_type_with_one_line():
    from typing import Optional

    from common.cli import UserError, typed_flags

    seen = {}

    def main(steps: int, lr: float = 1e-3, bf16: bool = False, limit: Optional[int] = None, repeats=3, name: str = "x"):
        seen.update(steps=steps, lr=lr, bf16=bf16, limit=limit, repeats=repeats, name=name)

    typed_flags(main)(2.0, lr=1, bf16="true", repeats=4, name=5)  # fire: "2.0" -> 2.0, "1" -> 1, "true" stays a str
    assert seen == dict(steps=2, lr=1.0, bf16=True, limit=None, repeats=4, name=5)
    assert type(seen["steps"]) is int and type(seen["lr"]) is float
    for kwargs, message in ((dict(steps="abc"), "--steps 'abc': expected an integer"),
                            (dict(steps=1, lr="abc"), "--lr 'abc': expected a number"),
                            (dict(steps=1.5), "--steps 1.5: expected an integer"),
                            (dict(steps=1, bf16="maybe"), "--bf16 'maybe': expected True or False"),
                            (dict(steps=None), "--steps None: expected an integer"),
                            (dict(steps=1, repeats="x"), "--repeats 'x': expected an integer")):  # from the default
        with pytest.raises(UserError) as e:
            typed_flags(main)(**kwargs)
        assert str(e.value) == message


def test_unknown_flag_is_refused_before_the_command_runs_and_choices_and_ranges_name_the_valid_values():
    from common.cli import UserError, check_choice, check_flag_names, check_range

    def main(batch_size: int = 1, verbose: bool = False):
        pass

    check_flag_names(main, ["--batch_size", "2", "--batch-size=3", "--noverbose", "--help"])
    with pytest.raises(UserError, match=r"^unknown flag --batch_sise; the flags are: --batch_size, --verbose$"):
        check_flag_names(main, ["--batch_sise", "2"])
    check_flag_names(lambda **flags: None, ["--anything"])  # **kwargs take every flag
    with pytest.raises(UserError, match=r"^--type 'ppo' is not one of: sft, kd$"):
        check_choice("--type", "ppo", ("sft", "kd"))
    with pytest.raises(UserError, match=r"^--batch_size 0: must be >= 1$"):
        check_range("--batch_size", 0, low=1)
    with pytest.raises(UserError, match=r"^--kd_ratio 1.5: must be in \[0, 1\]$"):
        check_range("--kd_ratio", 1.5, 0, 1)
    assert check_range("--kd_ratio", 0.5, 0, 1) == 0.5 and check_choice("--type", "kd", ("sft", "kd")) == "kd"


def test_a_flag_the_command_does_not_take_is_one_line_and_nothing_runs(script):
    done = subprocess.run([sys.executable, str(script), "--kind", "user", "--nonsense", "1"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == "error: unknown flag --nonsense; the flags are: --kind"
