"""A miniature HF-only train.py for the tests of common/hf_training.py: token-mean CE over the whole step,
common.labels targets and common.losses.cross_entropy, DDP or FSDP with accumulation, an lr schedule with
warmup, optional on-policy sampling inside the loop, an optional frozen teacher (+ forward KL), resumable
checkpoints and export. Run as `python tests/common/tiny_hf_train.py --model_path M --save_dir S` or under
`torchrun --nproc_per_node 2`; re-running the same command resumes. Causal LMs and T5 alike.

Item i is a random token sequence whose length and prompt length vary with i, so micro-batches hold
unequal numbers of counted (response) tokens. Global step s trains items [s*G, (s+1)*G), G =
accumulation * dp_size, sharded over DP ranks. Rank 0 appends {"step", "loss", "lr", "grad_norm"} to
save_dir/log.jsonl, exports save_dir/final, writes save_dir/logits.pt (the trained model's logits on
probe()) and save_dir/modules.json (what the run imported).

`pause_at` (tests only): in step `pause_at`, after the first micro-batch's backward, rank 0 writes
save_dir/paused and every rank waits for ever, so a test can kill -9 a run mid-step on a marker.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fire  # noqa: E402
import torch  # noqa: E402

from common import hf  # noqa: E402
from common.distributed import all_reduce_dp, print0, rank_seed, set_seed, setup, shutdown  # noqa: E402
from common.generation import generate  # noqa: E402
from common.hf_training import (export_model, gathered, grad_scaler, grad_sync, load_checkpoint,  # noqa: E402
                                lr_schedule, optimizer_step, save_checkpoint, unwrap, wrap_model)
from common.io import append_jsonl, atomic_write_json  # noqa: E402
from common.labels import targets_and_mask  # noqa: E402
from common.losses import cross_entropy, forward_kl  # noqa: E402
from common.training import dp_shard, global_count  # noqa: E402


def item(i: int, vocab: int = 100) -> tuple:
    """(input_ids [1, L], labels [1, L]): random ids in [4, vocab), labels -100 on the prompt."""
    g = torch.Generator().manual_seed(1000 + i)
    length, prompt = 5 + (7 * i) % 11, 2 + i % 4
    ids = torch.randint(4, vocab, (1, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def model_batch(ids, labels, seq2seq: bool) -> tuple:
    """(model inputs, targets, mask): a causal LM reads the whole item (targets shifted); a T5 encodes the
    prompt and decodes the rest (labels make its decoder inputs; targets unshifted)."""
    if not seq2seq:
        return {"input_ids": ids}, *targets_and_mask(labels, shift=True)
    prompt = min(int((labels[0] == -100).sum()), ids.shape[1] - 1)  # a target of at least one token
    target = ids[:, prompt:]
    return {"input_ids": ids[:, :prompt], "labels": target}, *targets_and_mask(target, shift=False)


def probe(seq2seq: bool) -> dict:
    ids = torch.arange(4, 13).view(1, 9)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if seq2seq else {"input_ids": ids}


def sampled_item(model, ids: torch.Tensor, seed: int) -> tuple:
    """An on-policy example: the first 3 tokens of `ids` plus 4 tokens the model samples (supervised)."""
    prompt = ids[0, :3].tolist()
    model.eval()
    with gathered(model):
        new = generate(unwrap(model), [prompt], 4, temperature=1.0, seed=seed)[0]
    model.train()
    sample = torch.tensor([prompt + list(new)])
    labels = sample.clone()
    labels[:, :3] = -100
    return sample, labels


def train(lay, model_path: str, save_dir: str, steps: int = 6, accumulation: int = 4, lr: float = 1e-2,
          schedule: str = "cosine", warmup_steps: int = 2, min_lr: float = 1e-4, sample: bool = False,
          save_steps: int = 2, lora_rank: int = 0, lora_dropout: float = 0.1, max_grad_norm: float = 1.0,
          seed: int = 1, hold_after: int = 0,
          sharding: str = "ddp", dtype: str = "float32", teacher_path: str = None, pause_at: int = -1,
          measure: bool = False) -> dict:
    """The run; returns {"losses": [...], "bytes": per-rank bytes of the last step (measure=True)}."""
    set_seed(seed)
    os.makedirs(save_dir, exist_ok=True)
    model = hf.load_model(model_path, dtype="float32", device=lay.device)
    tokenizer = hf.load_tokenizer(model_path)
    seq2seq = hf.is_seq2seq(model)
    if lora_rank > 0:
        model = hf.add_lora(model, r=lora_rank, alpha=2 * lora_rank, dropout=lora_dropout)
    model.train()
    teacher = None
    if teacher_path:
        teacher = wrap_model(hf.load_model(teacher_path, device=lay.device, frozen=True), lay, sharding)
    ddp = wrap_model(model, lay, sharding, dtype)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    scheduler = lr_schedule(optimizer, schedule, warmup_steps, steps, min_lr=min_lr)
    scaler = grad_scaler("float32", lay.device)
    state = load_checkpoint(save_dir, lay, ddp, optimizer, scheduler, scaler) or {"step": 0}
    print0(f"starting at step {state['step']}")
    per_step = accumulation * lay.dp_size
    losses, measured = [], None
    for step in range(state["step"], steps):
        mine = dp_shard(list(range(step * per_step, (step + 1) * per_step)), lay.dp_rank, lay.dp_size)
        micro = [item(i) for i in mine]
        if sample:
            micro.append(sampled_item(ddp, micro[0][0], rank_seed(seed, step, lay.dp_rank)))
        micro = [model_batch(ids.to(lay.device), labels.to(lay.device), seq2seq) for ids, labels in micro]
        norm = global_count(sum(int(mask.sum()) for _, _, mask in micro), lay.device)
        loss_total = torch.zeros((), device=lay.device)
        for k, (inputs, targets, mask) in enumerate(micro):
            with grad_sync(ddp, k == len(micro) - 1):
                logits = ddp(**inputs).logits
                loss = cross_entropy(logits, target_ids=targets, mask=mask, normalizer=norm)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(**inputs).logits
                    loss = loss + forward_kl(logits, teacher_logits, mask=mask, normalizer=norm)
                scaler.scale(loss).backward()
            loss_total += loss.detach()
            if step == pause_at and k == 0:
                if lay.is_main:
                    atomic_write_json({"step": step}, os.path.join(save_dir, "paused"))
                while True:
                    time.sleep(1)
        if measure and step == steps - 1:
            from common.memory_plan import measured_bytes

            measured = measured_bytes(ddp, optimizer, teacher)  # this step's gradients, earlier steps' Adam states
        lr_now = optimizer.param_groups[0]["lr"]
        grad_norm = optimizer_step(optimizer, scheduler, scaler, max_grad_norm)
        loss_total = all_reduce_dp(loss_total).item()
        losses.append(loss_total)
        state["step"] = step + 1
        if lay.is_main:
            append_jsonl(os.path.join(save_dir, "log.jsonl"),
                         {"step": state["step"], "loss": loss_total, "lr": lr_now, "grad_norm": grad_norm})
        print0(f"step {state['step']} loss {loss_total:.6f}")
        if state["step"] % save_steps == 0:
            save_checkpoint(save_dir, state, lay, ddp, optimizer, scheduler, scaler, tokenizer)
        while state["step"] == hold_after:  # a test kills the run here, mid-run whatever the machine's load
            time.sleep(1)
    ddp.eval()
    with torch.no_grad():
        logits = ddp(**{k: v.to(lay.device) for k, v in probe(seq2seq).items()}).logits
    if lay.is_main:
        torch.save(logits.cpu(), os.path.join(save_dir, "logits.pt"))
    export_model(ddp, tokenizer, os.path.join(save_dir, "final"), lay)
    return {"losses": losses, "bytes": measured}


def main(model_path: str, save_dir: str, seed: int = 1, **flags):
    lay = setup(seed)
    train(lay, model_path, save_dir, seed=seed, **flags)
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if lay.is_main:
        atomic_write_json({"common.model": "common.model" in sys.modules,
                           "common.parallel": "common.parallel" in sys.modules,
                           "fairscale_model_parallel": bool(fs and fs.model_parallel_is_initialized())},
                          os.path.join(save_dir, "modules.json"))
    shutdown()


if __name__ == "__main__":
    fire.Fire(main)
