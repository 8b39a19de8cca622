import json

import pytest
import torch

from atkd import eval as atkd_eval
from atkd.data import load_eval_set
from tests.tiny import save_tiny

SETS = ("dolly", "self-inst", "vicuna", "koala", "wizardlm")

# a module-level judge for --judge tests.atkd.test_eval:fake_judge: one malformed reply in three
def fake_judge(request):
    return ["Assistant 1: 6\nAssistant 2: 8", "I cannot rate this.", "**Assistant 1:** 3/10\n\nAssistant 2: 9/10"][
        request["id"] % 3]


def test_shipped_eval_sets_load_with_the_eval_prompt():
    for name in SETS:
        items = load_eval_set(f"data/instruct/{name}/valid.jsonl")
        assert items and all(x["prompt"].startswith("Human:\n### Instruction:\n") for x in items)
        assert all(x["prompt"].endswith("\n\nAssistant:\n") for x in items)
    dolly = load_eval_set("data/instruct/dolly/valid.jsonl")
    with_input = next(x for x in dolly if x["input"])
    assert f"\n\n### Input:\n{with_input['input']}\n\nAssistant:\n" in with_input["prompt"]
    without = next(x for x in dolly if not x["input"])
    assert "### Input" not in without["prompt"]


@pytest.mark.parametrize("reply,expected", [
    ("Assistant 1: 7\nAssistant 2: 9", (7.0, 9.0)),
    ("**Assistant 1:** 8/10\n\n**Assistant 2:** 6.5/10", (8.0, 6.5)),
    ("  \n8\n\n7\n", (8.0, 7.0)),
    ("8 7", (8.0, 7.0)),
    ("Assistant 1: 8, Assistant 2: 7", (8.0, 7.0)),
    ("Assistant 1: 10 out of 10\nsome words\nAssistant 2: 4", (10.0, 4.0)),
])
def test_judge_parser_reads_scores_from_first_and_last_lines(reply, expected):
    assert atkd_eval.parse_judge_reply(reply) == expected


@pytest.mark.parametrize("reply", ["", "   \n ", "I refuse.", "Assistant 1: 11\nAssistant 2: 5",
                                   "Assistant 1: 7", "no\nscores here", None, 42, "1 2 3"])
def test_judge_parser_skips_malformed_replies(reply):
    assert atkd_eval.parse_judge_reply(reply) is None


def test_judge_score_is_ratio_of_sums_and_counts_skipped():
    r = atkd_eval.judge_score(["Assistant 1: 6\nAssistant 2: 8", "garbage", "Assistant 1: 3\nAssistant 2: 2",
                               "Assistant 1: 12\nAssistant 2: 2"])
    assert r["judge_score"] == pytest.approx(100 * 9 / 10)
    assert (r["judged"], r["skipped"]) == (2, 2)


def test_judge_request_holds_the_released_contract():
    r = atkd_eval.judge_request(3, "Q?", "student says", "reference says")
    assert r["model"] == "gpt-3.5-turbo-1106" and r["temperature"] == 0 and r["max_tokens"] == 64
    assert r["messages"][0]["role"] == "system" and "Assistant 1: <score>" in r["messages"][0]["content"]
    assert r["messages"][1]["content"] == "Question: Q?\nAssistant 1: student says\nAssistant 2: reference says"


def test_predictions_are_greedy_continuations_cut_at_eos(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny("opt", tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = ["Human:\nhi\n\nAssistant:\n", "Human:\na longer question here\n\nAssistant:\n"]
    preds, truncated = atkd_eval.predict(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert truncated == 0
    for prompt, pred in zip(prompts, preds):  # oracle: transformers' own greedy decoding, one prompt at a time
        ids = torch.tensor([tok(prompt).input_ids])
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        ref = ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert pred == tok.decode(ref, skip_special_tokens=True).strip()


def test_eval_writes_predictions_rouge_judge_files_and_scores_replies(tmp_path, monkeypatch):
    path = save_tiny("gpt2", tmp_path / "m")
    out = tmp_path / "eval"
    atkd_eval.main(model_path=path, output_dir=str(out), sets="vicuna,koala", max_new_tokens=8, max_items=4,
                   batch_size=3)
    for name in ("vicuna", "koala"):
        preds = json.loads((out / name / "predictions.json").read_text())
        assert len(preds) == 4 and all({"prediction", "reference", "rougeL"} <= set(p) for p in preds)
        requests = [json.loads(x) for x in (out / name / "judge_requests.jsonl").read_text().splitlines()]
        assert [r["id"] for r in requests] == [0, 1, 2, 3]
        assert requests[1]["messages"][1]["content"].startswith(f"Question: {preds[1]['instruction']}\nAssistant 1:")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"vicuna", "koala"} and "judge_score" not in results["vicuna"]
    assert (out / "results.md").read_text().startswith("| set | items | ROUGE-L")

    # re-score the saved predictions with a pluggable judge: no model needed, replies saved and parsed
    monkeypatch.syspath_prepend(".")
    atkd_eval.main(output_dir=str(out), sets="vicuna", judge="tests.atkd.test_eval:fake_judge")
    replies = (out / "vicuna" / "judge_replies.jsonl").read_text().splitlines()
    assert len(replies) == 4
    results = json.loads((out / "results.json").read_text())["vicuna"]
    # ids 0..3 -> replies (6, 8), skip, (3, 9), (6, 8)
    assert (results["judged"], results["skipped"]) == (3, 1)
    assert results["judge_score"] == pytest.approx(100 * 15 / 25)


def test_eval_rejects_an_unknown_set(tmp_path):
    with pytest.raises(ValueError, match="valid: dolly, self-inst, vicuna, koala, wizardlm"):
        atkd_eval.main(output_dir=str(tmp_path), sets="dolly,alpaca")
