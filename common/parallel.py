"""Process setup: torchrun (or a plain process) -> fairscale tensor parallel x data parallel.

FairScale puts tensor-parallel (TP) groups on contiguous ranks [k*tp, (k+1)*tp) and data-parallel (DP)
groups strided across them. Every rank of a TP group must see the same batch and make the same random
choices, so data order and sampling are keyed on the DP rank, never the global rank.
"""
import os

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from common.cli import UserError
from common.distributed import Layout, init_process_group, set_seed, to_dtype
from common.distributed import dp_group, print0, shutdown  # noqa: F401  (TP scripts import them with setup)


def setup(tp_size=None, seed=1, dtype="float32") -> Layout:
    """Initialise torch.distributed and fairscale model parallel; idempotent within a process.

    Works under torchrun (reads RANK / WORLD_SIZE / LOCAL_RANK) and in a plain process (world of 1).
    Backend: nccl when CUDA is present, gloo otherwise. `tp_size` defaults to the whole world, as the
    original framework; the remaining factor is data parallel.
    """
    init_process_group()
    world = dist.get_world_size()
    tp_size = int(tp_size or world)
    if world % tp_size:
        raise UserError(f"tp_size={tp_size} does not divide the world size {world}; pick a divisor of {world}")
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
