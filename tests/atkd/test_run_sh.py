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


def _stub_python(tmp_path):
    """A `python` on PATH that records its arguments instead of running them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/calls\n')
    (bin_dir / "python").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DATAPATH=str(tmp_path / "outputs"))


def test_evaluation_sh_takes_the_seed_readmes_seven_arguments(tmp_path):
    """The seed README: `bash ./script/evaluation.sh $cuda $kl $student_size $teacher_size $per_bsz $setting
    $sample`; the run it evaluates is the one distillation.sh wrote for the same sizes, setting and source."""
    env = _stub_python(tmp_path)
    done = subprocess.run(["bash", "atkd/scripts/evaluation.sh", "0", "atkd", "6.7b", "1.3b", "4", "reverse", "teacher"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "outputs" / "alpaca_6.7b_vs_OPT_1.3b" / "alpaca_teacher_atkd_reverse"
    assert (tmp_path / "calls").read_text().split()[:5] == ["atkd/eval.py", "--model_path", f"{run}/model",
                                                          "--output_dir", f"{run}/eval"]
    six = subprocess.run(["bash", "atkd/scripts/evaluation.sh", "0", "atkd", "6.7b", "1.3b", "vanilla", "gt"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert six.returncode == 2 and "got 6 arguments" in six.stderr


def test_run_sh_with_the_paper_arguments_evaluates_the_run_distillation_sh_wrote(tmp_path):
    env = _stub_python(tmp_path)
    (tmp_path / "bin" / "torchrun").write_text(f'#!/usr/bin/env bash\necho torchrun "$@" >> {tmp_path}/calls\n')
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    done = subprocess.run(["bash", "atkd/run.sh", "dkd", "0", "1", "29500", "6.7b", "1.3b", "2", "reverse", "gt"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    trained = calls[0].split()[calls[0].split().index("--output_dir") + 1]
    evaluated = calls[1].split()[calls[1].split().index("--model_path") + 1]
    assert evaluated == f"{trained}/model" and trained.endswith("alpaca_6.7b_vs_OPT_1.3b/alpaca_gt_dkd_reverse")
