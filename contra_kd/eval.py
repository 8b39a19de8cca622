"""Rouge-L evaluation with the MiniLLM / DistiLLM / CONTRA-KD sampling protocol (contra_kd.md §4).

    python contra_kd/eval.py --model-path runs/x/best --save runs/x/eval \
        [--sets dolly,self-inst,vicuna,sinst] [--seeds 10,20,30,40,50] [--batch-size 8] [--num 50] \
        [--metrics runs/x/metrics.jsonl] [--paper-pair gpt2]
    torchrun --nproc_per_node 2 contra_kd/eval.py ...         # prompts sharded over processes

Per set and seed: the `prompt` field (with --chat-template: the model's chat template around the instruction
and input, common.hf.chat_prompt), left-truncated to `max_prompt_length` (256) tokens and left-padded;
sampling at temperature 1, top-p 1, top-k 0, no repeated 6-gram (test time only), at most
max_length - max_prompt_length (256) new tokens, EOS = pad; per-rank seed = seed + rank. Each response is
decoded without special tokens, cut at the first EOS text and stripped, then scored by Rouge-L F (rouge-score,
stemming) against each reference (S-NI has several: the max counts) and exact match. Writes
`predictions.json`, `results.json` (mean, std and per-seed values per set) and `results.md` (our numbers beside
the paper's, §8); with `--metrics`, `curves.png` of the run's training log. predictions.json keeps each
item's Rouge-L, so runs can be compared item by item (paired tests).
"""
import json
import os
import statistics
import string
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES
from common.io import read_jsonl
from common.metrics import rouge_l

SET_FILES = {"dolly": "dolly/valid.jsonl", "self-inst": "self-inst/valid.jsonl", "vicuna": "vicuna/valid.jsonl",
             "sinst": "sinst/11_/valid.jsonl", "uinst": "uinst/11_/valid.jsonl"}
UINST_ITEMS = 10000  # UnNI: the first 10,000 items (MiniLLM)

# §8.2, CONTRA-KD Table 2: Rouge-L (Dolly, SelfInst, Vicuna, S-NI, UnNI), mean of 5 sampling seeds
PAPER = {
    "gpt2": {"title": "GPT-2 1.5B -> 0.1B (CONTRA-KD Table 2)", "rows": {
        "Teacher": (27.22, 13.38, 16.33, 26.90, 30.38), "SFT": (23.33, 10.56, 15.12, 17.08, 20.07),
        "DistiLLM": (25.17, 11.93, 16.63, 23.29, 25.41), "DistiLLM+CONTRA": (26.22, 12.99, 17.41, 25.07, 26.85),
        "FDD": (24.27, 11.23, 14.69, 19.65, 22.50), "FDD+CONTRA": (25.12, 11.46, 16.05, 20.21, 22.79),
        "DistiLLM2": (22.22, 11.13, 17.19, 21.58, 24.39), "DistiLLM2+CONTRA": (22.56, 11.74, 18.10, 22.09, 24.92)}},
    "openllama2": {"title": "OpenLLaMA2-7B -> 3B (CONTRA-KD Table 2)", "rows": {
        "Teacher": (27.25, 19.19, 17.69, 31.51, 31.05), "SFT": (24.95, 17.38, 14.58, 28.65, 27.69),
        "DistiLLM": (28.97, 19.39, 19.60, 34.46, 34.26), "DistiLLM+CONTRA": (29.04, 20.20, 19.66, 35.65, 36.20),
        "FDD": (28.07, 19.47, 19.33, 35.47, 34.83), "FDD+CONTRA": (28.31, 19.12, 20.00, 36.56, 36.05),
        "DistiLLM2": (28.48, 19.78, 19.85, 35.66, 36.52), "DistiLLM2+CONTRA": (29.44, 20.38, 20.59, 35.74, 36.80)}},
    "llama2": {"title": "LLaMA2-13B -> 7B (CONTRA-KD Table 2)", "rows": {
        "Teacher": (30.19, 23.92, 19.56, 34.53, 34.25), "SFT": (28.38, 20.32, 17.72, 34.37, 33.25),
        "DistiLLM": (31.10, 23.22, 21.38, 36.30, 37.03), "DistiLLM+CONTRA": (31.45, 23.69, 21.48, 36.19, 37.70),
        "FDD": (30.59, 22.12, 20.87, 35.91, 36.48), "FDD+CONTRA": (31.55, 22.80, 20.92, 36.81, 37.08),
        "DistiLLM2": (31.76, 24.49, 21.96, 35.98, 36.57), "DistiLLM2+CONTRA": (32.19, 23.97, 22.27, 36.52, 38.59)}},
}
PAPER_SETS = ("dolly", "self-inst", "vicuna", "sinst", "uinst")

