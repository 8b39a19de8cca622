"""MCC-KD task files: loading with validation, and the prompt / target / label convention (mcc_kd.md §2-3).

Files (JSON lists, `data/<TASK>/`):
    eval (dev/test)   {instruction, output: str, label: str}            load_task_file(path)
    SFT train         {instruction, output: [str, ...] | str, label}     load_task_file(path, train=True)
    MCC train         the above + indices: [[start, end], ...]           load_task_file(path, multi_cot=True,
                                                                                        tokenizer=tok)
Malformed data raises DataError naming the file, the item (0-based index) and the field.

Token convention (§2.2 / §3.1):
    prompt   = encode(instruction, bos=True, eos=False)          # [BOS] + instruction (ends with "\n"), or with
               chat=True the tokenizer's chat template around the instruction (a user turn, then the
               assistant header): what an instruct model expects
    target   = encode(rationale, bos=False, eos=True)            # rationale + EOS
    tokens   = prompt + target                                   # L_i + L_o tokens
    labels[t]= tokens[t + 1] for t in [L_i - 1, L_i - 1 + L_o), IGNORE_INDEX (-100) elsewhere
             -> labels are aligned with the logits: CE(logits[:, t], labels[:, t]), no further shift.
    indices  = [start, end), absolute in `tokens`, in one of two conventions (INDICES), which the file's
               sidecar records (prepare_data.py writes either; README "indices"):
               "logits": the logit positions predicting the answer tokens (ours, the default), inside
                         [L_i - 1, L_i - 1 + L_o - 1) (never the EOS prediction);
               "tokens": the answer tokens' own positions (what the original v1 trainer's slicing suggests),
                         one later; training converts them to logit positions with an explicit shift.
               All spans of an item have equal length, so any pair (i, j) compares position by position.

    ex = encode_example(tok, instruction, rationale, max_seq_len)   # Example(tokens, labels, prompt_len)
    tokens, labels = collate([ex, ...], pad_id=tok.pad_id)          # right-padded LongTensors [B, S]
IGNORE_INDEX is common.labels'.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError
from common.labels import IGNORE_INDEX, causal_lm_batch, targets_and_mask
INDICES = ("logits", "tokens")  # the two `indices` conventions
REQUIRED_FIELDS = ("instruction", "output", "label")


class DataError(UserError):
    pass


def _error(path, msg, item=None, field=None):
    where = str(path)
    if item is not None:
        where += f": item {item}"
    if field is not None:
        where += f": field '{field}'"
    return DataError(f"{where}: {msg}")


def rationales(item) -> list[str]:
    """The item's rationales as a list (`output` may be one string)."""
    return [item["output"]] if isinstance(item["output"], str) else list(item["output"])


def prompt_ids(tokenizer, instruction: str, chat: bool = False) -> list[int]:
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": instruction.strip()}])
    return tokenizer.encode(instruction, bos=True, eos=False)


def fit_prompt(tokenizer, instruction: str, limit: int, chat: bool = False) -> list[int]:
    """The prompt in at most `limit` tokens, cut with a warning as the original: a plain prompt loses its tail;
    a chat prompt loses the tail of the user text, never the template around it (the assistant header stays
    last, so the model still answers)."""
    prompt = prompt_ids(tokenizer, instruction, chat)
    if len(prompt) <= limit:
        return prompt
    warnings.warn(f"prompt of {len(prompt)} tokens cut to {limit}: {instruction[:60]!r}...")
    if not chat:
        return prompt[:limit]
    text = tokenizer.encode(instruction.strip(), bos=False, eos=False)
    keep = len(text) - (len(prompt) - limit)
    while keep >= 0:  # keep 0: the template around an empty user turn
        prompt = tokenizer.encode_chat([{"role": "user", "content": tokenizer.decode(text[:keep])}])
        if len(prompt) <= limit:
            return prompt
        keep -= len(prompt) - limit
    raise UserError(f"max_seq_len leaves {limit} prompt tokens, fewer than the chat template around an empty "
                    f"user turn ({len(prompt_ids(tokenizer, '', chat))}): raise --max_seq_len")


def logit_spans(spans, indices: str) -> list:
    """Spans in the file's convention -> the logit positions that predict the answer tokens."""
    shift = {"logits": 0, "tokens": 1}[indices]
    return [[start - shift, end - shift] for start, end in spans]


