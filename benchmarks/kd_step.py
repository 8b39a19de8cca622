"""One offline KD step on the real pair, today's paths against the fast path and TRL's GKD, same process.

    python -m benchmarks.kd_step                          # CPU, 2 threads, full fine-tuning rows
    python -m benchmarks.kd_step --lora                   # a LoRA (peft) student
    python -m benchmarks.kd_step --compile_models         # + the fast step with torch.compile'd models
    python -m benchmarks.kd_step --device cuda --dtype bfloat16
    python -m benchmarks.kd_step accuracy --steps 50      # fast vs plain: held-out KL to the teacher after training

The pair: SmolLM2-135M-Instruct (the kdzoo cache, `python -m common.pretrained fetch`) as the teacher and its
10-block cut (common.hf.keep_layers, contra_kd's REAL student: blocks 0,1,2,3,21,23,25,27,28,29) as the student,
on 8 x 256 tokens of chat-templated UltraChat stand-in conversations (data/rwkv_llama), vocabulary 49,152.
A step = teacher forward, student forward, forward KL over every position that has a next token (common.losses;
TRL: generalized_jsd_loss with beta 0, the same forward KL), backward, AdamW step.

Rows (one process, the same initial student weights, the same batch):
  fp32        today's path without --bf16: fp32 teacher (no_grad) and student, full [B, S, V] logits
  bf16        today's path with --bf16 / --dtype bfloat16: bf16 teacher, student under bf16 autocast over fp32
              weights, full logits (bf16) into the loss
  fast        common.hf_training's fast path: bf16 teacher under inference_mode, student under bf16 autocast,
              both stopped before the head (common.hf.head_logits); the head and the divergence computed
              KD_CHUNK_SIZE rows at a time (common.losses.HeadLogits), so no [B, S, V] logits exist, each
              chunk's divergence and its gradient compiled (common.losses.compiled_chunks)
  fast, eager chunks   the same without compiling
  fast, compiled models   (--compile_models) the fast step with both models' bodies under torch.compile
  trl         TRL's GKDTrainer.training_step (lmbda 0: offline; beta 0) with bf16=True (accelerate's autocast),
              the bf16 teacher, then the same AdamW step
  matmul-only every matmul of one fast step (forward and backward, both models; recorded with a dispatch
              mode) replayed alone at its shapes, strides and dtype; the fused attention kernel counts as
              its two forward and four backward batched matmuls
Every row steps one shared student with AdamW at lr 0 (same work, unchanged weights: the rows' loss values
must agree, and are printed). Columns: seconds per step (median of `repeats` interleaved rounds after one
warm-up each; `--clock cpu` takes the process's CPU time instead of the wall clock, which a loaded machine
inflates far less at --threads 1; CPU: glibc's default allocator, as in the methods' train.py), tokens/s, the
peak memory rise of one more step, taken after all timings (CPU: sampled resident set, large blocks unmapped
when freed, which costs each step page faults: up to a third of its time; CUDA: max_memory_allocated) and its
share of the memory limit (the GPU's memory; on CPU the cgroup's limit, else the machine's RAM), matmul-only
time / step time.
A quick check: `--repeats 1` (one timed step per row after the warm-up); `--batch 2` for a smaller step.
The machine's load average is printed: on a shared machine only ratios from one run mean anything.
"""
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import PeakMemory  # noqa: E402
from common import hf, losses  # noqa: E402
from common.cli import check_choice, check_range, run_cli  # noqa: E402
from common.io import atomic_write_json  # noqa: E402
from common.distributed import to_dtype  # noqa: E402
from common.hf_training import KD_CHUNK_SIZE, autocast, lm_logits  # noqa: E402

MODEL_DIR = Path(os.environ.get("KDZOO_CACHE", Path.home() / ".cache" / "kdzoo")) / "models" / "smollm2-135m-instruct"
STUDENT_LAYERS = [0, 1, 2, 3, 21, 23, 25, 27, 28, 29]  # contra_kd/run.sh REAL=1
DATA = ROOT / "data" / "rwkv_llama" / "ultrachat_standin"