def _normalise(text: str) -> str:
    # SQuAD-style: lower case, no punctuation, single spaces (articles kept, as MiniLLM)
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, references) -> float:
    refs = [references] if isinstance(references, str) else references
    return float(any(_normalise(prediction) == _normalise(r) for r in refs))


def references(record) -> list:
    out = record["output"]
    return [out] if isinstance(out, str) else list(out)


def clean_response(tokenizer, ids) -> str:
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if tokenizer.eos_token and tokenizer.eos_token in text:
        text = text[:text.index(tokenizer.eos_token)]
    return text.strip()


def no_repeat_ngram(n: int):
    """transformers' own NoRepeatNGramLogitsProcessor as a `generate(logits_processor=...)` hook, so the ban
    is exactly what the originals' HF generate(no_repeat_ngram_size=n) applied (pads included, as there)."""
    from transformers import NoRepeatNGramLogitsProcessor
    processor = NoRepeatNGramLogitsProcessor(n)
    return lambda logits, tokens: processor(tokens, logits)


def sample_responses(model, tokenizer, prompts, *, lay, seed: int, batch_size: int = 8, max_prompt_length: int = 256,
                     max_new_tokens: int = 256, no_repeat_ngram_size: int = 0, desc: str = "sampling"):
    """Sampled responses (strings) for `prompts` (strings), sharded over DP ranks (item i on rank i % dp), in
    the input order on every rank."""
    from common.distributed import gather_object
    from common.generation import generate

    mine = list(range(lay.dp_rank, len(prompts), lay.dp_size))
    gen = torch.Generator(device=lay.device).manual_seed(seed + lay.dp_rank)
    processor = no_repeat_ngram(no_repeat_ngram_size) if no_repeat_ngram_size else None
    out = {}
    bar = tqdm(range(0, len(mine), batch_size), desc=desc, disable=not lay.is_main, leave=False)
    for start in bar:
        chunk = mine[start:start + batch_size]
        ids = [tokenizer.encode(prompts[i], add_special_tokens=False)[-max_prompt_length:] for i in chunk]
        gens = generate(model, ids, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, padding="left",
                        generator=gen, logits_processor=processor)
        out.update({i: clean_response(tokenizer, g) for i, g in zip(chunk, gens)})
    out = {k: v for part in gather_object(out, lay, everywhere=True) for k, v in part.items()}
    return [out[i] for i in range(len(prompts))]


def read_set(data_dir: str, name: str, num=None) -> list:
    if name not in SET_FILES:
        raise UserError(f"--sets: unknown set {name!r}; use any of {', '.join(SET_FILES)}")
    path = os.path.join(data_dir, SET_FILES[name])
    if not os.path.exists(path):
        raise UserError(f"{path}: evaluation set {name!r} is missing (data/README.md lists the shipped sets)")
    records = read_jsonl(path, fields=("prompt", "output"), fix="each line needs a prompt and its reference output")
    records = records[:UINST_ITEMS] if name == "uinst" else records
    if not records:
        raise UserError(f"{path}: evaluation set {name!r} holds no records")
    return records[:num] if num else records


