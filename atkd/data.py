"""ATKD data: the Alpaca-GPT4 loader, the offline teacher JSONL, the evaluation sets, their prompts (atkd.md §4, §7).

Files
    Alpaca-GPT4 JSON list   {instruction, input, output}                 load_training_data(path)
    teacher JSONL           {instruction (rendered prompt), teacher_output, output}   (atkd/generate_data.py)
    evaluation JSONL        {instruction, input?, output: str | [str]}    load_eval_set(path)
Bad data raises DataError (a common.cli.UserError) naming the file, the item (0-based) of a JSON list or the line
of a JSONL file, and the field.

Templates (kept as released; training and evaluation differ):
    training   "Human:\n{instruction} {input}\n\nAssistant:\n" + output + EOS   (the space stays when input is "")
    evaluation "Human:\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\nAssistant:\n"
               (the "### Input" block dropped when input is empty or absent)
    chat       (--chat_template True, ours: for an instruct model) both are the tokenizer's chat template around
               one user turn "{instruction}\n\n{input}" (common.hf.chat_prompt), tokenised without adding
               special tokens (the template writes its own)
"""
import json
from pathlib import Path

from common.cli import UserError
from common.hf import chat_prompt
from common.io import numbered_jsonl

TRAIN_PROMPT = "Human:\n{input}\n\nAssistant:\n"
EVAL_PROMPT = "Human:\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\nAssistant:\n"
EVAL_PROMPT_NO_INPUT = "Human:\n### Instruction:\n{instruction}\n\nAssistant:\n"


class DataError(UserError):
    pass


def _read_records(path) -> tuple:
    """(records, where each is) of a JSON list ("file: item i") or JSONL, one object per line ("file:line")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path} is a folder, not a data file")
    if path.suffix == ".jsonl":
        numbered = numbered_jsonl(str(path))
        return [row for _, row in numbered], [f"{path}:{i}" for i, _ in numbered]
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .jsonl file needs that "
                        "suffix") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records, [f"{path}: item {i}" for i in range(len(records))]


def _field(where: str, record, name, kind=str):
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{name}' must be {getattr(kind, '__name__', kind)}, "
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
    records, where = _read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    generated = path.suffix == ".jsonl"
    if teacher_output and not generated:
        raise DataError(f"{path}: the teacher and mix_* sample sources read the offline teacher JSONL "
                        f"({{instruction, teacher_output, output}}); make it with atkd/generate_data.py "
                        f"--data_path {path} and pass that file as --data_path")
    items = []
    for r, at in zip(records, where):
        instruction, output = _field(at, r, "instruction"), _field(at, r, "output")
        if generated:
            item = dict(prompt=instruction, output=output)
            if teacher_output:
                item["teacher_output"] = _field(at, r, "teacher_output")
        else:
            extra = r.get("input") or ""
            if not isinstance(extra, str):
                raise DataError(f"{at}: field 'input' must be str, got {type(extra).__name__}")
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
    items = []
    for r, at in zip(*_read_records(path)):
        instruction = _field(at, r, "instruction")
        extra = r.get("input") or ""
        output = _field(at, r, "output", (str, list))
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