def target_ids(tokenizer, rationale: str) -> list[int]:
    return tokenizer.encode(rationale, bos=False, eos=True)


@dataclass
class Example:
    tokens: list[int]
    labels: list[int]  # aligned with logits: labels[t] is the token that logits[t] must predict
    prompt_len: int  # L_i (after truncation)


def encode_example(tokenizer, instruction: str, output: str, max_seq_len: int, chat: bool = False) -> Example:
    """[BOS] + instruction + output + EOS with labels on the output and EOS only (§3.1).

    Truncation as the original: an instruction longer than max_seq_len is cut (with a warning; `fit_prompt`);
    then the excess is dropped from the end of the output (the EOS may be cut)."""
    prompt = fit_prompt(tokenizer, instruction, max_seq_len, chat)
    target = target_ids(tokenizer, output)[: max_seq_len - len(prompt)]
    tokens = prompt + target
    labels = [IGNORE_INDEX] * len(tokens)
    labels[len(prompt) - 1: len(prompt) - 1 + len(target)] = target
    return Example(tokens, labels, len(prompt))


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded to the longest row (common.labels): tokens with pad_id, labels aligned with the logits,
    IGNORE_INDEX on the prompt and padding (each example's own `labels`)."""
    batch = causal_lm_batch([e.tokens[:e.prompt_len] for e in examples], [e.tokens[e.prompt_len:] for e in examples],
                            pad_id=pad_id)
    return batch["input_ids"], targets_and_mask(batch["labels"], shift=True)[0]


def span_bounds(tokenizer, instruction: str, rationale: str, chat: bool = False,
                indices: str = "logits") -> tuple[int, int]:
    """(lowest start, highest end) an answer span may have: the logit positions that predict rationale tokens
    ("logits"), or those tokens' own positions ("tokens"); the final EOS is never part of a span."""
    n_prompt = len(prompt_ids(tokenizer, instruction, chat))
    n_target = len(target_ids(tokenizer, rationale))
    first = n_prompt - 1 + INDICES.index(indices)
    return first, first + n_target - 1


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def sidecar_path(path) -> Path:
    """`train-multi-cots.json` -> `train-multi-cots.meta.json` (tokenizer fingerprint and filter report)."""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def load_task_file(path, multi_cot: bool = False, train: bool = False, tokenizer=None, chat: bool = False,
                   indices: str = "logits") -> list[dict]:
    """Read and validate a task file; returns the list of items.

    multi_cot: an MCC training file (>= 2 rationales and `indices` per item); train: an SFT training file
    (>= 1 non-empty rationale per item). With `tokenizer` (and multi_cot), the spans are range-checked
    against the tokenised sequence (prompt format `chat`, convention `indices`) and the sidecar, if any,
    must agree with the run: same tokenizer fingerprint, prompt format and indices convention.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such task file")
    try:
        with open(path) as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise _error(path, f"not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise _error(path, f"expected a JSON list of items, got {type(items).__name__}")
    if not items:
        raise _error(path, "no items")
    if multi_cot and tokenizer is not None:
        check_sidecar(path, tokenizer, chat, indices)
    for i, item in enumerate(items):
        validate_item(item, path, i, multi_cot=multi_cot, train=train, tokenizer=tokenizer, chat=chat,
                      indices=indices)
    return items


def validate_item(item, path, i: int, multi_cot: bool = False, train: bool = False, tokenizer=None,
                  chat: bool = False, indices: str = "logits"):
    if not isinstance(item, dict):
        raise _error(path, f"expected an object, got {type(item).__name__}", i)
    for field in REQUIRED_FIELDS + (("indices",) if multi_cot else ()):
        if field not in item:
            raise _error(path, "missing field", i, field)
    for field in ("instruction", "label"):
        if not isinstance(item[field], str):
            raise _error(path, f"expected a string, got {type(item[field]).__name__}", i, field)
    output = item["output"]
    if multi_cot and not isinstance(output, list):
        raise _error(path, "expected a list of rationales", i, "output")
    if not isinstance(output, (str, list)) or (isinstance(output, list) and not all(isinstance(r, str) for r in output)):
        raise _error(path, "expected a string or a list of strings", i, "output")
    if isinstance(output, list) and not output:
        raise _error(path, "empty rationale list", i, "output")
    if (train or multi_cot) and any(not r.strip() for r in rationales(item)):
        raise _error(path, "empty rationale", i, "output")
    if multi_cot:
        if len(output) < 2:
            raise _error(path, f"MCC needs at least 2 rationales per item, got {len(output)}", i, "output")
        validate_indices(item, path, i, tokenizer, chat, indices)


def validate_indices(item, path, i: int, tokenizer=None, chat: bool = False, indices: str = "logits"):
    spans = item["indices"]
    n = len(item["output"])
    if not isinstance(spans, list) or len(spans) != n:
        got = len(spans) if isinstance(spans, list) else type(spans).__name__
        raise _error(path, f"expected one [start, end] span per rationale ({n}), got {got}", i, "indices")
    for k, span in enumerate(spans):
        if (not isinstance(span, list) or len(span) != 2 or not all(type(x) is int for x in span)
                or not 0 <= span[0] < span[1]):
            raise _error(path, f"span {k} is {span!r}; expected [start, end] with 0 <= start < end", i, "indices")
    lengths = [end - start for start, end in spans]
    if len(set(lengths)) > 1:
        raise _error(path, f"spans of unequal length {lengths} (spans {spans}); a pair must have equal lengths",
                     i, "indices")
    if tokenizer is not None:
        for k, (start, end) in enumerate(spans):
            lo, hi = span_bounds(tokenizer, item["instruction"], item["output"][k], chat, indices)
            if start < lo or end > hi:
                what = "logit positions predicting" if indices == "logits" else "positions of"
                raise _error(path, f"span {k} [{start}, {end}) out of range: the {what} rationale {k}'s tokens "
                                   f"are [{lo}, {hi}) (indices convention {indices!r})", i, "indices")


def write_sidecar(path, tokenizer, **info):
    from common.tokenizer import tokenizer_sha256

    meta = {"tokenizer": str(tokenizer.path), "tokenizer_sha256": tokenizer_sha256(tokenizer.path), **info}
    with open(sidecar_path(path), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def sidecar_indices(path):
    """The indices convention the file's sidecar records, or None without a sidecar."""
    meta_file = sidecar_path(path)
    if not meta_file.is_file():
        return None
    with open(meta_file) as f:
        return json.load(f).get("indices", "logits")  # sidecars from before the option held logit positions


def check_sidecar(path, tokenizer, chat: bool = False, indices: str = "logits"):
    """The indices depend on the tokenizer, the prompt format and their convention: refuse a file whose sidecar
    disagrees with the run on any of them (never shift or re-tokenise silently). A file without a sidecar
    (prepared elsewhere) is accepted with a warning; its spans are still range-checked."""
    from common.tokenizer import tokenizer_sha256

    if indices not in INDICES:
        raise DataError(f"--indices must be one of {INDICES}, got {indices!r}")
    meta_file = sidecar_path(path)
    if not meta_file.is_file():
        warnings.warn(f"{path}: no {meta_file.name}; cannot check that its indices ({indices!r} convention, "
                      f"{'chat' if chat else 'plain'} prompts) match tokenizer {tokenizer.path}")
        return
    with open(meta_file) as f:
        meta = json.load(f)
    written = meta.get("indices", "logits")  # sidecars from before the option held logit positions
    if written != indices:
        raise _error(path, f"{meta_file.name} says the indices are {written!r} positions but this run reads them as "
                           f"{indices!r}: pass --indices {written} (or rerun prepare_data.py filter --indices "
                           f"{indices})", field="indices")
    prompt = meta.get("prompt", "plain")
    if prompt != ("chat" if chat else "plain"):
        raise _error(path, f"{meta_file.name} says the indices were computed with {prompt} prompts but this run "
                           f"uses {'chat' if chat else 'plain'} ones: pass --chat_template {prompt == 'chat'} (or "
                           f"rerun prepare_data.py filter with --chat_template {chat})", field="indices")
    expected, actual = meta.get("tokenizer_sha256"), tokenizer_sha256(tokenizer.path)
    if expected != actual:
        raise _error(path, f"indices were computed with tokenizer {meta.get('tokenizer')} (sha256 {expected}); "
                           f"this run uses {tokenizer.path} (sha256 {actual}): rerun mcc_kd/prepare_data.py filter",
                     field="indices")