# ---------------------------------------------------------------------------------------------------------
# The pair and the data

def load_pair(model_dir, device, lora=False):
    """(fp32 teacher, fp32 student cut from it); with lora the student is a peft LoRA model (r 16, alpha 32,
    peft's default targets q_proj and v_proj)."""
    teacher = hf.load_model(model_dir, dtype="float32", device=device, frozen=True, flag="--model_dir")
    student = hf.keep_layers(copy.deepcopy(teacher), STUDENT_LAYERS).train().requires_grad_(True)
    student.config.use_cache = False
    if lora:
        student = hf.add_lora(student, r=16, alpha=32)
    return teacher, student


def token_rows(tokenizer, split, n_rows, seq_len, skip=0):
    """[n_rows, seq_len] ids: the split's conversations, chat-templated and concatenated, cut into rows."""
    stream = []
    with open(DATA / f"{split}.jsonl") as f:
        for line in f:
            stream += tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False)
            if len(stream) >= (skip + n_rows) * seq_len:
                break
    if len(stream) < (skip + n_rows) * seq_len:
        raise ValueError(f"{DATA / split}.jsonl holds {len(stream)} tokens, fewer than {skip + n_rows} rows of "
                         f"{seq_len}")
    return torch.tensor(stream[skip * seq_len:(skip + n_rows) * seq_len]).view(n_rows, seq_len)


def next_token_mask(ids):
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    mask[:, -1] = False  # the last position has no next token
    return mask


def optimizer_for(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


# ---------------------------------------------------------------------------------------------------------
# The steps

def kd_step(student, teacher, optimizer, ids, dtype, fast, compiled=True, micro_batches=1):
    """One optimiser step of forward KL on `ids`, in `micro_batches` accumulated micro-batches (each loss divided
    by the whole step's token count). fast=False: today's path (atkd/train.py micro_batch_loss, kl_method
    forward): full logits, then the loss. fast=True: both models stop before their heads; head + divergence
    chunked (common.hf_training.lm_logits, KD_CHUNK_SIZE), each chunk's divergence compiled unless not
    `compiled` (common.losses.compiled_chunks, as the methods' train.py run it)."""
    mask = next_token_mask(ids)
    n = int(mask.sum())
    total = 0.0
    for part in torch.arange(ids.shape[0], device=ids.device).chunk(micro_batches):
        inputs = {"input_ids": ids[part]}
        with autocast(dtype, ids.device), losses.compiled_chunks(compiled):
            _, t_logits = lm_logits(teacher, inputs, fast=fast, frozen=True)
            _, s_logits = lm_logits(student, inputs, fast=fast)
            if fast:
                loss = losses.forward_kl(s_logits, t_logits, mask=mask[part], chunk_size=KD_CHUNK_SIZE, normalizer=n)
        if not fast:
            loss = losses.forward_kl(s_logits, t_logits, mask=mask[part], normalizer=n)
        loss.backward()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def trl_step_fn(student, teacher, optimizer, tokenizer, dtype, device):
    """TRL's GKDTrainer.training_step (lmbda 0, beta 0: offline forward KL) and the same AdamW step.

    accelerate (inside GKDTrainer) gives the models it prepares a forward of their own under mixed precision
    (autocast, outputs cast to fp32); it is put in place for TRL's steps only, so that the other rows can share
    the student and the teacher (memory, on a shared machine)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, lmbda=0.0, beta=0.0,
                     temperature=1.0, report_to=[], use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                     disable_dropout=True, logging_strategy="no", save_strategy="no", gradient_checkpointing=False)
    unused = Dataset.from_list([{"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=unused,
                         processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we bypass to time one step
    if trainer.model is not student or trainer.teacher_model is not teacher:
        raise RuntimeError("GKDTrainer wrapped the models: give it copies of its own")
    prepared = {m: m.__dict__.pop("forward", None) for m in (student, teacher)}

    def step(ids):
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(), prompts=ids[:, :1],
                      prompt_attention_mask=torch.ones_like(ids[:, :1]))
        for model, forward in prepared.items():
            if forward is not None:
                model.forward = forward
        try:
            loss = trainer.training_step(trainer.model, inputs)
        finally:
            for model in prepared:
                model.__dict__.pop("forward", None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


# ---------------------------------------------------------------------------------------------------------
# The matmul-only time

def record_matmuls(fn):
    """(op, args) of every matmul fn runs, forward and backward, at the dispatcher (below autocast)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_efficient_attention_backward.default,
             aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_flash_attention_backward.default,
             aten._scaled_dot_product_cudnn_attention.default,
             aten._scaled_dot_product_cudnn_attention_backward.default}
    seen = []

    def spec(x):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype, x.device) if isinstance(x, torch.Tensor) else x

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in kinds:
                seen.append((func, [spec(a) for a in args]))
            return func(*args, **(kwargs or {}))
    with Recorder():
        fn()
    return seen


