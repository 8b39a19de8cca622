"""Run a function in N real processes (gloo), as torchrun would, and collect what each returns.

    with rendezvous_env(2) as env:          # for processes started by hand: add RANK and LOCAL_RANK
        procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]
"""
import contextlib
import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.distributed import shutdown


def free_port() -> int:
    """A port free now (it may be taken before it is bound: prefer rendezvous_env, or port 0, where possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rendezvous_env(world_size: int):
    """torchrun's environment for `world_size` processes, their store hosted by this process on a port the OS
    assigned while binding it: no race for a free port with tests running beside this one. The processes
    join it as clients (TORCHELASTIC_USE_AGENT_STORE, as under torchrun's agent)."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=600), wait_for_workers=False)
    try:
        yield dict(os.environ, WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                   TORCHELASTIC_USE_AGENT_STORE="True")
    finally:
        del store


def _worker(rank, env, out_dir, fn, args):
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()  # exiting with live gloo threads can abort ("terminate called without ...")


def run_distributed(fn, world_size=2, *args):
    """Spawn `world_size` processes running fn(*args); fn must be a module-level function.

    Returns the list of per-rank return values (tensors, numbers, lists and dicts of them).
    """
    with tempfile.TemporaryDirectory() as out_dir, rendezvous_env(world_size) as env:
        mp.spawn(_worker, args=(env, out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
