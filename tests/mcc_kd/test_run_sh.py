"""`TINY=1 bash mcc_kd/run.sh`: the whole tiny pipeline, as a user on a fresh machine runs it."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("side_by_side", ["", "1"])
def test_run_sh_runs_prepare_train_train_mcc_eval(tmp_path, side_by_side):
    """One after the other (the default), or side by side on one core each (the main job's way)."""
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), TINY="1", SIDE_BY_SIDE=side_by_side)
    done = subprocess.run(["bash", "mcc_kd/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = ("prepare", "side by side, one core each", "eval") if side_by_side else ("prepare", "Std-CoT", "MCC-KD", "eval")
    for step in steps:
        assert f"== {step}" in done.stdout
    if side_by_side:  # Std-CoT's result lines come back from its log
        assert any(line.startswith("| SVAMP test_standin") and "/sft/log/" in line for line in done.stdout.splitlines())
    times = {name: (int(wall), int(cpu)) for name, wall, cpu in (line.split() for line in open(out / "times.txt"))}
    assert {"sft", "mcc"} <= times.keys()
    # each stage's CPU seconds are its own processes' (side by side, MCC-KD's once counted Std-CoT's too)
    total_cpu = int(re.search(r"^run\.sh: \d+ s wall, (\d+) s CPU", done.stdout, re.MULTILINE).group(1))
    assert sum(cpu for _, cpu in times.values()) <= total_cpu + len(times), (times, total_cpu)
    for folder in ("sft/log", "mcc/log", "eval"):
        metrics = json.load(open(out / folder / "SVAMP-test_standin-metrics.json"))
        assert metrics["N"] == 20 and 0 <= metrics["accuracy"] <= 1
        predictions = json.load(open(out / folder / "SVAMP-test_standin-predictions.json"))
        assert len(predictions) == 20 and {"output", "predict", "label", "correct"} <= predictions[0].keys()
    assert (out / "mcc" / "checkpoints").is_dir()
    # Std-CoT and MCC-KD train on the filtered rationales, not on the raw train file
    filtered = json.load(open(out / "SVAMP-train-multi-cots.json"))
    raw = json.load(open(os.path.join(ROOT, "data", "SVAMP", "train_standin.json")))
    assert len(filtered) < len(raw)
    logs = done.stdout + ((out / "sft.log").read_text() if side_by_side else "")
    assert logs.count(f"SVAMP: {len(filtered)} training items") == 2
    for stage in ("sft", "mcc"):  # held-out consistency on the filtered train questions 40..60 (never trained on)
        records = json.load(open(out / stage / "log" / "SVAMP-heldout-multi-cots-consistency-predictions.json"))
        assert records and all(r["kl"] >= 0 and r["pairs"] >= 1 for r in records)
    assert "held-out span KL" in done.stdout and "MCC-KD vs Std-CoT: accuracy" in done.stdout


def _running(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(pid))
    return pids


def test_a_failed_mcc_run_side_by_side_stops_std_cot_and_its_python(tmp_path):
    """MCC-KD fails at once (0 questions per micro-batch) while Std-CoT has 100 epochs to go: run.sh must exit
    non-zero and leave no Std-CoT process behind (a `kill` of the backgrounded function's subshell would not
    reach its python)."""
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), TINY="1", SIDE_BY_SIDE="1", EPOCHS="100", MCC_BATCH="0")
    marker = str(out / "sft")
    try:
        done = subprocess.run(["bash", "mcc_kd/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode != 0, done.stdout[-2000:]
        assert "MCC-KD failed: stopping Std-CoT" in done.stderr
        deadline = time.monotonic() + 60  # a TERM'd process is gone within moments; this only bounds the wait
        while _running(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(marker) == [], "Std-CoT still running after run.sh exited"
        assert not (out / "sft" / "log" / "SVAMP-test_standin-metrics.json").exists()  # stopped, not finished
    finally:
        for pid in _running(marker):
            os.kill(pid, signal.SIGKILL)



def test_run_sh_with_chat_prompts_prepares_trains_and_evaluates_through_the_template(tmp_path, smollm2_dir):
    """A tiny random model with SmolLM2's tokenizer and chat template: the spans are computed for chat prompts
    (the sidecar says so, and train_mcc refuses a file whose prompt format differs), and Std-CoT, MCC-KD and
    the final eval answer every test item."""
    from common.checkpoint_split import init
    from mcc_kd.data import encode_example, load_task_file
    from common.tokenizer import load_tokenizer

    out = tmp_path / "run"
    init("tiny-llama", str(out / "ckpt"), tokenizer=smollm2_dir, seed=0)
    env = dict(os.environ, OUT=str(out), TINY="1", CHAT="--chat_template True", N_TRAIN="12", EPOCHS="1",
               MCC_EPOCHS="1", MAX_SEQ_LEN="256")
    done = subprocess.run(["bash", "mcc_kd/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    meta = json.load(open(out / "SVAMP-train-multi-cots.meta.json"))
    assert meta["prompt"] == "chat"
    tok = load_tokenizer(str(out / "ckpt"))
    items = load_task_file(out / "SVAMP-train-multi-cots.json", multi_cot=True, tokenizer=tok, chat=True)
    ex = encode_example(tok, items[0]["instruction"], items[0]["output"][0], 256, chat=True)
    assert ex.tokens[:ex.prompt_len] == tok.encode_chat([{"role": "user", "content": items[0]["instruction"].strip()}])
    for folder in ("sft/log", "mcc/log", "eval"):
        assert json.load(open(out / folder / "SVAMP-test_standin-metrics.json"))["N"] == 20
