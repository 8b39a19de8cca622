"""Training-step speed and peak memory: our TP model vs the transformers Llama, same weights, same process.

    python -m benchmarks.train_step                       # CPU fp32; on a CUDA machine: cuda bf16
    python -m benchmarks.train_step --repeats 1

One step = forward, token-mean cross-entropy over the full vocabulary (fp32), backward, on a batch of
`batch` x `seq_len` random tokens, every parameter trainable (no optimiser: it is the same for both).
Peak memory (one extra, untimed step per model, gradients already allocated): on CUDA
`max_memory_allocated` above the level before the step; on CPU the peak resident set size above the level
before the step, sampled every millisecond, with glibc told to map every allocation above 64 KiB on its
own (mallopt M_MMAP_THRESHOLD) so that freed tensors leave the resident set at once.
"""
import ctypes
import gc
import threading
import time

import torch
import torch.nn.functional as F

from benchmarks.generation import build_models, resolve, sync
from common.cli import run_cli

PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def release_freed_memory():
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, so large blocks are unmapped when freed
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the block above its starting level (CUDA allocator or sampled CPU RSS)."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            release_freed_memory()
            self.base, self.top, self.running = rss_bytes(), 0, True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, rss_bytes()) - self.base


def ours_step(model, tokens):
    # logits are not kept past the loss (transformers' output object is dropped the same way)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss


def hf_step(model, tokens):
    loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels inside
    loss.backward()
    return loss


def main(device=None, dtype=None, batch=8, seq_len=256, repeats=3, seed=0, threads=None):
    device, dtype = resolve(device, dtype)
    if threads:  # CPU: one thread is the stable choice on a machine shared with other jobs
        torch.set_num_threads(int(threads))
    hf, ours = build_models(device, dtype, max_seq_len=seq_len + 1, max_batch_size=batch, seed=seed)
    hf.train()
    ours.train()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, ours.args.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {device}, dtype {dtype}, {n_params / 1e6:.1f}M parameters, batch {batch} x {seq_len} tokens, "
          f"forward + backward, best of {repeats}", flush=True)

    # the two losses agree on the same weights (a check that both compute the same thing)
    loss_ours, loss_hf = ours_step(ours, tokens[:, :seq_len]).item(), hf_step(hf, tokens[:, :seq_len]).item()
    print(f"loss: ours {loss_ours:.5f}, transformers {loss_hf:.5f}", flush=True)

    steps = {"ours": (ours, ours_step, tokens), "transformers": (hf, hf_step, tokens[:, :seq_len])}
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, (model, step, batch_tokens) in steps.items():
            model.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
            sync(device)
            start = time.perf_counter()
            step(model, batch_tokens)
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    peak = {}
    for name, (model, step, batch_tokens) in steps.items():
        model.zero_grad(set_to_none=False)
        with PeakMemory(device) as mem:
            step(model, batch_tokens)
        peak[name] = mem.peak
    n_tokens = batch * seq_len
    print()
    print("| model | tokens/s | step s | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {n_tokens / best[name]:.0f} | {best[name]:.2f} | {peak[name] / 2**20:.0f} |")
    print(f"| ours / transformers | {best['transformers'] / best['ours']:.2f}x | | "
          f"{peak['ours'] / max(peak['transformers'], 1):.2f}x |")


if __name__ == "__main__":
    run_cli(main)
