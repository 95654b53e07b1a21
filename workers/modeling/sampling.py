"""Next-token selection, per row: greedy, or temperature + top-k + nucleus (top-p) sampling with the
row's own generator; an optional repetition penalty; stop strings.

Each row of a batch may carry its own `SamplingParams` (a request's `sampling`), so one decode batch
mixes greedy and sampled rows. A batch where every row is greedy without a penalty takes one argmax.

Repetition penalty: CTRL's rule as in transformers/vLLM (a seen token's logit is divided by the
penalty when positive, multiplied when negative), over the tokens the row has generated so far.
Deviation: those libraries also count the prompt's tokens; here a prompt is mostly hundreds of image
placeholders and the chat template, so only the answer is penalised.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class RowSampling:
    """One row's decoding settings and, when it samples, its own generator."""

    params: SamplingParams
    generator: Optional[torch.Generator] = None


def row_sampling(call: SamplingParams, own: Optional[SamplingParams], seed: int, row: int, row_seed: Optional[int],
                 device) -> RowSampling:
    """A row's settings (its own, else the call's) with a generator seeded (seed, row) or by its own seed,
    so a row's draws do not depend on its neighbours."""
    params = own if own is not None else call
    gen = row_generator(seed, row, row_seed, device) if params.temperature > 0 else None
    return RowSampling(params, gen)


def rows_sampling(call: SamplingParams, rows: int, device, row_seeds: Sequence = (), row_params: Sequence = ()) -> list:
    seed = base_seed(call)
    seeds = list(row_seeds) or [None] * rows
    own = list(row_params) or [None] * rows
    return [row_sampling(call, own[r], seed, r, seeds[r], device) for r in range(rows)]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set whose mass reaches top_p (always keeps the top token). [V]"""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """-inf outside the k largest logits (ties at the k-th are kept). [V]"""
    if top_k <= 0 or top_k >= logits.numel():
        return logits
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def penalise(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on the seen token ids. [V]"""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def select_next(logits: torch.Tensor, rows: Sequence[RowSampling], history: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]; history: per row, the ids it has generated."""
    if all(r.params.temperature == 0 and r.params.repetition_penalty == 1.0 for r in rows):
        return logits.argmax(dim=-1)
    picks = []
    for b, r in enumerate(rows):
        p = r.params
        x = penalise(logits[b], history[b] if history else (), p.repetition_penalty)
        if p.temperature == 0:
            picks.append(x.argmax().view(1))
            continue
        probs = torch.softmax(top_k_filter(x / p.temperature, p.top_k), dim=-1)
        picks.append(torch.multinomial(top_p_filter(probs, p.top_p), 1, generator=r.generator))
    return torch.cat(picks)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one occurred)."""
    at = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(at)], True) if at else (text, False)
