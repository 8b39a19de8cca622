"""generate_data.py -> train.py --type seqkd -> eval.py, in process on the tiny round: files and their contents."""
import json
import re

import pytest
import torch

from anli_reverse_kl import eval as anli_eval
from anli_reverse_kl import generate_data
from anli_reverse_kl.prepare_data import FIELDS, LABEL_WORDS, read_items
from anli_reverse_kl.train import train


def test_teacher_outputs_replace_the_targets_and_train_seqkd_then_eval_writes_predictions(run_dir):
    out = run_dir / "seqkd_data"
    generate_data.main(teacher_model_path=str(run_dir / "teacher"), data_dir=str(run_dir / "data" / "r1"),
                       save=str(out), max_new_tokens=6, batch_size=8)
    gold, generated = read_items(str(run_dir / "data" / "r1"), "train"), read_items(str(out), "train")
    assert len(generated) == len(gold) == 16
    for g, t in zip(gold, generated):
        assert {k: g[k] for k in FIELDS if k != "target"} == {k: t[k] for k in FIELDS if k != "target"}
        assert 1 <= len(t["target"]) <= 6
    assert any(g["target"] != t["target"] for g, t in zip(gold, generated))
    assert json.loads((out / "seqkd.json").read_text())["items"] == 16

    train(type="seqkd", model_path=str(run_dir / "student"), data_dir=str(out), save=str(run_dir / "seqkd"),
          batch_size=8, gradient_accumulation_steps=1, epochs=1, max_prompt_length=512, save_interval=100)
    log = [json.loads(line) for line in (run_dir / "seqkd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["tokens_per_s"] > 0 for r in log)

    anli_eval.main(model_path=str(run_dir / "seqkd" / "model"), data_dir=str(run_dir / "data"), rounds="r1",
                   splits="dev", save=str(run_dir / "eval"), max_new_tokens=8, batch_size=4)
    predictions = json.loads((run_dir / "eval" / "r1-dev-predictions.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["r1/dev"]
    assert len(predictions) == metrics["n"] == 6
    want = independent_metrics(run_dir / "seqkd" / "model", run_dir / "data" / "r1" / "dev.jsonl", max_new_tokens=8)
    for key in ("label_accuracy", "token_accuracy", "generation_accuracy", "invalid", "n_with_reason"):
        assert metrics[key] == want[key], key
    assert (metrics["rougeL"] is None) == (want["rougeL"] is None)
    if want["rougeL"] is not None:
        assert metrics["rougeL"] == pytest.approx(want["rougeL"], abs=1e-9)
    assert "| r1/dev |" in (run_dir / "eval" / "metrics.md").read_text()


def test_a_causal_teacher_continues_each_prompt_without_its_closing_eos(tmp_path):
    """Greedy teacher outputs of a causal LM equal transformers' own generate on the prompt minus its EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    from anli_reverse_kl.prepare_data import write_tokenized
    from tests.tiny import char_tokenizer, save_tiny

    tok = char_tokenizer()
    teacher = save_tiny("llama", tmp_path / "teacher", seed=3)
    prompts = [tok.encode(f"premise {i} and a hypothesis{'!' * i}?") + [tok.eos_token_id] for i in range(5)]
    records = [dict(uid=str(i), prompt="", target="", label="", reason="", prompt_tokens=p, target_tokens=[])
               for i, p in enumerate(prompts)]
    write_tokenized(str(tmp_path / "data"), "train", [p + [-1] + tok.encode("yes") + [1] + [-1] * 4 for p in prompts],
                    records, len(tok))
    generate_data.main(teacher_model_path=str(teacher), data_dir=str(tmp_path / "data"), save=str(tmp_path / "out"),
                       max_new_tokens=5, temperature=0.0, batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    for prompt, item in zip(prompts, read_items(str(tmp_path / "out"), "train")):
        ids = torch.tensor([prompt[:-1]])
        want = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id) + 1]
        assert item["target"] == want and item["prompt"] == prompt


@torch.no_grad()
def independent_metrics(model_dir, dev_jsonl, max_new_tokens):
    """The split's metrics from transformers alone: the label word with the lowest summed NLL (its own loss x
    length), the first-position argmax against the target's first token, greedy `generate` parsed as the first
    word before ":", and rouge-score Rouge-L (stemming) of the text after ":" against the gold reason."""
    from rouge_score import rouge_scorer
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tok = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    words = [tok.encode(w, add_special_tokens=False) for w in LABEL_WORDS]
    rows = [json.loads(line) for line in open(dev_jsonl)]
    label_ok = token_ok = gen_ok = invalid = 0
    rouge = []
    for row in rows:
        ids = torch.tensor([row["prompt_tokens"]])
        nll = [model(input_ids=ids, labels=torch.tensor([w])).loss.item() * len(w) for w in words]
        label_ok += LABEL_WORDS[min(range(3), key=nll.__getitem__)] == row["label"]
        start = torch.tensor([[model.config.decoder_start_token_id]])
        token_ok += model(input_ids=ids, decoder_input_ids=start).logits[0, 0].argmax().item() == \
            row["target_tokens"][0]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        text = tok.decode(out[0], skip_special_tokens=True).strip()
        head, _, reason = text.partition(":")
        word = re.sub(r"[^a-z-]", "", head.lower().split()[0]) if head.split() else ""
        gen_ok += word == row["label"]
        invalid += word not in LABEL_WORDS
        if row["reason"]:
            rouge.append(scorer.score(row["reason"], reason.strip()).get("rougeL").fmeasure)
    n = len(rows)
    return dict(label_accuracy=label_ok / n, token_accuracy=token_ok / n, generation_accuracy=gen_ok / n,
                invalid=invalid, n_with_reason=len(rouge), rougeL=sum(rouge) / len(rouge) if rouge else None)
