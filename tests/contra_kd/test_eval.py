import json
import os

import pytest
import torch

from contra_kd.eval import (PAPER, clean_response, exact_match, main, no_repeat_ngram, plot_curves, results_markdown,
                            rouge_l)
from tests.tiny import char_tokenizer, save_tiny, tiny_model


def test_rouge_l_is_the_stemmed_f_measure_max_over_references():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, refs = "The cats were running home", ["a dog ran", "cat running to the home"]
    assert rouge_l(pred, refs) == max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert rouge_l("Running cats", "run cat") == 1.0  # Porter stemming, lower case
    assert rouge_l("x", "y") == 0.0


def test_exact_match_normalises_case_punctuation_and_spaces_but_keeps_articles():
    assert exact_match("  The Answer, is 42! ", ["the answer is 42"]) == 1.0
    assert exact_match("answer is 42", "the answer is 42") == 0.0


def test_response_is_cut_at_the_first_eos_text_and_stripped():
    tok = char_tokenizer()
    ids = tok.encode(" hello ", add_special_tokens=False)
    assert clean_response(tok, ids) == "hello"
    assert clean_response(tok, ids + [tok.eos_token_id] + tok.encode("more", add_special_tokens=False)) == "hello"


def test_no_repeat_ngram_hook_matches_transformers_generate():
    from common.generation import generate
    model = tiny_model("gpt2", seed=4)
    prompts = [[5, 6, 7, 5, 8], [9, 9, 3]]  # no repeated bigram inside a prompt
    ours = generate(model, prompts, 20, temperature=0.0, pad_id=0, logits_processor=no_repeat_ngram(2))
    for prompt, got in zip(prompts, ours):
        want = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, no_repeat_ngram_size=2,
                              pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert list(got) == want
        seq = prompt + list(got)
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_table_puts_our_numbers_beside_the_paper_rows():
    results = {"dolly": {"rougeL_mean": 12.3456, "rougeL_std": 0.5}, "sinst": {"rougeL_mean": 3.0, "rougeL_std": 0.0}}
    table = results_markdown({"tiny": results, "other": {"sinst": results["sinst"]}}, "gpt2")
    assert "| tiny (ours) | 12.35 ± 0.50 | 3.00 ± 0.00 |" in table and "| other (ours) | - | 3.00 ± 0.00 |" in table
    assert "| DistiLLM+CONTRA (paper) | 26.22 | 25.07 |" in table
    assert set(PAPER) == {"gpt2", "openllama2", "llama2"}
    with pytest.raises(ValueError, match="--paper-pair 'gpt3'"):
        results_markdown({"tiny": results}, "gpt3")


def test_eval_writes_predictions_results_table_and_curves(tmp_path):
    model = save_tiny("gpt2", tmp_path / "model", n_positions=512)
    data = tmp_path / "instruct"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("dolly/valid.jsonl", "sinst/11_/valid.jsonl"):
        os.makedirs(data / os.path.dirname(name), exist_ok=True)
        with open(os.path.join(root, "data/instruct", name)) as f:
            short = sorted(f, key=lambda line: len(json.loads(line)["prompt"]))[:3]
        (data / name).write_text("".join(short))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "step", "unit": 1, "step": 0, "loss": 3.0, "loss_contra": 0.2},
        {"kind": "step", "unit": 2, "step": 1, "loss": 2.5, "loss_contra": 0.1},
        {"kind": "step", "unit": 3, "refit_round": 0, "loss_rf": 0.4},
        {"kind": "epoch", "unit": 4, "epoch": 0, "dev_loss": 2.4, "dev_rougeL": 4.0}]))
    main(model, str(tmp_path / "out"), data_dir=str(data), sets="dolly,sinst", seeds="10,20", batch_size=2,
         max_prompt_length=300, max_length=316, label="tiny", paper_pair="gpt2", metrics=str(metrics))
    results = json.load(open(tmp_path / "out/results.json"))["results"]
    assert set(results) == {"dolly", "sinst"} and results["sinst"]["items"] == 3
    assert set(results["dolly"]["per_seed"]) == {"10", "20"}
    predictions = json.load(open(tmp_path / "out/predictions.json"))
    assert len(predictions["sinst"]["10"]) == 3 and isinstance(predictions["sinst"]["10"][0]["references"], list)
    assert "| tiny (ours) |" in (tmp_path / "out/results.md").read_text()
    assert (tmp_path / "out/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_need_something_to_plot(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"kind": "epoch", "unit": 0, "epoch": -1}\n')
    with pytest.raises(ValueError, match="no 'loss\\*' step rows"):
        plot_curves(str(tmp_path / "m.jsonl"), str(tmp_path / "c.png"))


def test_paired_comparison_pairs_items_over_training_seeds_and_averages_sampling_seeds(tmp_path):
    from common.metrics import paired_test
    from contra_kd.eval import item_rouge, paired_comparison

    def run(name, per_sampling_seed):  # {sampling seed: per-item Rouge-L}
        folder = tmp_path / name
        folder.mkdir()
        (folder / "predictions.json").write_text(json.dumps(
            {"dolly": {seed: [{"rougeL": x} for x in xs] for seed, xs in per_sampling_seed.items()}}))
        return str(folder)
    a = [run("a1", {"10": [10, 20, 30], "20": [20, 20, 10]}), run("a2", {"10": [5, 25, 35], "20": [15, 15, 5]})]
    b = [run("b1", {"10": [0, 10, 30], "20": [10, 10, 10]}), run("b2", {"10": [5, 5, 5], "20": [5, 5, 5]})]
    init = [run("init", {"10": [1, 2, 3], "20": [1, 2, 3]})]
    assert item_rouge(a[0]) == {"dolly": [15, 20, 20]}  # mean over sampling seeds, item by item
    text = paired_comparison({"A": a, "B": b, "init": init})
    diff, p = paired_test([[15, 20, 20], [10, 20, 20]], [[5, 10, 20], [5, 5, 5]])
    assert f"- A - B on dolly: {diff:+.2f} (p {p:.3g}; 3 items x 2 seeds; per seed +6.67 +11.67)" in text
    diff, p = paired_test([[15, 20, 20], [10, 20, 20]], [[1, 2, 3], [1, 2, 3]])  # the shared start, for every seed
    assert f"- A - init on dolly: {diff:+.2f} (p {p:.3g}; 3 items x 2 seeds" in text and "- B - init on dolly" in text
