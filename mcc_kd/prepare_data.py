"""Prepare MCC training files: filter teacher rationales and compute answer-span `indices` (mcc_kd.md §2.4).

    python mcc_kd/prepare_data.py filter --task SVAMP --input_file data/SVAMP/train.json \
        --output_file runs/SVAMP/train-multi-cots.json --tokenizer_file CKPT/tokenizer.model
    python mcc_kd/prepare_data.py build --source ../shared/data --output data      # = mcc_kd/build_data.py

Run `filter` once per tokenizer and prompt format (`--chat_template`): the indices depend on both. A sidecar
`<output>.meta.json` records the tokenizer's sha256, the prompt format and the indices convention
(`--indices logits`, the default, or `tokens`; mcc_kd/data.py), all checked by
`mcc_kd.data.load_task_file(..., multi_cot=True, tokenizer=tok)`. Steps, each reported with the items and
rationales it keeps:
  1. correctness: drop rationales whose extracted final answer (mcc_kd.answers) differs from the label;
  2. diversity: drop rationale i if any later rationale j > i has word-set Jaccard similarity >= threshold;
  3. indices: the positions of the final answer's tokens, in the chosen convention (answer_indices below);
  4. equal spans: keep rationales whose answer-span token ids are the item's most frequent ones (ties: first);
  5. drop spans ending at or beyond max_seq_len, then items with fewer than `min_rationales`;
  then, with `max_rationales` K, keep the first K survivors of each item.
"""
import json
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from common.cli import UserError, check_choice, check_range, run_cli
from common.tokenizer import load_tokenizer
from mcc_kd.answers import check_task, find_answer, is_correct
from mcc_kd.data import INDICES, load_task_file, prompt_ids, rationales, write_sidecar


def correct_rationales(outputs: list[str], label: str, task: str) -> list[int]:
    """Positions of the rationales whose final answer equals the label (step 1)."""
    return [k for k, r in enumerate(outputs) if is_correct(_value(find_answer(r, task)), label, task)]


def _value(answer):
    return None if answer is None else answer.value


def jaccard(a: str, b: str) -> float:
    """|A ∩ B| / |A ∪ B| over the sets of whitespace-split words."""
    sa, sb = set(a.split()), set(b.split())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def diverse_rationales(outputs: list[str], threshold: float = 0.8) -> list[int]:
    """Positions kept by the diversity filter (step 2): i survives iff every later j has similarity < threshold,
    so of a group of near-duplicates the last one stays."""
    return [i for i in range(len(outputs))
            if all(jaccard(outputs[i], outputs[j]) < threshold for j in range(i + 1, len(outputs)))]


def answer_indices(tokenizer, instruction: str, rationale: str, task: str, chat: bool = False,
                   indices: str = "logits"):
    """([start, end), answer token ids) of the final answer in prompt + rationale, or None.

    L_i = len(prompt); the rationale is tokenised alone, as in training; [a, b) is the smallest token range
    of the rationale whose character offsets cover the answer the extractor chose. The span is
    [L_i - 1 + a, L_i - 1 + b) with indices="logits" (logit t predicts token t + 1, §2.4 step 3), or the
    tokens' own positions [L_i + a, L_i + b) with indices="tokens".
    """
    answer = find_answer(rationale, task)
    if answer is None:
        return None
    ids, offsets = tokenizer.encode_with_offsets(rationale)
    if ids != tokenizer.encode(rationale, bos=False, eos=False):
        raise RuntimeError(f"{tokenizer.path}: offset encoding differs from encode() for {rationale!r}")
    covering = [k for k, (begin, end) in enumerate(offsets) if begin < answer.end and end > answer.start]
    if not covering:
        return None
    a, b = covering[0], covering[-1] + 1
    text = rationale[answer.start:answer.end]
    decoded = tokenizer.decode(ids[a:b])
    assert text in decoded, f"answer {text!r} not in its decoded token span {decoded!r} ({rationale!r})"
    first = len(prompt_ids(tokenizer, instruction, chat)) - 1 + INDICES.index(indices)
    return [first + a, first + b], ids[a:b]


