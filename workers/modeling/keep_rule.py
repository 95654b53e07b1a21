"""The keep rule: which visual tokens survive, as pure functions (paper section 3.3).

Split the way the style guide asks: `keep_count`-style decisions (threshold, cap, floor, fixed ratio)
and "which ones" (top-k by probability). Applied per *sample*, jointly over all of that sample's
images; `split_per_image` reports the per-image share afterwards.

Faithful to the released `_get_remain_masks`:
  p = sigmoid(logits); keep = p > threshold
  if max_remain_ratio is set and keep.mean() > max_remain_ratio: keep = topk(p, int(ratio * N))
  if keep.sum() < min_remain_num: keep |= topk(p, min_remain_num)
plus the newer `fixed_remain_ratio` (exactly topk(int(r * N)), used for benchmarks).
Deliberate difference: the cap's k is clamped to >= 1 (as the newer upstream code does), and every
k is clamped to <= N, so a tiny image never asks top-k for more tokens than it has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class KeepRule:
    """Keep-rule settings. threshold in (0, 1); ratios in (0, 1]; min_remain_num >= 0."""

    threshold: float = 0.5
    max_remain_ratio: Optional[float] = None
    min_remain_num: Optional[int] = 1
    fixed_remain_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("max_remain_ratio", "fixed_remain_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.min_remain_num is not None and self.min_remain_num < 0:
            raise ValueError(f"min_remain_num must be >= 0, got {self.min_remain_num}")


def with_row_value(rule: KeepRule, value: float) -> KeepRule:
    """The rule with one row's own setting: its keep ratio for a fixed-ratio rule, else its threshold."""
    from dataclasses import replace

    if rule.fixed_remain_ratio is not None:
        return replace(rule, fixed_remain_ratio=value)
    return replace(rule, threshold=value)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores. scores: [N] -> [N]."""
    k = max(0, min(int(k), scores.numel()))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores, k, dim=-1).indices] = True
    return mask


def keep_mask(logits: torch.Tensor, rule: KeepRule) -> torch.Tensor:
    """Apply the keep rule to one sample's importance logits. logits: [N] -> bool [N]."""
    probs = logits.float().sigmoid()
    n = probs.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=logits.device)
    if rule.fixed_remain_ratio is not None:
        return topk_mask(probs, max(1, int(rule.fixed_remain_ratio * n)))
    keep = probs > rule.threshold
    if rule.max_remain_ratio is not None and keep.float().mean().item() > rule.max_remain_ratio:
        keep = topk_mask(probs, max(1, int(rule.max_remain_ratio * n)))
    if rule.min_remain_num is not None and int(keep.sum()) < rule.min_remain_num:
        keep = keep | topk_mask(probs, rule.min_remain_num)
    return keep


def keep_masks(logits: Sequence[torch.Tensor], rules: Sequence[KeepRule]) -> list[torch.Tensor]:
    """`keep_mask` for every sample of a batch, equal to it row by row. The threshold, the kept share
    and the cap/floor tests run once on the padded batch; only rows whose rule needs a top-k (a fixed
    ratio, over the cap, under the floor) take their own `keep_mask`, so the per-row top-k (and its
    tie order) is exactly the single-sample one. logits: per sample [N_b]; rules: one per sample."""
    if not logits:
        return []
    device = logits[0].device
    n = torch.tensor([x.numel() for x in logits], device=device)
    padded = torch.nn.utils.rnn.pad_sequence([x.float() for x in logits], batch_first=True, padding_value=float("-inf"))
    probs = padded.sigmoid()  # padding -> 0, never above a threshold in (0, 1)
    threshold = torch.tensor([r.threshold for r in rules], dtype=probs.dtype, device=device)[:, None]
    keep = probs > threshold  # [B, N_max]
    counts = keep.sum(dim=1)
    # keep.float().mean() of one sample is float32(count) / float32(N): the same rounding here.
    shares = (counts.float() / n.clamp(min=1).float()).tolist()
    out = []
    for b, (lg, rule, count, share) in enumerate(zip(logits, rules, counts.tolist(), shares)):
        capped = rule.max_remain_ratio is not None and share > rule.max_remain_ratio
        floored = rule.min_remain_num is not None and count < rule.min_remain_num
        if lg.numel() == 0 or rule.fixed_remain_ratio is not None or capped or floored:
            out.append(keep_mask(lg, rule))
        else:
            out.append(keep[b, : lg.numel()])
    return out


def split_per_image(mask: torch.Tensor, tokens_per_image: Sequence[int]) -> list[int]:
    """Kept-token count of each image of one sample. mask: [sum(tokens_per_image)]."""
    if mask.numel() != sum(tokens_per_image):
        raise ValueError(f"mask has {mask.numel()} tokens, images have {sum(tokens_per_image)}")
    return [int(part.sum()) for part in torch.split(mask, list(tokens_per_image))]
