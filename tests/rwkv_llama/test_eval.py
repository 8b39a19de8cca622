"""rwkv_llama/eval.py: perplexity against torch's own cross-entropy, and the student it rebuilds."""
import json
import math
import os

import torch
import torch.nn.functional as F

from rwkv_llama import eval as rwkv_eval
from rwkv_llama.data import chat_stream, encode
from rwkv_llama.model import build_hybrid
from rwkv_llama.train import save_student
from tests.tiny import char_tokenizer, save_tiny, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAL = os.path.join(ROOT, "data/rwkv_llama/ultrachat_standin/validation.jsonl")


def test_perplexity_is_exp_of_torch_cross_entropy_on_the_pre_shifted_labels():
    model, tok = tiny_model("llama"), char_tokenizer()
    tok.pad_token = tok.eos_token
    rows = [encode(raw, tok, 96) for raw in chat_stream(VAL)][:6]
    got = rwkv_eval.perplexity(model, iter(rows), micro_bsz=4)   # consumed lazily
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    attn = (torch.arange(96)[None] < torch.tensor([r["length"] for r in rows])[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert math.isclose(got["perplexity"], math.exp(float(ce)), rel_tol=1e-5)
    assert got["tokens"] == int((labels != -100).sum())


def test_kl_to_teacher_is_torch_kl_div_over_the_label_tokens():
    student, teacher, tok = tiny_model("llama", seed=1), tiny_model("llama", seed=2), char_tokenizer()
    tok.pad_token = tok.eos_token
    rows = [encode(raw, tok, 96) for raw in chat_stream(VAL)][:6]
    got = rwkv_eval.perplexity(student, rows, micro_bsz=4, teacher=teacher)
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.stack([r["labels"] for r in rows]) != -100
    attn = (torch.arange(96)[None] < torch.tensor([r["length"] for r in rows])[:, None]).long()
    with torch.no_grad():
        s_logp = F.log_softmax(student(input_ids=ids, attention_mask=attn).logits.double(), -1)[mask]
        t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=attn).logits.double(), -1)[mask]
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / mask.sum()  # KL(teacher || student)
    assert math.isclose(got["kl_to_teacher"], float(kl), rel_tol=1e-4) and got["kl_to_teacher"] > 0
    assert "kl_to_teacher" not in rwkv_eval.perplexity(student, rows, micro_bsz=4)


def test_eval_rebuilds_a_saved_student_and_writes_metrics_and_predictions(tmp_path):
    teacher_dir = save_tiny("llama", tmp_path / "teacher")
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    student = build_hybrid(AutoModelForCausalLM.from_pretrained(teacher_dir), [1], head_size=8)
    save_student(student, str(tmp_path / "student.safetensors"),
                 dict(model_id=teacher_dir, head_size=8, kv_layout="tile"))
    rebuilt = rwkv_eval.build_model(teacher_dir, str(tmp_path / "student.safetensors"))
    ids = torch.randint(4, 100, (1, 12))
    torch.testing.assert_close(rebuilt(ids).logits, student.eval()(ids).logits, atol=0, rtol=0)
    rwkv_eval.main(teacher_dir, ckpt_file=str(tmp_path / "student.safetensors"), val_data=VAL,
                   max_seq_length=64, max_batches=2, n_prompts=2, max_new_tokens=5, output_dir=str(tmp_path / "ev"))
    metrics = json.load(open(tmp_path / "ev/metrics.json"))
    assert metrics["perplexity"] > 1 and metrics["tokens"] > 0 and metrics["kl_to_teacher"] > 0
    rwkv_eval.main(teacher_dir, val_data=VAL, max_seq_length=64, max_batches=2, n_prompts=0,
                   output_dir=str(tmp_path / "ev_teacher"))
    assert "kl_to_teacher" not in json.load(open(tmp_path / "ev_teacher/metrics.json"))  # the teacher itself
    preds = [json.loads(line) for line in open(tmp_path / "ev/predictions.jsonl")]
    assert len(preds) == 2 and preds[0]["prompt"].endswith("Assistant : ")
