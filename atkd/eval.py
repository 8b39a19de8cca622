"""ATKD evaluation (atkd.md §7): greedy generation on the five instruction sets, ROUGE-L, the LLM-judge step as files.

    python atkd/eval.py --model_path runs/atkd/student --output_dir runs/atkd/eval
    python atkd/eval.py --output_dir runs/atkd/eval --judge my_module:judge     # score saved predictions

Per set, under output_dir/<set>/:
    predictions.json       [{instruction, input, reference, prediction, rougeL}]
    judge_requests.jsonl   one chat request per item {id, model, temperature, top_p, max_tokens, messages}
    judge_replies.jsonl    {id, reply}: written by `--judge module:function` (fn(request) -> reply text), or
                           by any tool of yours that answers judge_requests.jsonl; parsed when present
and output_dir/results.json + results.md: items, ROUGE-L, judge score, judged / skipped replies per set.

ROUGE-L: `rouge-score` RougeL F-measure with stemming, max over references, mean x 100 (the release averaged
the python `rouge` package's scores instead). Judge score: sum of student scores / sum of reference scores
over parsed replies, x 100; a reply without two scores in [0, 10] is skipped and counted.
"""
import importlib
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atkd.data import load_eval_set  # noqa: E402
from common import hf  # noqa: E402
from common.cli import UserError, check_range, run_cli  # noqa: E402
from common.generation import generate  # noqa: E402
from common.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl  # noqa: E402
from common.metrics import rouge_l  # noqa: E402

EVAL_SETS = ("dolly", "self-inst", "vicuna", "koala", "wizardlm")
JUDGE_MODEL = "gpt-3.5-turbo-1106"  # what the released code called (its file is named after GPT-4)
JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the answers of two AI assistants to the user question "
    "shown below. Rate each answer for its helpfulness, relevance, accuracy and level of detail, on a scale "
    "of 1 to 10, where a higher score means better overall performance. Output exactly two lines, "
    "\"Assistant 1: <score>\" and \"Assistant 2: <score>\", and nothing else. Do not let the order in which "
    "the answers are presented influence your rating.")


# ---- the judge as files ----

def judge_request(item_id: int, instruction: str, prediction: str, reference: str, model: str = JUDGE_MODEL) -> dict:
    user = f"Question: {instruction}\nAssistant 1: {prediction}\nAssistant 2: {reference}"
    return dict(id=item_id, model=model, temperature=0, top_p=0, max_tokens=64,
                messages=[dict(role="system", content=JUDGE_SYSTEM), dict(role="user", content=user)])