def score(predictions, records) -> tuple:
    """(mean Rouge-L and exact match x 100, per-item Rouge-L x 100)."""
    rouge = [100 * rouge_l(p, references(r)) for p, r in zip(predictions, records)]
    em = [exact_match(p, references(r)) for p, r in zip(predictions, records)]
    return {"rougeL": round(sum(rouge) / len(rouge), 4), "exact_match": round(100 * sum(em) / len(em), 4)}, rouge


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_markdown(runs: dict, paper_pair=None) -> str:
    """{label: results} -> one markdown table, our mean ± std per set, then the paper's rows of `paper_pair`."""
    sets = list(dict.fromkeys(name for results in runs.values() for name in results))
    lines = [f"| Run | {' | '.join(sets)} |", "|---|" + "---|" * len(sets)]
    for label, results in runs.items():
        cells = [f"{results[s]['rougeL_mean']:.2f} ± {results[s]['rougeL_std']:.2f}" if s in results else "-"
                 for s in sets]
        lines.append(f"| {label} (ours) | {' | '.join(cells)} |")
    if paper_pair:
        check_choice("--paper-pair", paper_pair, PAPER)
        paper = PAPER[paper_pair]
        for method, row in paper["rows"].items():
            vals = [f"{row[PAPER_SETS.index(s)]:.2f}" if s in PAPER_SETS else "-" for s in sets]
            lines.append(f"| {method} (paper) | {' | '.join(vals)} |")
        lines.append(f"\nPaper rows: {paper['title']}, Rouge-L mean of 5 seeds.")
    return "\n".join(lines) + "\n"


def table(paths, labels, paper_pair=None) -> str:
    """One table from several runs' results.json (e.g. teacher, student init, each method)."""
    runs = {}
    for path, label in zip(paths, labels):
        with open(path) as f:
            runs[label] = json.load(f)["results"]
    return results_markdown(runs, paper_pair)


def item_rouge(eval_dir: str) -> dict:
    """{set: per-item Rouge-L, the mean over the run's sampling seeds} from an eval folder's predictions.json."""
    with open(os.path.join(eval_dir, "predictions.json")) as f:
        predictions = json.load(f)
    return {name: [statistics.fmean(items) for items in zip(*([p["rougeL"] for p in per_seed] for per_seed in
                                                                  seeds.values()))]
            for name, seeds in predictions.items()}


def paired_comparison(groups: dict) -> str:
    """{label: [eval folders, one per training seed]} -> the paired difference of every pair of labels per set:
    the mean over training seeds and items of per-item Rouge-L (each item's mean over sampling seeds), and the
    p-value of a sign-flip permutation test over items (common.metrics.paired_test; all training seeds of an
    item flip together). A label with one folder (a shared start) is paired with every seed of the other."""
    from common.metrics import paired_test

    scores = {label: [item_rouge(d) for d in dirs] for label, dirs in groups.items()}
    labels = list(groups)
    lines = ["Paired differences (Rouge-L; mean over training seeds and items; p: sign-flip test over items):"]
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            for name in scores[a][0]:
                xa, xb = [r[name] for r in scores[a]], [r[name] for r in scores[b]]
                if len(xa) == 1 or len(xb) == 1:
                    xa, xb = xa * (len(xb) if len(xa) == 1 else 1), xb * (len(xa) if len(xb) == 1 else 1)
                diff, p = paired_test(xa, xb)
                per_seed = " ".join(f"{statistics.fmean(x) - statistics.fmean(y):+.2f}" for x, y in zip(xa, xb))
                lines.append(f"- {a} - {b} on {name}: {diff:+.2f} (p {p:.3g}; {len(xa[0])} items x {len(xa)} seeds; "
                             f"per seed {per_seed})")
    return "\n".join(lines) + "\n"


def curve_rows(metrics_path: str) -> tuple:
    """(step rows, epoch rows, loss terms, dev metrics) of a training log; a UserError when nothing can be plotted."""
    if not os.path.isfile(metrics_path):
        raise UserError(f"--metrics {metrics_path}: no such file (the metrics.jsonl that contra_kd/train.py writes)")
    rows = read_jsonl(metrics_path, drop_partial_last=True)
    steps = [r for r in rows if isinstance(r, dict) and r.get("kind") == "step"]
    epochs = [r for r in rows if isinstance(r, dict) and r.get("kind") == "epoch"]
    terms = sorted({k for r in steps for k in r if k.startswith("loss")})
    dev = sorted({k for r in epochs for k in r if k.startswith("dev_")})
    if not terms + dev:
        raise UserError(f"{metrics_path}: no 'loss*' step rows or 'dev_*' epoch rows to plot")
    return steps, epochs, terms, dev


