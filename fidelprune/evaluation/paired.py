"""Paired comparison of two models on the same zero-shot documents.

Two models answering the same items disagree on only a few of them, so the difference of their accuracies is
far better determined than the two accuracies' own errors suggest: a paired test (the exact McNemar test on
the items exactly one of them gets right) can call a 1-point drop significant where the unpaired error bars
overlap, and rightly call a 3-point drop on a small sample noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # accuracy of a minus accuracy of b, as a fraction
    stderr: float  # standard error of that mean over the items
    only_a: int  # items a got right and b wrong
    only_b: int  # items b got right and a wrong

    @property
    def p_value(self) -> float:
        return mcnemar_p(self.only_a, self.only_b)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: of the items exactly one of two models gets right, is the split 50/50?"""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_difference(outcomes_a: Sequence, outcomes_b: Sequence) -> PairedDifference:
    """a minus b over the same items; outcomes are 0/1 per item, as numbers or as the characters of a string."""
    if len(outcomes_a) != len(outcomes_b):
        raise ValueError(f"paired outcomes must cover the same items ({len(outcomes_a)} vs {len(outcomes_b)})")
    if len(outcomes_a) < 2:
        raise ValueError("a paired difference needs at least 2 items")
    diffs = [int(float(x)) - int(float(y)) for x, y in zip(outcomes_a, outcomes_b)]
    n = len(diffs)
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return PairedDifference(mean, stderr, diffs.count(1), diffs.count(-1))


def average_difference(differences: Sequence[PairedDifference]) -> tuple[float, float]:
    """(mean over tasks of the per-task differences, its standard error with the tasks taken as independent)."""
    if not differences:
        raise ValueError("no paired differences to average")
    n = len(differences)
    return sum(d.mean for d in differences) / n, math.sqrt(sum(d.stderr**2 for d in differences)) / n
