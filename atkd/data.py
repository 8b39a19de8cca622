"""ATKD data: the Alpaca-GPT4 loader, the offline teacher JSONL, the evaluation sets, their prompts (atkd.md §4, §7).

Files
    Alpaca-GPT4 JSON list   {instruction, input, output}                 load_training_data(path)
    teacher JSONL           {instruction (rendered prompt), teacher_output, output}   (atkd/generate_data.py)
    evaluation JSONL        {instruction, input?, output: str | [str]}    load_eval_set(path)
Bad data raises DataError naming the file, the item (0-based) and the field.

Templates (kept as released; training and evaluation differ):
    training   "Human:\n{instruction} {input}\n\nAssistant:\n" + output + EOS   (the space stays when input is "")
    evaluation "Human:\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\nAssistant:\n"
               (the "### Input" block dropped when input is empty or absent)
    chat       (--chat_template True, ours: for an instruct model) both are the tokenizer's chat template around
               one user turn "{instruction}\n\n{input}" (common.hf.chat_prompt), tokenised without adding
               special tokens (the template writes its own)
"""
import json
import os
import sys
from pathlib import Path

from common.hf import chat_prompt

TRAIN_PROMPT = "Human:\n{input}\n\nAssistant:\n"
EVAL_PROMPT = "Human:\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\nAssistant:\n"
EVAL_PROMPT_NO_INPUT = "Human:\n### Instruction:\n{instruction}\n\nAssistant:\n"


class DataError(ValueError):
    pass


def run_cli(fn) -> None:
    """fire.Fire(fn); bad input (a ValueError: unknown flag value, malformed data, mismatched models, missing
    folder) ends the run with its one line on stderr, from rank 0 only, and exit code 1."""
    import fire

    try:
        fire.Fire(fn)
    except (ValueError, FileNotFoundError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _read_records(path) -> list:
    """A JSON list, or JSONL (one object per line)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no + 1}: not valid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .jsonl file needs that "
                        "suffix") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _field(path, i, record, name, kind=str):
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{path}: item {i}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{path}: item {i}: field '{name}' must be {getattr(kind, '__name__', kind)}, "
                        f"got {type(value).__name__}")
    return value


def train_prompt(instruction: str, input: str = "") -> str:
    return TRAIN_PROMPT.format(input=f"{instruction} {input}")


def load_training_data(path, *, teacher_output: bool = False, chat_tokenizer=None) -> list:
    """Records -> [{prompt, output[, teacher_output]}].

    `.json`: Alpaca-GPT4 `{instruction, input, output}` (input optional), rendered with the training template
    (with `chat_tokenizer`: in its chat template).
    `.jsonl`: the offline teacher file of generate_data.py, whose `instruction` is already the rendered prompt.
    teacher_output=True (sources teacher, mix_*) requires the teacher file.
    """
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    generated = path.suffix == ".jsonl"
    if teacher_output and not generated:
        raise DataError(f"{path}: the teacher and mix_* sample sources read the offline teacher JSONL "
                        f"({{instruction, teacher_output, output}}); make it with atkd/generate_data.py "
                        f"--data_path {path} and pass that file as --data_path")
    items = []
    for i, r in enumerate(records):
        instruction, output = _field(path, i, r, "instruction"), _field(path, i, r, "output")
        if generated:
            item = dict(prompt=instruction, output=output)
            if teacher_output:
                item["teacher_output"] = _field(path, i, r, "teacher_output")
        else:
            extra = r.get("input") or ""
            if not isinstance(extra, str):
                raise DataError(f"{path}: item {i}: field 'input' must be str, got {type(extra).__name__}")
            prompt = (chat_prompt(chat_tokenizer, instruction, extra) if chat_tokenizer is not None
                      else train_prompt(instruction, extra))
            item = dict(prompt=prompt, output=output)
        items.append(item)
    return items


def eval_prompt(instruction: str, input: str = "") -> str:
    if input:
        return EVAL_PROMPT.format(instruction=instruction, input=input)
    return EVAL_PROMPT_NO_INPUT.format(instruction=instruction)


def load_eval_set(path, chat_tokenizer=None) -> list:
    """Evaluation JSONL -> [{instruction, input, prompt, references: [str, ...]}] (prompt in the eval form, or
    in `chat_tokenizer`'s chat template)."""
    path = Path(path)
    items = []
    for i, r in enumerate(_read_records(path)):
        instruction = _field(path, i, r, "instruction")
        extra = r.get("input") or ""
        output = _field(path, i, r, "output", (str, list))
        references = [output] if isinstance(output, str) else [str(x) for x in output]
        prompt = chat_prompt(chat_tokenizer, instruction, extra) if chat_tokenizer is not None else eval_prompt(instruction, extra)
        items.append(dict(instruction=instruction, input=extra, prompt=prompt, references=references))
    return items


def encode(tokenizer, prompt: str, response: str, chat: bool = False) -> tuple:
    """(prompt ids with the tokenizer's own special tokens, e.g. OPT's leading </s>, or none for a chat prompt
    that holds its template's; response ids + EOS).

    Tokenised apart so that the prompt length is explicit (the release searched for the first EOS, which OPT's
    leading </s> defeats); the EOS ending the response is a target (atkd.md, What we build 3).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids
