"""Build the ANLI **stand-in** under data/anli_standin/ from the shipped SVAMP problems (templated, not ANLI).

    python anli_reverse_kl/build_standin.py --source ../shared/data --output data/anli_standin

ANLI (HF `facebook/anli`, CC BY-NC 4.0) cannot be downloaded on our machines. This writes a few hundred
items in ANLI's schema `{uid, premise, hypothesis, label, reason}` as `{split}_{round}.jsonl` (the names of
the parquet files `plain_text/{split}_{round}-00000-of-00001.parquet`, as JSONL), made from SVAMP
(`svamp/SVAMP.json`, MIT): premise = the problem body; per problem three hypotheses,
  0 entailment:    one of the premise's sentences that states a number ("Jessie weighed 92 kilograms.")
  1 neutral:       such a sentence of *another* problem (the premise cannot settle it)
  2 contradiction: the entailed sentence with its number changed ("Jessie weighed 95 kilograms.")
with a one-sentence reason. Some train reasons are emptied or carry an "output:" prefix so that the
train-split cleaning of prepare_data.py has work to do. Every uid starts with "standin-". Numbers obtained
on these files are pipeline checks, never ANLI results.

The hypotheses are premise facts, not answers to the problem: deciding the label takes reading, not arithmetic
(is the sentence in the premise, with the same number, or about something else), so a small model can learn
it and a teacher fine-tuned on it has something to pass on (an earlier version asked for SVAMP's answers,
which no model here could compute: every row, the teacher's included, sat at chance).
"""
import json
import random
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UserError, run_cli  # noqa: E402

ROUNDS = ("r1", "r2", "r3")
PROBLEMS = {"train": 100, "dev": 20, "test": 20}  # per round; three rows per problem
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def facts(body: str) -> list:
    """The premise's sentences that state a number, as stand-alone sentences (a leading "If" dropped)."""
    out = []
    for sentence in re.split(r"(?<=[.?!])\s+", body.strip()):
        sentence = re.sub(r"^(if|and)\s+", "", sentence.strip().rstrip(".?!,"), flags=re.IGNORECASE)
        if NUMBER.search(sentence) and len(sentence) <= 120:
            out.append(sentence[0].upper() + sentence[1:] + ".")
    return out


def changed(sentence: str, rng: random.Random) -> tuple:
    """The sentence with its first number replaced by a different one: (sentence, old, new)."""
    match = NUMBER.search(sentence)
    old = float(match.group())
    new = number(old + rng.choice([d for d in range(-9, 10) if d and old + d >= 0]))
    return sentence[:match.start()] + new + sentence[match.end():], match.group(), new


def rows_for(problem: dict, other: dict, rng: random.Random) -> list:
    """Entailment: a number-stating sentence of the premise; contradiction: that sentence with its number
    changed; neutral: such a sentence of another problem (the premise cannot settle it)."""
    fact = rng.choice(facts(problem["Body"]))
    wrong, old, new = changed(fact, rng)
    premise = problem["Body"].strip()
    return [
        dict(premise=premise, hypothesis=fact, label=0, reason=f"The premise states this, with {old}."),
        dict(premise=premise, hypothesis=rng.choice(facts(other["Body"])), label=1,
             reason="The premise describes a different situation and says nothing about that."),
        dict(premise=premise, hypothesis=wrong, label=2, reason=f"The premise says {old}, not {new}."),
    ]


def build(source: str = "../shared/data", output: str = "data/anli_standin", seed: int = 0) -> dict:
    path = Path(source) / "svamp" / "SVAMP.json"
    if not path.is_file():
        raise UserError(f"--source {source}: no svamp/SVAMP.json; point --source at the shared data folder")
    problems = [p for p in json.load(open(path)) if facts(p["Body"])]
    rng = random.Random(seed)
    order = list(range(len(problems)))
    rng.shuffle(order)
    need = len(ROUNDS) * sum(PROBLEMS.values())
    if len(order) < 2 * need:
        raise UserError(f"{source}/svamp/SVAMP.json: {len(order)} problems, need {2 * need}")
    chosen, others = order[:need], order[need:]  # neutral hypotheses borrow questions of unused problems
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts, i = {}, 0
    for round_ in ROUNDS:
        for split, n in PROBLEMS.items():
            rows = []
            for _ in range(n):
                problem, other = problems[chosen[i]], problems[others[i]]
                i += 1
                rows += rows_for(problem, other, rng)
            rng.shuffle(rows)
            for j, row in enumerate(rows):
                row["uid"] = f"standin-{round_}-{split}-{j:04d}"
                if split == "train" and j % 7 == 3:
                    row["reason"] = ""  # ANLI train reasons are often empty; cleaning drops these rows
                elif split == "train" and j % 11 == 5:
                    row["reason"] = "output: " + row["reason"]
            path = out / f"{split}_{round_}.jsonl"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for row in rows:
                    f.write(json.dumps({k: row[k] for k in ("uid", "premise", "hypothesis", "label", "reason")},
                                       ensure_ascii=False) + "\n")
            tmp.replace(path)
            counts[path.name] = len(rows)
    print(f"{output}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return counts


if __name__ == "__main__":
    run_cli(build)
