"""Offline teacher outputs for the `teacher` and `mix_*` sample sources (atkd.md §4; the release never published
the script or the file it made).

    python atkd/generate_data.py --teacher_model_path fine-tuned/OPT-6.7b --data_path alpaca_gpt4_data.json \
        --output_path generated_data/OPT_6.7b/alpaca_generated_data.jsonl

Writes one JSON line per data item, in data order: `{instruction: the rendered training prompt,
teacher_output: the teacher's greedy continuation (cut at EOS, stripped), output: the data file's answer}`.
Lines are appended and flushed batch by batch: rerun the same command after an interruption and it continues
after the last complete line, having checked that the lines already there belong to this data file.
"""
import sys
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atkd.data import DataError, load_training_data  # noqa: E402
from atkd.eval import load_model, predict  # noqa: E402
from common import hf  # noqa: E402
from common.cli import check_range, run_cli  # noqa: E402
from common.io import append_jsonl, read_jsonl, write_jsonl  # noqa: E402


def _done_lines(path: Path, items: list, data_path) -> int:
    """Complete lines already written (a torn last line is dropped), each checked against its data item."""
    if not path.exists():
        return 0
    rows = read_jsonl(str(path), drop_partial_last=True)
    if len(rows) > len(items):
        raise DataError(f"{path}: {len(rows)} lines but {data_path} has {len(items)} items; it was generated from "
                        "another data file: delete it or choose another --output_path")
    for i, record in enumerate(rows):
        for field, expected in (("instruction", items[i]["prompt"]), ("output", items[i]["output"])):
            if record.get(field) != expected:
                raise DataError(f"{path}: line {i + 1}: field '{field}' does not match item {i} of {data_path}; it "
                                "was generated from another data file: delete it or choose another --output_path")
    write_jsonl(rows, str(path))  # without the torn line, so that appends start on a fresh line
    return len(rows)


def main(teacher_model_path: str, data_path: str, output_path: str, max_new_tokens: int = 256,
         batch_size: int = 16, max_items: int = None, bf16: bool = False, chat_template: bool = False):
    """chat_template (ours): prompts in the teacher's chat template (train.py --chat_template True reads them)."""
    for flag, value in (("--max_new_tokens", max_new_tokens), ("--batch_size", batch_size), ("--max_items", max_items)):
        if value is not None:
            check_range(flag, value, low=1)
    chat_tokenizer = hf.load_tokenizer(teacher_model_path, "--teacher_model_path") if chat_template else None
    items = load_training_data(data_path, chat_tokenizer=chat_tokenizer)[:max_items]
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = _done_lines(path, items, data_path)
    if start == len(items):
        print(f"{path}: complete ({len(items)} lines)")
        return
    model, tokenizer = load_model(teacher_model_path, bf16, flag="--teacher_model_path")
    bar = tqdm(total=len(items), initial=start, desc="teacher outputs")
    for begin in range(start, len(items), batch_size):
        batch = items[begin:begin + batch_size]
        outputs, _ = predict(model, tokenizer, [x["prompt"] for x in batch], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, desc=None, chat=chat_template)
        append_jsonl(str(path), *(dict(instruction=x["prompt"], teacher_output=o, output=x["output"])
                                   for x, o in zip(batch, outputs)))
        bar.update(len(batch))
    bar.close()


if __name__ == "__main__":
    run_cli(main)
