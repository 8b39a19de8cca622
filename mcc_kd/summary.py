"""The closing table of run.sh: one row per model (base, Std-CoT, MCC-KD) on the same test items.

    python mcc_kd/summary.py --out runs/mcc_kd-smollm2 --task SVAMP --label_file runs/.../test.json

Reads what the stages wrote under `out`: base/, sft/, mcc/ (metrics JSONs, the last checkpoint's state.json for
the step count and the selected epoch) and times.txt (`stage seconds` lines written by run.sh).

On a small test set a few points of accuracy are noise, so each trained row also gives the paired count
against the base model on the same items: +questions it answers and base did not / -the reverse, and the
two-sided sign-test p-value of that split (exact binomial, p = 1/2).

Where consistency.py ran (NAME/log/*-consistency-predictions.json), a column gives each model's held-out inconsistency:
the mean span KL between its answer distributions under two teacher rationales of questions it was never
trained on, with the paired difference against the base model (and MCC-KD's against Std-CoT, below the
table) and its sign-flip permutation p-value over the questions (common.metrics.paired_test).
"""
import glob
import json
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UserError, run_cli  # noqa: E402
from common.metrics import paired_test  # noqa: E402


def _state(save_dir: str) -> dict:
    states = sorted(glob.glob(os.path.join(save_dir, "checkpoints", "step-*", "state.json")))
    return json.load(open(states[-1])) if states else {}


def row(out: str, stage: str, task: str, split: str):
    """(metrics, steps, predictions file) of one stage, or None when it did not run."""
    if stage == "base":
        stem = os.path.join(out, "base", f"{task}-{split}")
        steps = 0
    else:
        state = _state(os.path.join(out, stage))
        if not state:
            return None
        final = os.path.join(out, stage, "log", f"{task}-{split}")  # with a dev file: the best epoch on test
        per_epoch = os.path.join(out, stage, "log", f"{task}-{split}-epoch{state['best_epoch']}")
        stem = final if os.path.exists(f"{final}-metrics.json") else per_epoch
        steps = state["step"]
    if not os.path.exists(f"{stem}-metrics.json"):
        return None
    return json.load(open(f"{stem}-metrics.json")), steps, f"{stem}-predictions.json"


def versus(predictions: str, base_predictions: str) -> str:
    """'+gained / -lost (p)' of one predictions file against the base model's, matched by item index."""
    base = {r["index"]: r["correct"] for r in json.load(open(base_predictions))}
    mine = {r["index"]: r["correct"] for r in json.load(open(predictions))}
    gained = sum(ok and not base.get(i, False) for i, ok in mine.items())
    lost = sum(not ok and base.get(i, False) for i, ok in mine.items())
    return f"+{gained} / -{lost} (p {sign_test(gained, lost):.2f})"


def consistency(out: str, stage: str):
    """{question index: mean span KL} of one model's held-out consistency run, or None."""
    found = sorted(glob.glob(os.path.join(out, stage, "log", "*-consistency-predictions.json")))
    return {r["index"]: r["kl"] for r in json.load(open(found[0]))} if found else None


def kl_versus(mine: dict, other: dict) -> str:
    """'-0.0123 (p 0.01)': mean paired difference of span KL (negative = more consistent) and its p-value."""
    common = sorted(mine.keys() & other.keys())
    diff, p = paired_test([mine[i] for i in common], [other[i] for i in common])
    return f"{diff:+.4f} (p {p:.2g})"


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test of a successes against b failures."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(a, b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main(out: str, task: str, label_file: str, settings: str = ""):
    if not os.path.isdir(out):
        raise UserError(f"--out {out}: no such folder (the OUT folder of mcc_kd/run.sh)")
    times = {}
    if os.path.exists(os.path.join(out, "times.txt")):
        for i, line in enumerate(open(os.path.join(out, "times.txt")), 1):
            if len(line.split()) != 3:
                raise UserError(f"{os.path.join(out, 'times.txt')}:{i}: expected `stage wall_seconds cpu_seconds`, "
                                f"got {line.strip()!r}; delete the line or the file")
            name, wall, cpu = line.split()
            times[name] = f"{wall} s ({cpu} s CPU)"
    split = Path(label_file).stem
    print(f"settings: {settings}")
    kls = {stage: consistency(out, stage) for stage in ("base", "sft", "mcc")}
    with_kl = any(kls.values())
    kl_head = " held-out span KL | vs base |" if with_kl else ""
    print(f"| {task} ({split}) | accuracy | correct / N | vs base |{kl_head} missing | steps | wall time (CPU time) "
          f"| predictions |")
    print("|---|---|---|---|" + "---|---|" * with_kl + "---|---|---|---|")
    base = row(out, "base", task, split)
    for stage, name in (("base", "base (zero-shot)"), ("sft", "Std-CoT (train.py)"), ("mcc", "MCC-KD (train_mcc.py)")):
        found = row(out, stage, task, split)
        if found is None:
            continue
        m, steps, predictions = found
        wall = times.get(stage, "-")
        paired = versus(predictions, base[2]) if base is not None and stage != "base" else "-"
        kl = ""
        if with_kl:
            mine = kls[stage]
            kl = (f" {sum(mine.values()) / len(mine):.4f} | "
                  f"{kl_versus(mine, kls['base']) if kls['base'] and stage != 'base' else '-'} |") if mine else " - | - |"
        print(f"| {name} | {100 * m['accuracy']:.1f} | {m['correct']} / {m['N']} | {paired} |{kl} {m['missing']} "
              f"| {steps} | {wall} | {predictions} |")
    sft, mcc = row(out, "sft", task, split), row(out, "mcc", task, split)
    if sft and mcc:
        line = f"MCC-KD vs Std-CoT: accuracy {versus(mcc[2], sft[2])}"
        if kls["sft"] and kls["mcc"]:
            n = len(kls["sft"].keys() & kls["mcc"].keys())
            line += f"; held-out span KL {kl_versus(kls['mcc'], kls['sft'])} on {n} questions"
        print(line)


if __name__ == "__main__":
    run_cli(main)
