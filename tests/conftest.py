"""Every test runs tiny models: one thread each (a second OpenMP thread only adds waiting, badly so on a
busy 2-core machine); subprocesses and spawned workers inherit it through OMP_NUM_THREADS."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
