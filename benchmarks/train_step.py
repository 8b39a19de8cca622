"""Training-step speed and peak memory: our TP model vs the transformers Llama, same weights, same process.

    python -m benchmarks.train_step                       # CPU; on a CUDA machine: cuda bf16
    python -m benchmarks.train_step --repeats 1 --rows lora --threads 1 --clock cpu   # CPU time: a loaded machine

Two tables. Full fine-tuning (`full`): one step = forward, token-mean cross-entropy over the full vocabulary
(fp32), backward, on a batch of `batch` x `seq_len` random tokens of a 58M llama, every parameter trainable (no
optimiser: it is the same for both); fp32 on a CPU.
LoRA at the main job's shapes (`lora`, mcc_kd/run.sh): a SmolLM2-135M-shaped llama (random weights, 30 layers,
hidden 576, 9 heads / 3 KV heads, vocabulary 49152, tied head), LoRA r16 on all seven projections and the head,
bf16 base weights and fp32 adapters, 4 right-padded rows of 224 positions (lengths 224, 205, 186, 167; a 90-token
prompt, so 49 % of the positions are supervised), Std-CoT's per-sequence cross-entropy, backward and Adam. Rows:
today's step (main before issue 18: `model(tokens)`, the full [B, S, V] logits, then log q(label) on every
position; the model code is this branch's), ours as mcc_kd trains it now (`sft_loss`: hidden states up to the last
supervised position, the head and the loss on the supervised rows in chunks), and
transformers + peft (the same adapters, peft's fp32 adapter dtype, `labels=` token-mean loss).
Peak memory (one extra, untimed step per model, gradients already allocated): on CUDA
`max_memory_allocated` above the level before the step; on CPU the peak resident set size above the level
before the step, sampled every millisecond, with glibc told to map every allocation above 64 KiB on its
own (mallopt M_MMAP_THRESHOLD) so that freed tensors leave the resident set at once; restored to glibc's
default steady state after each peak, so that the timings never pay for it.
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _malloc_settings(*settings, trim=False):
    """glibc mallopt(option, value) for each pair, then malloc_trim when asked; nothing off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        for option, value in settings:
            libc.mallopt(option, value)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_freed_memory():
    """A fixed 64 KiB mmap threshold: from here on large blocks are unmapped when freed (honest peaks)."""
    gc.collect()
    _malloc_settings((M_MMAP_THRESHOLD, 1 << 16), trim=True)


def keep_freed_memory():
    """Undo release_freed_memory for the timings that follow: glibc's default steady state (its dynamic mmap
    threshold at its 32 MiB ceiling, trimming above twice that). At 64 KiB every step re-faults its pages: up to
    a third of a KD step's time on these CPUs."""
    _malloc_settings((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))


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
            keep_freed_memory()


def ours_step(model, tokens):
    # logits are not kept past the loss (transformers' output object is dropped the same way)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss


def hf_step(model, tokens):
    loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels inside
    loss.backward()
    return loss


def main(device=None, dtype=None, batch=8, seq_len=256, repeats=3, seed=0, threads=None, rows="full,lora",
         clock="wall"):
    """clock: `wall`, or `cpu` (the process's CPU time: on a loaded machine, with --threads 1, it counts the work
    and not the waiting for a core)."""
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    if threads:  # CPU: one thread is the stable choice on a machine shared with other jobs
        torch.set_num_threads(int(threads))
    rows = rows.split(",") if isinstance(rows, str) else list(rows)
    if "full" in rows:
        full_fine_tuning(device, dtype, batch, seq_len, repeats, seed, timer)
    if "lora" in rows:
        lora_main_job(device, repeats, seed, timer)


def timed_steps(steps: dict, repeats: int, device, timer=time.perf_counter) -> tuple:
    """Best seconds per step of each (model, step, inputs) over interleaved rounds, then each one's peak memory
    rise in one more step."""
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, (model, step, inputs) in steps.items():
            model.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
            sync(device)
            start = timer()
            step(model, inputs)
            sync(device)
            best[name] = min(best[name], timer() - start)
    peak = {}
    for name, (model, step, inputs) in steps.items():
        model.zero_grad(set_to_none=False)
        with PeakMemory(device) as mem:
            step(model, inputs)
        peak[name] = mem.peak
    return best, peak


def full_fine_tuning(device, dtype, batch, seq_len, repeats, seed, timer):
    device, dtype = resolve(device, dtype)
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
    best, peak = timed_steps(steps, repeats, device, timer)
    n_tokens = batch * seq_len
    print()
    print("| model | tokens/s | step s | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {n_tokens / best[name]:.0f} | {best[name]:.2f} | {peak[name] / 2**20:.0f} |")
    print(f"| ours / transformers | {best['transformers'] / best['ours']:.2f}x | | "
          f"{peak['ours'] / max(peak['transformers'], 1):.2f}x |")



# ---- LoRA at the main job's shapes ----

