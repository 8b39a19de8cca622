import pytest
from rouge_score import rouge_scorer

from common.metrics import paired_test, rouge_l


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


def _enumerated_p(d):
    """The exact sign-flip p by brute force: every sign pattern, |mean| at least the observed one."""
    import itertools

    observed = abs(sum(d) / len(d))
    flips = list(itertools.product((1, -1), repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= observed - 1e-12 for signs in flips) / len(flips)


def test_paired_test_is_the_exact_sign_flip_test_for_few_items():
    a, b = [3.0, 1.5, 4.0, 2.0, 5.5, 0.5], [1.0, 2.0, 1.0, 1.0, 2.5, 0.0]
    diff, p = paired_test(a, b)
    assert diff == pytest.approx(sum(x - y for x, y in zip(a, b)) / 6)
    assert p == pytest.approx(_enumerated_p([x - y for x, y in zip(a, b)]))
    assert paired_test(b, a) == (pytest.approx(-diff), pytest.approx(p))  # two-sided, antisymmetric difference
    assert paired_test(a, a) == (0.0, 1.0)


def test_paired_test_with_seeds_flips_whole_items_and_samples_many():
    import numpy as np

    rng = np.random.default_rng(3)
    a = rng.normal(size=(3, 8))
    b = a - 0.1 + rng.normal(scale=0.5, size=(3, 8))
    diff, p = paired_test(a, b)
    per_item = (a - b).mean(0)  # the seeds of an item count once: the test runs on these 8 values
    assert diff == pytest.approx(per_item.mean()) and p == pytest.approx(_enumerated_p(list(per_item)))
    big_a = rng.normal(size=200)
    assert paired_test(big_a + 1.0, big_a)[1] < 1e-4  # sampled p: (hits + 1) / (draws + 1)
    assert paired_test(big_a, big_a + rng.normal(scale=1e-3, size=200) * 0)[1] == 1.0
    assert paired_test(big_a, big_a[::-1])[1] == pytest.approx(paired_test(big_a, big_a[::-1])[1])  # seeded
    with pytest.raises(ValueError, match="one shape"):
        paired_test([1.0, 2.0], [1.0])
