"""Paired comparison of two models on the same documents, against hand counts and scipy's exact binomial test."""

import math

import pytest

from fidelprune.evaluation.paired import average_difference, mcnemar_p, paired_difference


def test_paired_difference_against_hand_counts():
    # 8 items: a alone right on 3, b alone right on 1, both right on 2, both wrong on 2
    difference = paired_difference("11100110", [0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    diffs = [1, 1, 1, -1, 0, 0, 0, 0]
    assert (difference.only_a, difference.only_b, difference.mean) == (3, 1, 0.25)
    assert difference.stderr == pytest.approx(math.sqrt(sum((d - 0.25) ** 2 for d in diffs) / 7 / 8), abs=1e-15)
    assert difference.p_value == mcnemar_p(3, 1) == 2 * (1 + 4) / 16  # two-sided exact binomial on the 4 discordant
    assert mcnemar_p(0, 6) == 2 / 64 and mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0


def test_mcnemar_p_is_scipys_two_sided_exact_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in [(3, 1), (0, 6), (12, 30), (47, 51), (1, 0), (100, 140)]:
        expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_average_difference_takes_tasks_as_independent():
    first, second = paired_difference("1100", "0100"), paired_difference("0011", "0111")
    mean, stderr = average_difference([first, second])
    assert mean == pytest.approx((0.25 - 0.25) / 2)
    assert stderr == pytest.approx(math.sqrt(first.stderr**2 + second.stderr**2) / 2)


def test_unpaired_outcomes_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_difference("110", "11")
    with pytest.raises(ValueError, match="no paired differences"):
        average_difference([])