def prepare_item(item, task, tokenizer, jaccard_threshold=0.8, max_seq_len=512, max_rationales=None,
                 min_rationales=2, chat=False, indices="logits"):
    """Run steps 1-5 on one raw item; returns (the MCC item or None, rationales left after each step)."""
    outputs = rationales(item)
    kept = [outputs[k] for k in correct_rationales(outputs, item["label"], task)]
    counts = [len(kept)]
    kept = [kept[k] for k in diverse_rationales(kept, jaccard_threshold)]
    counts.append(len(kept))
    spans = []
    for r in kept:
        found = answer_indices(tokenizer, item["instruction"], r, task, chat, indices)
        if found is not None:
            spans.append((r, found[0], tuple(found[1])))
    counts.append(len(spans))
    if spans:
        common_ids = Counter(ids for _, _, ids in spans).most_common(1)[0][0]  # ties: first seen
        spans = [s for s in spans if s[2] == common_ids]
    counts.append(len(spans))
    spans = [s for s in spans if s[1][1] - INDICES.index(indices) < max_seq_len]  # the answer fits
    if len(spans) < min_rationales:
        spans = []
    counts.append(len(spans))
    if max_rationales:
        spans = spans[:max_rationales]
    counts.append(len(spans))
    if not spans:
        return None, counts
    out = {"instruction": item["instruction"], "output": [r for r, _, _ in spans], "label": item["label"],
           "indices": [span for _, span, _ in spans]}
    return out, counts


STEPS = ("1. correct answer", "2. Jaccard diversity", "3. answer span found", "4. equal span tokens",
         "5. span < max_seq_len, >= min", "max_rationales")


def filter_file(task: str, input_file: str, output_file: str, tokenizer_file: str, max_seq_len: int = 512,
                jaccard_threshold: float = 0.8, max_rationales: int = None, min_rationales: int = 2,
                chat_template: bool = False, indices: str = "logits", max_items: int = None):
    """Write the MCC training file (`instruction, output, label, indices`) and its sidecar; print the report.
    `max_items` reads only the first N questions of `input_file` (a quick run)."""
    check_task(task)
    check_choice("--indices", indices, INDICES)
    check_range("--max_seq_len", max_seq_len, low=2)
    check_range("--jaccard_threshold", jaccard_threshold, 0, 1)
    check_range("--min_rationales", min_rationales, low=1)
    for flag, value in (("--max_rationales", max_rationales), ("--max_items", max_items)):
        if value is not None:
            check_range(flag, value, low=1)
    items = load_task_file(input_file, train=True)[:max_items]
    tokenizer = load_tokenizer(tokenizer_file)
    out, per_step = [], [[] for _ in STEPS]
    for item in tqdm(items, desc=f"prepare {task}", disable=len(items) < 100):
        result, counts = prepare_item(item, task, tokenizer, jaccard_threshold, max_seq_len, max_rationales,
                                      min_rationales, chat_template, indices)
        for step, n in enumerate(counts):
            per_step[step].append(n)
        if result is not None:
            out.append(result)
    n_raw = sum(len(rationales(x)) for x in items)
    rows = [("raw", len(items), sum(1 for x in items if len(rationales(x)) >= 2), n_raw)]
    rows += [(name, sum(1 for n in ns if n), sum(1 for n in ns if n >= 2), sum(ns)) for name, ns in zip(STEPS, per_step)]
    print(f"{'step':32s} {'items>=1':>9s} {'items>=2':>9s} {'rationales':>11s}")
    for name, n1, n2, nr in rows:
        print(f"{name:32s} {n1:9d} {n2:9d} {nr:11d}")
    if not out:
        raise UserError(f"{input_file}: no item kept {min_rationales} rationales; nothing written (lower "
                        f"--min_rationales or check the --task and the answers)")
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)
    with open(output_file, "w") as f:
        json.dump(out, f, indent=4, ensure_ascii=False)
        f.write("\n")
    write_sidecar(output_file, tokenizer, prompt="chat" if chat_template else "plain", indices=indices,
                  task=task, source=str(input_file), max_seq_len=max_seq_len,
                  jaccard_threshold=jaccard_threshold, max_rationales=max_rationales, min_rationales=min_rationales,
                  report=[dict(zip(("step", "items", "items_ge_2", "rationales"), r)) for r in rows])
    print(f"wrote {output_file}: {len(out)} items, {sum(len(x['output']) for x in out)} rationales")


def build(source: str = "../shared/data", output: str = "data", tasks: str = "GSM8K,SVAMP,ASDiv,CSQA"):
    """Build data/<TASK>/ from the shared data (same as mcc_kd/build_data.py)."""
    from mcc_kd.build_data import build as build_data

    build_data(source, output, tasks)


if __name__ == "__main__":
    run_cli({"filter": filter_file, "build": build})
