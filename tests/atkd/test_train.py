import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from atkd import train
from atkd.train import KL_METHODS, collate, kd_loss, loss_terms, micro_batch_loss
from common import losses
from tests.tiny import char_tokenizer, save_tiny, tiny_model

EOS, PAD = 1, 0
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _batch():
    tok = char_tokenizer()
    prompts = [tok("Human:\nadd 1 2 \n\nAssistant:\n").input_ids, tok("Human:\nhi \n\nAssistant:\n").input_ids]
    responses = [tok("3", add_special_tokens=False).input_ids + [EOS],
                 tok("hello there", add_special_tokens=False).input_ids + [EOS]]
    return collate(prompts, responses, PAD, 512)


def _expected(kl_method, s, t, labels, setting="vanilla"):
    """The common.losses call each kl_method stands for (atkd.md §2), written out independently; the
    transformers convention for the targets (labels shifted left by one)."""
    labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    mask, g = labels != -100, labels.clamp(min=0)
    return {
        "forward": lambda: losses.forward_kl(s, t, mask=mask),
        "reverse": lambda: losses.reverse_kl(s, t, mask=mask),
        "jsd": lambda: 0.9 * losses.forward_kl(s, t, mask=mask) + 0.1 * losses.reverse_kl(s, t, mask=mask),
        "gjsd": lambda: losses.generalized_jsd(s, t, mask=mask, beta=0.5),
        "tvd": lambda: losses.tvd(s, t, mask=mask),
        "dkd": lambda: losses.dkd(s, t, mask=mask, target_ids=g, alpha=0.2, beta=1.0),
        "atkd": lambda: losses.atkd(s, t, mask=mask, target_ids=g, lam=0.2, reverse=setting == "reverse"),
        "seqkd": lambda: torch.nn.functional.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=-100),
    }[kl_method]()


@pytest.mark.parametrize("kl_method,setting", [(k, "vanilla") for k in KL_METHODS] + [("atkd", "reverse")])
def test_each_kl_method_training_loss_equals_the_common_losses_value(kl_method, setting):
    student, teacher, batch = tiny_model("opt", seed=1), tiny_model("opt", seed=2), _batch()
    loss = micro_batch_loss(student, teacher, batch, kl_method, setting=setting)[0]
    with torch.no_grad():  # oracle logits: the transformers models called directly
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _expected(kl_method, s, t, batch["labels"], setting)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert expected.item() > 0


def test_global_normaliser_makes_micro_batch_losses_add_up_to_the_whole_batch():
    student, teacher, batch = tiny_model("opt", seed=1), tiny_model("opt", seed=2), _batch()
    n = int((batch["labels"] != -100).sum())
    whole = micro_batch_loss(student, teacher, batch, "forward")[0]
    parts = [micro_batch_loss(student, teacher, {k: v[i:i + 1] for k, v in batch.items()}, "forward",
                              normalizer=n)[0] for i in range(2)]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.parametrize("setting", ["vanilla", "reverse"])
def test_logged_atkd_terms_recombine_into_the_loss(setting):
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 16), 2 * torch.randn(2, 9, 16)
    labels = torch.randint(0, 16, (2, 9))
    labels[0, :3] = -100  # targets aligned with the logits
    terms = {}
    loss = kd_loss("atkd", s, t, labels, setting=setting, parts=terms)
    assert terms["n_easy"] + terms["n_hard"] == 15 and abs(terms["n_easy"] - terms["n_hard"]) <= 1
    recombined = 0.2 * terms["nckd_easy"] + 0.8 * (terms["tckd_hard"] + terms["nckd_hard"])
    assert recombined == pytest.approx(loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(kd_loss("atkd", s, t, labels, setting=setting).item(), rel=1e-6)
    dkd = loss_terms("dkd", s, t, labels)
    assert 0.2 * dkd["tckd"] + dkd["nckd"] == pytest.approx(kd_loss("dkd", s, t, labels).item(), rel=1e-5)
    jsd = loss_terms("jsd", s, t, labels)
    assert 0.9 * jsd["fkl"] + 0.1 * jsd["rkl"] == pytest.approx(kd_loss("jsd", s, t, labels).item(), rel=1e-5)


# ---- runs ----

def _models(tmp_path, student_vocab=None):
    teacher = save_tiny("opt", tmp_path / "teacher", seed=1, **NO_DROPOUT)
    extra = {} if student_vocab is None else dict(vocab_size=student_vocab)
    student = save_tiny("opt", tmp_path / "student", seed=2, **NO_DROPOUT, **extra)
    return str(student), str(teacher)


def _data(tmp_path, n=4, teacher_jsonl=False):
    records = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w}."}
               for w in ["hi", "yes", "no", "ok", "sun", "sea", "red", "tea"][:n]]
    if not teacher_jsonl:
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
        return str(path)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Human:\n{r['instruction']} \n\nAssistant:\n",
                                        "teacher_output": r["output"].upper(), "output": r["output"]}) + "\n"
                            for r in records))
    return str(path)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kl_method", KL_METHODS)
def test_a_short_run_of_each_kl_method_reduces_its_loss(tmp_path, kl_method):
    student, teacher = _models(tmp_path)
    out = tmp_path / "out"
    train.main(student, teacher, _data(tmp_path), str(out), kl_method=kl_method, per_device_train_batch_size=4,
               gradient_accumulation_steps=1, num_train_epochs=12, learning_rate=1e-2, warmup_ratio=0.0,
               lr_scheduler_type="constant", model_max_length=64)
    loss = [r["loss"] for r in _metrics(out)]  # the same 4 items every step
    assert len(loss) == 12 and loss[-1] < 0.7 * loss[0], loss
    assert (out / "model" / "model.safetensors").exists()


def test_step_record_holds_loss_terms_lr_grad_norm_and_throughput(tmp_path):
    student, teacher = _models(tmp_path)
    out = tmp_path / "out"
    train.main(student, teacher, _data(tmp_path, teacher_jsonl=True), str(out), kl_method="atkd",
               sample_source="mix_request_teacher", per_device_train_batch_size=1, max_steps=4, model_max_length=48,
               warmup_ratio=0.5)
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "n_easy", "n_hard", "nckd_easy", "tckd_hard", "nckd_hard", "lr", "grad_norm",
                "tokens_per_s", "generation_share"} <= set(r)
        assert r["n_easy"] + r["n_hard"] == r["targets"]
    lrs = [r["lr"] for r in records]  # warmup 2 steps, then cosine down (the schedule is common's, tested there)
    assert lrs[0] < max(lrs) == 2e-5 and lrs[-1] < max(lrs)


def _run_cmd(student, teacher, data, out, **flags):
    args = dict(student_model_path=student, teacher_model_path=teacher, data_path=data, output_dir=out, **flags)
    return [sys.executable, "atkd/train.py"] + [f"--{k}={v}" for k, v in args.items()]


def test_kill_9_during_an_on_policy_run_and_rerun_gives_the_uninterrupted_weights(tmp_path):
    student, teacher = _models(tmp_path)
    data = _data(tmp_path, n=8)
    flags = dict(sample_source="student", kl_method="reverse", per_device_train_batch_size=2, max_steps=4,
                 learning_rate=1e-2, save_steps=1, model_max_length=40)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train.main(student, teacher, data, str(tmp_path / "a"), **flags)

    cmd = _run_cmd(student, teacher, data, str(tmp_path / "b"), **flags)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not list((tmp_path / "b").glob("checkpoints/*/state.json")):  # step 1 committed (state.json: last)
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 1"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)   # three steps and the export before the run could end
    proc.wait()
    assert not (tmp_path / "b" / "model" / "model.safetensors").exists()
    done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=1800)
    assert "resumed from" in done.stdout
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4]


def test_torchrun_with_the_released_flags_matches_one_process(tmp_path):
    student, teacher = _models(tmp_path)
    data = _data(tmp_path, n=8)
    released = dict(task="alpaca", setting="vanilla", max_propose_num=5, bf16=False, num_train_epochs=1,
                    per_device_eval_batch_size=1, evaluation_strategy="no", save_strategy="no",
                    learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.03, lr_scheduler_type="cosine",
                    logging_steps=1, tf32=False, model_max_length=48, gradient_checkpointing=True,
                    lazy_preprocess=True, run_name="distillation_gt_atkd", mode="offline", sample_source="gt",
                    kl_method="atkd")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {name: subprocess.Popen(torchrun + _run_cmd(student, teacher, data, str(tmp_path / name),
                                                       per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                                       **released, **extra)[1:],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name, extra in (("ddp", {}), ("fsdp", {"fsdp": "full_shard auto_wrap"}))}  # the HF Trainer flag
    single = _run_cmd(student, teacher, data, str(tmp_path / "one"), per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, **released)
    subprocess.run(single, check=True, env=env, capture_output=True)
    for proc in runs.values():
        assert proc.wait(600) == 0, proc.stderr.read()[-3000:]
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    for name in runs:
        a = load_file(tmp_path / name / "model" / "model.safetensors")
        # equal up to float summation order (Adam turns 1e-7 gradient differences into ~1e-6 weight differences)
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
        ra, rb = _metrics(tmp_path / name), _metrics(tmp_path / "one")
        for x, y in zip(ra, rb):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["targets"] == y["targets"]
            assert (x["n_easy"], x["n_hard"]) == (y["n_easy"], y["n_hard"])


def test_fsdp_generates_mix_token_samples_on_gathered_weights_and_trains_as_ddp(tmp_path):
    student, teacher = _models(tmp_path)
    data = _data(tmp_path, n=8)
    flags = dict(sample_source="mix_token", kl_method="atkd", per_device_train_batch_size=2, max_steps=3,
                 learning_rate=1e-2, save_steps=2, model_max_length=40)
    train.main(student, teacher, data, str(tmp_path / "ddp"), **flags)
    train.main(student, teacher, data, str(tmp_path / "fsdp"), fsdp="full_shard auto_wrap offload", **flags)
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = [[r["loss"] for r in _metrics(tmp_path / run)] for run in ("ddp", "fsdp")]
    assert losses[1] == pytest.approx(losses[0])
    assert (tmp_path / "fsdp" / "checkpoints" / "step-00000002" / "sharded" / ".metadata").exists()


# ---- bad input: one clear line ----

def test_unknown_kl_method_and_sample_source_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="--kl_method 'kl' is not one of: " + ", ".join(KL_METHODS)):
        train.main("s", "t", "d.json", str(tmp_path), kl_method="kl")
    with pytest.raises(ValueError, match="--sample_source 'online' is not one of: gt, teacher, student, mix_token"):
        train.main("s", "t", "d.json", str(tmp_path), sample_source="online")
    with pytest.raises(ValueError, match="evaluate the saved model with atkd/eval.py"):
        train.main("s", "t", "d.json", str(tmp_path), evaluation_strategy="steps")


def test_teacher_and_student_with_different_vocabularies_is_one_clear_error(tmp_path):
    student, teacher = _models(tmp_path, student_vocab=160)
    with pytest.raises(ValueError, match=r"teacher outputs 128 logits per token but the student 160"):
        train.main(student, teacher, _data(tmp_path), str(tmp_path / "out"), max_steps=1)
    # the same tokenizer padded to other widths (Pythia sizes): the first 128 logits are compared
    train.main(student, teacher, _data(tmp_path), str(tmp_path / "out"), max_steps=1, allow_padded_vocab=True)
    assert _metrics(tmp_path / "out")[0]["loss"] > 0


def test_teacher_source_on_the_alpaca_json_points_to_generate_data(tmp_path):
    student, teacher = _models(tmp_path)
    with pytest.raises(ValueError, match="generate_data.py"):
        train.main(student, teacher, _data(tmp_path), str(tmp_path / "out"), sample_source="teacher")


def test_cli_reports_bad_data_as_one_line_naming_file_item_and_field(tmp_path):
    student, teacher = _models(tmp_path)
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    done = subprocess.run(_run_cmd(student, teacher, str(data), str(tmp_path / "out")), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {data}: item 1: missing field 'output'"
    assert "Traceback" not in done.stderr


def test_compatibility_flags_have_their_documented_effects(tmp_path):
    student, teacher = _models(tmp_path)
    data, runs = _data(tmp_path), {}
    for lazy, strategy in ((True, "epoch"), (False, "steps")):
        out = tmp_path / f"lazy{lazy}"
        train.main(student, teacher, data, str(out), kl_method="forward", per_device_train_batch_size=2,
                   gradient_accumulation_steps=1, num_train_epochs=2, lazy_preprocess=lazy, save_strategy=strategy,
                   save_steps=1, max_propose_num=3, per_device_eval_batch_size=7, tf32=True)
        runs[lazy] = [r["loss"] for r in _metrics(out)]
        exported = sorted((p.name for p in out.glob(f"{strategy[:-1] if strategy == 'steps' else strategy}-*")),
                          key=lambda name: int(name.split("-")[1]))
        n = len(runs[lazy])  # steps: every --save_steps but the last (that one is model/)
        assert exported == (["epoch-1", "epoch-2"] if strategy == "epoch" else [f"step-{k}" for k in range(1, n)])
    assert runs[True] == pytest.approx(runs[False])  # tokenising up front or in the loop: the same run
    # --mode offline shuffles each epoch with its own seed; online keeps the data order
    assert train._step_items(8, 0, 2, 4, seed=42, shuffle=False) == [0, 1, 2, 3]
    epochs = [train._step_items(8, 2 * e, 2, 4, 42, True) + train._step_items(8, 2 * e + 1, 2, 4, 42, True)
              for e in range(2)]
    assert all(sorted(x) == list(range(8)) for x in epochs) and epochs[0] != epochs[1]
