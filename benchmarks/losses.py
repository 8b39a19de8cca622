"""Peak memory and time of a KD loss, forward + backward: plain (chunk_size=None) vs chunked, and
vocab-parallel at TP 2 (2 gloo processes, each holding V/2 columns), on TOKENS x VOCAB logits.

    python benchmarks/losses.py                      # 8192 tokens x 32000 vocabulary, forward_kl, fp32
    python benchmarks/losses.py --loss generalized_jsd --dtype bfloat16 --chunk_size 512

Every variant runs in a fresh process. Memory: the inputs (student logits requiring grad, teacher logits,
mask) are allocated first, then the kernel's peak-RSS counter is reset (`/proc/self/clear_refs` = 5) and
"peak extra" = VmHWM after one forward + backward minus VmRSS at the reset. That includes the gradient of
the student logits (N x V in their dtype), which every variant must produce; "beyond grad" subtracts it.
With the default glibc allocator, freed blocks below its dynamic mmap threshold (up to 32 MiB,
e.g. one chunk of fp32 rows) stay in the heap and count in the RSS; `--live_only` sets
MALLOC_MMAP_THRESHOLD_=1MiB in every variant's process so that freed tensors go back to the kernel and the
peak is that of live tensors (no timing then: every chunk would pay for fresh pages). On CUDA,
torch.cuda.max_memory_allocated is used instead. Time: one more process per group (plain and
chunked; TP plain and TP chunked) alternates the variants, one warm-up each then the median of `repeats`
passes, so that load from other processes on a shared machine hits both alike. TP rows report the worse of
the two ranks (each on one core, while the single-process rows use both cores); their ratios are against
TP plain.

Measured 2026-11-22 on the shared 2-core CPU machine (other jobs running: load average 1-4, so times are
noisy; memory is not). Values differ between the single-process and TP rows only because the TP ranks draw
their own random shards.

forward_kl, 8192 tokens x 32000 vocabulary, float32 logits, chunk_size 128
variant          value  peak extra GiB  x plain  beyond grad GiB  x plain  time s  x plain
plain          8.73170           6.840    1.000            5.864    1.000   22.77    1.000
chunked        8.73170           1.395    0.204            0.419    0.071   14.27    0.627
tp2_plain      8.72788           3.911    1.000            3.422    1.000   22.67    1.000
tp2_chunked    8.72788           0.716    0.183            0.227    0.066    6.11    0.270

same, --live_only (peak of live tensors)
plain          8.73170           6.840    1.000            5.864    1.000       -        -
chunked        8.73170           1.121    0.164            0.145    0.025       -        -
tp2_plain      8.72788           3.911    1.000            3.422    1.000       -        -
tp2_chunked    8.72788           0.571    0.146            0.083    0.024       -        -

forward_kl, bfloat16 logits, chunk_size 128
plain          8.73186           6.841    1.000            6.352    1.000    6.76    1.000
chunked        8.73186           0.842    0.123            0.354    0.056    1.84    0.273
tp2_plain      8.72817           3.911    1.000            3.667    1.000   18.73    1.000
tp2_chunked    8.72817           0.464    0.119            0.220    0.060    6.12    0.327

generalized_jsd (beta 0.5), float32 logits, chunk_size 128, --tp=False
plain          0.64583          13.677    1.000           12.700    1.000   45.58    1.000
chunked        0.64583           1.656    0.121            0.679    0.053   17.64    0.387

chunked_view: the same loss on logits[:, :-1] of a batch of 8 sequences (a non-contiguous view, as callers
wrote before targets came aligned with the full logits). "allocated GiB" is the total of every allocation in one
forward + backward (torch.profiler memory events on CPU), so each copy counts. Measured 2026-12-01, 2048 tokens
x 32000, fp32, chunk_size 64, --tp=False --repeats 2, load average 13-17 on the 2 cores (times are rough):

before (da8d430: rows selected by reshaping the whole tensor, a full copy per chunk and side)
variant          value  peak extra GiB  x plain  beyond grad GiB  x plain  allocated GiB  time s  x plain
plain          8.74634           1.713    1.000            1.468    1.000           2.81    9.61    1.000
chunked        8.74634           0.435    0.254            0.190    0.129           2.81   17.81    1.854
chunked_view   8.74634           0.678    0.396            0.433    0.295          18.68   56.96    5.928
after (rows gathered by (batch, position) index)
plain          8.74634           1.745    1.000            1.500    1.000           2.81   13.52    1.000
chunked        8.74634           0.447    0.256            0.202    0.135           2.81   15.83    1.171
chunked_view   8.74634           0.681    0.390            0.435    0.290           3.05   22.91    1.694
The view's extra 0.24 GiB (peak and allocated) is autograd's slice backward writing the gradient into the
full [8, 257, 32000] base; passing the full logits with targets_and_mask (the chunked row) avoids it.
"""
import inspect
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import losses  # noqa: E402
from common.cli import check_choice, check_range, run_cli  # noqa: E402
from common.distributed import DTYPES  # noqa: E402

