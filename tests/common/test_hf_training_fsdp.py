"""common.hf_training's FSDP path (fully_shard) on gloo with real processes: 2 sharded ranks train what 1
unsharded process trains (causal LM and T5, full and LoRA, each with a sharded frozen teacher; CPU offload;
bf16 parameters), hold half the bytes, resume exactly after kill -9 mid-step, and export a folder that
from_pretrained loads with the training model's logits.

The runs are tests/common/tiny_hf_train.py: its train() inside torch.multiprocessing workers for the
equivalence tests (one spawn per world size, every configuration in it), the script under torchrun for
the kill test.
"""
import json
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from common import hf, memory_plan
from common.cli import UserError
from common.distributed import Layout, setup
from common.hf_training import load_checkpoint, sharding_from_flag, wrap_model
from common.io import read_jsonl, read_tensors
from tests.common.test_hf_training import ROOT, command, finish, kill_tree, start
from tests.common.tiny_hf_train import probe, train
from tests.distributed import run_distributed
from tests.tiny import save_tiny

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout_rate=0.0)
# name: (family, LoRA rank, sharding, dtype of the sharded run)
CONFIGS = {"causal": ("llama", 0, "fsdp", "float32"), "causal_lora": ("llama", 4, "fsdp", "float32"),
           "t5": ("t5", 0, "fsdp", "float32"), "t5_lora": ("t5", 4, "fsdp", "float32"),
           "causal_offload": ("llama", 0, "fsdp_offload", "float32"), "causal_bf16": ("llama", 0, "fsdp", "bfloat16")}
GLOBAL_MICRO_BATCHES = 4
ONE = Layout(rank=0, world_size=1, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for family in ("llama", "t5"):
        save_tiny(family, folder / family, seed=0, **NO_DROPOUT)
        save_tiny(family, folder / f"{family}_teacher", seed=1, **NO_DROPOUT)
    return folder


KILL_FLAGS = dict(steps=4, accumulation=2, sample=True, save_steps=2, warmup_steps=2, sharding="fsdp")


def _train_all(folder: str, out: str, sharded: bool) -> dict:
    """Every configuration in this process; unsharded (the DDP path, one process) or as CONFIGS says; sharded,
    also the kill test's uninterrupted reference (tiny_hf_train's main runs the same train())."""
    lay = setup(1)
    results = {}
    for name, (family, lora_rank, sharding, dtype) in CONFIGS.items():
        if not sharded and name in ("causal_offload", "causal_bf16"):
            continue  # their reference is the unsharded fp32 "causal" run
        results[name] = train(lay, f"{folder}/{family}", f"{out}/{name}", teacher_path=f"{folder}/{family}_teacher",
                              lora_rank=lora_rank, lora_dropout=0.0, accumulation=GLOBAL_MICRO_BATCHES // lay.dp_size,
                              steps=3, warmup_steps=1, save_steps=100, sharding=sharding if sharded else "ddp",
                              dtype=dtype if sharded else "float32", measure=True)
    if sharded:
        train(lay, f"{folder}/llama", f"{out}/kill_reference", teacher_path=f"{folder}/llama_teacher", **KILL_FLAGS)
    return results


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    two = run_distributed(_train_all, 2, str(models), str(out / "two"), True)
    one = run_distributed(_train_all, 1, str(models), str(out / "one"), False)[0]
    return out, one, two


@pytest.mark.parametrize("name", ["causal", "causal_lora", "t5", "t5_lora", "causal_offload"])
def test_two_sharded_ranks_train_what_one_process_trains(runs, name):
    out, one, two = runs
    reference = "causal" if name == "causal_offload" else name
    assert two[0][name]["losses"] == two[1][name]["losses"]
    assert two[0][name]["losses"] == pytest.approx(one[reference]["losses"], rel=1e-5, abs=1e-5)
    norms = [[r["grad_norm"] for r in read_jsonl(str(out / run / "log.jsonl"))] for run in (f"one/{reference}",
                                                                                            f"two/{name}")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)  # the global norm (clipped at 1: full fine-tuning's > 1)
    assert max(norms[0]) > 1.0 or CONFIGS[name][1]
    a = read_tensors(str(out / "one" / reference / "final" / "model.safetensors"))
    b = read_tensors(str(out / "two" / name / "final" / "model.safetensors"))
    assert set(a) == set(b) and not any("lora" in k for k in a)  # LoRA merged on export
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-5)
    logits_one = torch.load(out / "one" / reference / "logits.pt", weights_only=True)
    logits_two = torch.load(out / "two" / name / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits_two, logits_one, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["causal", "causal_lora", "t5", "t5_lora"])
def test_the_exported_folder_loads_with_from_pretrained_and_gives_the_training_models_logits(runs, name):
    out, _, _ = runs
    seq2seq = CONFIGS[name][0] == "t5"
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    loaded = auto.from_pretrained(str(out / "two" / name / "final"), local_files_only=True).eval()
    with torch.no_grad():
        logits = loaded(**probe(seq2seq)).logits
    torch.testing.assert_close(logits, torch.load(out / "two" / name / "logits.pt", weights_only=True), atol=1e-5, rtol=1e-5)
    assert hf.load_tokenizer(str(out / "two" / name / "final")).pad_token == "<pad>"


def test_bf16_parameters_train_close_to_fp32_and_the_master_weights_stay_fp32(runs):
    _, one, two = runs
    assert two[0]["causal_bf16"]["losses"] == pytest.approx(one["causal"]["losses"], rel=2e-2)
    assert two[0]["causal_bf16"]["bytes"] == two[0]["causal"]["bytes"]  # fp32 shards and AdamW states


