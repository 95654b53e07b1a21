"""Token-budget packing invariants."""
from __future__ import annotations

import random

import pytest

from workers.batching import fixed_rows, pack_by_budget, padding_fraction


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_and_budget_respected(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(5, 300) for _ in range(rng.randint(1, 60))]
    groups = pack_by_budget(lengths, budget=1200, max_rows=8, extra=16)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= 8
        if len(g) > 1:
            assert len(g) * (max(lengths[i] for i in g) + 16) <= 1200


def test_oversized_row_gets_its_own_group():
    assert pack_by_budget([5000, 10, 10], budget=100, max_rows=4) == [[0], [1, 2]]


def test_sorting_by_length_pads_less_than_fixed_rows():
    lengths = [100, 10, 100, 10, 100, 10, 100, 10]
    packed = pack_by_budget(lengths, budget=10_000, max_rows=4)
    fixed = fixed_rows(len(lengths), 4)
    assert padding_fraction(lengths, packed) == 0.0
    assert padding_fraction(lengths, fixed) == pytest.approx(1 - 440 / 800)


def test_invalid_budget():
    with pytest.raises(ValueError):
        pack_by_budget([1], budget=0, max_rows=1)
