"""anli_reverse_kl/eval.py: generation parser, label-constrained scoring, Rouge-L, per-split metrics."""
import random
from pathlib import Path

import pytest
import torch

from anli_reverse_kl.eval import label_scores, parse_generation, rouge_l, split_metrics
from anli_reverse_kl.prepare_data import LABEL_WORDS
from tests.tiny import char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, word, reason", [
    ("entailment:The man sleeps.", "entailment", "the man sleeps."),
    ("  Contradiction : no way", "contradiction", "no way"),
    ("neutral", "neutral", ""),                                   # no ":" -> the whole text
    ("neutral, because it says so", "neutral", ""),               # first word, punctuation stripped
    ("Entailment. It follows: yes", "entailment", "yes"),
    ("", "", ""),
    (":only a reason", "", "only a reason"),
    ("maybe so", "maybe", ""),
])
def test_generation_parser_takes_first_word_before_colon_and_handles_no_colon(text, word, reason):
    assert parse_generation(text) == (word, reason)


def test_rouge_l_is_one_for_identical_text_and_uses_stemming():
    assert rouge_l("the man is sleeping", "the man is sleeping") == pytest.approx(1.0)
    assert rouge_l("the men sleeps", "the man sleeping") == pytest.approx(rouge_l("the man sleep", "the man sleep")
                                                                          * 2 / 3)


@torch.no_grad()
def teacher_labels(model, prompts, words):
    """The label each prompt's teacher prefers, from transformers' own loss on each word (no EOS)."""
    out = []
    for p in prompts:
        nll = [model(input_ids=torch.tensor([p]), labels=torch.tensor([w])).loss.item() * len(w) for w in words]
        out.append(LABEL_WORDS[min(range(3), key=nll.__getitem__)])
    return out


def test_label_constrained_accuracy_is_one_for_the_teacher_that_produced_the_labels():
    tok = char_tokenizer()
    words = [tok.encode(w) for w in LABEL_WORDS]
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 100) for _ in range(rng.randrange(3, 12))] + [1] for _ in range(24)]
    teacher = tiny_model("t5", seed=2, initializer_factor=30.0)  # larger weights: labels vary across prompts
    labels = teacher_labels(teacher, prompts, words)
    assert len(set(labels)) > 1, labels
    records = [dict(uid=str(i), label=lab, reason="", target_tokens=words[LABEL_WORDS.index(lab)] + [1])
               for i, lab in enumerate(labels)]
    scores, first = label_scores(teacher, prompts, words, pad_id=0, batch_size=5)
    _, metrics = split_metrics(records, scores, first, None)
    assert metrics["label_accuracy"] == 1.0
    other = tiny_model("t5", seed=7, initializer_factor=30.0)
    _, metrics = split_metrics(records, *label_scores(other, prompts, words, pad_id=0), None)
    assert metrics["label_accuracy"] < 1.0


def test_label_scores_do_not_depend_on_batch_padding():
    tok = char_tokenizer()
    words = [tok.encode(w) for w in LABEL_WORDS]
    prompts = [[5, 6, 7, 1], [8, 9, 10, 11, 12, 13, 14, 1], [20, 1]]
    model = tiny_model("t5", seed=4)
    together, _ = label_scores(model, prompts, words, pad_id=0, batch_size=3)
    alone = torch.cat([label_scores(model, [p], words, pad_id=0)[0] for p in prompts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_split_metrics_count_invalid_generations_and_rouge_over_items_with_a_reason():
    records = [dict(uid="a", label="entailment", reason="he sleeps", target_tokens=[5]),
               dict(uid="b", label="neutral", reason="", target_tokens=[6]),
               dict(uid="c", label="contradiction", reason="no", target_tokens=[7])]
    scores = torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, -2.0], [-3.0, -2.0, -1.0]])
    first = torch.tensor([5, 9, 7])
    gens = ["entailment:he sleeps", "maybe", "Contradiction"]
    preds, m = split_metrics(records, scores, first, gens)
    assert m["label_accuracy"] == pytest.approx(2 / 3) and m["token_accuracy"] == pytest.approx(2 / 3)
    assert m["generation_accuracy"] == pytest.approx(2 / 3) and m["invalid"] == 1
    assert m["n_with_reason"] == 2 and m["rougeL"] == pytest.approx(0.5)  # 1.0 and 0.0 (empty generated reason)
    assert preds[1]["generation_pred"] == "maybe"


@torch.no_grad()
def test_causal_label_scores_are_the_words_log_likelihood_after_the_prompt():
    """A causal LM scores each word right after the prompt: the sum of its tokens' log-probs equals
    -len(word) x transformers' own mean loss on prompt + word with the prompt masked; the token-level
    prediction is the argmax at the prompt's last position. Padding in the batch changes nothing."""
    tok = char_tokenizer()
    words = [tok.encode(w) for w in LABEL_WORDS]
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    model = tiny_model("llama", seed=3)
    scores, first = label_scores(model, prompts, words, pad_id=0, batch_size=2)
    for i, p in enumerate(prompts):
        for k, w in enumerate(words):
            ids = torch.tensor([p + w])
            labels = torch.tensor([[-100] * len(p) + w])
            expected = -model(input_ids=ids, labels=labels).loss.item() * len(w)
            assert scores[i, k].item() == pytest.approx(expected, abs=1e-4)
        assert first[i].item() == model(input_ids=torch.tensor([p])).logits[0, -1].argmax().item()
    alone = torch.cat([label_scores(model, [p], words, pad_id=0)[0] for p in prompts])
    assert torch.allclose(scores, alone, atol=1e-5)


def test_eval_runs_a_causal_model_on_a_prepared_round(tmp_path):
    from anli_reverse_kl import prepare_data
    from anli_reverse_kl.eval import main
    from tests.tiny import save_tiny

    model_dir = save_tiny("llama", tmp_path / "model", seed=1, max_position_embeddings=1024)
    prepare_data.main(data_dir=str(ROOT / "data" / "anli_standin"), tokenizer=str(model_dir), save=str(tmp_path / "data"),
                      rounds="r1", splits="dev", max_prompt_length=512)
    main(model_path=str(model_dir), data_dir=str(tmp_path / "data"), save=str(tmp_path / "eval"), rounds="r1",
         splits="dev", max_new_tokens=4)
    import json
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))["r1/dev"]
    assert metrics["n"] == 60 and 0 <= metrics["label_accuracy"] <= 1 and metrics["invalid"] <= 60
    predictions = json.load(open(tmp_path / "eval" / "r1-dev-predictions.json"))
    assert len(predictions) == 60 and "generation" in predictions[0]
