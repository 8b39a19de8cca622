"""run.sh's closing table: the paired comparison against the base model and its sign test."""
import json
import math

from mcc_kd.summary import sign_test, versus


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    assert sign_test(0, 0) == 1.0
    assert math.isclose(sign_test(9, 1), 2 * (1 + 10) / 2 ** 10)
    assert math.isclose(sign_test(1, 9), sign_test(9, 1))
    assert sign_test(5, 5) == 1.0  # capped: both tails overlap at the middle


def test_versus_counts_items_gained_and_lost_on_the_same_indices(tmp_path):
    base = [{"index": i, "correct": ok} for i, ok in enumerate([True, False, False, True])]
    mine = [{"index": i, "correct": ok} for i, ok in enumerate([True, True, True, False])]
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "m.json").write_text(json.dumps(list(reversed(mine))))  # order must not matter
    assert versus(str(tmp_path / "m.json"), str(tmp_path / "b.json")) == f"+2 / -1 (p {sign_test(2, 1):.2f})"