def replay_calls(seen):
    """Zero-argument callables, one per recorded matmul, on fresh tensors of the recorded layout."""
    def make(s):
        if not (isinstance(s, tuple) and s and s[0] == "tensor"):
            return s
        _, shape, stride, dtype, device = s
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
    calls = []
    for func, args in seen:
        if "attention" in func.__name__:  # q [B, H, T, d], k and v [B, H_kv, S, d]: QKᵀ and PV per head
            q, k = args[0], args[1]
            if "backward" in func.__name__:
                q, k = args[1], args[2]
            (b, h, t, d), s = q[1], k[1][2]
            dtype, device = q[3], q[4]
            scores = (torch.randn(b * h, t, d, dtype=dtype, device=device),
                      torch.randn(b * h, d, s, dtype=dtype, device=device))
            values = (torch.randn(b * h, t, s, dtype=dtype, device=device),
                      torch.randn(b * h, s, d, dtype=dtype, device=device))
            pairs = [scores, values] + ([scores, values] if "backward" in func.__name__ else [])
            calls += [lambda a=a, c=c: torch.bmm(a, c) for a, c in pairs]
        else:
            tensors = [make(a) for a in args]
            calls.append(lambda func=func, tensors=tensors: func(*tensors))
    return calls


def linear_flops(func, args):
    """2·n·k·m of a recorded mm / addmm / bmm / baddbmm (its last two arguments), 0 for attention."""
    if "attention" in func.__name__:
        return 0
    a, b = args[-2], args[-1]
    return 2 * torch.Size(a[1]).numel() * b[1][-1]


def matmul_only_seconds(seen, device, timer, repeats=3):
    calls = replay_calls(seen)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = timer()
        for call in calls:
            call()
        sync(device)
        best = min(best, timer() - start)
    return best


