"""`TINY=1 bash mcc_kd/run.sh`: the whole tiny pipeline, as a user on a fresh machine runs it."""
import json
import os
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
    times = dict(line.split()[:2] for line in open(out / "times.txt"))
    assert {"sft", "mcc"} <= times.keys()
    for folder in ("sft/log", "mcc/log", "eval"):
        metrics = json.load(open(out / folder / "SVAMP-test_standin-metrics.json"))
        assert metrics["N"] == 20 and 0 <= metrics["accuracy"] <= 1
        predictions = json.load(open(out / folder / "SVAMP-test_standin-predictions.json"))
        assert len(predictions) == 20 and {"output", "predict", "label", "correct"} <= predictions[0].keys()
    assert (out / "mcc" / "checkpoints").is_dir()
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
