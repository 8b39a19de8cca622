"""`bash contra_kd/run.sh` with no arguments (reduced sizes): the whole tiny pipeline as a user runs it, from data
to the one table, with the velocity-field re-fit between the two DistiLLM+CONTRA epochs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = ("teacher", "init", "distillm", "distillm_contra")


def test_run_sh_runs_the_tiny_pipeline_end_to_end_and_writes_the_table(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), EPOCHS="2", NUM="16", DEV_NUM="4", EVAL_NUM="4", EVAL_SEEDS="10",
               EVAL_SETS="dolly", MAX_LEN="288", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # this venv's python
    done = subprocess.run(["bash", "contra_kd/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for run in RUNS:
        results = json.load(open(out / "eval" / run / "results.json"))["results"]["dolly"]
        assert results["items"] == 4 and list(results["per_seed"]) == ["10"]
        assert (out / "eval" / run / "predictions.json").exists()
    for run in RUNS[1:]:
        assert (out / "eval" / run / "curves.png").stat().st_size > 0
        assert (out / run / "best" / "config.json").exists()
    rows = [json.loads(line) for line in open(out / "distillm_contra" / "metrics.jsonl")]
    assert any("loss_rf" in r for r in rows) and any("loss_contra" in r for r in rows)  # re-fit and CONTRA term ran
    assert (out / "distillm_contra" / "velocity_field.safetensors").exists()
    table = (out / "eval" / "table.md").read_text()
    for run in RUNS:
        assert f"| {run} (ours) |" in table
    assert "DistiLLM+CONTRA (paper)" in table and "first 4 test items of dolly, sampling seeds 10" in table
    assert "demo numbers" in done.stdout
