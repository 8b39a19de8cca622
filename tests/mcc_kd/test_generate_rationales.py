"""mcc_kd/generate_rationales.py: K samples per question from a real instruct teacher (SmolLM2-135M-Instruct,
chat template) in prepare_data's train schema; killed with -9 and rerun, no question repeated or lost."""
import json
import os
import signal
import subprocess
import sys

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


def _run_killed_in_batch(kwargs, batch):
    """main(**kwargs) in this process, which SIGKILLs itself inside the generate call of `batch` (0-based):
    the batches before it are committed, nothing is cleaned up."""
    from mcc_kd import generate_rationales
    real, calls = generate_rationales.generate, []

    def generate_then_die(*args, **kw):
        calls.append(1)
        if len(calls) == batch + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)
    generate_rationales.generate = generate_then_die
    generate_rationales.main(**kwargs)


def test_killed_and_rerun_writes_the_file_of_an_uninterrupted_run_byte_for_byte(tmp_path):
    """Batches of 3 questions x 2 samples; the run is SIGKILLed in its 4th batch, then the last committed line
    is torn as a kill inside a write leaves it, so the rerun starts mid-batch. Seeds keyed per question and
    sample (not per batch) and whole batches regenerated give the uninterrupted run's bytes."""
    import multiprocessing as mp

    teacher = save_tiny("llama", tmp_path / "teacher")
    items = questions(tmp_path / "q.json", 15)
    flags = dict(samples=2, temperature=1.0, max_new_tokens=12, batch_size=3)
    straight = subprocess.run(command(teacher, tmp_path / "q.json", tmp_path / "straight.jsonl", **flags),
                              cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "out.jsonl"
    kwargs = dict(task="SVAMP", input_file=str(tmp_path / "q.json"), teacher=teacher, output_file=str(out), **flags)
    child = mp.get_context("spawn").Process(target=_run_killed_in_batch, args=(kwargs, 3))
    child.start()
    child.join(1200)
    assert child.exitcode == -signal.SIGKILL
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 9 and all(line.endswith(b"\n") for line in lines)  # batches 0-2 committed, no more
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])  # question 8 torn: batch 2 half done
    rerun = subprocess.run(command(teacher, tmp_path / "q.json", out, **flags), cwd=ROOT, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "8 already in" in rerun.stdout
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert (tmp_path / "out.json").read_bytes() == (tmp_path / "straight.json").read_bytes()
    records = [json.loads(line) for line in open(out)]
    assert [r["index"] for r in records] == list(range(len(items)))
    assert any(r["output"][0] != r["output"][1] for r in records)  # sampled, not greedy


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
