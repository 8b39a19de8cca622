"""Build the ANLI **stand-in** under data/anli_standin/ from the shipped SVAMP problems (templated, not ANLI).

    python anli_reverse_kl/build_standin.py --source ../shared/data --output data/anli_standin

ANLI (HF `facebook/anli`, CC BY-NC 4.0) cannot be downloaded on our machines. This writes a few hundred
items in ANLI's schema `{uid, premise, hypothesis, label, reason}` as `{split}_{round}.jsonl` (the names of
the parquet files `plain_text/{split}_{round}-00000-of-00001.parquet`, as JSONL), made from SVAMP
(`svamp/SVAMP.json`, MIT): premise = the problem body; per problem three hypotheses,
  0 entailment:    "The answer to the question "<Question>" is <Answer>."
  1 neutral:       the same sentence for *another* problem's question and answer (the premise cannot settle it)
  2 contradiction: "... is <a wrong number>."
with a one-sentence reason. Some train reasons are emptied or carry an "output:" prefix so that the
train-split cleaning of prepare_data.py has work to do. Every uid starts with "standin-". Numbers obtained
on these files are pipeline checks, never ANLI results.
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
PROBLEMS = {"train": 60, "dev": 10, "test": 10}  # per round; three rows per problem


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def wrong_answer(answer: float, rng: random.Random) -> str:
    delta = rng.choice([d for d in range(-10, 11) if d and answer + d >= 0])
    return number(answer + delta)


def rows_for(problem: dict, other: dict, rng: random.Random) -> list:
    answer, question = number(problem["Answer"]), problem["Question"].strip()
    equation = re.sub(r"(\d+)\.0\b", r"\1", problem["Equation"].strip())
    wrong = wrong_answer(float(problem["Answer"]), rng)
    sentence = 'The answer to the question "{}" is {}.'
    return [
        dict(premise=problem["Body"].strip(), hypothesis=sentence.format(question, answer), label=0,
             reason=f"Working it out from the premise, {equation} gives {answer}."),
        dict(premise=problem["Body"].strip(), hypothesis=sentence.format(other["Question"].strip(),
                                                                         number(other["Answer"])), label=1,
             reason="The premise describes a different situation and says nothing about that question."),
        dict(premise=problem["Body"].strip(), hypothesis=sentence.format(question, wrong), label=2,
             reason=f"The premise gives {equation} = {answer}, not {wrong}."),
    ]


def build(source: str = "../shared/data", output: str = "data/anli_standin", seed: int = 0) -> dict:
    path = Path(source) / "svamp" / "SVAMP.json"
    if not path.is_file():
        raise UserError(f"--source {source}: no svamp/SVAMP.json; point --source at the shared data folder")
    problems = json.load(open(path))
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