# ---------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_limit(device):
    """Bytes the step may use: the GPU's memory, or the cgroup's limit where one is set, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            return int(limit)
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_average():
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(device=None, dtype=None, threads=2, lora=False, batch=8, seq_len=256, repeats=3, clock="wall",
         compile_models=False, model_dir=str(MODEL_DIR)):
    """The table and the one-line summary (ratios of the fast row against fp32, bf16 and TRL).

    compile_models: one more row, the fast step with both models' bodies under torch.compile (copies of the
    student, its optimiser and the bf16 teacher; the compile happens in the warm-up step)."""
    check_choice("--clock", clock, ("wall", "cpu"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = to_dtype(dtype or "bfloat16")
    if device.type == "cpu":  # the timings run under glibc's default allocator, as the methods' train.py do;
        torch.set_num_threads(int(threads))  # the peaks are taken last (PeakMemory unmaps freed blocks from then on)
    torch.manual_seed(0)
    tokenizer = hf.load_tokenizer(model_dir, flag="--model_dir")
    teacher32, student0 = load_pair(model_dir, device, lora)
    teacher16 = copy.deepcopy(teacher32).to(dtype)
    ids = token_rows(tokenizer, "train", batch, seq_len).to(device)
    n_tokens = ids.numel()
    # every row steps the same student (memory, on a shared machine); lr 0 keeps its weights, so that the rows'
    # loss values compare (AdamW does all its work at lr 0 too)
    optimizer = optimizer_for(student0, lr=0.0)
    steps = {
        "fp32": lambda: kd_step(student0, teacher32, optimizer, ids, torch.float32, fast=False),
        "bf16": lambda: kd_step(student0, teacher16, optimizer, ids, dtype, fast=False),
        "fast": lambda: kd_step(student0, teacher16, optimizer, ids, dtype, fast=True),
        "fast, eager chunks": lambda: kd_step(student0, teacher16, optimizer, ids, dtype, fast=True, compiled=False),
        "trl": lambda: trl(ids),
    }
    trl = trl_step_fn(student0, teacher16, optimizer, tokenizer, dtype, device)
    if compile_models:
        student_c, teacher_c = copy.deepcopy(student0), copy.deepcopy(teacher16)
        optimizer_c = optimizer_for(student_c, lr=0.0)
        for model in (student_c, teacher_c):
            model.model.compile(dynamic=False)
        steps["fast, compiled models"] = lambda: kd_step(student_c, teacher_c, optimizer_c, ids, dtype, fast=True)
    trainable = sum(p.numel() for p in student0.parameters() if p.requires_grad)
    print(f"teacher SmolLM2-135M-Instruct (30 blocks), student its blocks {','.join(map(str, STUDENT_LAYERS))} "
          f"({'LoRA r 16, ' if lora else 'full fine-tuning, '}{trainable / 1e6:.1f}M trainable), batch {batch} x "
          f"{seq_len}, vocab {hf.vocab_width(teacher32)}, forward KL, AdamW; device {device}, "
          f"{torch.get_num_threads() if device.type == 'cpu' else ''} threads, low precision {dtype}, "
          f"chunk {KD_CHUNK_SIZE}, {clock} clock", flush=True)
    print(f"load average before: {load_average()}", flush=True)

    values = {name: float(step()) for name, step in steps.items()}  # warm-up (compiles, allocates optimiser state)
    print("forward KL, same weights: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = timer()
            step()
            sync(device)
            times[name].append(timer() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}

    def fast_forward_backward():  # the fast step without the optimiser, for the matmul record
        mask = next_token_mask(ids)
        with autocast(dtype, device):
            with torch.no_grad():  # the same matmuls as under inference_mode, which the recorder does not see
                _, t_logits = hf.head_logits(teacher16, input_ids=ids)
            _, s_logits = lm_logits(student0, {"input_ids": ids}, fast=True)
            loss = losses.forward_kl(s_logits, t_logits, mask=mask, chunk_size=KD_CHUNK_SIZE)
        loss.backward()
        student0.zero_grad(set_to_none=True)
    seen = record_matmuls(fast_forward_backward)
    matmul_s = matmul_only_seconds(seen, device, timer)
    flops = sum(linear_flops(func, args) for func, args in seen)
    peak = {}
    for name, step in steps.items():
        with PeakMemory(device) as mem:
            step()
        peak[name] = mem.peak
    print(f"load average after: {load_average()}", flush=True)
    limit = memory_limit(device)

    print()
    print(f"| path | s/step | tokens/s | peak memory rise (MiB) | share of the {limit / 2**30:.0f} GiB limit | "
          f"matmul share |")
    print("|---|---|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {seconds[name]:.2f} | {n_tokens / seconds[name]:.0f} | {peak[name] / 2**20:.0f} | "
              f"{100 * peak[name] / limit:.1f}% | {100 * matmul_s / seconds[name]:.0f}% |")
    print(f"| matmul-only ({len(seen)} matmuls, {flops / 1e12:.2f} TFLOP in the linear ones) | {matmul_s:.2f} | "
          f"{n_tokens / matmul_s:.0f} | - | - | 100% |")
    print()
    speedup = {name: seconds[name] / seconds["fast"] for name in ("fp32", "bf16", "trl")}
    print(f"kd_step: fast/fp32 {speedup['fp32']:.2f}x, fast/bf16 {speedup['bf16']:.2f}x, "
          f"fast/TRL {speedup['trl']:.2f}x tokens/s, fast/TRL memory {peak['fast'] / max(peak['trl'], 1):.2f}x, "
          f"{100 * matmul_s / seconds['fast']:.0f}% matmul share")


# ---------------------------------------------------------------------------------------------------------
# Accuracy: the fast path trains as the plain one does

@torch.no_grad()
def held_out_kl(student, teacher, rows, batch):
    """Per-sequence token-mean forward KL(teacher ‖ student), fp32 models, full logits, plain loss."""
    out = []
    for i in range(0, rows.shape[0], batch):
        ids = rows[i:i + batch]
        mask = next_token_mask(ids)
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
        out += [losses.forward_kl(s[b:b + 1], t[b:b + 1], mask=mask[b:b + 1]).item() for b in range(ids.shape[0])]
    return torch.tensor(out, dtype=torch.float64)


def accuracy(steps=50, lr=1e-4, batch=8, seq_len=256, eval_rows=32, eval_every=25, plain_dtype="float32",
             micro_batches=1, seeds=1, device=None, dtype=None, threads=2, model_dir=str(MODEL_DIR), out=None):
    """Train the student `steps` AdamW steps (constant lr) twice from the same cut on the same batches of the
    train split, by the plain path (full logits, `plain_dtype`) and by the fast path (bf16), one after the other;
    every `eval_every` steps both are scored on `eval_rows` held-out sequences (the validation split) by the
    token-mean forward KL to the teacher, fp32 throughout. Prints each path's mean and the paired difference
    with its standard error over the sequences (the noise of the held-out estimate); `out`: a JSON of it all.

    seeds > 1 repeats both runs on other orders of the same training rows (seed 0: file order; seed s: a
    permutation drawn from s). Then the paths' difference stands beside the training noise: how far two plain
    runs that differ only in data order end apart (the sd over seeds of the plain path's final KL)."""
    for flag, value in (("--steps", steps), ("--batch", batch), ("--seq_len", seq_len), ("--eval_rows", eval_rows),
                        ("--eval_every", eval_every), ("--micro_batches", micro_batches), ("--seeds", seeds)):
        check_range(flag, value, low=1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = to_dtype(dtype or "bfloat16")
    if device.type == "cpu":
        torch.set_num_threads(int(threads))
    tokenizer = hf.load_tokenizer(model_dir, flag="--model_dir")
    train_rows = token_rows(tokenizer, "train", steps * batch, seq_len).to(device)
    eval_ids = token_rows(tokenizer, "validation", eval_rows, seq_len).to(device)
    print(f"{steps} steps of {batch} x {seq_len} tokens, lr {lr}; held-out: {eval_rows} validation sequences; "
          f"plain path {plain_dtype}, fast path {dtype}; load average {load_average()}", flush=True)
    runs = [train_both(train_rows[order_of(seed, train_rows.shape[0])], eval_ids, steps, lr, batch,
                       eval_every, plain_dtype, dtype, micro_batches, model_dir, device, f"seed {seed} ")
             for seed in range(seeds)]
    summaries = [print_accuracy(results, steps, f"seed {seed}: " if seeds > 1 else "")
                 for seed, results in enumerate(runs)]
    last = [s[steps] for s in summaries]
    if seeds > 1:
        diffs = torch.tensor([x["diff"] for x in last])
        plain, fast = torch.tensor([x["plain"] for x in last]), torch.tensor([x["fast"] for x in last])
        print(f"\nover {seeds} data orders after {steps} steps: plain {plain.mean():.4f} (sd {plain.std():.4f}), "
              f"fast {fast.mean():.4f} (sd {fast.std():.4f}); fast - plain per order "
              + ", ".join(f"{d:+.4f}" for d in diffs.tolist())
              + f", mean {diffs.mean():+.4f}: {abs(diffs.mean()) / plain.std():.2f} sd of the plain path's "
              f"order-to-order spread")
    if out:
        atomic_write_json({"settings": dict(steps=steps, lr=lr, batch=batch, seq_len=seq_len, eval_rows=eval_rows,
                                            plain_dtype=plain_dtype, dtype=str(dtype), seeds=seeds),
                           "summary": summaries,
                           "per_sequence": [{p: {k: v.tolist() for k, v in c.items()} for p, c in results.items()}
                                            for results in runs]}, out)


def order_of(seed, n_rows):
    """The training rows' order for seed `seed`: file order for 0, else a permutation drawn from the seed."""
    if seed == 0:
        return torch.arange(n_rows)
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))


