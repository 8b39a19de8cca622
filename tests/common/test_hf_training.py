"""common.hf_training: DDP with accumulation equals one process, kill -9 + rerun is bit-identical, schedules,
clipping under loss scaling, gradient checkpointing, checkpoints, export that from_pretrained loads.

The two multi-process tests run tests/common/tiny_hf_train.py (a miniature HF-only train.py) as a real
subprocess: plain python for one rank, torchrun for two (gloo).
"""
import contextlib
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from common import hf
from common.distributed import Layout
from common.hf_training import (autocast, clip_gradients, enable_gradient_checkpointing, export_model, grad_scaler,
                                load_checkpoint, lr_schedule, optimizer_step, save_checkpoint)
from common.io import read_jsonl, read_tensors
from tests.common.tiny_hf_train import item
from tests.tiny import char_tokenizer, save_tiny, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "common", "tiny_hf_train.py")
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
ONE = Layout(rank=0, world_size=1, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))


def command(model_path, save_dir, nproc: int, **flags) -> list:
    args = [SCRIPT, f"--model_path={model_path}", f"--save_dir={save_dir}"] + [f"--{k}={v}" for k, v in flags.items()]
    if nproc == 1:
        return [sys.executable] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args


def start(model_path, save_dir, nproc: int, **flags) -> subprocess.Popen:
    return subprocess.Popen(command(model_path, save_dir, nproc, **flags), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in sessions of their own)."""
    pids, frontier = [pid], [pid]
    while frontier:
        for children in glob.glob(f"/proc/{frontier.pop()}/task/*/children"):
            with open(children) as f:
                kids = [int(k) for k in f.read().split()]
            pids += kids
            frontier += kids
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def final_weights(save_dir) -> dict:
    return read_tensors(os.path.join(save_dir, "final", "model.safetensors"))


def losses(save_dir) -> dict:
    return {row["step"]: row["loss"] for row in read_jsonl(os.path.join(save_dir, "log.jsonl"))}  # last write wins


def assert_hf_only(save_dir):
    with open(os.path.join(save_dir, "modules.json")) as f:
        assert json.load(f) == {"common.model": False, "common.parallel": False, "fairscale_model_parallel": False}


# ---------------------------------------------------------------------------- multi-process runs

def test_two_ranks_accumulating_two_equal_one_rank_accumulating_four(tmp_path):
    counted = [int((item(i)[1][:, 1:] != -100).sum()) for i in range(4)]
    assert len(set(counted)) > 1  # the micro-batches of a step hold unequal numbers of counted tokens
    model = save_tiny("gpt2", tmp_path / "gpt2", **NO_DROPOUT)
    runs = [start(model, tmp_path / "one", 1, accumulation=4, steps=4),
            start(model, tmp_path / "two", 2, accumulation=2, steps=4)]
    for proc in runs:
        finish(proc)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert one[step] == pytest.approx(two[step], abs=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], tiny_model("gpt2").state_dict()["transformer.h.0.attn.c_attn.weight"])
    assert_hf_only(tmp_path / "one")  # an HF-only run: no TP model imported, fairscale model parallel untouched
    assert_hf_only(tmp_path / "two")


def test_kill_9_mid_run_then_the_same_command_gives_bit_identical_weights(tmp_path):
    model = save_tiny("gpt2", tmp_path / "gpt2")  # dropout 0.1 on
    flags = dict(steps=6, accumulation=2, sample=True, save_steps=2, schedule="cosine", warmup_steps=2)
    reference = start(model, tmp_path / "reference", 2, **flags)
    proc = subprocess.Popen(command(model, tmp_path / "run", 2, hold_after=3, **flags), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 600
    while not (log.exists() and len(read_jsonl(str(log), drop_partial_last=True)) >= 3):  # step 3 done: it holds
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
        time.sleep(0.02)
    kill_tree(proc.pid)  # torchrun and both workers, held after step 3
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "run" / "final").exists()
    finish(reference)

    out = finish(start(model, tmp_path / "run", 2, **flags))  # the same command again
    first = int(out.split("starting at step ")[1].split()[0])
    assert first == 2  # resumed mid-run from the last checkpoint (saves every 2 steps), not from scratch
    reference, resumed = final_weights(tmp_path / "reference"), final_weights(tmp_path / "run")
    assert set(reference) == set(resumed) and all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")


# ---------------------------------------------------------------------------- schedules, precision, clipping

def schedule_lrs(name, steps=10, lr=1.0, **kwargs) -> list:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_schedule(opt, name, total_steps=steps, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedules_warm_up_linearly_then_follow_their_formula():
    assert schedule_lrs("constant", warmup_steps=4) == pytest.approx([0, .25, .5, .75, 1, 1, 1, 1, 1, 1])
    assert schedule_lrs("linear", warmup_steps=2) == pytest.approx([0, .5, 1, .875, .75, .625, .5, .375, .25, .125])
    min_lr = 0.1
    cosine = [min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(2, 10)]
    assert schedule_lrs("cosine", warmup_steps=2, min_lr=min_lr) == pytest.approx([0, .5] + cosine)
    with pytest.raises(ValueError, match="one of constant, linear, cosine; got 'cosinus'"):
        schedule_lrs("cosinus")


def test_cosine_without_warmup_is_torch_cosine_annealing():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-7)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        torch_sched.step()
    assert schedule_lrs("cosine", lr=5e-4, min_lr=1e-7) == pytest.approx(expected, rel=1e-9)


def loss_of(model, ids):
    return F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def test_clipping_under_fp16_loss_scaling_returns_the_true_gradient_norm():
    ids = torch.randint(4, 100, (2, 8))
    model = tiny_model("gpt2")
    loss_of(model, ids).backward()
    true_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    scaled = tiny_model("gpt2")
    opt = torch.optim.SGD(scaled.parameters(), lr=0.1)
    scaler = grad_scaler("float16", "cpu")
    assert scaler.is_enabled() and not grad_scaler("bfloat16", "cpu").is_enabled()
    scaler.scale(loss_of(scaled, ids)).backward()
    norm = clip_gradients(opt, 0.5, scaler)
    assert norm == pytest.approx(true_norm.item(), rel=1e-5)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in scaled.parameters() if p.grad is not None]))
    assert clipped.item() == pytest.approx(0.5, rel=1e-4)


def test_optimizer_step_with_an_inf_gradient_skips_the_update_and_the_schedule():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = lr_schedule(opt, "linear", warmup_steps=0, total_steps=10)
    scaler = grad_scaler("float16", "cpu")
    scaler.scale(p.sum() * float("inf")).backward()
    optimizer_step(opt, sched, scaler, max_grad_norm=1.0)
    assert torch.equal(p.detach(), torch.ones(2)) and sched.last_epoch == 0 and p.grad is None
    scaler.scale(p.sum()).backward()
    optimizer_step(opt, sched, scaler, max_grad_norm=None)
    assert torch.equal(p.detach(), torch.zeros(2)) and sched.last_epoch == 1


def test_bf16_autocast_runs_the_forward_in_bf16_and_float32_is_untouched():
    model, ids = tiny_model("llama"), torch.randint(4, 100, (1, 5))
    with autocast("bfloat16", "cpu"):
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    with autocast("float32", "cpu"):
        assert model(input_ids=ids).logits.dtype == torch.float32


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora):
    ids = torch.randint(4, 100, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        model = hf.add_lora(model, r=4, alpha=8) if lora else model
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        loss = loss_of(model, ids)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and set(g0) == set(g1) and g0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- checkpoints and export

def trained(model, steps=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = lr_schedule(opt, "cosine", warmup_steps=1, total_steps=10)
    for _ in range(steps):
        loss_of(model, torch.randint(4, 100, (2, 6))).backward()
        optimizer_step(opt, sched)
    return opt, sched


def test_lora_checkpoint_restores_adapters_optimizer_schedule_and_rng_and_skips_an_interrupted_save(tmp_path):
    torch.manual_seed(0)
    model = hf.add_lora(tiny_model("gpt2"), r=4, alpha=8, dropout=0.1).train()
    opt, sched = trained(model)
    save_checkpoint(str(tmp_path), {"step": 2, "position": 7}, ONE, model, opt, sched, tokenizer=char_tokenizer())
    after_save = torch.rand(3)
    (tmp_path / "checkpoints" / "step-00000003").mkdir()  # a later save that died before its state.json

    fresh = hf.add_lora(tiny_model("gpt2"), r=4, alpha=8, dropout=0.1)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    fresh_sched = lr_schedule(fresh_opt, "cosine", warmup_steps=1, total_steps=10)
    state = load_checkpoint(str(tmp_path), ONE, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 2 and state["position"] == 7
    assert torch.equal(torch.rand(3), after_save)  # this rank's RNG continues where the saved run was
    saved, restored = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.equal(saved[n], restored[n]) for n in saved)
    assert fresh_sched.state_dict() == sched.state_dict()
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert os.path.exists(tmp_path / "checkpoints" / "step-00000002" / "model" / "adapter_model.safetensors")
    assert load_checkpoint(str(tmp_path / "fresh"), ONE, fresh, fresh_opt) is None


def test_resume_from_another_model_or_world_size_names_the_folder_and_the_fix(tmp_path):
    model = tiny_model("gpt2")
    opt, _ = trained(model, steps=1)
    folder = save_checkpoint(str(tmp_path), {"step": 1}, ONE, model, opt)
    lora = hf.add_lora(tiny_model("gpt2"), r=4, alpha=8)
    with pytest.raises(ValueError, match=r"step-00000001 was saved from another model \(GPT2LMHeadModel, .*\), this run "
                                         r"trains GPT2LMHeadModel with LoRA.*same model and LoRA settings.*--save_dir"):
        load_checkpoint(str(tmp_path), ONE, lora, torch.optim.AdamW(lora.parameters()))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(dict(state, dp_size=2), f)
    with pytest.raises(ValueError, match=r"step-00000001 was saved by 2 data-parallel processes, this run has 1.*"
                                         r"--nproc_per_node 2"):
        load_checkpoint(str(tmp_path), ONE, model, opt)


@pytest.mark.parametrize("lora", [False, True])
def test_exported_folder_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path, lora):
    model = tiny_model("gpt2")
    if lora:
        model = hf.add_lora(model, r=4, alpha=8)
    trained(model)
    export_model(model, char_tokenizer(), str(tmp_path / "export"))
    assert not os.path.exists(tmp_path / "export" / "adapter_config.json")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), local_files_only=True).eval()
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        expected, got = model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
    if lora:
        assert hf.is_lora(model)  # exporting did not merge the live model
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, expected)
    exported_tokenizer = hf.load_tokenizer(str(tmp_path / "export"))
    assert exported_tokenizer.encode("hi", add_special_tokens=False) == char_tokenizer().encode("hi", add_special_tokens=False)
