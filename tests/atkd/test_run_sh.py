"""`bash atkd/run.sh` with no arguments: the whole tiny pipeline (sizes shrunk through its environment settings)."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_sh_runs_sft_teacher_data_distillation_and_eval(tmp_path):
    out = tmp_path / "run"
    small = dict(N_ITEMS="16", SFT_EPOCHS="1", N_GEN="8", GEN_TOKENS="8", EVAL_ITEMS="4", EVAL_SETS="vicuna",
                 KD_EPOCHS="1", BSZ="4", MAX_LEN="128", LOG_STEPS="1")
    done = subprocess.run(["bash", "atkd/run.sh"], cwd=ROOT, env=dict(os.environ, OUT=str(out), **small),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for step in ("teacher SFT", "offline teacher outputs", "distil: --kl_method atkd --sample_source teacher"):
        assert f"== {step}" in done.stdout
    generated = (out / "generated" / "alpaca_generated_data.jsonl").read_text().splitlines()
    assert len(generated) == 8 and {"instruction", "teacher_output", "output"} == set(json.loads(generated[0]))
    records = [json.loads(x) for x in (out / "atkd-s42" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("n_easy" in r for r in records)
    for model in ("teacher", "student-init", "atkd-s42"):
        results = json.loads((out / "eval" / model / "results.json").read_text())
        assert results["vicuna"]["items"] == 4
    assert "| student after atkd (1 seeds) |" in done.stdout
    assert "- atkd - student before KD on vicuna:" in done.stdout  # the paired comparison


def test_run_sh_two_methods_two_seeds_side_by_side_with_a_paired_test(tmp_path):
    """The REAL layout on the tiny pair: methods side by side per seed, one table over seeds, a paired test."""
    out = tmp_path / "run"
    small = dict(N_ITEMS="8", SFT_EPOCHS="0", GEN_TOKENS="4", EVAL_ITEMS="3", EVAL_SETS="vicuna", KD_EPOCHS="1",
                 BSZ="4", MAX_LEN="96", LOG_STEPS="1", SAMPLE="gt", METHODS="atkd forward", SEEDS="1 2",
                 SIDE_BY_SIDE="1")
    done = subprocess.run(["bash", "atkd/run.sh"], cwd=ROOT, env=dict(os.environ, OUT=str(out), **small),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "offline teacher outputs" not in done.stdout  # gt needs no teacher file
    for run in ("atkd-s1", "forward-s1", "atkd-s2", "forward-s2"):
        assert (out / "eval" / run / "vicuna" / "predictions.json").exists()
    assert "| student after forward (2 seeds) |" in done.stdout
    assert "- atkd - forward on vicuna:" in done.stdout and "3 items x 2 seeds" in done.stdout
