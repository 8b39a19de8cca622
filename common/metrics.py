"""Metrics the evaluations share.

    rouge_l("the cats sat", ["a dog ran", "the cat sat"])   # 1.0: max over references, Porter stemming
    paired_test(scores_a, scores_b)                          # (mean difference, p): paired sign-flip test

Rouge-L is Google's `rouge-score` (the scorer MiniLLM, DistiLLM, CONTRA-KD and the ATKD / ANLI specs name):
the F-measure of the longest common subsequence, default tokenizer (lower case, alphanumeric tokens),
stemming on. In [0, 1]; the tables multiply by 100.
"""
from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references) -> float:
    """Rouge-L F of `prediction` against one reference (a str) or the best of several (a list)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    return max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def paired_test(a, b, n_resamples: int = 100_000, seed: int = 0) -> tuple[float, float]:
    """(mean of a - b, two-sided p) of a paired sign-flip permutation test: are two systems' scores on the same
    units different beyond noise?

    a, b: scores on the same items, [items], or [seeds, items] (row s = training seed s, column i = item i of
    both systems): the statistic is the mean difference; under the null each item's difference (a whole
    column: all seeds of that item) is as likely negated, so seeds of one item are not counted as independent
    samples. Exact over all 2^n sign patterns for n <= 16 items, else `n_resamples` random ones (p = (hits + 1)
    / (n_resamples + 1), a valid p-value).
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1] == 0:
        raise ValueError(f"paired_test needs two [items] or [seeds, items] arrays of one shape, got {a.shape}, {b.shape}")
    d = (a - b).reshape(-1, a.shape[-1]).mean(0)  # per item, over seeds
    observed = abs(d.mean())
    n = d.size
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(d.mean()), float(np.mean(np.abs(signs @ d / n) >= observed - 1e-12))
    rng, hits = np.random.default_rng(seed), 0
    for start in range(0, n_resamples, 10_000):  # in blocks: [10k, n] signs at a time
        signs = rng.choice([-1.0, 1.0], size=(min(10_000, n_resamples - start), n))
        hits += int(np.sum(np.abs(signs @ d / n) >= observed - 1e-12))
    return float(d.mean()), (hits + 1) / (n_resamples + 1)
