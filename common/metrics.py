"""Text metrics the evaluations share.

    rouge_l("the cats sat", ["a dog ran", "the cat sat"])   # 1.0: max over references, Porter stemming

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
