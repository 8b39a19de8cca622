"""`bash anli_reverse_kl/run.sh` end to end on a few stand-in rows: every stage runs and the table lists every model."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_sh_trains_every_baseline_and_minillm_then_compares_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 19), ("dev", 3), ("test", 3)):  # 16 train items after the cleaning
        with open(os.path.join(ROOT, "data", "anli_standin", f"{split}_r1.jsonl")) as f:
            (src / f"{split}_r1.jsonl").write_text("".join(f.readlines()[:n]))
    env = dict(os.environ, OUT=str(tmp_path / "out"), SRC=str(src), EPOCHS="1", BATCH="8", MAX_NEW="4",
               TOTAL_ITERS="1")
    done = subprocess.run(["bash", "anli_reverse_kl/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = (tmp_path / "out" / "comparison.md").read_text()
    for run in ("teacher_sft", "sft", "kd", "seqkd", "minillm"):
        assert f"| {run} r1/dev |" in table and f"| {run} r1/test |" in table
        assert (tmp_path / "out" / run / "model" / "config.json").exists()
