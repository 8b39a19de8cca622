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
    records = [json.loads(x) for x in (out / "atkd" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("n_easy" in r for r in records)
    for model in ("teacher", "student-init", "atkd"):
        results = json.loads((out / "eval" / model / "results.json").read_text())
        assert results["vicuna"]["items"] == 4
    assert "| student after atkd |" in done.stdout
