"""`bash rwkv_llama/run.sh` with no arguments (fewer steps): a teacher server and 2 torchrun trainers for both
stages, then the perplexity table, as a user on a fresh machine runs it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_sh_runs_both_stages_through_the_server_and_prints_the_table(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), STEPS1="4", STEPS2="4", VAL_BATCHES="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])   # this venv's python, torchrun
    done = subprocess.run(["bash", "rwkv_llama/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=2400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for stage in ("stage1", "stage2"):
        assert (out / stage / "student.safetensors").exists()
        assert len(open(out / stage / "metrics.jsonl").readlines()) == 4
    assert "all clients shut down" in done.stdout
    for name in ("teacher", "init", "stage1", "stage2"):
        assert json.load(open(out / "eval" / name / "metrics.json"))["perplexity"] > 1
    assert "| after stage 2 |" in done.stdout and not os.path.exists(out / "nccl.txt_0.tmp")