def plot_curves(metrics_path: str, png_path: str) -> str:
    """One panel per logged training term against the run's unit counter (student steps and velocity-field
    re-fit steps in the order they ran) and one per dev metric against the epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, epochs, terms, dev = curve_rows(metrics_path)
    panels = terms + dev
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False)
    for ax, key in zip(axes[:, 0], panels):
        src, x = (steps, "unit") if key in terms else (epochs, "epoch")  # unit: student and re-fit steps in order
        pts = [(r[x], r[key]) for r in src if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if src is epochs else None)
        ax.set_ylabel(key, fontsize=8)
        ax.set_xlabel(x, fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)
    return png_path


def main(model_path: str, save: str, data_dir: str = "data/instruct", sets="dolly,self-inst,vicuna,sinst",
         seeds="10,20,30,40,50", batch_size: int = 8, max_prompt_length: int = 256, max_length: int = 512,
         no_repeat_ngram_size: int = 6, num: int = None, label: str = None, paper_pair: str = None,
         metrics: str = None, dtype: str = "float32", chat_template: bool = False):
    from common import hf
    from common.hf import chat_prompt
    from common.distributed import print0, setup, shutdown
    from common.io import atomic_write_json, atomic_write_text

    sets = sets.split(",") if isinstance(sets, str) else list(sets)
    try:
        seeds = [int(s) for s in (str(seeds).split(",") if isinstance(seeds, (str, int)) else seeds)]  # fire: "10" -> 10
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: give integers, e.g. --seeds 10,20,30") from None
    # every input is checked before the model loads and the sampling starts
    check_choice("--dtype", dtype, DTYPES)
    for flag, value in (("--batch-size", batch_size), ("--max-prompt-length", max_prompt_length), ("--num", num)):
        if value is not None:
            check_range(flag, value, low=1)
    check_range("--max-length", max_length, low=max_prompt_length + 1)  # room for at least one new token
    check_range("--no-repeat-ngram-size", no_repeat_ngram_size, low=0)
    if paper_pair:
        check_choice("--paper-pair", paper_pair, PAPER)
    if metrics:
        curve_rows(metrics)
    hf.check_model_folder(model_path, "--model-path")
    records_of = {name: read_set(data_dir, name, num) for name in sets}
    lay = setup(seeds[0])
    tokenizer = hf.load_tokenizer(model_path, flag="--model-path")
    model = hf.load_model(model_path, dtype=dtype, device=lay.device, frozen=True, flag="--model-path")
    results, predictions = {}, {}
    for name in sets:
        records = records_of[name]
        prompts = [chat_prompt(tokenizer, r["instruction"], r.get("input", "")) if chat_template else r["prompt"]
                   for r in records]
        per_seed = []
        for seed in seeds:
            preds = sample_responses(model, tokenizer, prompts, lay=lay, seed=seed,
                                     batch_size=batch_size, max_prompt_length=max_prompt_length,
                                     max_new_tokens=max_length - max_prompt_length,
                                     no_repeat_ngram_size=no_repeat_ngram_size, desc=f"{name} seed {seed}")
            summary, item_rouge = score(preds, records)
            per_seed.append(summary)
            predictions.setdefault(name, {})[str(seed)] = [
                {"prompt": q, "references": references(r), "prediction": p, "rougeL": s}
                for q, r, p, s in zip(prompts, records, preds, item_rouge)]
            print0(f"{name} seed {seed}: Rouge-L {per_seed[-1]['rougeL']:.4f}  EM {per_seed[-1]['exact_match']:.2f}")
        mean, std = _mean_std([s["rougeL"] for s in per_seed])
        results[name] = {"items": len(records), "rougeL_mean": round(mean, 4), "rougeL_std": round(std, 4),
                         "exact_match_mean": round(_mean_std([s["exact_match"] for s in per_seed])[0], 4),
                         "per_seed": dict(zip(map(str, seeds), per_seed))}
    if lay.is_main:
        os.makedirs(save, exist_ok=True)
        atomic_write_json(predictions, os.path.join(save, "predictions.json"))
        atomic_write_json({"model_path": model_path, "seeds": seeds, "num": num, "results": results},
                          os.path.join(save, "results.json"))
        text = results_markdown({label or os.path.basename(os.path.normpath(model_path)): results}, paper_pair)
        atomic_write_text(text, os.path.join(save, "results.md"))
        print0(text)
        if metrics:
            print0(f"curves: {plot_curves(metrics, os.path.join(save, 'curves.png'))}")
    shutdown()
    return None


if __name__ == "__main__":
    run_cli(main)
