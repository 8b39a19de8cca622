"""Split, re-split, merge, merge LoRA, export: the checkpoint command line.

    python -m common.checkpoint_split --ckpt_file PATH --save_path DIR --n N       # the original's command
    python -m common.checkpoint_split merge_lora --ckpt_dir DIR --save_path OUT [--lora_alpha A --lora_rank R]
    python -m common.checkpoint_split export_hf --ckpt_dir DIR --save_path HF_DIR
    python -m common.checkpoint_split init --model_type tiny-llama --save_path DIR [--tokenizer T --n N]

PATH: a Hugging Face model folder (config.json + safetensors/bin, tokenizer files), one of our shard
folders (re-split N -> M; --n 1 merges), one weights file, or several (comma-separated). Under torchrun
only global rank 0 works.
"""
import os
import sys

from common import checkpoint as ckpt
from common.cli import UserError, check_range, run_cli
from common.model import lora_scale, model_args
from common.tokenizer import load_tokenizer


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def split(ckpt_file, save_path: str, n: int = 1, tokenizer: str = None):
    """Write `n` tensor-parallel shards of PATH to DIR, with params.json and the tokenizer files."""
    check_range("--n", n, low=1)
    for path in ckpt_file if isinstance(ckpt_file, (list, tuple)) else str(ckpt_file).split(","):
        if not os.path.exists(os.path.expanduser(str(path).strip())):
            raise UserError(f"--ckpt_file {path}: no such file or folder")
    if not _is_rank0():
        return
    state, args, folder = ckpt.read_checkpoint(ckpt_file)
    lora = [k for k in state if "lora_" in k]
    if lora:
        raise UserError(f"{ckpt_file} holds LoRA adapters ({lora[0]}, ...): merge LoRA first with "
                        "`python -m common.checkpoint_split merge_lora --ckpt_dir ... --save_path ...`")
    shards = ckpt.split_state_dict(state, int(n), args, source=str(ckpt_file))
    ckpt.write_checkpoint(shards, args, save_path, tokenizer_from=tokenizer or folder)
    if args is None:
        print(f"note: no params.json or config.json found beside {ckpt_file}; pass --model_type when loading")
    print(f"wrote {n} shard(s) of {len(state)} tensors to {save_path}")


def merge_lora(ckpt_dir: str, save_path: str, lora_rank: int = None, lora_alpha: float = None):
    """Fold LoRA adapters into the base weights shard by shard (scale 1, or alpha / rank when alpha is given)."""
    scale = lora_scale(lora_rank, lora_alpha)
    if not ckpt.shard_paths(ckpt_dir):
        raise UserError(f"--ckpt_dir {ckpt_dir}: no consolidated.*.pth shards (one of our checkpoint folders)")
    if not _is_rank0():
        return
    shards = [ckpt.merge_lora(ckpt.read_tensors(p), scale) for p in ckpt.shard_paths(ckpt_dir)]
    params = os.path.join(ckpt_dir, "params.json")
    args = ckpt.ModelArgs.from_params_json(params) if os.path.exists(params) else None
    ckpt.write_checkpoint(shards, args, save_path, tokenizer_from=ckpt_dir)
    print(f"merged LoRA into {len(shards)} shard(s) at {save_path}")


def export_hf(ckpt_dir: str, save_path: str, lora_rank: int = None, lora_alpha: float = None):
    """Write a folder that transformers.AutoModelForCausalLM.from_pretrained loads."""
    scale = lora_scale(lora_rank, lora_alpha)
    if not ckpt.shard_paths(ckpt_dir):
        raise UserError(f"--ckpt_dir {ckpt_dir}: no consolidated.*.pth shards (one of our checkpoint folders)")
    if not _is_rank0():
        return
    print(f"exported to {ckpt.export_hf(ckpt_dir, save_path, lora_scale=scale)}")


def init(model_type: str, save_path: str, tokenizer: str = None, n: int = 1, seed: int = 0):
    """A randomly initialised checkpoint of a registry type (vocabulary sized to `tokenizer` when given)."""
    check_range("--n", n, low=1)
    if not _is_rank0():
        return
    args = model_args(model_type)
    if tokenizer is not None:
        args.vocab_size = load_tokenizer(tokenizer).vocab_size
    state = ckpt.random_checkpoint(args, seed)
    ckpt.write_checkpoint(ckpt.split_state_dict(state, int(n), args, source=model_type), args, save_path,
                          tokenizer_from=tokenizer)
    print(f"wrote a random {model_type} ({sum(t.numel() for t in state.values()):,} parameters) to {save_path}")


COMMANDS = {"split": split, "merge_lora": merge_lora, "export_hf": export_hf, "init": init}

if __name__ == "__main__":
    run_cli(COMMANDS if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else split)
