"""A miniature HF-only train.py for the tests of common/hf_training.py: token-mean CE over the whole step,
common.labels targets and common.losses.cross_entropy, DDP with accumulation, an lr schedule with warmup, optional on-policy sampling inside the loop, resumable
checkpoints and export. Run as `python tests/common/tiny_hf_train.py --model_path M --save_dir S` or under
`torchrun --nproc_per_node 2`; re-running the same command resumes.

Item i is a random token sequence whose length and prompt length vary with i, so micro-batches hold
unequal numbers of counted (response) tokens. Global step s trains items [s*G, (s+1)*G), G =
accumulation * dp_size, sharded over DP ranks. Rank 0 appends {"step", "loss", "lr", "grad_norm"} to
save_dir/log.jsonl, exports save_dir/final and writes save_dir/modules.json (what the run imported).
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fire  # noqa: E402
import torch  # noqa: E402

from common import hf  # noqa: E402
from common.distributed import all_reduce_dp, print0, rank_seed, setup, shutdown  # noqa: E402
from common.generation import generate  # noqa: E402
from common.hf_training import (export_model, grad_scaler, grad_sync, load_checkpoint, lr_schedule,  # noqa: E402
                                optimizer_step, save_checkpoint, unwrap, wrap_ddp)
from common.io import append_jsonl, atomic_write_json  # noqa: E402
from common.labels import targets_and_mask  # noqa: E402
from common.losses import cross_entropy  # noqa: E402
from common.training import dp_shard, global_count  # noqa: E402


def item(i: int, vocab: int = 100) -> tuple:
    """(input_ids [1, L], labels [1, L]): random ids in [4, vocab), labels -100 on the prompt."""
    g = torch.Generator().manual_seed(1000 + i)
    length, prompt = 5 + (7 * i) % 11, 2 + i % 4
    ids = torch.randint(4, vocab, (1, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def sampled_item(model, ids: torch.Tensor, seed: int) -> tuple:
    """An on-policy example: the first 3 tokens of `ids` plus 4 tokens the model samples (supervised)."""
    prompt = ids[0, :3].tolist()
    model.eval()
    new = generate(model, [prompt], 4, temperature=1.0, seed=seed)[0]
    model.train()
    sample = torch.tensor([prompt + list(new)])
    labels = sample.clone()
    labels[:, :3] = -100
    return sample, labels


def main(model_path: str, save_dir: str, steps: int = 6, accumulation: int = 4, lr: float = 1e-2,
         schedule: str = "cosine", warmup_steps: int = 2, min_lr: float = 1e-4, sample: bool = False,
         save_steps: int = 2, lora_rank: int = 0, max_grad_norm: float = 1.0, seed: int = 1, hold_after: int = 0):
    lay = setup(seed)
    os.makedirs(save_dir, exist_ok=True)
    model = hf.load_model(model_path, dtype="float32", device=lay.device)
    tokenizer = hf.load_tokenizer(model_path)
    if lora_rank > 0:
        model = hf.add_lora(model, r=lora_rank, alpha=2 * lora_rank, dropout=0.1)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    scheduler = lr_schedule(optimizer, schedule, warmup_steps, steps, min_lr=min_lr)
    scaler = grad_scaler("float32", lay.device)
    state = load_checkpoint(save_dir, lay, model, optimizer, scheduler, scaler) or {"step": 0}
    print0(f"starting at step {state['step']}")
    ddp = wrap_ddp(model, lay)
    per_step = accumulation * lay.dp_size
    for step in range(state["step"], steps):
        mine = dp_shard(list(range(step * per_step, (step + 1) * per_step)), lay.dp_rank, lay.dp_size)
        micro = [item(i) for i in mine]
        if sample:
            micro.append(sampled_item(model, micro[0][0], rank_seed(seed, step, lay.dp_rank)))
        micro = [(ids.to(lay.device), *targets_and_mask(labels.to(lay.device), shift=True)) for ids, labels in micro]
        norm = global_count(sum(int(mask.sum()) for _, _, mask in micro), lay.device)
        loss_total = torch.zeros((), device=lay.device)
        for k, (ids, targets, mask) in enumerate(micro):
            with grad_sync(ddp, k == len(micro) - 1):
                loss = cross_entropy(ddp(input_ids=ids).logits, target_ids=targets, mask=mask, normalizer=norm)
                scaler.scale(loss).backward()
            loss_total += loss.detach()
        lr_now = optimizer.param_groups[0]["lr"]
        grad_norm = optimizer_step(optimizer, scheduler, scaler, max_grad_norm)
        loss_total = all_reduce_dp(loss_total).item()
        state["step"] = step + 1
        if lay.is_main:
            append_jsonl(os.path.join(save_dir, "log.jsonl"),
                         {"step": state["step"], "loss": loss_total, "lr": lr_now, "grad_norm": grad_norm})
        print0(f"step {state['step']} loss {loss_total:.6f}")
        if state["step"] % save_steps == 0:
            save_checkpoint(save_dir, state, lay, model, optimizer, scheduler, scaler, tokenizer)
        while state["step"] == hold_after:  # a test kills the run here, mid-run whatever the machine's load
            time.sleep(1)
    export_model(unwrap(ddp), tokenizer, os.path.join(save_dir, "final"), lay)
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if lay.is_main:
        atomic_write_json({"common.model": "common.model" in sys.modules,
                           "common.parallel": "common.parallel" in sys.modules,
                           "fairscale_model_parallel": bool(fs and fs.model_parallel_is_initialized())},
                          os.path.join(save_dir, "modules.json"))
    shutdown()


if __name__ == "__main__":
    fire.Fire(main)
