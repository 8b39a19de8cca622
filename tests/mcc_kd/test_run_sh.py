"""`TINY=1 bash mcc_kd/run.sh`: the whole tiny pipeline, as a user on a fresh machine runs it."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("side_by_side", ["", "1"])
def test_run_sh_runs_prepare_train_train_mcc_eval(tmp_path, side_by_side):
    """One after the other (the default), or side by side on one core each (the main job's way)."""
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), TINY="1", SIDE_BY_SIDE=side_by_side)
    done = subprocess.run(["bash", "mcc_kd/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    steps = ("prepare", "Std-CoT (train.py) and MCC-KD", "eval") if side_by_side else ("prepare", "Std-CoT", "MCC-KD", "eval")
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
