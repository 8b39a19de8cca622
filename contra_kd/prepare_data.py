"""Tokenise Dolly-style instruction data and a plain-text corpus into binarised files (contra_kd.md §2).

    python contra_kd/prepare_data.py dolly --data-dir DOLLY --processed-data-dir processed_data/dolly \
        --model-path gpt2 --model-type gpt2
    python contra_kd/prepare_data.py pretrain --data-file owt.txt \
        --processed-data-dir processed_data/openwebtext --model-path gpt2 --model-type gpt2 \
        --dev-num 1000 --train-num 22870
    python contra_kd/prepare_data.py standins --source ../shared/data --output data/contra_kd

`dolly` reads DSKD's layout (`train.jsonl` + `dev.jsonl`, records {instruction, prompt, input, output}) or
MiniLLM's (`raw.jsonl`, whose first `dev_num` lines are the dev split; databricks fields context / response
are accepted) and writes both variants: `full/{model_type}/` (prompt ⟂ response + eos) and
`prompt/{model_type}/` (prompt only), each with `{train,valid}_0.{bin,idx}` + `{train,valid}.jsonl`.
Prompts longer than `max_prompt_length` tokens are dropped from both (MiniLLM; CONTRA truncated them and lost
"### Response:") and the count is printed. `pretrain` reads one document per line (newline runs written as
`<@x(x!>`), appends EOS to each, and cuts the stream into `max_length`-token chunks: the first `dev_num` go
to `valid`, the next `train_num` to `train`. `standins` builds the labelled stand-ins of data/README.md from
the shared reference files (the Dolly train split and OpenWebText are not available here).
"""
import json
import os
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from common.binarized import best_dtype, split_marker, write_indexed
from common.cli import UserError, check_range, run_cli
from common.hf import chat_prompt
from common.standins import dolly_dev_without_test
from contra_kd.data import OWT_NEWLINE, owt_chunks, owt_documents, read_records, tokenize_record


def _tokenizer(model_path):
    from common.hf import load_tokenizer
    return load_tokenizer(model_path, flag="--model-path", model_folder=False)


def _dolly_splits(data_dir, dev_num, num):
    if os.path.exists(os.path.join(data_dir, "train.jsonl")):
        dev = os.path.join(data_dir, "dev.jsonl")
        if not os.path.exists(dev):
            raise UserError(f"{data_dir}: train.jsonl without dev.jsonl (DSKD layout needs both)")
        return {"train": read_records(os.path.join(data_dir, "train.jsonl"))[:num],
                "valid": read_records(dev)[:dev_num][:num]}
    raw = os.path.join(data_dir, "raw.jsonl")
    if not os.path.exists(raw):
        raise UserError(f"{data_dir}: neither train.jsonl + dev.jsonl (DSKD) nor raw.jsonl (MiniLLM); "
                        f"see data/README.md for the stand-in")
    records = read_records(raw)
    return {"train": records[dev_num:][:num], "valid": records[:dev_num][:num]}


def dolly(data_dir: str, processed_data_dir: str, model_path: str, model_type: str, max_prompt_length: int = 256,
          dev_num: int = 1000, num: int = None, chat_template: bool = False):
    """`dev_num`: the first dev_num records of dev.jsonl (DSKD) or raw.jsonl (MiniLLM) are the dev split;
    `num`: keep only the first num records of each split (quick demos); `chat_template` (ours): each prompt is
    the tokenizer's chat template around the instruction and input (common.hf.chat_prompt), for an instruct
    model, instead of §2.1's template (written into the jsonl too, so dev sampling uses it)."""
    check_range("--max-prompt-length", max_prompt_length, low=1)
    check_range("--dev-num", dev_num, low=0)
    splits = _dolly_splits(data_dir, dev_num, num)  # every record is read and checked before the tokenizer loads
    tokenizer = _tokenizer(model_path)
    dtype = best_dtype(len(tokenizer))
    marker = split_marker(dtype)
    for split, records in splits.items():
        kept, full, prompts = [], [], []
        for record in tqdm(records, desc=f"dolly {split}"):
            if chat_template:
                record = dict(record, prompt=chat_prompt(tokenizer, record["instruction"], record["input"]))
            prompt_ids, response_ids = tokenize_record(tokenizer, record)
            if len(prompt_ids) > max_prompt_length:
                continue
            kept.append(record)
            full.append(prompt_ids + [marker] + response_ids)
            prompts.append(prompt_ids)
        for kind, items in (("full", full), ("prompt", prompts)):
            out = os.path.join(processed_data_dir, kind, model_type)
            os.makedirs(out, exist_ok=True)
            write_indexed(os.path.join(out, f"{split}_0"), items, dtype)
            with open(os.path.join(out, f"{split}.jsonl.tmp"), "w") as f:
                for record in kept:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            os.replace(os.path.join(out, f"{split}.jsonl.tmp"), os.path.join(out, f"{split}.jsonl"))
        print(f"dolly {split}: {len(kept)} items, {len(records) - len(kept)} dropped (prompt > {max_prompt_length} "
              f"tokens), dtype {dtype.__name__} -> {processed_data_dir}/{{full,prompt}}/{model_type}")


