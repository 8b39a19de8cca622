"""Generation speed: common.generation on our TP model vs transformers `generate`, same weights, same process.

    python -m benchmarks.generation                       # CPU fp32; on a CUDA machine: cuda bf16
    python -m benchmarks.generation --batch_sizes 1,16 --repeats 1
    python -m benchmarks.generation --small               # a model where per-step overhead, not matmuls, bounds

Rows: greedy decoding of `new_tokens` tokens after `prompt_len`-token prompts at each batch size
(ours: right padding and the static cache, eager and with `compile=True`, which replays each decode step
as a torch.compile graph, CUDA graphs on a GPU; transformers: its default dynamic cache), then a batch whose
prompt lengths are spread evenly over `spread` (ours: left padding with a key mask, one prefill;
transformers: left padding + attention mask). Tokens/s counts new tokens, prefill included.
"matmul-only" times just the weight matrix multiplies of the same decode work with the same weights
(the prefill over every prompt position, then one position per step; the output head only where a
token is chosen): what this machine needs at the least, so ours / it is our efficiency.
Each time is the best of `repeats` runs, ours and transformers interleaved (shared machines are noisy;
on a CPU shared with other jobs, `--threads 1` avoids OpenMP threads waiting on each other).
"""
import copy
import time

import torch
import torch.nn.functional as F

from common.checkpoint import hf_to_meta
from common.cli import check_choice, run_cli
from common.distributed import DTYPES, to_dtype
from common.generation import generate
from common.model import ModelArgs, Transformer
from common.parallel import setup

# ~58M parameters: llama layout, hidden 512, 8 layers, 8 heads, FFN 1376, vocabulary 32000
BENCH_CONFIG = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=1376, vocab_size=32000, max_position_embeddings=512, rms_norm_eps=1e-5,
                    pad_token_id=0, bos_token_id=1, eos_token_id=None)
# --small: the same 8 layers at hidden 64, FFN 172, 4 heads, vocabulary 1000 (~0.4M parameters). Matmuls no
# longer bound decoding, the cost per step does: on a CPU the role kernel launches play on a GPU.
SMALL_CONFIG = dict(BENCH_CONFIG, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=1000)


def resolve(device, dtype):
    device = torch.device(check_choice("--device", device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                       ("cpu", "cuda")))
    dtype = to_dtype(check_choice("--dtype", dtype or ("bfloat16" if device.type == "cuda" else "float32"), DTYPES))
    return device, dtype


