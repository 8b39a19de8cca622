"""`bash anli_reverse_kl/run.sh` end to end on a few stand-in rows: every stage runs and the table lists every model."""
import json
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


def test_real_run_sh_takes_the_causal_path_with_chat_prompts_on_a_tiny_llama(tmp_path, smollm2_dir):
    """REAL=1's layout on a tiny random Llama that carries SmolLM2's tokenizer and chat template (standing in for
    the cached SmolLM2 folder): the student cut from it, chat prompts, causal SFT / KD / SeqKD / MiniLLM, the
    teacher evaluated on dev before distillation, every model in the table."""
    from transformers import AutoTokenizer

    from tests.tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model_dir = tmp_path / "smollm2-tiny"
    tiny_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (model_dir / "SOURCE.md").write_text("a tiny random stand-in for the fetched model\n")  # fetch reuses it
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 10), ("dev", 3), ("test", 3)):
        with open(os.path.join(ROOT, "data", "anli_standin", f"{split}_r1.jsonl")) as f:
            (src / f"{split}_r1.jsonl").write_text("".join(f.readlines()[:n]))
    env = dict(os.environ, REAL="1", MODEL_DIR=str(model_dir), OUT=str(tmp_path / "out"), SRC=str(src),
               STUDENT_LAYERS="0", EPOCHS="1", BATCH="4", MAX_NEW="4", TOTAL_ITERS="1", ROLLOUTS="4")
    done = subprocess.run(["bash", "anli_reverse_kl/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "== the teacher on r1 dev before anything is distilled from it" in done.stdout
    prompt = json.loads(open(tmp_path / "out" / "processed" / "r1" / "dev.jsonl").readline())["prompt"]
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert json.load(open(tmp_path / "out" / "student" / "config.json"))["num_hidden_layers"] == 1
    table = (tmp_path / "out" / "comparison.md").read_text()
    for run in ("teacher_sft", "sft", "kd", "seqkd", "minillm"):
        assert f"| {run} r1/dev |" in table and f"| {run} r1/test |" in table
