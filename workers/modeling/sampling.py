"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling with per-row generators."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .api import SamplingParams


def base_seed(sampling: SamplingParams) -> int:
    """The call's seed: the sampling seed, or a random one when it has none."""
    return sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())


def row_generator(seed: int, row: int, row_seed: Optional[int], device) -> torch.Generator:
    """The generator of one row: its own seed if it has one, else (call seed, row index)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(row_seed if row_seed is not None else seed * 1_000_003 + row)
    return gen


def row_generators(sampling: SamplingParams, rows: int, device, row_seeds: Sequence = ()) -> Optional[list]:
    """One generator per row, seeded (seed, row) or by the row's own seed, so a row's draw does not
    depend on its neighbours."""
    if sampling.temperature == 0:
        return None
    seed = base_seed(sampling)
    seeds = list(row_seeds) or [None] * rows
    return [row_generator(seed, row, seeds[row], device) for row in range(rows)]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set whose mass reaches top_p (always keeps the top token). [V]"""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def select_next(logits: torch.Tensor, sampling: SamplingParams, generators: Optional[Sequence]) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]."""
    if generators is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    picks = []
    for row, gen in enumerate(generators):
        p = top_p_filter(probs[row], sampling.top_p)
        picks.append(torch.multinomial(p, 1, generator=gen))
    return torch.cat(picks)
