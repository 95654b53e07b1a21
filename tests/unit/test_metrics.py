"""Answer metrics (workers/metrics.py) on cases whose values follow from the benchmarks' published rules."""
from __future__ import annotations

import pytest

from workers.metrics import anls, exact_match, pick_metric, relaxed_accuracy, score, vqa_accuracy, vqa_normalise


def test_exact_match_normalises_case_punctuation_and_articles():
    assert exact_match("The red circle.", ["red circle"]) == 1.0
    assert exact_match("a blue  square", ["Blue square", "x"]) == 1.0
    assert exact_match("red", ["blue"]) == 0.0


def test_vqa_accuracy_is_the_mean_over_leave_one_out_subsets():
    # 3 of 10 annotators said "2": the 3 subsets without one of them have 2 matches (2/3), the other 7 have 3 (1).
    refs = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", refs) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("3", refs) == 1.0
    assert vqa_accuracy("4", refs) == 0.0
    assert vqa_accuracy("1", ["1"] + ["0"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0  # one reference: plain match after processing


def test_vqa_normalisation():
    assert vqa_normalise("Two dogs!") == "2 dogs"
    assert vqa_normalise("the isnt") == "isn't"
    assert vqa_normalise("1,000") == "1000"
    assert vqa_normalise("red-white") == "red white"


def test_anls():
    assert anls("hello wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert anls("abc", ["xyz"]) == 0.0
    assert anls(" ABC ", ["zzz", "abc"]) == 1.0
    assert anls("abcdef", ["abcxyz"]) == 0.0  # NL = 0.5 is not below the threshold


def test_relaxed_accuracy():
    assert relaxed_accuracy("10.4", ["10"]) == 1.0
    assert relaxed_accuracy("10.6", ["10"]) == 0.0
    assert relaxed_accuracy("50%", ["0.5"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0


def test_pick_metric_and_unknown():
    assert pick_metric("chartqa", 1) == "relaxed_accuracy"
    assert pick_metric("DocVQA_val", 1) == "anls"
    assert pick_metric("vqav2", 10) == "vqa_accuracy"
    assert pick_metric("gqa", 1) == "exact_match"
    assert score("object_f1", "a red circle and a blue star", ["a blue star, a red circle"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", ["a"])
