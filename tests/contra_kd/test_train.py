"""contra_kd/train.py: --type parsing, the DistiLLM-2 reduction, 1 vs 2 processes (gloo) on the same global
batch for distillm+contra with the velocity-field re-fit, and bit-exact resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

from common.losses import skew_forward_kl
from contra_kd.flow import Projector, VelocityField, save_flow
from contra_kd.prepare_data import dolly, pretrain
from contra_kd.train import ALIASES, main, parse_type, per_sequence_mean
from tests.tiny import char_tokenizer, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def test_types_and_original_aliases_resolve():
    assert parse_type("sft", "srkl") == ("sft", False, "srkl")
    assert parse_type("distillm+contra", "skl") == ("distillm", True, "skl")
    assert parse_type("adaptive-sfkl", "srkl") == ("distillm", False, "skl")
    assert parse_type("adaptive-srkl-contra", "skl") == ("distillm", True, "srkl")
    assert parse_type("srkl-aesop", "srkl") == ("distillm", False, "srkl")  # adaptive SGOs kept (upstream bug 3)
    assert parse_type("rkl-contra-fdd", "srkl")[:2] == ("fdd", True)
    assert parse_type("distillm2-v2-contra", "srkl")[:2] == ("distillm2", True)
    assert set(ALIASES) == {"adaptive-sfkl", "adaptive-srkl", "srkl-aesop", "rkl-fdd", "adaptive-srkl-contra",
                            "rkl-contra-fdd", "distillm2-v2", "distillm2-v2-contra"}


def test_unknown_type_is_one_line_listing_the_valid_ones():
    for bad in ("minillm", "sft+contra", "kd+contra"):
        with pytest.raises(ValueError, match=r"--type .* is not one of: sft, kd, seqkd, distillm, fdd, distillm2, "
                                             r"distillm\+contra, fdd\+contra, distillm2\+contra, adaptive-sfkl") as e:
            parse_type(bad, "srkl")
        assert "\n" not in str(e.value)


def test_distillm2_reduction_is_the_mean_over_sequences_of_token_means():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    got = per_sequence_mean(skew_forward_kl, s, t, mask, range(3), alpha=0.1) / 3
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    per_token = (p * (p.log() - (0.1 * p + 0.9 * q).log())).sum(-1)
    want = sum(per_token[b][mask[b]].mean() for b in range(3)) / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny GPT-2 teacher (4 layers) and student (2 layers), no dropout; 16 train / 4 dev Dolly stand-in items
    with short prompts; 40 OWT stand-in chunks; a random velocity field for 2 paired layers."""
    root = tmp_path_factory.mktemp("contra")
    save_tiny("gpt2", root / "teacher", seed=1, n_layer=4, n_embd=48, **NO_DROPOUT)
    save_tiny("gpt2", root / "student", seed=2, **NO_DROPOUT)
    with open(os.path.join(ROOT, "data/contra_kd/dolly_standin/train.jsonl")) as f:
        records = [r for r in map(json.loads, f) if len(r["prompt"]) <= 200][:20]
    os.makedirs(root / "raw")
    for name, part in (("train.jsonl", records[:16]), ("dev.jsonl", records[16:])):
        with open(root / "raw" / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    dolly(str(root / "raw"), str(root / "dolly"), str(root / "student"), "tiny", max_prompt_length=200)
    with open(os.path.join(ROOT, "data/contra_kd/owt_standin.txt")) as f, open(root / "owt.txt", "w") as out:
        out.writelines(line for _, line in zip(range(60), f))
    pretrain(str(root / "owt.txt"), str(root / "owt"), str(root / "student"), "tiny", max_length=96, dev_num=2,
             train_num=40)
    torch.manual_seed(3)
    save_flow(str(root / "vf.safetensors"), str(root / "proj.safetensors"),
              VelocityField(48, width=16, num_distill_layers=2, num_blocks=1), Projector(32, 48),
              {"student_layers": [0, 1], "teacher_layers": [1, 2]})
    return root


def _args(root, save, **extra):
    flags = {"type": "adaptive-srkl-contra", "model-path": root / "student", "teacher-model-path": root / "teacher",
             "data-dir": root / "dolly/full/tiny", "lm-data-dir": root / "owt/tiny/96/40", "save": save,
             "epochs": 2, "num-distill-layers": 2, "velocity-field": root / "vf.safetensors",
             "projector": root / "proj.safetensors", "velocity-dropout": 0.0, "max-length": 232,
             "max-prompt-length": 200, "eval-batch-size": 4, "seed": 5, **extra}
    return [f"--{k}={v}" for k, v in flags.items()]


def _run(args, nproc=1, wait=True):
    """contra_kd/train.py as a command (torchrun --standalone for 2 processes: its store binds a port the OS
    picks, so parallel test runs cannot collide); output to a file, so a full pipe never blocks the run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(launcher + [os.path.join(ROOT, "contra_kd/train.py")] + args, env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    if not wait:
        return proc
    proc.wait(timeout=900)
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    return out


def _output(proc):
    proc.log.seek(0)
    return proc.log.read()


def _curve(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["unit"], r.get("loss", r.get("loss_rf"))) for r in rows if r["kind"] == "step"]


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


# global batch 4: 1 process x batch 2 x GA 2 == 2 processes x batch 2 x GA 1. θ = 0.5 with a buffer that never
# fills: about half the steps train on fresh student outputs (SGO), the rest on ground truth (replay, drawn from
# each rank's own buffer, is the one source that differs with the number of processes).
TWO_PROCESSES = {"batch-size": 2, "init-threshold": 0.5, "capacity": 1000, "loss-eps": 100.0}


@pytest.fixture(scope="module")
def one_process(workspace, tmp_path_factory):
    save = tmp_path_factory.mktemp("contra_one")
    _run(_args(workspace, save, **TWO_PROCESSES, **{"gradient-accumulation-steps": 2}))
    return save


@pytest.mark.parametrize("fsdp", [False, True])  # DDP; FSDP (dev evaluation and sampling on gathered weights)
def test_two_processes_follow_the_one_process_loss_curve_for_distillm_contra_with_refit(workspace, one_process,
                                                                                        tmp_path, fsdp):
    _run(_args(workspace, tmp_path / "two", **TWO_PROCESSES, **({"fsdp": True} if fsdp else {})), nproc=2)
    one, two = _curve(one_process), _curve(tmp_path / "two")
    sources = [json.loads(line).get("source") for line in open(one_process / "metrics.jsonl")]
    assert {"generate", "ground_truth"} <= set(sources)
    assert sources == [json.loads(line).get("source") for line in open(tmp_path / "two/metrics.jsonl")]
    assert [u for u, _ in one] == [u for u, _ in two] and len(one) == 2 * 4 + 4  # 2 epochs x 4 steps + 4 re-fit
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for name, w in _weights(one_process / "final").items():
        assert torch.allclose(w, _weights(tmp_path / "two/final")[name], atol=1e-5), name
    rouge = [[r["dev_rougeL"] for r in map(json.loads, open(d / "metrics.jsonl")) if "dev_rougeL" in r]
             for d in (one_process, tmp_path / "two")]
    assert len(rouge[1]) == 2 and all(r >= 0 for r in rouge[1])


def _wait_for_unit(proc, save, unit):
    """Until metrics.jsonl has a complete line (the run appends them: the last may be half written) of `unit`."""
    path = os.path.join(save, "metrics.jsonl")
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")[:-1]      # the part after the last newline may be unfinished
            if any(json.loads(line)["unit"] >= unit for line in lines if line.strip()):
                return
        time.sleep(0.05)
    raise AssertionError(f"run ended or stalled before unit {unit}: {_output(proc)[-2000:]}")


def test_kill_minus_nine_in_student_epoch_and_in_refit_then_rerun_gives_the_same_final_weights(workspace, tmp_path):
    # θ 0.5: SGO generation and replay (buffer in the checkpoint) happen in the run; a checkpoint every unit
    extra = {"batch-size": 4, "init-threshold": 0.5, "capacity": 6, "save-steps": 1}
    _run(_args(workspace, tmp_path / "straight", **extra))
    interrupted = tmp_path / "killed"
    # units: 0 start, 1-4 epoch 0 steps, 5 epoch end, 6-9 re-fit, 10 re-fit end, 11-14 epoch 1, 15 epoch end
    for unit in (2, 7):
        proc = _run(_args(workspace, interrupted, **extra), wait=False)
        _wait_for_unit(proc, interrupted, unit)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    out = _run(_args(workspace, interrupted, **extra))
    assert "resumed" in out
    sources = {json.loads(line).get("source") for line in open(interrupted / "metrics.jsonl")}
    assert {"ground_truth", "generate", "replay"} <= sources
    straight, killed = _weights(tmp_path / "straight/final"), _weights(interrupted / "final")
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name
    assert _curve(tmp_path / "straight") == _curve(interrupted)


def test_lora_on_a_model_peft_cannot_wrap_is_one_clear_line(workspace, tmp_path):
    from transformers import AutoModelForCausalLM, OpenAIGPTConfig
    folder = tmp_path / "openai-gpt"
    AutoModelForCausalLM.from_config(OpenAIGPTConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match=r"--peft lora: peft cannot wrap .*openai-gpt \(openai-gpt\) with its "
                                         r"default targets") as e:
        main(type="sft", model_path=str(folder), data_dir=str(workspace / "dolly/full/tiny"),
             save=str(tmp_path / "x"), peft="lora")
    assert "\n" not in str(e.value)


def test_generated_tgo_sgo_pair_up_and_train_distillm2_contra(workspace, tmp_path):
    from common.binarized import IndexedTokens
    from contra_kd.data import InstructionSplit
    from contra_kd.generate_data import main as generate_data

    src = str(workspace / "dolly/full/tiny")
    from contra_kd.train_velocity_field import flow_data

    for name, model, new_tokens in (("tgo", "teacher", None), ("sgo", "student", 8)):
        generate_data(str(workspace / model), src, str(tmp_path / "d2" / name), max_length=232, max_prompt_length=200,
                      max_new_tokens=new_tokens, batch_size=8, seed=1)
    tok = char_tokenizer()
    source, tgo, sgo = (InstructionSplit(p, "train") for p in (src, tmp_path / "d2/tgo", tmp_path / "d2/sgo"))
    assert len(tgo) == len(sgo) == len(source) == 16
    for i in range(len(source)):
        assert tgo[i][0] == sgo[i][0] == source[i][0]                      # same prompts, in order
        assert 0 < len(tgo[i][1]) <= 32 and tgo.records[i]["reference"] == source.records[i]["output"]
        assert 0 < len(sgo[i][1]) <= 8  # --max-new-tokens
        assert tgo.records[i]["output"] == tok.decode(tgo[i][1], skip_special_tokens=True).strip()
    # the DistiLLM-2 velocity field trains on both outputs (CONTRA's lm-distillm2 batches hold chosen and rejected)
    assert flow_data(str(tmp_path / "d2")) == [tgo[i] for i in range(16)] + [sgo[i] for i in range(16)]
    assert IndexedTokens(str(tmp_path / "d2/tgo/valid_0")).sizes.tolist() == \
        IndexedTokens(src + "/valid_0").sizes.tolist()
    out = _run(_args(workspace, tmp_path / "run", **{"type": "distillm2-v2-contra", "data-dir": tmp_path / "d2",
                                                     "gt-data-dir": src, "batch-size": 4, "epochs": 1,
                                                     "gradual-beta": True}))
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 4 and all(r["loss_tgo_skl"] > 0 and r["loss_sgo_srkl"] > 0 for r in steps)
    assert "best epoch 0" in out


@pytest.mark.parametrize("type_,terms", [("kd", ("loss_ce", "loss_kd")),
                                         ("fdd+contra", ("loss_ce", "loss_rkl", "loss_fdd", "loss_contra")),
                                         ("adaptive-sfkl", ("loss_ce", "loss_skl"))])
def test_each_type_logs_its_terms_and_the_total_is_their_weighted_sum(workspace, tmp_path, type_, terms):
    save = tmp_path / "run"
    main(type=type_, model_path=str(workspace / "student"), teacher_model_path=str(workspace / "teacher"),
         data_dir=str(workspace / "dolly/full/tiny"), lm_data_dir=str(workspace / "owt/tiny/96/40"), save=str(save),
         epochs=1, batch_size=8, kd_ratio=0.5, lm_coef=0.7, num_distill_layers=2,
         velocity_field=str(workspace / "vf.safetensors"), projector=str(workspace / "proj.safetensors"),
         max_length=232, max_prompt_length=200, eval_batch_size=4, seed=5, save_interval=1)
    steps = [json.loads(line) for line in open(save / "metrics.jsonl") if '"step"' in line]
    assert sorted(p.name for p in save.glob("step-*")) == ["step-1"]  # --save-interval 1 of 2 steps (2: final/)
    assert len(steps) == 2
    for row in steps:
        assert all(row[t] > 0 for t in terms)
        distill = sum(row[t] for t in terms if t not in ("loss_ce", "loss_contra"))
        want = 0.5 * row["loss_ce"] + 0.5 * distill + 0.5 * row.get("loss_contra", 0.0) + 0.7 * row["loss_lm"]
        assert row["loss"] == pytest.approx(want, rel=1e-5)
    assert (save / "final/model.safetensors").exists() and (save / "best/model.safetensors").exists()


def test_resume_with_another_plan_is_one_clear_line(workspace, tmp_path):
    args = dict(type="sft", model_path=str(workspace / "student"), data_dir=str(workspace / "dolly/full/tiny"),
                save=str(tmp_path / "run"), batch_size=8, max_length=232, max_prompt_length=200, eval_batch_size=4)
    main(epochs=1, **args)
    with pytest.raises(ValueError, match=r"run holds a run of .*'units': 4.* this command plans .*'units': 7") as e:
        main(epochs=2, **args)
    assert "\n" not in str(e.value)


# ---- each objective on one fixed batch against its formula, written here in float64 ----

def _reference_rows(model_dir, split_dir, max_length, hidden=False):
    """Per sequence of the split: float64 logits at the positions that predict response tokens, the response
    tokens, and (hidden) the hidden states at those positions. A response is cut so prompt + response fits."""
    from transformers import AutoModelForCausalLM

    from contra_kd.data import InstructionSplit
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    split = InstructionSplit(str(split_dir), "train")
    rows = []
    with torch.no_grad():
        for i in range(len(split)):
            prompt, response = split[i]
            response = response[:max_length - len(prompt)]
            out = model(torch.tensor([prompt + response]), output_hidden_states=hidden)
            at = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
            rows.append(dict(logits=out.logits[0, at], targets=torch.tensor(response),
                             hidden=[h[0, at] for h in out.hidden_states] if hidden else None))
    return model, rows


def _skl(p, q, a=0.1):
    return (p * (p.log() - (a * p + (1 - a) * q).log())).sum(-1)


def _srkl(p, q, a=0.1):
    return (q * (q.log() - ((1 - a) * p + a * q).log())).sum(-1)


def _pairing(n_layers, n_distill):
    import numpy as np
    return [int(x) for x in np.linspace(0, n_layers, n_distill + 2)[1:-1]]  # losses.md §4.2


@pytest.mark.parametrize("type_", ["kd", "adaptive-sfkl", "adaptive-srkl", "rkl-fdd", "adaptive-srkl-contra",
                                   "distillm2-v2"])
def test_each_objective_on_a_fixed_batch_equals_its_formula(workspace, tmp_path, type_):
    from contra_kd.flow import load_flow
    from contra_kd.generate_data import main as generate_data

    lam, max_length = 0.5, 232
    data_dir, gt = workspace / "dolly/full/tiny", workspace / "dolly/full/tiny"
    if type_ == "distillm2-v2":
        data_dir = tmp_path / "d2"
        for name, model in (("tgo", "teacher"), ("sgo", "student")):
            generate_data(str(workspace / model), str(gt), str(data_dir / name), max_length=max_length,
                          max_prompt_length=200, max_new_tokens=8, batch_size=16, seed=1)
    main(type=type_, model_path=str(workspace / "student"), teacher_model_path=str(workspace / "teacher"),
         data_dir=str(data_dir), gt_data_dir=str(gt), save=str(tmp_path / "run"), epochs=1, batch_size=16,
         kd_ratio=lam, num_distill_layers=2, velocity_field=str(workspace / "vf.safetensors"),
         projector=str(workspace / "proj.safetensors"), velocity_dropout=0.0, max_length=max_length,
         max_prompt_length=200, eval_batch_size=8, seed=5, select_by="loss")
    (row,) = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl") if '"step"' in line]
    assert row["source"] == "ground_truth"

    if type_ == "distillm2-v2":  # mean over pairs of the per-sequence token means; β = 1
        terms = {}
        for name, divergence, key in (("tgo", _skl, "loss_tgo_skl"), ("sgo", _srkl, "loss_sgo_srkl")):
            _, s_rows = _reference_rows(workspace / "student", data_dir / name, max_length)
            _, t_rows = _reference_rows(workspace / "teacher", data_dir / name, max_length)
            terms[key] = sum(divergence(t["logits"].softmax(-1), s["logits"].softmax(-1)).mean()
                             for s, t in zip(s_rows, t_rows)).item() / len(s_rows)
        terms["loss"] = terms["loss_tgo_skl"] + terms["loss_sgo_srkl"]
    else:
        hidden = type_ in ("rkl-fdd", "adaptive-srkl-contra")
        student, s_rows = _reference_rows(workspace / "student", data_dir, max_length, hidden)
        teacher, t_rows = _reference_rows(workspace / "teacher", data_dir, max_length, hidden)
        zs = torch.cat([r["logits"] for r in s_rows])
        zt = torch.cat([r["logits"] for r in t_rows])
        y = torch.cat([r["targets"] for r in s_rows])
        q, p = zs.softmax(-1), zt.softmax(-1)
        ce = -q.log().gather(-1, y[:, None]).mean()
        terms = {"loss_ce": ce.item()}
        if type_ == "kd":
            terms["loss_kd"] = -(p * q.log()).sum(-1).mean().item()
        elif type_ == "adaptive-sfkl":
            terms["loss_skl"] = _skl(p, q).mean().item()
        else:
            terms["loss_srkl" if type_ != "rkl-fdd" else "loss_rkl"] = \
                (_srkl(p, q) if type_ != "rkl-fdd" else (q * (q.log() - p.log())).sum(-1)).mean().item()
        s_layers, t_layers = _pairing(2, 2), _pairing(4, 2)
        hs = [torch.cat([r["hidden"][j] for r in s_rows]) for j in s_layers] if hidden else []
        ht = [torch.cat([r["hidden"][j] for r in t_rows]) for j in t_layers] if hidden else []
        if type_ == "rkl-fdd":  # τ = 2 trajectory KL(p_T ‖ q_S) + derivative cosine, through each model's own head
            zS = [student.lm_head(h) for h in hs]
            zT = [teacher.lm_head(h) for h in ht]
            traj = [(F.softmax(b / 2, -1) * (F.log_softmax(b / 2, -1) - F.log_softmax(a / 2, -1))).sum(-1).mean()
                    for a, b in zip(zS, zT)]
            dS = F.log_softmax(zS[1], -1) - F.log_softmax(zS[0], -1)
            dT = F.log_softmax(zT[1], -1) - F.log_softmax(zT[0], -1)
            der = (1 - (dS * dT).sum(-1) / (dS.norm(dim=-1) * dT.norm(dim=-1))).mean()
            terms["loss_fdd"] = (sum(traj) / 2 + der).item()
        if type_ == "adaptive-srkl-contra":  # 1 - cos(a, a + k v(a, 0, j)), k = (epoch + 1) / E = 1
            field, projector = load_flow(str(workspace / "vf.safetensors"), str(workspace / "proj.safetensors"),
                                         {}, 0.0)
            field.eval()
            contra = []
            with torch.no_grad():
                for j, h in enumerate(hs):
                    a = projector(h.float()).double()
                    v = field(a.float(), torch.zeros(len(a)), torch.full((len(a),), j)).double()
                    contra.append((1 - F.cosine_similarity(a, a + v, dim=-1)).mean())
            terms["loss_contra"] = (sum(contra) / len(contra)).item()
        distill = sum(v for k, v in terms.items() if k not in ("loss_ce", "loss_contra"))
        terms["loss"] = (1 - lam) * ce.item() + lam * distill + lam * terms.get("loss_contra", 0.0)
    for name, want in terms.items():
        assert row[name] == pytest.approx(want, rel=2e-4, abs=1e-6), name
