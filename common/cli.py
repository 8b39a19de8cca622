"""Command lines that end on bad input with one line, not a traceback.

    from common.cli import UserError, check_choice, check_range, run_cli
    check_choice("--type", type, ("sft", "kd"))            # "--type 'x' is not one of: sft, kd"
    check_range("--batch_size", batch_size, low=1)         # "--batch_size 0: must be >= 1"
    raise UserError(f"{path}:{line}: no 'prompt' field; re-run prepare_data.py")
    if __name__ == "__main__":
        run_cli(main)            # or run_cli({"dolly": dolly, "pretrain": pretrain}), as fire.Fire takes

A UserError is bad input the user can fix (a flag, a path, a data file). It is a ValueError, so library callers
and tests that expect ValueError keep working. Anything else that escapes a command is a bug and keeps its
traceback.

run_cli checks every flag against its function's annotation (or, without one, the type of its default) before
the function runs: fire hands over whatever was typed (`--lr abc` arrives as the string "abc"), so a wrong type
ends as one line naming the flag instead of a TypeError deep inside. An unknown flag is refused before the
function runs (fire would run it and complain afterwards), and fire's own usage errors (a required flag
missing, an unknown command) become one line too. Ranges and choices are the command's to check, with
check_range / check_choice, before anything expensive.
"""
import functools
import inspect
import math
import os
import sys
import time
import types
import typing


class UserError(ValueError):
    """Bad input the user can fix (a data file, a flag, a path): the command line prints this one line and exits 1."""


def check_choice(flag: str, value, choices):
    """`value` if it is one of `choices`, else a UserError listing them."""
    if value not in choices:
        raise UserError(f"{flag} {value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def check_range(flag: str, value, low=None, high=None):
    """`value` if low <= value <= high (a bound of None is open), else a UserError naming the range."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise UserError(f"{flag} {value!r}: must be {bounds}")
    return value


def _flag(name: str) -> str:
    """The flag as typed on the command line (fire takes --batch_size and --batch-size alike)."""
    dashed = "--" + name.replace("_", "-")
    typed = any(a == dashed or a.startswith(dashed + "=") for a in sys.argv[1:])
    return dashed if typed else "--" + name


def _expected_type(param: inspect.Parameter):
    """(type, None allowed) for bool / int / float flags from the annotation or the default; (None, _) otherwise."""
    kind, optional = param.annotation, param.default is None
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [k for k in typing.get_args(kind) if k is not type(None)]
        optional = optional or len(members) < len(typing.get_args(kind))
        kind = members[0] if len(members) == 1 else None
    if kind is inspect.Parameter.empty:
        kind = type(param.default) if param.default is not inspect.Parameter.empty else None
    return (kind if kind in (bool, int, float) else None), optional


def _typed(flag: str, value, kind, optional: bool):
    """`value` as `kind`, or a UserError; fire passes what it parsed (an int, a float, a string, a tuple...)."""
    if value is None and optional:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"{flag} {value!r}: expected True or False")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        if number and float(value).is_integer():
            return int(value)
        raise UserError(f"{flag} {value!r}: expected an integer")
    if number:
        return float(value)
    raise UserError(f"{flag} {value!r}: expected a number")


def typed_flags(fn):
    """`fn` with its bool / int / float arguments checked and converted before it runs (what run_cli calls)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            param = signature.parameters[name]
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            kind, optional = _expected_type(param)
            if kind is not None:
                bound.arguments[name] = _typed(_flag(name), value, kind, optional)
        fn(*bound.args, **bound.kwargs)  # a command prints what it has to say; fire prints no return value

    return checked


def check_flag_names(fn, args: list) -> None:
    """A UserError for a `--name` among `args` that `fn` does not take. fire would call `fn` first and complain
    about the leftover flag afterwards, so a typo would cost the whole run."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for arg in args:
        if arg == "--":
            break
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if not arg.startswith("--") or name == "help" or name in params or (name[:2] == "no" and name[2:] in params):
            continue
        raise UserError(f"unknown flag --{arg[2:].split('=', 1)[0]}; the flags are: "
                        f"{', '.join('--' + p for p in params)}")


def _fire_error_line(trace, program: str) -> str:
    """fire's error (usage text follows it there) as one line naming the flag."""
    text = trace.elements[-1].ErrorAsStr()
    for prefix, line in (("The function received no value for the required argument: ", "--{} is required"),
                         ("Could not consume arg: ", "unexpected argument {}"), ("Cannot find key: ", "unknown command {}")):
        if text.startswith(prefix):
            text = line.format(text[len(prefix):])
            break
    return f"{program}: {text} ({program} --help lists the flags)"


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_cli(main) -> None:
    """fire.Fire(main) with typed flags; a UserError (or a fire usage error) ends the run with `error: <one line>`
    on stderr, printed by rank 0 only (under torchrun every rank raises it), and exit code 1."""
    import fire
    import fire.core

    component = {k: typed_flags(v) for k, v in main.items()} if isinstance(main, dict) else typed_flags(main)
    program = os.path.relpath(sys.argv[0]) if not os.path.relpath(sys.argv[0]).startswith("..") else sys.argv[0]
    usage_error = []
    show_error = fire.core._DisplayError  # fire has no hook for its usage errors: it prints them with the usage

    def one_line(trace):
        if any(h in trace.elements[-1].args for h in ("-h", "--help")):
            return show_error(trace)
        usage_error.append(_fire_error_line(trace, program))

    fire.core._DisplayError = one_line
    try:
        args = sys.argv[1:]
        if isinstance(main, dict):
            if args and args[0] in main:
                check_flag_names(main[args[0]], args[1:])
        else:
            check_flag_names(main, args)
        fire.Fire(component)
    except fire.core.FireExit as e:
        if usage_error:
            _fail(usage_error[0])
        sys.exit(1 if e.code else 0)
    except UserError as e:
        _fail(str(e))
    finally:
        fire.core._DisplayError = show_error


def _fail(message: str) -> None:
    """Rank 0 prints the line; every rank leaves the process group and exits 1."""
    if _is_rank0():
        print(f"error: {message}", file=sys.stderr)
    _leave_process_group()
    if not _is_rank0():
        _await_rank0(message)
    sys.exit(1)


def _leave_process_group() -> None:
    """Tear down torch.distributed before exiting on bad input (exiting with live gloo threads can abort)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


RANK0_GRACE_S = 60


def _await_rank0(message: str) -> None:
    """Under torchrun, a rank other than 0 leaves the exit to rank 0: torchrun stops every rank as soon as one
    fails, so a rank exiting first could kill rank 0 before it prints the line. Rank 0, failing on the same
    input, prints and exits, and torchrun then stops this process. Should rank 0 not fail (bad input in this
    rank's share alone), this rank prints the line itself after RANK0_GRACE_S."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    time.sleep(RANK0_GRACE_S)
    print(f"error (rank {os.environ.get('RANK')}): {message}", file=sys.stderr)
