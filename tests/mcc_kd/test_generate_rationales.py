"""mcc_kd/generate_rationales.py: K samples per question from a real instruct teacher (SmolLM2-135M-Instruct,
chat template) in prepare_data's train schema; killed with -9 and rerun, no question repeated or lost."""
import json
import os
import signal
import subprocess
import sys
import time

from mcc_kd.data import load_task_file
from tests.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "mcc_kd", "generate_rationales.py")


def questions(path, n):
    items = json.load(open(os.path.join(ROOT, "data", "SVAMP", "test.json")))[:n]
    json.dump(items, open(path, "w"))
    return items


def command(teacher, input_file, output_file, **flags):
    cmd = [sys.executable, SCRIPT, "--task", "SVAMP", "--input_file", str(input_file), "--teacher", str(teacher),
           "--output_file", str(output_file)]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def test_real_teacher_writes_k_chat_template_samples_per_question_in_the_train_schema(smollm2_dir, tmp_path):
    items = questions(tmp_path / "q.json", 3)
    done = subprocess.run(command(smollm2_dir, tmp_path / "q.json", tmp_path / "out.jsonl", samples=2,
                                  temperature=0.7, max_new_tokens=24, batch_size=3),
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chat template" in done.stdout
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert sorted(r["index"] for r in lines) == [0, 1, 2]
    assert all(len(r["output"]) == 2 and all(o.strip() for o in r["output"]) for r in lines)
    assert any(r["output"][0] != r["output"][1] for r in lines)  # sampled, not greedy
    train = load_task_file(tmp_path / "out.json", train=True)  # the schema prepare_data filters
    assert [x["instruction"] for x in train] == [x["instruction"] for x in items]


def test_killed_and_rerun_neither_repeats_nor_loses_a_question(tmp_path):
    teacher = save_tiny("llama", tmp_path / "teacher")
    questions(tmp_path / "q.json", 40)
    out = tmp_path / "out.jsonl"
    cmd = command(teacher, tmp_path / "q.json", out, samples=2, temperature=1.0, max_new_tokens=12, batch_size=1)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_text().splitlines()
    assert 3 <= len(before) < 40, "the kill must land mid-run"
    with open(out, "a") as f:  # and a line torn by the kill
        f.write('{"index": 39, "instruction": "cut')
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    after = [json.loads(line) for line in open(out)]
    assert sorted(r["index"] for r in after) == list(range(40))  # each question exactly once
    assert [json.dumps(r) for r in after[:len(before)]] == [json.dumps(json.loads(b)) for b in before]  # kept
    by_instruction = {r["instruction"]: r for r in after}
    for x in load_task_file(tmp_path / "out.json", train=True):  # the schema prepare_data filters
        assert x["output"] == [o for o in by_instruction[x["instruction"]]["output"] if o.strip()]


def test_teacher_prompts_are_the_chat_template_token_ids_transformers_builds(smollm2_dir, tmp_path, monkeypatch):
    """The ids handed to the sampler are transformers' own apply_chat_template of the user turn (question + the
    step-by-step cue) with the generation prompt, not merely a run that says "chat template"."""
    from transformers import AutoTokenizer

    from mcc_kd import generate_rationales
    items = questions(tmp_path / "q.json", 2)
    real, seen = generate_rationales.generate, []

    def recording(model, prompts, **kw):
        seen.extend(prompts)
        return real(model, prompts, **kw)
    monkeypatch.setattr(generate_rationales, "generate", recording)
    generate_rationales.main(task="SVAMP", input_file=str(tmp_path / "q.json"), teacher=str(smollm2_dir),
                             output_file=str(tmp_path / "out.jsonl"), samples=2, max_new_tokens=2, batch_size=2)
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    want = [list(hf_tok.apply_chat_template([{"role": "user", "content": f"{x['instruction'].strip()}\nLet's think "
                                                                          "step by step."}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False))
            for x in items for _ in range(2)]
    assert [list(p) for p in seen] == want