_LABEL = re.compile(r"(assistant|answer)\s*[12]\s*(score)?\s*[:：=\-]?", re.IGNORECASE)
_OUT_OF = re.compile(r"(/|out of)\s*10(\.0+)?\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _scores_in(line: str) -> list:
    line = _OUT_OF.sub(" ", _LABEL.sub(" ", line.replace("*", " ")))
    return [float(x) for x in _NUMBER.findall(line)]


def parse_judge_reply(reply) -> tuple | None:
    """(student score, reference score) from the first and last non-empty lines, or None when the reply does
    not hold two scores in [0, 10]. "Assistant 1: 8", "**Assistant 1:** 8/10", "8.5" all parse; a single line
    must hold exactly two scores ("8 7", "Assistant 1: 8, Assistant 2: 7")."""
    if not isinstance(reply, str):
        return None
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if not lines:
        return None
    if len(lines) == 1:
        scores = _scores_in(lines[0])
        if len(scores) != 2:
            return None
    else:
        first, last = _scores_in(lines[0]), _scores_in(lines[-1])
        if not first or not last:
            return None
        scores = [first[0], last[0]]
    if not all(0 <= s <= 10 for s in scores):
        return None
    return scores[0], scores[1]


def judge_score(replies: list) -> dict:
    """Σ student / Σ reference over parsed replies, x 100; unparsable or > 10 replies skipped and counted."""
    parsed = [p for p in map(parse_judge_reply, replies) if p is not None]
    student, reference = sum(p[0] for p in parsed), sum(p[1] for p in parsed)
    return dict(judge_score=100 * student / reference if reference > 0 else None, judged=len(parsed),
                skipped=len(replies) - len(parsed))


def load_judge(spec: str):
    """'package.module:function' -> the function; it takes one request dict and returns the reply text."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"--judge {spec!r}: expected 'module:function', e.g. 'my_judges:openai_chat'")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # the module exists but an import inside it fails: its traceback says where
        raise UserError(f"--judge {spec!r}: no module {e.name!r} on the Python path (run from the folder that holds "
                        f"it, or add it to PYTHONPATH)") from None
    fn = getattr(found, name, None)
    if not callable(fn):
        raise UserError(f"--judge {spec!r}: {module} has no function {name!r}")
    return fn


def _read_jsonl(path: Path) -> list:
    return read_jsonl(str(path), drop_partial_last=True) if path.exists() else []


def run_judge(folder: Path, judge) -> None:
    """Answer every request of folder/judge_requests.jsonl not yet in judge_replies.jsonl (appended one by one,
    so an interrupted run of a paid API resumes where it stopped)."""
    requests = _read_jsonl(folder / "judge_requests.jsonl")
    done = {r["id"] for r in _read_jsonl(folder / "judge_replies.jsonl")}
    for request in tqdm([r for r in requests if r["id"] not in done], desc=f"judge {folder.name}"):
        append_jsonl(str(folder / "judge_replies.jsonl"), dict(id=request["id"], reply=judge(request)))


# ---- generation ----

def load_model(model_path: str, bf16: bool, flag: str = "--model_path"):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf.load_model(model_path, dtype="bfloat16" if bf16 else "float32", device=device, frozen=True, flag=flag)
    return model, hf.load_tokenizer(model_path, flag)


def predict(model, tokenizer, prompts: list, *, max_new_tokens: int = 256, batch_size: int = 16,
            desc: str | None = "generate", chat: bool = False) -> tuple:
    """Greedy continuations, left-padded batches, cut at EOS and stripped. Prompts longer than the model's
    context minus max_new_tokens keep their last tokens (their count is returned). desc=None: no progress bar.
    chat: the prompts are chat-template text (no special tokens added)."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    room = None if limit is None else limit - max_new_tokens
    if room is not None and room < 1:
        raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {limit} tokens; lower --max_new_tokens")
    eos = tokenizer.eos_token_id
    predictions, truncated = [], 0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        ids = [tokenizer(p, add_special_tokens=not chat).input_ids for p in prompts[start:start + batch_size]]
        if room is not None:
            truncated += sum(len(x) > room for x in ids)
            ids = [x[-room:] for x in ids]
        out = generate(model, ids, max_new_tokens, temperature=0.0, eos_id=eos, pad_id=tokenizer.pad_token_id,
                       padding="left")
        for new in out:
            new = new[:-1] if new and new[-1] == eos else new
            predictions.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return predictions, truncated


def _results_table(results: dict) -> str:
    rows = ["| set | items | ROUGE-L | judge score | judged | skipped |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        score = "-" if r.get("judge_score") is None else f"{r['judge_score']:.2f}"
        rows.append(f"| {name} | {r['items']} | {r['rougeL']:.2f} | {score} | {r.get('judged', 0)} | "
                    f"{r.get('skipped', 0)} |")
    return "\n".join(rows) + "\n"


def main(model_path: str = None, output_dir: str = "runs/atkd/eval", data_dir: str = "data/instruct",
         sets: str = ",".join(EVAL_SETS), max_new_tokens: int = 256, batch_size: int = 16, max_items: int = None,
         bf16: bool = False, judge: str = None, judge_model: str = JUDGE_MODEL, chat_template: bool = False):
    """Evaluate `model_path` (skip it to re-score predictions already in output_dir) on `sets` (comma list).
    chat_template (ours): prompts in the model's chat template instead of the release's evaluation template."""
    names = sets.split(",") if isinstance(sets, str) else list(sets)
    unknown = [s for s in names if s not in EVAL_SETS]
    if unknown:
        raise UserError(f"--sets: unknown set(s) {unknown}; valid: {', '.join(EVAL_SETS)}")
    for flag, value in (("--max_new_tokens", max_new_tokens), ("--batch_size", batch_size), ("--max_items", max_items)):
        if value is not None:
            check_range(flag, value, low=1)
    out = Path(output_dir)
    # every input is checked before the model loads: the judge, then each set (or the predictions to re-score)
    judge_fn = load_judge(judge) if judge else None
    if model_path is not None:
        hf.check_model_folder(model_path, "--model_path")
        chat_tokenizer = hf.load_tokenizer(model_path) if chat_template else None
        eval_sets = {name: load_eval_set(Path(data_dir) / name / "valid.jsonl", chat_tokenizer)[:max_items]
                     for name in names}
    else:
        for name in names:
            if not (out / name / "predictions.json").exists():
                raise UserError(f"{out / name / 'predictions.json'}: no predictions to score; pass --model_path")
    model = tokenizer = None
    if model_path is not None:
        model, tokenizer = load_model(model_path, bf16)
    results = {}
    for name in names:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            items = eval_sets[name]
            preds, truncated = predict(model, tokenizer, [x["prompt"] for x in items],
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc=name,
                                       chat=chat_template)
            scores = [100 * rouge_l(p, x["references"]) for p, x in zip(preds, items)]
            records = [dict(instruction=x["instruction"], input=x["input"], reference=x["references"][0],
                            prediction=p, rougeL=s) for x, p, s in zip(items, preds, scores)]
            atomic_write_json(records, str(folder / "predictions.json"))
            requests = [judge_request(i, r["instruction"], r["prediction"], r["reference"], judge_model)
                        for i, r in enumerate(records)]
            write_jsonl(requests, str(folder / "judge_requests.jsonl"))
            (folder / "judge_replies.jsonl").unlink(missing_ok=True)  # replies to older predictions
            if truncated:
                print(f"{name}: {truncated} prompts longer than the context were cut to their last tokens")
        records = json.loads((folder / "predictions.json").read_text())
        if judge_fn is not None:
            run_judge(folder, judge_fn)
        result = dict(items=len(records), rougeL=sum(r["rougeL"] for r in records) / max(len(records), 1))
        replies = _read_jsonl(folder / "judge_replies.jsonl")
        if replies:
            result.update(judge_score([r.get("reply") for r in replies]))
        results[name] = result
    atomic_write_json(results, str(out / "results.json"))
    table = _results_table(results)
    atomic_write_text(table, str(out / "results.md"))
    print(table, end="")


if __name__ == "__main__":
    run_cli(main)