def build_models(device, dtype, max_seq_len=512, max_batch_size=64, seed=0, config=BENCH_CONFIG):
    """A random transformers Llama and our Transformer holding the same (converted) weights."""
    import transformers
    setup(tp_size=1, seed=seed)
    config = transformers.LlamaConfig(**config)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config).to(dtype)
    hf.generation_config.eos_token_id = None  # every run produces exactly new_tokens tokens
    hf.generation_config.pad_token_id = 0
    args = ModelArgs.from_hf_config(config.to_dict(), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device(device):
        ours = Transformer(args)
    ours.load_state_dict(hf_to_meta(hf.state_dict(), args), strict=False)
    ours.to(dtype)
    return hf, ours


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(fns: dict, repeats: int, device) -> dict:
    """Best wall time of each function over `repeats` interleaved rounds (one untimed warm-up each)."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def matmul_only(ours: Transformer, batch: int, prompt_len: int, new_tokens: int, device, dtype):
    """The weight matmuls of one generation: prefill of batch x prompt_len rows, then new_tokens - 1 steps."""
    weights = []
    for layer in ours.layers:
        a, f = layer.attention, layer.feed_forward
        weights += [a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight, f.w1.weight, f.w3.weight, f.w2.weight]
    head = ours.output.weight
    inputs = {}
    for phase, rows in (("prefill", batch * prompt_len), ("step", batch)):
        inputs[phase] = {n_in: torch.randn(rows, n_in, device=device, dtype=dtype)
                         for n_in in (ours.args.dim, ours.args.hidden_dim)}
    last = torch.randn(batch, ours.args.dim, device=device, dtype=dtype)

    def run():
        for phase, count in (("prefill", 1), ("step", new_tokens - 1)):
            for _ in range(count):
                for w in weights:
                    F.linear(inputs[phase][w.shape[1]], w)
                F.linear(last, head)
    return run


def as_ints(value) -> list:
    """fire turns `1,16` into a tuple and `16` into an int; accept those and strings."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).split(",") if v.strip()]


def main(device=None, dtype=None, batch_sizes="1,16,64", prompt_len=64, new_tokens=64, spread="16,128",
         spread_batch_sizes="16,64", repeats=3, seed=0, threads=None, compile=True, small=False):
    device, dtype = resolve(device, dtype)
    if threads:  # CPU: one thread is the stable choice on a machine shared with other jobs
        torch.set_num_threads(int(threads))
    batch_sizes, spread_batch_sizes = as_ints(batch_sizes), as_ints(spread_batch_sizes)
    lo, hi = as_ints(spread)
    hf, ours = build_models(device, dtype, max_seq_len=max(prompt_len, hi) + new_tokens,
                            max_batch_size=max(batch_sizes + spread_batch_sizes),
                            config=SMALL_CONFIG if small else BENCH_CONFIG)
    compiled = copy.deepcopy(ours) if compile else None  # its own cache: the compiled step keeps it between calls
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"device {device}",
          f"dtype {dtype}, {n_params / 1e6:.1f}M parameters, {new_tokens} new tokens, greedy, "
          f"best of {repeats}", flush=True)
    g = torch.Generator().manual_seed(seed)
    rows = []

    def hf_generate(prompts):
        longest = max(map(len, prompts))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        return lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)

    with torch.no_grad():
        for batch in batch_sizes:
            prompts = torch.randint(3, ours.args.vocab_size, (batch, prompt_len), generator=g).tolist()
            fns = {"ours": lambda: generate(ours, prompts, new_tokens), "hf": hf_generate(prompts),
                   "matmul": matmul_only(ours, batch, prompt_len, new_tokens, device, dtype)}
            if compile:
                fns["compiled"] = lambda: generate(compiled, prompts, new_tokens, compile=True)
            t = best_times(fns, repeats, device)
            rows.append((f"prompt {prompt_len}", batch, t))
            print_row(*rows[-1], batch * new_tokens, flush=True)
        padding = "left"  # one prefill for every prompt, as transformers; right padding forces prompt positions
        for batch in spread_batch_sizes:
            lens = torch.linspace(lo, hi, batch).round().long().tolist()
            prompts = [torch.randint(3, ours.args.vocab_size, (n,), generator=g).tolist() for n in lens]
            fns = {"ours": lambda: generate(ours, prompts, new_tokens, padding=padding), "hf": hf_generate(prompts)}
            if compile:
                fns["compiled"] = lambda: generate(compiled, prompts, new_tokens, padding=padding, compile=True)
            t = best_times(fns, repeats, device)
            rows.append((f"prompts {lo}..{hi} (ours {padding}-padded)", batch, t))
            print_row(*rows[-1], batch * new_tokens, flush=True)
    print()
    print_table(rows, new_tokens)


def print_row(label, batch, t, n_tokens, **kw):
    print(f"  {label}, batch {batch}: " + ", ".join(f"{k} {v:.2f}s ({n_tokens / v:.1f} tok/s)" for k, v in t.items()),
          **kw)


def print_table(rows, new_tokens):
    print("| prompts | batch | ours tok/s | ours compiled tok/s | transformers tok/s | best ours / transformers "
          "| matmul-only tok/s | best ours % of matmul-only |")
    print("|---|---|---|---|---|---|---|---|")
    for label, batch, t in rows:
        n = batch * new_tokens
        best = min(t["ours"], t.get("compiled", float("inf")))
        compiled = f"{n / t['compiled']:.1f}" if "compiled" in t else "-"
        mm = f"{n / t['matmul']:.1f} | {100 * t['matmul'] / best:.0f}%" if "matmul" in t else "- | -"
        print(f"| {label} | {batch} | {n / t['ours']:.1f} | {compiled} | {n / t['hf']:.1f} | {t['hf'] / best:.2f}x | {mm} |")


if __name__ == "__main__":
    run_cli(main)
