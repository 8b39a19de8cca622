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
    # Std-CoT and MCC-KD train on the filtered rationales, not on the raw train file
    filtered = json.load(open(out / "SVAMP-train-multi-cots.json"))
    raw = json.load(open(os.path.join(ROOT, "data", "SVAMP", "train_standin.json")))
    assert len(filtered) < len(raw)
    logs = done.stdout + ((out / "sft.log").read_text() if side_by_side else "")
    assert logs.count(f"SVAMP: {len(filtered)} training items") == 2


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
