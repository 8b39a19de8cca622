"""`TINY=1 bash mcc_kd/run.sh`: the whole tiny pipeline, as a user on a fresh machine runs it."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_sh_runs_prepare_train_train_mcc_eval(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(["bash", "mcc_kd/run.sh"], cwd=ROOT, env=dict(os.environ, OUT=str(out), TINY="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for step in ("prepare", "Std-CoT", "MCC-KD", "eval"):
        assert f"== {step}" in done.stdout
    for folder in ("sft/log", "mcc/log", "eval"):
        metrics = json.load(open(out / folder / "SVAMP-test_standin-metrics.json"))
        assert metrics["N"] == 20 and 0 <= metrics["accuracy"] <= 1
        predictions = json.load(open(out / folder / "SVAMP-test_standin-predictions.json"))
        assert len(predictions) == 20 and {"output", "predict", "label", "correct"} <= predictions[0].keys()
    assert (out / "mcc" / "checkpoints").is_dir()
