"""`--metric llava-med` against LLaVA-Med v1.0.0's published scoring, worked by hand.

How each expected value is derived: LLaVA-Med's `run_eval_batch.py` lowercases the ground truth and
the prediction and runs `normalize_word` on both (eval_metrics/glossary.py): each punctuation mark
of its list is deleted when it stands beside a space (or the text holds a number like "1,000"),
else replaced by a space; a period not followed by a digit is deleted; "none"/"zero".."ten" become
digits; "a", "an", "the" are dropped. Closed questions score 1 when the normalised answer is a
substring of the normalised prediction. Open questions score the `recall` of `calculate_f1score`:
tp = sum of the prediction's counts of words also in the answer, fn = sum of the answer's counts
of words missing from the prediction, recall = tp / (tp + fn), and 0 when tp is 0.
"""

from __future__ import annotations

import pytest

from kit.core.errors import KitError
from kit.eval.metrics import (
    change_interval,
    interval,
    llava_med_closed,
    llava_med_normalize,
    llava_med_open_recall,
    score,
)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("No, there is no fracture.", "no", 1.0),  # ", " -> "," deleted; final "." deleted; "no" found
        ("Yes.", "no", 0.0),
        ("There is not a fracture.", "no", 1.0),  # substring: "no" is inside "not"
        ("The finding is normal", "no", 1.0),  # ... and inside "normal"
        ("Yes, it is.", "Yes", 1.0),
        ("left", "Left", 1.0),  # a closed answer that is not yes/no
        ("right side", "left", 0.0),
        ("MRI", "CT", 0.0),
    ],
)
def test_closed_is_a_substring_match_after_normalisation(prediction, answer, expected):
    assert llava_med_closed(prediction, answer) == expected
    assert score(prediction, answer, "closed") == expected


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("left left lung", "left lung", 1.0),  # tp = 2 + 1, fn = 0
        ("left left kidney", "left lung", 2 / 3),  # tp = 2 (left twice), fn = 1 (lung): the repeat counts
        ("The two nodules", "2 nodules", 1.0),  # "the" dropped, "two" -> "2"
        ("3.5 cm lesion.", "3.5 cm", 1.0),  # the decimal's period stays, the final one goes
        ("left-sided effusion", "left", 1.0),  # a glued "-" becomes a space: "left sided effusion"
        ("1,000 cells", "1000", 1.0),  # a comma inside a number: punctuation deleted outright
        ("none seen", "zero", 1.0),  # both become "0"
        ("nothing", "none", 0.0),
        ("", "red", 0.0),
        ("blue", "red", 0.0),
        ("liver (hepatic)", "liver", 1.0),  # "(" beside a space is deleted, ")" glued -> space
    ],
)
def test_open_recall_follows_the_reference_counts(prediction, answer, expected):
    assert llava_med_open_recall(prediction, answer) == pytest.approx(expected)
    assert score(prediction, answer, "open") == pytest.approx(expected)


def test_normalisation_details():
    assert llava_med_normalize("the left-sided mass.") == "left sided mass"
    assert llava_med_normalize("an isnt dont") == "isn't don't"
    assert llava_med_normalize("3.5 mm, 2 mm") == "3.5 mm 2 mm"
    assert llava_med_normalize("lets go") == "lets go"  # only the scorer's own contraction spellings map


def test_strict_is_kits_own_and_unknown_metrics_are_named():
    assert score("There is not a fracture.", "no", "closed", "strict") == 0.0  # no yes/no word
    assert score("left left kidney", "left lung", "open", "strict") == 0.5
    with pytest.raises(KitError, match="unknown metric 'vqa'; choose one of llava-med, strict"):
        score("a", "b", "open", "vqa")


def test_bootstrap_intervals():
    assert interval([]) is None
    assert interval([1.0] * 7) == (1.0, 1.0)
    lo, hi = interval([1.0] * 10 + [0.0] * 10)
    # The normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 20) = [0.28, 0.72].
    assert abs(lo - 0.28) < 0.05 and abs(hi - 0.72) < 0.05
    assert interval([1.0] * 10 + [0.0] * 10) == (lo, hi)  # seeded: the same numbers every run
    assert change_interval([0.0, 1.0], [0.0, 1.0]) == (0.0, 0.0)  # paired: no change, no spread
    lo, hi = change_interval([0.0] * 3, [1.0] * 3)
    assert lo == hi == 1.0
    # 3 of 18 questions flip: a resample holds none of them with probability (15/18)^18 = 3.7%, more
    # than 2.5%, so the interval reaches 0: as in the embedded run, too few questions to tell.
    lo, hi = change_interval([0.0] * 18, [1.0] * 3 + [0.0] * 15)
    assert lo == 0.0 and 3 / 18 < hi
    assert change_interval([1.0], [1.0, 0.0]) is None
