"""Dolly-family data: the prompt template, tokenisation into `full` / `prompt` items, the OpenWebText chunks,
and reading them back from the binarised format (contra_kd.md §2).

On disk (common/binarized.py, byte-compatible with MiniLLM / DistiLLM processed data):
    processed_data/dolly/full/{model_type}/{train,valid}_0.{bin,idx} + {train,valid}.jsonl   prompt ⟂ response+eos
    processed_data/dolly/prompt/{model_type}/...                                             prompt only
    processed_data/openwebtext/{model_type}/512/{train_num}/{train,valid}_0.{bin,idx}        512-token chunks
"""
import os

import numpy as np

from common.binarized import read_split
from common.cli import UserError
from common.io import numbered_jsonl
from common.labels import causal_lm_batch, targets_and_mask

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
OWT_NEWLINE = "<@x(x!>"  # the extraction step writes one document per line with this in place of newline runs
FIX = "write it with contra_kd/prepare_data.py (or point it at MiniLLM / DistiLLM processed data)"


def build_prompt(instruction: str, input: str = "") -> str:
    """§2.1, for Dolly and every evaluation set."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def normalise_record(record: dict, source: str) -> dict:
    """{instruction, prompt, input, output} from a DSKD/MiniLLM record or a databricks-dolly-15k one
    (context / response). `output` may be a list of references (S-NI)."""
    if not isinstance(record, dict):
        raise UserError(f"{source}: a {type(record).__name__}, not a JSON object with instruction and output")
    if "instruction" not in record:
        raise UserError(f"{source}: record without an 'instruction' field (keys {sorted(record)})")
    input_ = record.get("input", record.get("context", "")) or ""
    output = record.get("output", record.get("response"))
    if output is None:
        raise UserError(f"{source}: record without an 'output' (or 'response') field (keys {sorted(record)})")
    prompt = record.get("prompt") or build_prompt(record["instruction"], input_)
    out = {"instruction": record["instruction"], "prompt": prompt, "input": input_, "output": output}
    if "reference" in record:  # sampled data (generate_data.py) keeps the ground truth beside its output
        out["reference"] = record["reference"]
    return out


def read_records(path: str) -> list:
    """The normalised records of a JSONL file; a bad line is a UserError naming the file, the line and the field."""
    return [normalise_record(record, f"{path}:{n}") for n, record in numbered_jsonl(path)]


def encode(tokenizer, text: str) -> list:
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_record(tokenizer, record: dict):
    """(prompt_ids, response_ids + [eos]); the response is tokenised in context (§2.1)."""
    output = record["output"] if isinstance(record["output"], str) else record["output"][0]
    prompt_ids = encode(tokenizer, record["prompt"])
    full = encode(tokenizer, record["prompt"] + output)
    return prompt_ids, full[len(prompt_ids):] + [tokenizer.eos_token_id]


def owt_documents(lines):
    """Documents from extracted OpenWebText lines (sentinel -> newline), empty lines skipped."""
    for line in lines:
        line = line.rstrip("\n")
        if line.strip():
            yield line.replace(OWT_NEWLINE, "\n")


def owt_chunks(tokenizer, documents, chunk_length: int = 512):
    """Each document tokenised + EOS, concatenated into one stream, cut into full chunk_length chunks (§2.5)."""
    buffer = []
    for doc in documents:
        buffer.extend(encode(tokenizer, doc) + [tokenizer.eos_token_id])
        while len(buffer) >= chunk_length:
            yield buffer[:chunk_length]
            buffer = buffer[chunk_length:]


class InstructionSplit:
    """A processed `full` or `prompt` split: item i -> (prompt ids, response ids or None), records from the jsonl."""

    def __init__(self, folder: str, split: str, flag: str = "--data-dir"):
        self.tokens = read_split(folder, split, flag, FIX)
        jsonl = os.path.join(folder, f"{split}.jsonl")
        self.records = read_records(jsonl) if os.path.exists(jsonl) else None
        if self.records is not None and len(self.records) != len(self.tokens):
            raise UserError(f"{jsonl}: {len(self.records)} records but {split}_*.idx holds {len(self.tokens)} "
                            f"items; re-run contra_kd/prepare_data.py")

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        seq = self.tokens[i].astype(np.int64)
        cut = np.flatnonzero(seq == self.tokens.marker)
        if cut.size == 0:
            return seq.tolist(), None
        return seq[:cut[0]].tolist(), seq[cut[0] + 1:].tolist()


class ChunkSplit:
    """A processed pretraining split: item i -> one chunk of token ids."""

    def __init__(self, folder: str, split: str, flag: str = "--lm-data-dir"):
        self.tokens = read_split(folder, split, flag, FIX)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i].astype(np.int64).tolist()


# ---- batching: one global batch per optimiser step, split over DP ranks, then into micro-batches ----

def rank_micro_batches(global_items: list, dp_rank: int, dp_size: int, batch_size: int) -> list:
    """This rank's micro-batches of one global batch: [(offset in the global batch, items), ...]. Rank r takes
    the r-th contiguous share; 1 process x GA 2 and 2 processes x GA 1 see the same global batch."""
    share = len(global_items) // dp_size
    mine = global_items[dp_rank * share:(dp_rank + 1) * share]
    return [(dp_rank * share + i, mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]


def collate(pairs, pad_id: int, max_length: int, device="cpu") -> dict:
    """Right-padded causal-LM batch of (prompt ids, response ids) pairs, each cut to max_length tokens (the
    response loses its tail); labels on the response only. Adds target_ids / mask aligned with the logits."""
    prompts = [list(p)[:max_length] for p, _ in pairs]
    responses = [list(r)[:max_length - len(p)] for p, (_, r) in zip(prompts, pairs)]
    batch = causal_lm_batch(prompts, responses, pad_id=pad_id)
    batch["target_ids"], batch["mask"] = targets_and_mask(batch["labels"], shift=True)
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