def pretrain(data_file: str, processed_data_dir: str, model_path: str, model_type: str, max_length: int = 512,
             dev_num: int = 1000, train_num: int = 22870, train_num_name: str = None):
    check_range("--max-length", max_length, low=1)
    check_range("--dev-num", dev_num, low=0)
    check_range("--train-num", train_num, low=1)
    if not os.path.isfile(data_file):
        raise UserError(f"--data-file {data_file}: no such file (one document per line)")
    tokenizer = _tokenizer(model_path)
    dtype = best_dtype(len(tokenizer))
    with open(data_file) as f:
        chunks = owt_chunks(tokenizer, owt_documents(f), max_length)
        valid = [c for _, c in zip(range(dev_num), chunks)]
        train = [c for _, c in zip(range(train_num), tqdm(chunks, desc="pretrain chunks", total=train_num))]
    out = os.path.join(processed_data_dir, model_type, str(max_length), train_num_name or str(train_num))
    os.makedirs(out, exist_ok=True)
    write_indexed(os.path.join(out, "valid_0"), valid, dtype)
    write_indexed(os.path.join(out, "train_0"), train, dtype)
    print(f"pretrain: {len(valid)} valid + {len(train)} train chunks of {max_length} tokens "
          f"(asked {dev_num} + {train_num}) -> {out}")


def standins(source: str = "../shared/data", output: str = "data/contra_kd", dev_num: int = 100, seed: int = 0,
             owt_gsm8k: int = 2000):
    """Dolly train/dev stand-ins: a seeded split of the shipped Dolly **dev** set (never the test set; dev items
    whose instruction is also a test instruction are left out); OpenWebText stand-in: Dolly dev contexts and
    responses plus GSM8K train answers, one document per line."""
    for name in ("instruct/dolly/valid.jsonl", "instruct/dolly/dev.jsonl", "gsm8k/train.jsonl"):
        if not os.path.isfile(os.path.join(source, name)):
            raise UserError(f"--source {source}: no {name}; point --source at the shared data folder")
    lines, overlap = dolly_dev_without_test(source)
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    os.makedirs(os.path.join(output, "dolly_standin"), exist_ok=True)
    for name, part in (("dev.jsonl", order[:dev_num]), ("train.jsonl", order[dev_num:])):
        with open(os.path.join(output, "dolly_standin", name), "w") as f:
            f.writelines(lines[i] for i in sorted(part))
    docs = []
    for line in lines:
        record = json.loads(line)
        docs += [t for t in (record["input"], record["output"]) if t.strip()]
    with open(os.path.join(source, "gsm8k", "train.jsonl")) as f:
        docs += [json.loads(line)["answer"] for _, line in zip(range(owt_gsm8k), f)]
    with open(os.path.join(output, "owt_standin.txt"), "w") as f:
        for doc in docs:
            f.write(OWT_NEWLINE.join(p for p in doc.split("\n") if p) + "\n")
    print(f"stand-ins: dolly_standin/train.jsonl {len(lines) - dev_num}, dev.jsonl {dev_num} ({overlap} dev "
          f"items shared with the test set left out); owt_standin.txt {len(docs)} documents -> {output}")


if __name__ == "__main__":
    run_cli({"dolly": dolly, "pretrain": pretrain, "standins": standins})
