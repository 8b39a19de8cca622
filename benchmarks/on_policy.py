"""One on-policy KD step, ours (atkd/train.py's path) against TRL's GKDTrainer.training_step, same model and batch.

    python benchmarks/on_policy.py                       # CPU: Llama-style 4 x 256, vocab 8192, batch 8, 64 + 64 tokens
    python benchmarks/on_policy.py --hidden 512 --vocab 32000 --batch 16

A step = sample continuations from the student (temperature 0.9, top_k 0, top_p 1, as TRL's GKD defaults), teacher
forward under no_grad, generalized JSD (beta 0.5) over the completion tokens, backward; no optimiser update (TRL's
training_step does none either). Each implementation runs in its own process (peak memory = the rise of the
process's peak resident set over its state after setup, or of torch.cuda.max_memory_allocated on a GPU); the
first step is a warm-up and not timed. TRL runs with gradient checkpointing off, as ours (its default, on, also
generates without a KV cache). tokens/s counts prompt + new tokens of the batch per second. For ours, the table
also gives the share of the step spent generating.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.cli import check_range, run_cli  # noqa: E402
PAD, EOS = 0, 1


def _models(hidden, layers, vocab, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed, n_layers):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=n_layers,
                          num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                          max_position_embeddings=1024, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
        return LlamaForCausalLM(cfg).to(device)
    student, teacher = build(0, layers), build(1, 2 * layers)
    teacher.eval().requires_grad_(False)
    return student, teacher


def _prompts(batch, prompt_len, vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (prompt_len - i % 4,), generator=g).tolist() for i in range(batch)]  # ragged


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "</s>": EOS, **{f"t{i}": i for i in range(2, vocab)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t2")),
                                   pad_token="<pad>", eos_token="</s>")


def _ours(student, teacher, prompts, new_tokens, step):
    from atkd.train import collate, micro_batch_loss
    from common.generation import generate

    t0 = time.perf_counter()
    responses = generate(student, prompts, new_tokens, temperature=0.9, eos_id=EOS, pad_id=PAD, padding="left",
                         seed=step)
    t1 = time.perf_counter()
    student.train()
    loss = micro_batch_loss(student, teacher, collate(prompts, list(responses), PAD, 10_000), "gjsd")[0]
    loss.backward()
    student.zero_grad(set_to_none=True)
    return t1 - t0


def _trl_step_fn(student, teacher, prompts, new_tokens, vocab, device):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(prompts), lmbda=1.0, beta=0.5,
                     temperature=0.9, max_new_tokens=new_tokens, report_to=[], use_cpu=device == "cpu",
                     disable_dropout=True, logging_strategy="no", save_strategy="no",
                     gradient_checkpointing=False)  # TRL's default True also turns off its KV cache in generation
    unused = Dataset.from_list([{"messages": [{"role": "user", "content": "t2"},
                                              {"role": "assistant", "content": "t3"}]}])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=unused,  # batches given below
                         processing_class=_tokenizer(vocab))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we bypass to time one step
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - len(p) for p in prompts],
                                                                      device=device)[:, None]).long()

    def step_fn(step):
        torch.manual_seed(step)
        inputs = dict(prompts=ids, prompt_attention_mask=mask, input_ids=ids, attention_mask=mask,
                      labels=torch.full_like(ids, -100))
        trainer.training_step(trainer.model, inputs)
        trainer.model.zero_grad(set_to_none=True)
        return None
    return step_fn


def _peak_bytes(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run(impl: str, hidden: int = 256, layers: int = 4, vocab: int = 8192, batch: int = 8, prompt_len: int = 64,
        new_tokens: int = 64, steps: int = 3):
    """One implementation in this process; prints a JSON line."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher = _models(hidden, layers, vocab, device)
    prompts = _prompts(batch, prompt_len, vocab)
    if impl == "ours":
        def step_fn(step):
            return _ours(student, teacher, prompts, new_tokens, step)
    elif impl == "trl":
        step_fn = _trl_step_fn(student, teacher, prompts, new_tokens, vocab, device)
    else:
        raise ValueError(f"impl must be ours or trl, got {impl!r}")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else _peak_bytes(device)
    step_fn(0)  # warm-up (in the memory peak: the steps after it repeat its allocations)
    times, gen = [], []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        g = step_fn(step)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        gen.append(g)
    tokens = sum(map(len, prompts)) + batch * new_tokens
    best = min(times)
    print(json.dumps(dict(impl=impl, step_s=best, tokens_per_s=tokens / best,
                          peak_mib=(_peak_bytes(device) - base) / 2**20,
                          generation_share=None if gen[0] is None else gen[times.index(best)] / best)))


def main(hidden: int = 256, layers: int = 4, vocab: int = 8192, batch: int = 8, prompt_len: int = 64,
         new_tokens: int = 64, steps: int = 3):
    for flag, value in dict(hidden=hidden, layers=layers, vocab=vocab, batch=batch, prompt_len=prompt_len,
                            new_tokens=new_tokens, steps=steps).items():
        check_range(f"--{flag}", value, low=1)
    flags = [f"--{k}={v}" for k, v in dict(hidden=hidden, layers=layers, vocab=vocab, batch=batch,
                                           prompt_len=prompt_len, new_tokens=new_tokens, steps=steps).items()]
    rows = []
    for impl in ("ours", "trl"):
        out = subprocess.run([sys.executable, __file__, "run", impl, *flags], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode:
            raise RuntimeError(f"{impl} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"student Llama {layers} x {hidden}, teacher {2 * layers} x {hidden}, vocab {vocab}, batch {batch}, "
          f"prompts <= {prompt_len} + {new_tokens} new tokens, best of {steps} steps, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {os.environ.get('OMP_NUM_THREADS', '1')} thread(s)")
    print("| implementation | step (s) | tokens/s | peak memory rise (MiB) | generation share |")
    print("|---|---|---|---|---|")
    for r in rows:
        share = "-" if r["generation_share"] is None else f"{100 * r['generation_share']:.0f} %"
        print(f"| {r['impl']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | {share} |")


if __name__ == "__main__":
    run_cli({"run": run, "main": main} if len(sys.argv) > 1 and sys.argv[1] == "run" else main)
