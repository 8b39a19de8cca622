"""Process setup: torchrun (or a plain process) -> fairscale tensor parallel x data parallel.

FairScale puts tensor-parallel (TP) groups on contiguous ranks [k*tp, (k+1)*tp) and data-parallel (DP)
groups strided across them. Every rank of a TP group must see the same batch and make the same random
choices, so data order and sampling are keyed on the DP rank, never the global rank.
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

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
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup(tp_size=None, seed=1, dtype="float32") -> Layout:
    """Initialise torch.distributed and fairscale model parallel; idempotent within a process.

    Works under torchrun (reads RANK / WORLD_SIZE / LOCAL_RANK) and in a plain process (world of 1).
    Backend: nccl when CUDA is present, gloo otherwise. `tp_size` defaults to the whole world, as the
    original framework; the remaining factor is data parallel.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # plain `python script.py`: a world of one, with an in-memory store (no port to race for)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    tp_size = int(tp_size or world)
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}; pick a divisor of {world}")
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() != tp_size:
            raise RuntimeError(f"model parallel already initialised with tp_size={fs_init.get_model_parallel_world_size()}, asked for {tp_size}")
    else:
        fs_init.initialize_model_parallel(tp_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    set_seed(seed)  # the same seed on every rank: TP shards of LoRA init and sampling agree
    torch.set_default_dtype(to_dtype(dtype))
    return layout()


def layout() -> Layout:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Layout(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=fs_init.get_model_parallel_rank(), tp_size=fs_init.get_model_parallel_world_size(),
        dp_rank=fs_init.get_data_parallel_rank(), dp_size=fs_init.get_data_parallel_world_size(),
        device=device,
    )


def tp_group():
    return fs_init.get_model_parallel_group()


def dp_group():
    return fs_init.get_data_parallel_group()


def all_reduce_dp(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (by default) a tensor over the data-parallel group, in place; a no-op for one DP rank."""
    if fs_init.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=dp_group())
    return t


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
