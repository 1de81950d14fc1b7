"""Case products that the README's test command covers pairwise and `.ci/run` runs whole.

A product of six factors is 96 trajectories; most of what a fault in a kernel looks like is an
interaction of two of them (bf16 with amsgrad, maximize with weight decay). ``covering_product``
puts every pair of factor values in at least one case of the default run and marks the rest of the
product ``extended``, which `.ci/run` runs after the README's command, so every case still runs in
CI."""

from __future__ import annotations

import itertools

import pytest


def _pairs(case: tuple) -> set:
    return {((i, a), (j, b)) for (i, a), (j, b) in itertools.combinations(enumerate(case), 2)}


def pairwise_cases(*factors: list) -> list[tuple]:
    """A small subset of the product of ``factors`` holding every pair of values of any two
    factors; greedy (each next case covers the most pairs not yet covered), so deterministic."""
    product = list(itertools.product(*factors))
    uncovered = set().union(*(_pairs(case) for case in product))
    chosen = []
    while uncovered:
        best = max(product, key=lambda case: len(_pairs(case) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def _id(value) -> str:
    return str(value).removeprefix("torch.")


def covering_product(*factors: list) -> list:
    """Every case of the product as a ``pytest.param``: those of ``pairwise_cases`` unmarked, the
    others marked ``extended``."""
    covering = set(pairwise_cases(*factors))
    return [pytest.param(*case, id="-".join(map(_id, case)),
                         marks=() if case in covering else pytest.mark.extended)
            for case in itertools.product(*factors)]
