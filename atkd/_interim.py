"""TEMPORARY stand-ins for common/{distributed,hf,hf_training,io}.py until the shared Hugging Face layer lands in
main; deleted at that merge. Nothing else may import this file."""
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Layout:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup(seed):
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.manual_seed(seed)
    return Layout(rank, world, device)


def all_reduce_sum(t):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def load_causal_lm(path, dtype, device, frozen=False):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def load_tokenizer(path, max_len):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, model_max_length=max_len, use_fast=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(student, teacher, s_path, t_path):
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(f"student {s_path} has {vs} output logits, teacher {t_path} has {vt}: KD needs one vocabulary")


def lr_at(step, total, warmup, kind, base):
    import math
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return base * (1 - progress)
    return base


def save_checkpoint(folder, model, optimizer, state):
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_checkpoint(folder, model, optimizer):
    path = os.path.join(folder, "state.json")
    if not os.path.exists(path):
        return None
    model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), weights_only=True))
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    with open(path) as f:
        return json.load(f)


def rank_seed(seed, step, rank):
    import hashlib
    return int.from_bytes(hashlib.sha256(f"{seed}-{step}-{rank}".encode()).digest()[:8], "little") >> 2
