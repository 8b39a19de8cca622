"""Command lines that end on bad input with one line, not a traceback.

    from common.cli import UserError, run_cli
    raise UserError(f"--data-dir {path}: no train_0.idx; run contra_kd/prepare_data.py first")
    if __name__ == "__main__":
        run_cli(main)            # or run_cli({"dolly": dolly, "pretrain": pretrain}), as fire.Fire takes

A UserError is bad input the user can fix (a flag, a path, a data file). It is a ValueError, so library callers
and tests that expect ValueError keep working.
"""
import os
import sys


class UserError(ValueError):
    """Bad input the user can fix (a data file, a flag, a path): the command line prints this one line and exits 1."""


def run_cli(main) -> None:
    """fire.Fire(main); a UserError ends the run with `error: <its message>` on stderr, printed by rank 0 only
    (under torchrun every rank raises it), and exit code 1, instead of a traceback from every rank."""
    import fire

    try:
        fire.Fire(main)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
