"""Training utilities every method's loop uses: data-parallel sharding, the whole-step loss normaliser,
gradient averaging, resumable atomic checkpoints of the TP model, throughput logging.

Imports neither fairscale nor the TP model (the DP group comes from common.distributed), so transformers
runs use dp_shard / global_count / Throughput too; their DDP, schedules and save_pretrained checkpoints
live in common/hf_training.py.

Checkpoints (one folder per save, so a crash never mixes two steps):

    save_dir/checkpoints/step-00000120/consolidated.00.pth   trainable weights of TP rank 0 (LoRA adapters,
                                      optimizer.00.pth        or the full shard), its optimiser state
                                      state.json              written last by global rank 0: the commit marker
                                                              (step, epoch, data position, anything else)

Only data-parallel rank 0 of each TP slot writes (DP replicas hold the same weights). A folder without
state.json is an interrupted save and is ignored; older folders are pruned after a successful save.
Randomness in our loops is drawn from generators keyed on (seed, epoch, item), so the data position is
all a resumed run needs to make the same choices; torch's global RNG state is saved too.
"""
import glob
import json
import os
import random
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from common.cli import UserError
from common.distributed import Layout, all_reduce_dp, dp_group
from common.io import atomic_save, atomic_write_json, read_tensors


def dp_shard(items: list, dp_rank: int, dp_size: int) -> list:
    """Strided shard of `items` for one DP rank, wrapped around so that every rank gets the same count
    (ranks must run the same number of steps; at most dp_size - 1 items are seen twice)."""
    per_rank = -(-len(items) // dp_size)
    padded = [items[i % len(items)] for i in range(per_rank * dp_size)]
    return padded[dp_rank::dp_size]


def epoch_order(n: int, seed: int, epoch) -> list:
    """A permutation of range(n) that depends only on (seed, epoch) (epoch may be any key, e.g. "refit-0-1"):
    the same on every rank, whatever the number of processes, and on resume."""
    order = list(range(n))
    random.Random(f"{seed}-order-{epoch}").shuffle(order)
    return order


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, **kwargs) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norm weights (the parameters
    of fewer than 2 dimensions), as Hugging Face's Trainer groups them."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, **kwargs)


def global_count(count, device) -> float:
    """Sum a count over the data-parallel group: the normaliser of the whole optimiser step."""
    t = torch.tensor(float(count), device=device)
    return all_reduce_dp(t).item()


def average_gradients(model: torch.nn.Module) -> None:
    """Sum trainable gradients over the DP group (losses are already divided by the global count)."""
    if dist.is_initialized() and dist.get_world_size(dp_group()) > 1:
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                dist.all_reduce(p.grad, group=dp_group())


def trainable_state(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict, source: str) -> None:
    own = dict(model.named_parameters())
    wanted = {n for n, p in own.items() if p.requires_grad}
    if set(state) != wanted:
        raise UserError(f"{source} holds {sorted(set(state) - wanted)[:4]} extra and lacks "
                        f"{sorted(wanted - set(state))[:4]} trainable weights: was it saved with the same "
                        "model_type / lora_rank / tensor-parallel size?")
    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)


def save_weights(folder: str, model: torch.nn.Module, lay: Layout) -> None:
    """Trainable weights of this TP rank -> folder/consolidated.{tp:02d}.pth (DP rank 0 writes)."""
    if lay.dp_rank == 0:
        os.makedirs(folder, exist_ok=True)
        atomic_save(trainable_state(model), os.path.join(folder, f"consolidated.{lay.tp_rank:02d}.pth"))


def load_weights(folder: str, model: torch.nn.Module, lay: Layout) -> None:
    path = os.path.join(folder, f"consolidated.{lay.tp_rank:02d}.pth")
    load_trainable_state(model, read_tensors(path), path)


def save_checkpoint(save_dir: str, model, optimizer, lay: Layout, state: dict, keep: int = 1) -> str:
    """Atomic resumable checkpoint at `state["step"]`; returns its folder."""
    folder = os.path.join(save_dir, "checkpoints", f"step-{state['step']:08d}")
    save_weights(folder, model, lay)
    if lay.dp_rank == 0:
        atomic_save(optimizer.state_dict(), os.path.join(folder, f"optimizer.{lay.tp_rank:02d}.pth"))
    if dist.is_initialized():
        dist.barrier()
    if lay.is_main:
        state = dict(state, tp_size=lay.tp_size, torch_rng=torch.get_rng_state().tolist())
        atomic_write_json(state, os.path.join(folder, "state.json"))
        for old in complete_checkpoints(save_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return folder


def complete_checkpoints(save_dir: str) -> list:
    """Checkpoint folders under save_dir that hold their commit marker (state.json), oldest first."""
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(save_dir, "checkpoints", "step-*", "state.json")))


def latest_checkpoint(save_dir: str) -> tuple:
    """(folder, its state.json) of the newest complete checkpoint under save_dir, or (None, None)."""
    folders = complete_checkpoints(save_dir)
    if not folders:
        return None, None
    with open(os.path.join(folders[-1], "state.json")) as f:
        return folders[-1], json.load(f)


def load_latest_checkpoint(save_dir: str, model, optimizer, lay: Layout) -> Optional[dict]:
    """Restore the newest complete checkpoint under save_dir; None when there is none (a fresh run)."""
    folder, state = latest_checkpoint(save_dir)
    if folder is None:
        return None
    if state.get("tp_size") != lay.tp_size:
        raise UserError(f"{folder} was saved at tensor-parallel size {state.get('tp_size')}, this run uses "
                        f"{lay.tp_size}: resume with the same layout, or start from a fresh --save_dir")
    load_weights(folder, model, lay)
    optimizer_file = os.path.join(folder, f"optimizer.{lay.tp_rank:02d}.pth")
    optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=True))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state


class Throughput:
    """Tokens per second since the last call (what the progress bar shows next to loss and lr)."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, n_tokens: int) -> None:
        self.tokens += n_tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate
