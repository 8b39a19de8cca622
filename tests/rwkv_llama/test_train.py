"""rwkv_llama/train.py end to end on a tiny Llama teacher: both stages learn, kill -9 + rerun is exact, the
served teacher trains like the in-process one, and bad configuration is one clear line."""
import json
import os
import signal

import pytest
import torch

from common.io import read_tensors
from rwkv_llama import train
from tests.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C4 = os.path.join(ROOT, "data/rwkv_llama/c4_standin")
CONFIG = """RWKV:
  layers: [0, 1]
  grad_cp: 1
Llama:
  model_id: {teacher}
kl_weight: 0.1
ce_weight: 1
model_file: tiny
teach_mode:
  is_client: False
  nccl_file: {nccl}
  is_hidden_align: True
  num_groups: 1
is_sft: False
is_llama_ffn: False
is_rwkv_att_only: False
is_all_labels_kl: False
"""


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv_train")
    teacher = save_tiny("llama", d / "teacher")
    (d / "hybrid.yaml").write_text(CONFIG.format(teacher=teacher, nccl=d / "nccl.txt"))
    return d


def run(d, out, **flags):
    args = dict(config_file=str(d / "hybrid.yaml"), output_dir=str(out), c4_data=C4, languages=["en", "gsm8k"],
                max_seq_length=32, micro_bsz=4, head_size=8, chunk_len=8, lr_init=3e-3, lr_final=3e-3,
                log_every_n_steps=1000, max_val_batches=2, grad_cp=1)
    args.update(flags)
    train.main(**args)
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_stage1_then_stage2_reduce_their_losses(setup_dir, tmp_path):
    s1 = run(setup_dir, tmp_path / "s1", max_steps=24)
    assert [r["hidden_mse"] for r in s1][-1] < 0.8 * s1[0]["hidden_mse"]
    s2 = run(setup_dir, tmp_path / "s2", max_steps=24, is_hidden_align=False,
             ckpt_file=str(tmp_path / "s1/student.safetensors"))
    first, last = (sum(r["loss"] for r in rows) / 4 for rows in (s2[:4], s2[-4:]))
    assert last < first and {"kl", "ce"} <= set(s2[0])
    # stage 2 started from stage 1's student, not from a fresh one
    w1 = read_tensors(str(tmp_path / "s1/student.safetensors"))
    assert set(read_tensors(str(tmp_path / "s2/student.safetensors"))) == set(w1)


# 24 rows in shuffle windows of 10: 6 micro-batches of 4 per epoch, so the 8 steps cross an epoch boundary and a
# resumed run must continue the stream mid-window and mid-epoch
STREAM_FLAGS = dict(max_steps=8, is_hidden_align=False, log_every_n_steps=3, dropout=0.1, max_rows=24,
                    shuffle_buffer=10)


def _killed_run(d, out):
    """Stage 2 that SIGKILLs itself after its 5th optimiser step (checkpoint at 3): no cleanup of any kind."""
    real = train.optimizer_step
    calls = []

    def step_then_die(*a, **k):
        norm = real(*a, **k)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return norm
    train.optimizer_step = step_then_die
    run(d, out, **STREAM_FLAGS)


# Children are spawned, not forked: a fresh interpreter inherits no process group from the tests before.