GiB = 2 ** 30


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def _allocated_bytes(step):
    """Bytes allocated in total (not at once) while step() runs: every copy counts."""
    if torch.cuda.is_available():
        before = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
        step()
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def _inputs(tokens, vocab, dtype, seed, batch):
    """Logits of `batch` causal sequences of tokens / batch + 1 positions, as a model returns them; the mask of
    targets_and_mask(labels, shift=True) for all-response labels: every position but the last counts."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, dtype)
    shape = (batch, tokens // batch + 1, vocab)
    student = (3 * torch.randn(shape, generator=gen, device=device)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    mask[:, -1] = False
    return student, teacher, mask


def _step(fn, student, teacher, mask, chunk_size, group, view=False):
    """One forward + backward; returns (loss value, seconds). view: the loss reads logits[:, :-1] (a
    non-contiguous view, as callers wrote before targets came aligned with the full logits)."""
    student.grad = None
    start = time.perf_counter()
    if view:
        out = fn(student[:, :-1], teacher[:, :-1], mask=mask[:, :-1], chunk_size=chunk_size, group=group)
    else:
        out = fn(student, teacher, mask=mask, chunk_size=chunk_size, group=group)
    out.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out.item(), time.perf_counter() - start


def _chunk(variant, chunk_size):
    return None if variant.endswith("plain") else int(chunk_size)


def _run(kind, variants, loss, tokens, vocab, dtype, chunk_size, repeats, batch, group=None, seed=0):
    """kind "memory": one forward + backward of variants[0] (call in a fresh process); kind "time": variants
    alternated `repeats` times after one warm-up each, so that load from other processes hits all alike."""
    student, teacher, mask = _inputs(tokens, vocab, dtype, seed, batch)
    fn = getattr(losses, loss)
    if kind == "memory":
        base = _reset_peak()
        v = variants[0]
        value, _ = _step(fn, student, teacher, mask, _chunk(v, chunk_size), group, v.endswith("view"))
        extra = _peak() - base
        allocated = _allocated_bytes(lambda: _step(fn, student, teacher, mask, _chunk(v, chunk_size), group,
                                                   v.endswith("view")))
        return dict(value=value, extra=extra, allocated=allocated, grad_bytes=student.numel() * student.element_size())
    times = {v: [] for v in variants}
    for round_ in range(repeats + 1):
        for v in variants:
            _, seconds = _step(fn, student, teacher, mask, _chunk(v, chunk_size), group, v.endswith("view"))
            if round_:
                times[v].append(seconds)
    return {v: statistics.median(t) for v, t in times.items()}


def _tp_worker(rank, port, out_file, kind, variants, loss, tokens, vocab, dtype, chunk_size, repeats, batch):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from common.parallel import setup, tp_group
    setup(tp_size=2)
    result = _run(kind, variants, loss, tokens, vocab // 2, dtype, chunk_size, repeats, batch, tp_group(), seed=rank)
    torch.save(result, f"{out_file}.{rank}")


def worker(kind, variants, out_file, loss="forward_kl", tokens=8192, vocab=32000, dtype="float32",
           chunk_size=128, repeats=3, batch=8):
    """Runs in a fresh process; writes its measurements to out_file. TP variants: the worse of the 2 ranks."""
    variants = variants.split("+")
    args = (kind, variants, loss, tokens, vocab, dtype, chunk_size, repeats, batch)
    if variants[0].startswith("tp2"):
        import torch.multiprocessing as mp
        from tests.distributed import free_port  # common.parallel no longer has it (07dafda)
        mp.spawn(_tp_worker, args=(free_port(), out_file, *args), nprocs=2)
        ranks = [torch.load(f"{out_file}.{r}", weights_only=True) for r in range(2)]
        for r in range(2):
            os.remove(f"{out_file}.{r}")
        result = {k: (ranks[0][k] if k == "value" else max(r[k] for r in ranks)) for k in ranks[0]}
    else:
        result = _run(*args)
    torch.save(result, out_file)


def _subprocess(kind, variants, live_only, **options):
    out_file = f"/tmp/kdzoo_bench_losses_{os.getpid()}.pt"
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)} if live_only else {}))
    subprocess.run([sys.executable, os.path.abspath(__file__), "worker", kind, "+".join(variants), out_file]
                   + [f"--{k}={v}" for k, v in options.items()], check=True, env=env)
    result = torch.load(out_file, weights_only=True)
    os.remove(out_file)
    return result


def main(loss="forward_kl", tokens=8192, vocab=32000, dtype="float32", chunk_size=128, repeats=5, tp=True,
         live_only=False, batch=8):
    check_choice("--loss", loss, [n for n, f in vars(losses).items() if inspect.isfunction(f) and not n.startswith("_")
                                  and list(inspect.signature(f).parameters)[:2] == ["student_logits", "teacher_logits"]])
    check_choice("--dtype", dtype, DTYPES)
    for flag, value in (("--tokens", tokens), ("--vocab", vocab), ("--chunk_size", chunk_size), ("--repeats", repeats),
                        ("--batch", batch)):
        check_range(flag, value, low=1)
    options = dict(loss=loss, tokens=tokens, vocab=vocab, dtype=dtype, chunk_size=chunk_size, repeats=repeats,
                   batch=batch)
    groups = [["plain", "chunked", "chunked_view"]] + ([["tp2_plain", "tp2_chunked"]] if tp else [])
    rows, load = {}, os.getloadavg()[0]
    for variants in groups:
        for v in variants:
            rows[v] = _subprocess("memory", [v], live_only, **options)
        if not live_only:  # with every chunk mmapped, times measure page faults more than the loss
            for v, seconds in _subprocess("time", variants, live_only, **options).items():
                rows[v]["time"] = seconds
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\n{loss}, {tokens} tokens ({batch} sequences) x {vocab} vocabulary, {dtype} logits, chunk_size {chunk_size}, "
          f"forward + backward, {device}; 1-min load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
          + ("; live tensors only (MALLOC_MMAP_THRESHOLD_=1MiB)" if live_only else ""))
    header = (f"{'variant':<12} {'value':>9} {'peak extra GiB':>15} {'x plain':>8} {'beyond grad GiB':>16} "
              f"{'x plain':>8} {'allocated GiB':>14} {'time s':>7} {'x plain':>8}")
    print(header)
    print("-" * len(header))
    for variant, r in rows.items():
        ref = rows["tp2_plain" if variant.startswith("tp2") else "plain"]
        beyond, ref_beyond = r["extra"] - r["grad_bytes"], ref["extra"] - ref["grad_bytes"]
        timing = f"{r['time']:>7.2f} {r['time'] / ref['time']:>8.3f}" if "time" in r else f"{'-':>7} {'-':>8}"
        print(f"{variant:<12} {r['value']:>9.5f} {r['extra'] / GiB:>15.3f} {r['extra'] / ref['extra']:>8.3f} "
              f"{beyond / GiB:>16.3f} {beyond / ref_beyond:>8.3f} {r['allocated'] / GiB:>14.2f} {timing}")


if __name__ == "__main__":
    run_cli({"main": main, "worker": worker} if len(sys.argv) > 1 and sys.argv[1] == "worker" else main)