SMOLLM2_CONFIG = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
MAIN_JOB_LENGTHS, MAIN_JOB_PROMPT = (224, 205, 186, 167), 90
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def main_job_batch(vocab, seed):
    """mcc_kd's Std-CoT batch layout: right-padded rows, labels pre-shifted, -100 on the prompt and padding."""
    from mcc_kd.data import IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    width = max(MAIN_JOB_LENGTHS)
    tokens = torch.full((len(MAIN_JOB_LENGTHS), width), SMOLLM2_CONFIG["pad_token_id"], dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    for b, n in enumerate(MAIN_JOB_LENGTHS):
        tokens[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        labels[b, MAIN_JOB_PROMPT - 1:n - 1] = tokens[b, MAIN_JOB_PROMPT:n]
    return tokens, labels


def lora_main_job(device, repeats, seed, timer):
    from peft import LoraConfig, get_peft_model

    from common.model import mark_only_lora_trainable
    from common.losses import token_log_probs
    from mcc_kd.train import sft_loss

    device, dtype = resolve(device, "bfloat16")
    hf, ours = build_models(device, dtype, max_seq_len=max(MAIN_JOB_LENGTHS), max_batch_size=4, seed=seed,
                            config=SMOLLM2_CONFIG, lora_rank=16)
    for name, module in ours.named_modules():  # fp32 adapters under the bf16 base, as load_model makes them
        if name.rsplit(".", 1)[-1].startswith("lora_"):
            module.float()
    mark_only_lora_trainable(ours)
    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the same adapters in both (B != 0, so the adapters matter)
        for layer, block in zip(hf.base_model.model.model.layers, ours.layers):
            pairs = [(layer.self_attn.q_proj, block.attention, "wq"), (layer.self_attn.k_proj, block.attention, "wk"),
                     (layer.self_attn.v_proj, block.attention, "wv"), (layer.self_attn.o_proj, block.attention, "wo"),
                     (layer.mlp.gate_proj, block.feed_forward, "w1"), (layer.mlp.up_proj, block.feed_forward, "w3"),
                     (layer.mlp.down_proj, block.feed_forward, "w2")]
            pairs.append((hf.base_model.model.lm_head, ours, "output")) if block is ours.layers[-1] else None
            for peft_layer, module, target in pairs:
                for ab, peft_ab in (("a", peft_layer.lora_A["default"]), ("b", peft_layer.lora_B["default"])):
                    w = torch.randn(peft_ab.weight.shape, generator=g) * 0.02
                    peft_ab.weight.copy_(w)
                    getattr(module, f"lora_{ab}_{target}").weight.copy_(w)
    q_a, q_b = hf.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"], ours.layers[0].attention.lora_a_wq
    assert q_a.weight.dtype == torch.float32 and q_b.weight.dtype == torch.float32
    hf.train()
    ours.train()
    tokens, labels = main_job_batch(ours.args.vocab_size, seed)
    tokens, labels = tokens.to(device), labels.to(device)
    n_sequences = float(len(MAIN_JOB_LENGTHS))
    # lr 0: Adam does its full work, the weights stay put, so every row computes the same loss at every round
    optimizers = {id(m): torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.0) for m in (ours, hf)}

    def adam(model):
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)

    def fast_step(model, batch):
        loss = sft_loss(model, batch, {"sequences": n_sequences}, None)[0]
        loss.backward()
        adam(model)
        return loss

    def todays_step(model, batch):  # main's sft_loss before the fast path: full [B, S, V] logits, then log q(label)
        logp = token_log_probs(model(batch["tokens"]), target_ids=batch["labels"])
        n = (batch["labels"] != -100).sum(1)
        loss = (-logp.sum(1)[n > 0] / n[n > 0]).sum() / n_sequences
        loss.backward()
        adam(model)
        return loss

    def peft_step(model, batch):
        shifted = torch.cat([torch.full_like(batch["labels"][:, :1], -100), batch["labels"][:, :-1]], 1)
        loss = model(input_ids=batch["tokens"], labels=shifted).loss  # transformers shifts the labels back
        loss.backward()
        adam(model)
        return loss

    batch = {"tokens": tokens, "labels": labels}
    n_params = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    real, supervised = int(sum(MAIN_JOB_LENGTHS)), int((labels != -100).sum())
    print(f"\nLoRA r16 at the main job's shapes: device {device}, base {dtype}, fp32 adapters ({n_params / 1e6:.2f}M), "
          f"4 x {tokens.shape[1]} positions ({real} real, {supervised} supervised), forward + backward + Adam, "
          f"best of {repeats}, {'CPU' if timer is time.process_time else 'wall'} time", flush=True)
    with torch.no_grad():  # the two models agree before the adapters move
        logits_ours, logits_hf = ours(tokens).float(), hf(input_ids=tokens).logits.float()
        keep = labels != -100
        print(f"logits on the supervised positions: max |ours - transformers| {(logits_ours - logits_hf)[keep].abs().max():.3f} "
              f"(bf16), max |logit| {logits_hf[keep].abs().max():.1f}", flush=True)
    today, fast = "ours, today's step", "ours, fast (mcc_kd step)"
    steps = {today: (ours, todays_step, batch), fast: (ours, fast_step, batch),
             "transformers + peft": (hf, peft_step, batch)}
    losses = {name: step(model, inputs).item() for name, (model, step, inputs) in steps.items()}  # also a warm-up
    print("loss: " + ", ".join(f"{name} {value:.5f}" for name, value in losses.items()), flush=True)
    best, peak = timed_steps(steps, repeats, device, timer)
    print()
    print("| LoRA step | tokens/s | step s | peak memory rise (MiB) | vs today's | vs transformers + peft |")
    print("|---|---|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {real / best[name]:.0f} | {best[name]:.2f} | {peak[name] / 2**20:.0f} | "
              f"{best[today] / best[name]:.2f}x | {best['transformers + peft'] / best[name]:.2f}x |")
    print(f"train_step lora: fast/today {best[today] / best[fast]:.2f}x, "
          f"fast/peft {best['transformers + peft'] / best[fast]:.2f}x tokens/s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    run_cli(main)
