"""Adaptive batching by token count: pure functions, no torch.

Two budgets, in tokens:
  * the glimpse pass is batched by *raw* length (prompt + all visual tokens): rows sorted by length
    are packed while `rows * longest <= max_batch_tokens` (the padded batch is what costs);
  * after pruning, rows are regrouped by *retained* length and generation batches are packed while
    `rows * (longest retained + max_new_tokens) <= max_decode_tokens` (the KV cache the batch will hold).
Short pruned rows therefore travel together and do not pay for long ones. `padding_fraction` reports
how much of a batch plan is padding.
"""
from __future__ import annotations

from typing import Sequence


def pack_by_budget(lengths: Sequence[int], budget: int, max_rows: int, extra: int = 0) -> list[list[int]]:
    """Group row indices, longest first, so each group's rows * (max length + extra) <= budget.

    A row that alone exceeds the budget still gets a group of its own (it must run somehow).
    Returns groups of indices into `lengths`; every index appears exactly once.
    """
    if budget < 1 or max_rows < 1:
        raise ValueError(f"budget and max_rows must be >= 1, got {budget}, {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        cost_if_added = (len(current) + 1) * (max(longest, lengths[i]) + extra)
        if current and (cost_if_added > budget or len(current) >= max_rows):
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        groups.append(current)
    return groups


def fixed_rows(count: int, rows: int) -> list[list[int]]:
    """The baseline: consecutive groups of `rows` rows, in input order."""
    return [list(range(start, min(start + rows, count))) for start in range(0, count, rows)]


def padding_fraction(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> float:
    """Share of padded slots when each group is left-padded to its longest row."""
    total = sum(len(g) * max(lengths[i] for i in g) for g in groups if g)
    real = sum(lengths[i] for g in groups for i in g)
    return 0.0 if total == 0 else 1.0 - real / total
