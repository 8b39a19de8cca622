import pytest
from rouge_score import rouge_scorer

from common.metrics import rouge_l


def test_rouge_l_is_rouge_score_f_with_stemming_max_over_references():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, refs = "the cats sat on a mat today", ["a dog ran", "the cat sat on the mat", "cats sat"]
    assert rouge_l(pred, refs) == max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert rouge_l("Running cats", "run cat") == 1.0  # Porter stemming, lower case
    assert rouge_l("x", "y") == 0.0
    assert 0.0 < rouge_l("the men sleeps", "the man sleeping") < 1.0


def test_rouge_l_without_references_is_an_error():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("x", [])
