"""SeqKD data: the teacher answers every train prompt of a round (spec §3.3; MiniLLM's sampling settings).

    python anli_reverse_kl/generate_data.py --teacher_model_path runs/teacher/model --data_dir processed/r1 \
        --save runs/seqkd_data/r1
    torchrun --nproc_per_node 8 anli_reverse_kl/generate_data.py ...        # prompts sharded over the ranks

Writes `{save}/train_0.{bin,idx}` + `train.jsonl` in prepare_data.py's format with each target replaced by
the teacher's sampled decoder tokens (EOS kept when produced), and `{save}/seqkd.json` (the settings;
`train.py --type seqkd` checks for it). Sampling: temperature 1, top-p 1, top-k 0, seeded per rank. A causal
teacher continues each prompt without its closing EOS (as train.py reads it), left-padded.
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from anli_reverse_kl.prepare_data import FIELDS, read_items, write_tokenized
from common import hf
from common.cli import UserError, check_range, run_cli
from common.distributed import gather_object, print0, rank_seed, setup, shutdown
from common.generation import generate
from common.io import atomic_write_json
from common.training import dp_shard


def main(teacher_model_path: str = None, data_dir: str = None, save: str = None, max_new_tokens: int = 180,
         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 16, seed: int = 10):
    for flag, value in (("--teacher_model_path", teacher_model_path), ("--data_dir", data_dir), ("--save", save)):
        if value is None:
            raise UserError(f"{flag} is required")
    for flag, value in (("--max_new_tokens", max_new_tokens), ("--batch_size", batch_size)):
        check_range(flag, value, low=1)
    hf.load_config(teacher_model_path, "--teacher_model_path")  # before the weights load
    items = read_items(data_dir, "train")
    lay = setup(seed)
    tok = hf.load_tokenizer(teacher_model_path, flag="--teacher_model_path")
    teacher = hf.load_model(teacher_model_path, device=lay.device, frozen=True, flag="--teacher_model_path")
    causal = not hf.is_seq2seq(teacher)
    mine = dp_shard(list(range(len(items))), lay.dp_rank, lay.dp_size)
    out = []
    for s in tqdm(range(0, len(mine), batch_size), desc="teacher outputs", disable=not lay.is_main):
        rows = mine[s:s + batch_size]
        prompts = [items[i]["prompt"] for i in rows]
        if causal:
            prompts = [p[:-1] if p[-1:] == [tok.eos_token_id] else p for p in prompts]
        gens = generate(teacher, prompts, max_new_tokens, temperature, top_p, tok.eos_token_id, top_k=top_k,
                        seed=rank_seed(seed, s, lay.dp_rank), pad_id=tok.pad_token_id,
                        padding="left" if causal else "right")
        out += [(i, list(g)) for i, g in zip(rows, gens)]
    gathered = gather_object(out, lay)
    if lay.is_main:
        targets = dict(pair for part in gathered for pair in part)  # dp_shard repeats a few items: same index
        sequences, records = [], []
        for i, item in enumerate(items):
            item = dict(item, target=targets[i])
            sequences.append([t for k, name in enumerate(FIELDS) for t in ([-1] if k else []) + item[name]])
            records.append(dict(uid=tok.decode(item["uid"]), prompt=tok.decode(item["prompt"], skip_special_tokens=True),
                                target=tok.decode(item["target"], skip_special_tokens=True),
                                label=tok.decode(item["label_word"]), prompt_tokens=item["prompt"],
                                target_tokens=item["target"]))
        write_tokenized(save, "train", sequences, records, len(tok))
        atomic_write_json(dict(teacher_model_path=teacher_model_path, data_dir=data_dir, items=len(items),
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               seed=seed, dp_size=lay.dp_size), os.path.join(save, "seqkd.json"))
        print0(f"{save}: {len(items)} teacher outputs")
    shutdown()


if __name__ == "__main__":
    run_cli(main)