def test_kill_9_during_stage_2_then_rerun_gives_the_weights_of_an_uninterrupted_run(setup_dir, tmp_path):
    import multiprocessing as mp
    whole = run(setup_dir, tmp_path / "whole", **STREAM_FLAGS)
    child = mp.get_context("spawn").Process(target=_killed_run, args=(setup_dir, tmp_path / "cut"))
    child.start()
    child.join(1200)
    assert child.exitcode == -signal.SIGKILL
    assert not (tmp_path / "cut/student.safetensors").exists()
    assert os.path.exists(tmp_path / "cut/checkpoints/step-00000003/state.json")
    cut = run(setup_dir, tmp_path / "cut", **STREAM_FLAGS)
    assert [r["loss"] for r in cut[-5:]] == [r["loss"] for r in whole[-5:]]     # steps 4-8 on the same batches
    a = read_tensors(str(tmp_path / "whole/student.safetensors"))
    b = read_tensors(str(tmp_path / "cut/student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def _trainer(d, out, rank, env, served=True, strategy="ddp"):
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    run(d, out, max_steps=4, is_client=served, is_hidden_align=True, connect_timeout_s=300, reply_timeout_s=300,
        strategy=strategy, nccl_file=str(out / "nccl.txt"))


def _server(d, id_file):
    from transformers import AutoModelForCausalLM
    from rwkv_llama.teacher_server import serve
    code = serve(lambda: (AutoModelForCausalLM.from_pretrained(str(d / "teacher")).eval(), 1), batch=4, length=32,
                 size=3, nccl_id_file=id_file, output_all_hiddens=True, backend="gloo", connect_timeout_s=300,
                 request_timeout_s=300)
    os._exit(code)


def _run_all(procs):
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(900)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:            # nothing is left running
            if p.exitcode is None:
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def two_local_trainers(setup_dir, tmp_path_factory):
    """Two DDP trainers with in-process teachers (the reference of the served runs)."""
    import multiprocessing as mp
    from tests.distributed import rendezvous_env
    out = tmp_path_factory.mktemp("local")
    with rendezvous_env(2) as env:
        _run_all([mp.get_context("spawn").Process(target=_trainer, args=(setup_dir, out, r, env, False))
                  for r in range(2)])
    return out


# ddp; the 8B scripts' deepspeed_stage_3_offload, run as FSDP with CPU offload of the hybrid student
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_3_offload"])
def test_two_trainers_on_a_teacher_server_train_as_with_the_in_process_teacher(setup_dir, two_local_trainers,
                                                                                tmp_path, strategy):
    import multiprocessing as mp
    from tests.distributed import rendezvous_env
    spawn = mp.get_context("spawn")
    (tmp_path / "served").mkdir()
    with rendezvous_env(2) as env:
        _run_all([spawn.Process(target=_server, args=(setup_dir, str(tmp_path / "served" / "nccl.txt_0")))] +
                 [spawn.Process(target=_trainer, args=(setup_dir, tmp_path / "served", r, env, True, strategy))
                  for r in range(2)])
    served = read_tensors(str(tmp_path / "served/student.safetensors"))
    local = read_tensors(str(two_local_trainers / "student.safetensors"))
    assert served.keys() == local.keys()
    for k in served:   # the server's batched forward over both trainers' rows differs from each rank's own in ulps
        torch.testing.assert_close(served[k], local[k], atol=1e-4, rtol=1e-4)
    rows = [json.loads(line) for line in open(tmp_path / "served/metrics.jsonl")]
    assert len(rows) == 4 and all(r["hidden_mse"] > 0 for r in rows)
    final = json.load(open(tmp_path / "served/final_metrics.json"))
    assert final["val_hidden_mse"] > 0


def test_config_field_of_the_wrong_type_is_one_clear_line(setup_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((setup_dir / "hybrid.yaml").read_text().replace("num_groups: 1", "num_groups: '2'"))
    with pytest.raises(ValueError, match=r"bad.yaml: field teach_mode.num_groups must be int, got str '2'"):
        train.load_config(str(bad), {})
    with pytest.raises(ValueError, match=r"--kl_weight must be float, got str 'high'"):
        train.load_config(str(setup_dir / "hybrid.yaml"), {"kl_weight": "high"})
    with pytest.raises(ValueError, match=r"unknown field 'teach_mode.num_group'"):
        bad.write_text((setup_dir / "hybrid.yaml").read_text().replace("num_groups:", "num_group:"))
        train.load_config(str(bad), {})
    cfg = train.load_config(str(setup_dir / "hybrid.yaml"), {"layers": (1,), "is_client": "true"})
    assert cfg["layers"] == [1] and cfg["is_client"] is True and cfg["kl_weight"] == 0.1


def test_a_layer_index_outside_the_teacher_stops_training_with_the_field_named(setup_dir, tmp_path):
    with pytest.raises(ValueError, match=r"RWKV.layers: layer index \[7\] is outside the model"):
        run(setup_dir, tmp_path / "x", max_steps=1, layers=[0, 7])


def test_rwkv_parameter_groups_and_learning_rate_schedule():
    from rwkv_llama.model import build_hybrid
    from tests.tiny import tiny_model
    student = build_hybrid(tiny_model("llama"), [1], head_size=8)
    groups = {g["name"]: g for g in train.param_groups(student, 0.1)}
    assert groups["time_decay"]["lr"] == 2.0 and groups["time_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["lora"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in student.named_parameters()}
    assert {names[id(p)].split(".")[-1] for p in groups["lora"]["params"]} == {
        "time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"}
    assert {names[id(p)].split(".")[-1] for p in groups["time_decay"]["params"]} == {"time_decay"}
    # warmup from 1 %, exponential from lr_init to lr_final, linear when one end is 0
    assert train.rwkv_lr(0, 1e-3, 1e-5, 10, 110) == pytest.approx(1e-3 * 0.01)
    assert train.rwkv_lr(5, 1e-3, 1e-5, 10, 110) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert train.rwkv_lr(109, 1e-3, 1e-5, 10, 110) == pytest.approx(1e-5)
    assert train.rwkv_lr(59, 1e-3, 1e-5, 10, 110) == pytest.approx(1e-4)
    assert train.rwkv_lr(59, 1e-3, 0.0, 10, 110) == pytest.approx(0.5e-3)


def test_shipped_llama31_configs_load(tmp_path):
    folder = os.path.join(ROOT, "rwkv_llama/scripts/configs")
    layers = {}
    for name in sorted(os.listdir(folder)):
        text = open(os.path.join(folder, name)).read().replace("${MODEL_ID}", "/models/llama-3.1-8b-instruct")
        (tmp_path / name).write_text(text)
        layers[name] = train.load_config(str(tmp_path / name), {})["layers"]
    assert layers["hybrid_full_logits.yaml"] == list(range(32)) and layers["hybrid_tiny.yaml"] == [24]
    assert layers["hybrid.yaml"] == list(range(0, 32, 4)) and layers["hybrid_half.yaml"] == list(range(0, 32, 2))


def test_eval_hybrid_before_distillation_is_the_student_training_starts_from(setup_dir, tmp_path):
    from rwkv_llama.eval import build_model

    run(setup_dir, tmp_path / "s0", max_steps=0)      # no step: the saved student is the initial one
    start = read_tensors(str(tmp_path / "s0/student.safetensors"))
    # both at their default seeds, as run.sh calls them for the table's "hybrid before distillation" row
    params = dict(build_model(str(setup_dir / "teacher"), layers=[0, 1], head_size=8).named_parameters())
    assert start and all(torch.equal(params[k], v) for k, v in start.items())
    other = dict(build_model(str(setup_dir / "teacher"), layers=[0, 1], head_size=8, seed=8).named_parameters())
    assert not all(torch.equal(other[k], v) for k, v in start.items())


class _FixedTeacher:
    def __init__(self, logits):
        self.logits = logits

    def forward(self, ids, lengths):
        return self.logits, None


@pytest.mark.parametrize("all_labels", [False, True])
def test_stage2_loss_equals_the_hand_formula(all_labels):
    """kl_weight·FKL(p ‖ q) + ce_weight·CE(labels[t] from logits[t]) (spec §4): FKL a token mean over
    labels != -100, or with is_all_labels_kl summed over every position and the vocabulary and divided by B."""
    from tests.tiny import tiny_model
    student = tiny_model("llama", seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (2, 6), generator=g)
    labels = torch.tensor([[-100, 5, 6, 7, -100, -100], [-100, -100, 8, 9, 10, 11]])
    t_logits = 3 * torch.randn(2, 6, student.config.vocab_size, generator=g)
    batch = dict(input_ids=ids, labels=labels, lengths=torch.tensor([4, 6]))
    cfg = dict(is_sft=False, is_hidden_align=False, is_all_labels_kl=all_labels, kl_weight=0.1, ce_weight=1.0)
    loss, parts = train.step_losses(student, batch, _FixedTeacher(t_logits), cfg,
                                    dict(tokens=7.0, sequences=2.0, batches=1))
    with torch.no_grad():
        attn = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
        z = student(input_ids=ids, attention_mask=attn).logits.double()
    p, logq = t_logits.double().softmax(-1), z.log_softmax(-1)
    kl_all = (p * (p.log() - logq)).sum(-1)
    counted = labels != -100
    kl = kl_all.sum() / 2 if all_labels else kl_all[counted].sum() / 7
    ce = -logq[counted].gather(-1, labels[counted][:, None]).sum() / 7
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * kl.item() + ce.item(), rel=1e-5)


def test_each_step_logs_the_originals_quantities(setup_dir, tmp_path):
    """loss, the KL and the student CE, lr, Kt/s = max_seq_length·real_bsz / step time / 1000, tokens seen; with a
    validation check, the student's and the teacher's validation CE (spec §6 logging)."""
    s1 = run(setup_dir, tmp_path / "s1", max_steps=2)
    rows = run(setup_dir, tmp_path / "s2", max_steps=2, is_hidden_align=False, val_check_interval=2,
               ckpt_file=str(tmp_path / "s1/student.safetensors"))
    assert {"loss", "hidden_mse", "lr", "kt_per_s", "tokens"} <= set(s1[0])
    assert {"step", "loss", "kl", "ce", "lr", "grad_norm", "kt_per_s", "tokens"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(0.1 * rows[0]["kl"] + rows[0]["ce"], rel=1e-6)
    assert [r["tokens"] for r in rows] == [32 * 4, 2 * 32 * 4]  # max_seq_length x real_bsz per step
    assert {"val_ce", "val_teacher_ce", "val_kl"} <= set(rows[1]) and "val_ce" not in rows[0]

def script_flags(name: str) -> dict:
    """The rwkv_llama.train flags of one of scripts/*.sh (its torchrun command, continuation lines joined), each
    value parsed as fire parses it."""
    import shlex

    from fire.parser import DefaultParseValue
    text = open(os.path.join(ROOT, "rwkv_llama/scripts", name)).read().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "-m rwkv_llama.train" in x)
    words = shlex.split(line.split("-m rwkv_llama.train", 1)[1])
    return {k.lstrip("-"): DefaultParseValue(v) for k, v in zip(words[::2], words[1::2])}


def test_the_8b_scripts_flags_reach_the_fsdp_offload_path_on_a_tiny_model(setup_dir, tmp_path, capsys):
    """The stage 1 and stage 2 commands of scripts/*_llama31_8b.sh with the tiny teacher's sizes, data, one
    process and an in-process teacher: --strategy deepspeed_stage_3_offload runs as FSDP with CPU offload."""
    tiny = dict(config_file=str(setup_dir / "hybrid.yaml"), c4_data=C4, languages=["en", "gsm8k"], max_seq_length=32,
                num_devices=1, head_size=8, chunk_len=8, max_val_batches=2)
    stage1 = dict(script_flags("stage1_llama31_8b.sh"), **tiny, output_dir=str(tmp_path / "s1"), max_steps=2)
    assert stage1["strategy"] == "deepspeed_stage_3_offload" and stage1["grad_cp"] == 1
    train.main(**stage1)
    assert "DeepSpeed ZeRO-3 is run as PyTorch FSDP with CPU offload" in capsys.readouterr().out
    stage2 = dict(script_flags("stage2_llama31_8b.sh"), **tiny, output_dir=str(tmp_path / "s2"), max_steps=2,
                  ckpt_file=str(tmp_path / "s1/student.safetensors"), micro_bsz=2, accumulate_grad_batches=2,
                  log_every_n_steps=1)
    assert stage2["strategy"] == "deepspeed_stage_3_offload" and stage2["is_hidden_align"] == "false"
    train.main(**stage2)
    rows = [json.loads(line) for line in open(tmp_path / "s2/metrics.jsonl")]
    assert len(rows) == 2 and {"kl", "ce"} <= set(rows[0])
    with open(tmp_path / "s2/checkpoints/step-00000001/state.json") as f:
        assert json.load(f)["sharding"] == "fsdp_offload"
    assert set(read_tensors(str(tmp_path / "s2/student.safetensors"))) == \
        set(read_tensors(str(tmp_path / "s1/student.safetensors")))

