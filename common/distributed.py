"""Process setup for runs without tensor parallelism: data parallel under torchrun, or one plain process.

    lay = setup(seed=1)                          # torchrun: one DP rank per process; python: a world of 1
    seed = rank_seed(cfg.seed, step, lay.dp_rank)  # sampling that must differ between DP ranks
    total = all_reduce_dp(torch.tensor(n)).item()  # summed over DP ranks (a no-op for one)
    rows = gather_object(my_rows, lay)           # list of every rank's rows on rank 0, None elsewhere
    print0(f"step {step}")                       # global rank 0 only
    set_timeout(600)                             # later collectives fail after 600 s without an answer
    peer_failure(error)                          # did a collective fail because another rank ended or stopped?
    shutdown()                                   # barrier, then destroy the process group

Nothing here touches fairscale's model-parallel state, so a Hugging Face run never initialises it (nor
imports the TP model). The helpers also serve the TP path (common/parallel.py imports Layout and friends
from here): `dp_group` is fairscale's data-parallel group when fairscale model parallelism has been set
up, and the whole world otherwise.
"""
import datetime
import hashlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.cli import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def keyed_seed(*keys) -> int:
    """A seed that depends on nothing but `keys` (e.g. seed, question, sample): the same on every rank, in a
    resumed run and whatever the batching; different for different keys."""
    digest = hashlib.sha256("-".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62, what torch.Generator.manual_seed takes


def rank_seed(seed: int, step: int, dp_rank: int) -> int:
    """A seed for sampling at `step` on one DP rank: different across DP ranks and steps, the same on every
    TP rank of a group and on a resumed run (it depends on nothing but its arguments)."""
    return keyed_seed(seed, step, dp_rank)


def init_process_group() -> None:
    """torch.distributed from torchrun's environment, or a world of one (idempotent). nccl on CUDA, else gloo."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # plain `python script.py`: a world of one, with an in-memory store (no port to race for)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def setup(seed: int = 1) -> Layout:
    """Data parallel over every process (tp_size 1), the same `seed` on every rank (identical initial
    weights, e.g. LoRA); returns the Layout. Model dtypes are left to the caller (no default dtype set)."""
    if torch.cuda.is_available():  # before the process group, so nccl binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_process_group()
    set_seed(seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Layout(rank=rank, world_size=world, tp_rank=0, tp_size=1, dp_rank=rank, dp_size=world, device=device)


def _fairscale_mp():
    """fairscale's model-parallel module when a TP run has initialised it, else None (never imports it)."""
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    return fs if fs is not None and fs.model_parallel_is_initialized() else None


def dp_group():
    """The data-parallel group: fairscale's under tensor parallelism, else the whole world."""
    fs = _fairscale_mp()
    return fs.get_data_parallel_group() if fs else dist.group.WORLD


def dp_size() -> int:
    return dist.get_world_size(dp_group()) if dist.is_initialized() else 1


def dp_rank() -> int:
    """This process's data-parallel rank (the ranks of one TP group share it); 0 without torch.distributed."""
    return dist.get_rank(dp_group()) if dist.is_initialized() else 0


def all_reduce_dp(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (by default) a tensor over the data-parallel group, in place; a no-op for one DP rank."""
    if dp_size() > 1:
        dist.all_reduce(t, op=op, group=dp_group())
    return t


def gather_object(obj, lay: Layout, everywhere: bool = False):
    """Every global rank's `obj` as a list on rank 0 (in rank order); None on the other ranks, or the same list on
    every rank with `everywhere=True`."""
    if lay.world_size == 1:
        return [obj]
    if everywhere:
        out = [None] * lay.world_size
        dist.all_gather_object(out, obj)
        return out
    out = [None] * lay.world_size if lay.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def set_timeout(seconds: float) -> None:
    """Bound every later collective of the default group: a rank that died or stopped then fails the others
    after `seconds` instead of the backend's default (30 min on gloo). Set it after the start-up, whose waits
    (a rank loading a model the others do not) can be longer."""
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))  # torch has no public setter


PEER_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
               "Application timeout caused pair closure", "Broken pipe")


def peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective or send/recv that failed because another process ended or stopped answering
    (gloo raises plain RuntimeErrors that say so; nccl and the stores raise DistError)."""
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_ERRORS)


def shutdown() -> None:
    """Wait for every rank, then tear the process groups down, fairscale's too: a process that exits with live
    gloo/nccl threads can abort ("terminate called without an active exception"), failing a finished run."""
    if dist.is_initialized():
        dist.barrier()
        fs = _fairscale_mp()
        if fs:
            fs.destroy_model_parallel()
        dist.destroy_process_group()