@pytest.mark.parametrize("name", ["causal", "causal_lora", "t5"])
def test_each_of_two_ranks_holds_half_the_parameter_gradient_and_optimiser_bytes(runs, name):
    _, one, two = runs
    whole = one[name]["bytes"]
    for part in ("params", "grads", "optimizer", "teacher"):
        shards = [rank[name]["bytes"][part] for rank in two]
        assert whole[part] > 0
        assert sum(shards) == pytest.approx(whole[part], rel=0.01)  # AdamW's step counters exist per rank
        assert all(0.4 < s / whole[part] < 0.6 for s in shards), (part, shards, whole[part])


@pytest.mark.parametrize("name", ["causal", "t5_lora"])
def test_the_memory_plan_gives_the_measured_bytes_within_ten_percent(runs, models, name):
    _, one, two = runs
    family, lora_rank = CONFIGS[name][:2]
    for world, mode, measured in ((1, "ddp", one[name]["bytes"]), (2, "fsdp", two[0][name]["bytes"])):
        plan = memory_plan.model_states(str(models / family), str(models / f"{family}_teacher"), lora_rank=lora_rank,
                                        mode=mode, gpus=world)
        for part in ("params", "grads", "optimizer", "teacher"):
            assert plan[part] == pytest.approx(measured[part], rel=0.1), (mode, part, plan[part], measured[part])


def test_kill_9_mid_step_of_a_sharded_run_then_the_same_command_gives_the_same_weights(models, runs, tmp_path):
    """On-policy samples (generated on gathered weights) and a sharded teacher; killed in step 4 of 4, after its
    first micro-batch's backward, with a torn save of step 4 left behind; the reference ran uninterrupted."""
    out, _, _ = runs
    flags = dict(KILL_FLAGS, teacher_path=models / "llama_teacher")
    proc = subprocess.Popen(command(models / "llama", tmp_path, 2, pause_at=3, **flags), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and not (tmp_path / "paused").exists():
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "final").exists()
    torn = tmp_path / "checkpoints" / "step-00000004" / "sharded"
    torn.mkdir(parents=True)
    (torn / "__0_0.distcp").write_bytes(b"torn")

    assert "starting at step 2" in finish(start(models / "llama", tmp_path, 2, **flags))  # the same command again
    with open(tmp_path / "checkpoints" / "step-00000004" / "state.json") as f:
        assert json.load(f)["sharding"] == "fsdp"
    expected = read_tensors(str(out / "two" / "kill_reference" / "final" / "model.safetensors"))
    resumed = read_tensors(str(tmp_path / "final" / "model.safetensors"))
    assert set(expected) == set(resumed) and all(torch.equal(expected[k], resumed[k]) for k in expected)
    losses = lambda d: {r["step"]: r["loss"] for r in read_jsonl(str(d / "log.jsonl"))}  # noqa: E731 (last wins)
    assert losses(tmp_path) == losses(out / "two" / "kill_reference")
    two_ranks = Layout(rank=0, world_size=2, tp_rank=0, tp_size=1, dp_rank=0, dp_size=2, device=torch.device("cpu"))
    student = hf.load_model(str(models / "llama"))
    with pytest.raises(UserError, match=r"step-00000004 was saved by a FSDP run, this run uses DDP.*same --fsdp"):
        load_checkpoint(str(tmp_path), two_ranks, student, torch.optim.AdamW(student.parameters()))


def _lora_run_run_again(folder: str, out: str) -> dict:
    """A sharded LoRA run of 4 steps, then the same command again: it resumes from its step-4 checkpoint, which
    holds the adapters and their optimiser states but not the frozen base weights, and trains no more."""
    lay = setup(1)
    flags = dict(lora_rank=4, lora_dropout=0.0, steps=4, accumulation=1, save_steps=2, warmup_steps=1,
                 sharding="fsdp")
    whole = train(lay, f"{folder}/llama", out, **flags)
    logits = torch.load(f"{out}/logits.pt", weights_only=True)
    again = train(lay, f"{folder}/llama", out, **flags)
    return {"whole": whole["losses"], "again": again["losses"], "logits": logits,
            "again_logits": torch.load(f"{out}/logits.pt", weights_only=True)}


def test_a_sharded_lora_run_resumes_from_a_checkpoint_without_the_frozen_base(models, tmp_path):
    result = run_distributed(_lora_run_run_again, 2, str(models), str(tmp_path / "run"))[0]
    assert len(result["whole"]) == 4 and result["again"] == []
    assert torch.equal(result["logits"], result["again_logits"])


def test_the_users_fsdp_flags_map_onto_the_sharding_and_bad_ones_name_the_fix():
    assert sharding_from_flag(None) == sharding_from_flag(False) == sharding_from_flag("") == "ddp"
    assert sharding_from_flag(True) == sharding_from_flag("full_shard auto_wrap") == "fsdp"
    assert sharding_from_flag("full_shard auto_wrap offload") == sharding_from_flag("offload") == "fsdp_offload"
    with pytest.raises(UserError, match=r"--fsdp 'shard_grad_op': shard_grad_op is not built.*full_shard auto_wrap"):
        sharding_from_flag("shard_grad_op")


def test_fp16_under_fsdp_is_refused_with_the_fix(models):
    student = hf.load_model(str(models / "llama"))
    with pytest.raises(UserError, match="FSDP trains in bfloat16 or float32.*use --dtype bfloat16"):
        wrap_model(student, ONE, "fsdp", "float16")  # before any collective: no process group needed
