"""Run many command lines fast: import the heavy libraries once, then fork one child per command, which runs
the entry point exactly as `python FILE ...` / `python -m MODULE ...` would (runpy, `__main__`, the same
sys.argv and sys.path[0], an uncaught exception printed as a traceback with exit code 1).

    python tests/cli_fork_server.py JOBS < requests.jsonl > replies.jsonl

A request is {"id", "argv": ["FILE" | "-m", "MODULE", args...], "cwd", "env", "stdout", "stderr"} (the last two:
files the child writes); a reply is {"id", "returncode"}, in the order the children finish. Nothing but
third-party libraries is imported here before the fork, so every child starts from a clean process: our own
modules run their import-time code in the child, as in a real run. tests/test_cli_contract.py uses it; with
KDZOO_CLI_REAL=1 it runs every command as a plain subprocess instead.
"""
import json
import os
import sys


def preload() -> None:
    import fire  # noqa: F401
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import sentencepiece  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import tqdm  # noqa: F401
    import transformers
    import yaml  # noqa: F401
    from fairscale.nn.model_parallel import initialize, layers, mappings  # noqa: F401

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM",
                 "PreTrainedTokenizerFast", "get_cosine_with_min_lr_schedule_with_warmup"):
        getattr(transformers, name)


def run_child(request: dict) -> None:
    """In the forked child: become the command line, run it, exit with its code (never returns)."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import runpy
        argv = request["argv"]
        if argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]  # run_module puts the module's file in argv[0]
            sys.path[0] = os.getcwd()
            run = lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)  # noqa: E731
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            run = lambda: runpy.run_path(argv[0], run_name="__main__")  # noqa: E731
        try:
            run()
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(jobs: int) -> None:
    preload()
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    running = {}
    while requests or running:
        while requests and len(running) < jobs:
            request = requests.pop(0)
            pid = os.fork()
            if pid == 0:
                run_child(request)
            running[pid] = request["id"]
        pid, status = os.wait()
        print(json.dumps({"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
