"""Known user errors end every contra_kd command line with one line on stderr and exit code 1, not a traceback
(common.cli.run_cli); under torchrun only rank 0 prints it."""
import os
import subprocess
import sys

import pytest
import torch

from contra_kd.flow import Projector, VelocityField, save_flow
from contra_kd.prepare_data import dolly
from tests.tiny import char_tokenizer, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny GPT-2 teacher (4 layers, width 48) and student (2 layers, width 32), 8 Dolly stand-in items, a copy of
    them whose index claims int32, a velocity field for another pair, and an openai-gpt model (no peft defaults)."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny("gpt2", root / "teacher", seed=1, n_layer=4, n_embd=48)
    save_tiny("gpt2", root / "student", seed=2)
    dolly(os.path.join(ROOT, "data/contra_kd/dolly_standin"), str(root / "dolly"), str(root / "student"), "tiny",
          max_prompt_length=200, num=8)
    bad = root / "bad"
    bad.mkdir()
    for name in os.listdir(root / "dolly/full/tiny"):
        (bad / name).write_bytes((root / "dolly/full/tiny" / name).read_bytes())
    raw = bytearray((bad / "train_0.idx").read_bytes())
    raw[17] = 4  # the dtype code claims int32 for uint16 tokens
    (bad / "train_0.idx").write_bytes(bytes(raw))
    torch.manual_seed(0)
    save_flow(str(root / "vf.safetensors"), str(root / "proj.safetensors"),  # hidden sizes 64 / 48, not 32 / 48
              VelocityField(48, width=16, num_distill_layers=2, num_blocks=1), Projector(64, 48),
              {"student_layers": [0, 1], "teacher_layers": [1, 2]})
    from transformers import AutoModelForCausalLM, OpenAIGPTConfig
    AutoModelForCausalLM.from_config(OpenAIGPTConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        root / "openai-gpt")
    char_tokenizer().save_pretrained(root / "openai-gpt")
    return root


def run(script, *args, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    done = subprocess.run(launcher + [f"contra_kd/{script}", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


def train_args(ws, **flags):
    flags = {"type": "sft", "model-path": ws / "student", "data-dir": ws / "dolly/full/tiny", "save": ws / "out",
             "max-length": 232, "max-prompt-length": 200, **flags}
    return [f"--{k}={v}" for k, v in flags.items()]


def case_args(ws, case):
    if case == "unknown --type":
        return "train.py", train_args(ws, type="minillm"), "error: --type 'minillm' is not one of: sft, kd,"
    if case == "binarised file whose dtype does not match its data":
        return "train.py", train_args(ws, **{"data-dir": ws / "bad"}), f"error: {ws / 'bad' / 'train_0.idx'}: pointer of item 1"
    if case == "velocity field for other hidden sizes":
        return ("train.py", train_args(ws, type="distillm+contra", **{
            "teacher-model-path": ws / "teacher", "num-distill-layers": 2, "velocity-field": ws / "vf.safetensors",
            "projector": ws / "proj.safetensors"}),
            f"error: --velocity-field {ws / 'vf.safetensors'} was trained for d_student 64 (this run: 32)")
    if case == "LoRA on a model peft cannot wrap":
        return ("train.py", train_args(ws, **{"model-path": ws / "openai-gpt", "peft": "lora"}),
                f"error: --peft lora: peft cannot wrap {ws / 'openai-gpt'} (openai-gpt)")
    missing = ws / "nowhere"
    if case == "eval.py: missing model folder":
        return ("eval.py", ["--model-path", missing, "--save", ws / "ev"],
                f"error: --model-path {missing} is not a transformers model folder")
    if case == "train_velocity_field.py: missing teacher folder":
        return ("train_velocity_field.py", ["--model-path", ws / "student", "--teacher-model-path", missing,
                                            "--data-dir", ws / "dolly/full/tiny", "--save", ws / "vf"],
                f"error: --teacher-model-path {missing} is not a transformers model folder")
    if case == "generate_data.py: missing data":
        return ("generate_data.py", ["--model-path", ws / "student", "--data-dir", missing, "--save", ws / "gen"],
                f"error: --data-dir {missing} does not exist; write it with contra_kd/prepare_data.py")
    return ("prepare_data.py", ["dolly", "--data-dir", missing, "--processed-data-dir", ws / "p", "--model-path",
                                ws / "student", "--model-type", "tiny"], f"error: {missing}: neither train.jsonl")


@pytest.mark.parametrize("case", ["unknown --type", "binarised file whose dtype does not match its data",
                                  "velocity field for other hidden sizes", "LoRA on a model peft cannot wrap",
                                  "eval.py: missing model folder", "train_velocity_field.py: missing teacher folder",
                                  "generate_data.py: missing data", "prepare_data.py: missing Dolly files"])
def test_user_error_is_one_line_on_stderr_and_exit_code_1(ws, case):
    script, args, expected = case_args(ws, case)
    code, lines = run(script, *args)
    assert code == 1
    # before it only progress bars (loading weights) may appear; the error is one line, the last, no traceback
    assert lines[-1].startswith(expected), lines
    assert sum(line.startswith("error:") for line in lines) == 1 and not any("Traceback" in line for line in lines)


def test_under_torchrun_only_rank_0_prints_the_error(ws):
    code, lines = run("train.py", *train_args(ws, type="minillm"), nproc=2)
    assert code != 0
    assert sum(line.startswith("error: --type 'minillm'") for line in lines) == 1, lines
    # torchrun's own launcher then reports the failed children; no traceback comes from our code
    assert not any('contra_kd/train.py", line' in line for line in lines), lines
