"""Teacher rationales for MCC-KD: K sampled chains of thought per question, in the schema prepare_data filters.

    python mcc_kd/generate_rationales.py --task GSM8K --input_file data/GSM8K/train.json --teacher TEACHER \
        --output_file runs/GSM8K/teacher.jsonl --samples 4 --temperature 0.7
    torchrun --nproc_per_node 8 mcc_kd/generate_rationales.py ...      # questions split over the ranks
    python mcc_kd/prepare_data.py filter --task GSM8K --input_file runs/GSM8K/teacher.json ...

The paper's teacher was gpt-3.5-turbo; its rationales ship for SVAMP and ASDiv only (data/README.md), and any
instruct model can stand in for GSM8K and CSQA. TEACHER is one of our checkpoint folders (params.json +
consolidated.*.pth: our TP model, split over all ranks) or a Hugging Face folder (a transformers model, one
replica per rank). When the teacher's tokenizer has a chat template, the question is sent as a user turn.

Output: `output_file` (JSONL) gets one line per question, {"index", "instruction", "label", "output": [K
rationales]}, appended by rank 0 as soon as the question's K samples are done; rerunning the same command
skips the questions already there (a line cut by a kill is dropped and redone), so a killed run neither
repeats nor loses a question, and ends with the same file as an uninterrupted one: each sample's seed is keyed
on (seed, question, sample) and questions go through in fixed batches of `batch_size`. At the end `train_file`
(default: output_file with .json) holds the list {instruction, output, label} in input order, empty samples
dropped: the train-file schema of prepare_data.py.
"""
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun mcc_kd/generate_rationales.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES, keyed_seed
from common.generation import generate
from common.parallel import dp_group, setup, shutdown
from common.tokenizer import load_tokenizer
from mcc_kd.answers import check_task
from mcc_kd.data import load_task_file


def load_teacher(teacher: str, dtype: str, max_seq_len: int, max_batch_size: int):
    """(layout, model, tokenizer): our TP model over all ranks, or a transformers model on every rank."""
    check_choice("--dtype", dtype, DTYPES)
    if os.path.exists(os.path.join(teacher, "params.json")):
        from common.model import load_model

        lay = setup(dtype=dtype)  # one TP group over the world
        model = load_model(teacher, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    elif os.path.exists(os.path.join(teacher, "config.json")):
        from transformers import AutoModelForCausalLM

        lay = setup(tp_size=1, dtype=dtype)  # data parallel: each rank its own questions
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=getattr(torch, dtype)).to(lay.device)
    else:
        raise UserError(f"--teacher {teacher}: expected one of our checkpoint folders (params.json) or a Hugging "
                        f"Face model folder (config.json)")
    return lay, model.eval(), load_tokenizer(teacher)


def read_done(path: str) -> dict:
    """{question index: record} of the complete lines of a JSONL file; a torn last line is cut off."""
    done, good_bytes = {}, 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a write cut by a kill: everything after it is redone
                if not line.endswith(b"\n"):
                    break
                done[record["index"]] = record
                good_bytes += len(line)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def main(task: str, input_file: str, teacher: str, output_file: str, train_file: str = None, samples: int = 4,
         temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 8,
         max_seq_len: int = 1024, dtype: str = "float32", seed: int = 1, chat_template: bool = True,
         instruction_suffix: str = "Let's think step by step."):
    """K = `samples` rationales per question of `input_file` (any task file: instruction, label)."""
    check_task(task)
    for flag, value in (("--samples", samples), ("--max_new_tokens", max_new_tokens), ("--batch_size", batch_size),
                        ("--max_seq_len", max_seq_len)):
        check_range(flag, value, low=1)
    items = load_task_file(input_file)
    lay, model, tokenizer = load_teacher(teacher, dtype, max_seq_len, batch_size * samples)
    chat = chat_template and tokenizer.has_chat_template

    def prompt(instruction: str) -> list:
        text = f"{instruction.strip()}\n{instruction_suffix}".strip()
        return tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else \
            tokenizer.encode(text + "\n", bos=True, eos=False)

    done = read_done(output_file) if lay.is_main else {}
    if dist.is_initialized() and lay.world_size > 1:
        box = [sorted(done)]
        dist.broadcast_object_list(box, src=0)
        todo_done = set(box[0])
    else:
        todo_done = set(done)
    # Fixed batches of consecutive questions, each generated whole even when a kill left part of it written, and
    # one seed per question and sample: a rerun computes every rationale exactly as an uninterrupted run does.
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    todo = [b for b in batches if not todo_done.issuperset(b)]
    mine = todo[lay.dp_rank::lay.dp_size]
    steps = (len(todo) + lay.dp_size - 1) // lay.dp_size  # the same on every rank
    n_todo = len(items) - len(todo_done)
    if lay.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        print(f"{task}: {len(items)} questions, {len(todo_done)} already in {output_file}, {n_todo} to do; "
              f"{samples} samples at T={temperature}, {'chat template' if chat else 'plain prompts'}")
    bar = tqdm(total=n_todo, desc="rationales", disable=not lay.is_main)
    for step in range(steps):
        idx = mine[step] if step < len(mine) else []
        records = []
        if idx:
            prompts = [prompt(items[i]["instruction"]) for i in idx for _ in range(samples)]
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_seq_len=max_seq_len,
                           padding="left", seed=[keyed_seed(seed, i, k) for i in idx for k in range(samples)])
            texts = [tokenizer.decode(ids).strip() for ids in out]
            records = [{"index": i, "instruction": items[i]["instruction"], "label": items[i]["label"],
                        "output": texts[k * samples:(k + 1) * samples]} for k, i in enumerate(idx)
                       if i not in todo_done]
        if lay.dp_size > 1:
            gathered = [None] * lay.dp_size
            dist.all_gather_object(gathered, records, group=dp_group())
            records = [r for part in gathered for r in part]
        if lay.is_main:
            with open(output_file, "a") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(records))
    bar.close()
    shutdown()
    if lay.is_main:
        done = read_done(output_file)
        missing = [i for i in range(len(items)) if i not in done]
        if missing:
            raise UserError(f"{output_file}: questions {missing[:10]} have no rationales; rerun the same command")
        train_file = train_file or str(Path(output_file).with_suffix(".json"))
        train = [{"instruction": done[i]["instruction"], "output": [r for r in done[i]["output"] if r.strip()],
                  "label": done[i]["label"]} for i in range(len(items))]
        train = [x for x in train if x["output"]]  # an empty sample (EOS first) is no rationale
        tmp = f"{train_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(train, f, indent=1, ensure_ascii=False)
        os.replace(tmp, train_file)
        print(f"wrote {train_file}: {len(train)} of {len(items)} questions with {sum(len(x['output']) for x in train)} "
              f"non-empty rationales (next: python mcc_kd/prepare_data.py filter --task {task} --input_file "
              f"{train_file} ...)")


if __name__ == "__main__":
    run_cli(main)
