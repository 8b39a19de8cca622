"""Run a function in N real processes (gloo), as torchrun would, and collect what each returns."""
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():  # exiting with live gloo threads can abort ("terminate called without ...")
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn, world_size=2, *args):
    """Spawn `world_size` processes running fn(*args); fn must be a module-level function.

    Returns the list of per-rank return values (tensors, numbers, lists and dicts of them).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