def train_both(train_rows, eval_ids, steps, lr, batch, eval_every, plain_dtype, dtype, micro_batches, model_dir,
               device, label=""):
    """{path: {step: per-sequence held-out KL}} for the plain and the fast path trained on `train_rows` in order."""
    results = {}
    for path in ("plain", "fast"):
        torch.manual_seed(0)
        teacher32, student = load_pair(model_dir, device)
        teacher = teacher32 if path == "plain" and to_dtype(plain_dtype) == torch.float32 else \
            copy.deepcopy(teacher32).to(to_dtype(plain_dtype) if path == "plain" else dtype)
        optimizer = optimizer_for(student, lr)
        curve, start = {}, time.perf_counter()
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                if step == 0 and results:  # the same cut, the same weights: scored once
                    curve[0] = results["plain"][0]
                else:
                    student.eval()
                    curve[step] = held_out_kl(student, teacher32, eval_ids, batch)
                    student.train()
                print(f"{label}{path} step {step}: held-out KL {curve[step].mean():.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if step == steps:
                break
            ids = train_rows[step * batch:(step + 1) * batch]
            kd_step(student, teacher, optimizer, ids, to_dtype(plain_dtype) if path == "plain" else dtype,
                    fast=path == "fast", micro_batches=micro_batches)
        results[path] = curve
        del teacher32, teacher, student, optimizer
    return results


def print_accuracy(results, steps, label="") -> dict:
    """The table of one data order and its summary line; {step: plain, fast, diff, se}."""
    print(f"\n{label}" if label else "")
    print("| step | plain held-out KL | fast held-out KL | fast - plain (paired) | its standard error |")
    print("|---|---|---|---|---|")
    summary = {}
    for step in results["plain"]:
        a, b = results["plain"][step], results["fast"][step]
        diff = b - a
        se = diff.std().item() / len(diff) ** 0.5
        summary[step] = dict(plain=a.mean().item(), fast=b.mean().item(), diff=diff.mean().item(), se=se)
        print(f"| {step} | {a.mean():.4f} | {b.mean():.4f} | {diff.mean():+.4f} | {se:.4f} |")
    last = summary[steps]
    print(f"\n{label}kd_step accuracy: after {steps} steps held-out KL plain {last['plain']:.4f}, "
          f"fast {last['fast']:.4f}, difference {last['diff']:+.4f} ± {last['se']:.4f} (paired SE), "
          f"from {summary[0]['plain']:.4f} at step 0")
    return summary


if __name__ == "__main__":
    run_cli({"main": main, "accuracy": accuracy} if len(sys.argv) > 1 and sys.argv[1] in ("main", "accuracy")
            else main)
