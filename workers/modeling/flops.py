"""Analytic prefill FLOPs of Qwen2.5-VL with and without visual-token pruning: one home for the formulas
the engine's per-row prediction, `workers.training.flops` and `bench/engine_bench.py` use.

Matmul FLOPs only, 2 per multiply-add, empty cache:
- vision tower, per image of n = h x w patches: patch embedding 2 n (3 T P^2) D_v; per block q/k/v/o
  projections 8 n D_v^2, attention scores and values 4 n s D_v with s the segment a patch attends
  (its window's patches in window blocks, the image's n in full-attention blocks), gated MLP
  6 n D_v F_v; the merger MLP on n / m^2 merged tokens (2 x (D_v m^2)^2 + D_v m^2 x D_out each);
- decoder layer on n tokens: projections 2 n D (2 h hd + 2 kvh hd), causal attention 4 h hd n (n + 1) / 2,
  gated MLP 6 n D F; the LM head is not counted;
- GlimpsePrune's extras: the glimpse token through layers 0..K (one more token per layer), its
  attention logits over the N visual keys at each selected layer (2 N h hd each) and the le_proj
  (2 D^2 per layer 0..K); the VIP on N tokens of one image, per level: condition projection
  2 N C_vit C, q/k from [x, c] 4 N (F + C)^2, v/o 4 N F^2, scores 2 N^2 (F + C), values 2 N^2 F, MLP
  (hidden 2F) 12 N F^2; plus its input projection 2 N (selected layers x heads) F and output 2 N F.

Rows with several images are counted as one image of all their visual tokens (this changes only the
attention terms of the ViT and the VIP).

The per-row prediction (`PrefillFlops.ratio`) is what the run summary compares with the measured
speed: on a small model where the ViT dominates and the VIP is as wide as the decoder, pruning can
cost more than it saves, and the token-layer count of the decoder alone cannot say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class TextDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, text: Mapping) -> "TextDims":
        heads = text["num_attention_heads"]
        return cls(layers=text["num_hidden_layers"], hidden=text["hidden_size"], heads=heads,
                   kv_heads=text.get("num_key_value_heads") or heads,
                   head_dim=text.get("head_dim") or text["hidden_size"] // heads, intermediate=text["intermediate_size"])


@dataclass(frozen=True)
class VisionDims:
    depth: int
    hidden: int
    intermediate: int
    patch: int
    merge: int
    temporal: int
    window: int  # patches per side of a window
    full_blocks: tuple
    out_hidden: int

    @classmethod
    def from_config(cls, vision: Mapping) -> "VisionDims":
        patch = vision["patch_size"]
        return cls(depth=vision["depth"], hidden=vision["hidden_size"], intermediate=vision["intermediate_size"],
                   patch=patch, merge=vision["spatial_merge_size"], temporal=vision.get("temporal_patch_size", 2),
                   window=max(1, vision.get("window_size", 0) // patch), full_blocks=tuple(vision.get("fullatt_block_indexes", ())),
                   out_hidden=vision.get("out_hidden_size", vision["hidden_size"]))


@dataclass(frozen=True)
class VipDims:
    vision_hidden: int
    fuse: int
    cond: int
    levels: int
    attn_in: int  # selected decoder layers x heads: the VIP's input width

    @classmethod
    def from_glimpse_config(cls, glimpse: Mapping, vision_hidden: int, heads: int) -> "VipDims":
        return cls(vision_hidden=vision_hidden, fuse=glimpse["attn_fuse_size"], cond=glimpse["visual_cond_size"],
                   levels=len(glimpse["selected_visual_layers"]), attn_in=len(glimpse["selected_layers"]) * heads)


def layer_flops(text: TextDims, n: int) -> float:
    """One decoder layer running n tokens causally with an empty cache."""
    d, hd = text.hidden, text.head_dim
    projections = 2 * n * d * (2 * text.heads * hd + 2 * text.kv_heads * hd)  # q, o; k, v
    attention = 4 * text.heads * hd * n * (n + 1) / 2
    return float(projections + attention + 6 * n * d * text.intermediate)


def text_flops(text: TextDims, n: int, layers: Optional[int] = None) -> float:
    return layer_flops(text, n) * (text.layers if layers is None else layers)


def vision_flops(vision: VisionDims, grid_h: int, grid_w: int) -> float:
    """One image of grid_h x grid_w patches (before the m x m merge)."""
    d, n = vision.hidden, grid_h * grid_w
    flops = 2 * n * (3 * vision.temporal * vision.patch**2) * d
    window = _window_patches(vision, grid_h, grid_w)
    for block in range(vision.depth):
        span = n if block in vision.full_blocks else window
        flops += 8 * n * d * d + 4 * n * span * d + 6 * n * d * vision.intermediate
    merged, wide = n // vision.merge**2, d * vision.merge**2
    return float(flops + 2 * merged * (wide * wide + wide * vision.out_hidden))


def _window_patches(vision: VisionDims, grid_h: int, grid_w: int) -> float:
    """Mean window size a patch attends in window blocks (edge windows are smaller)."""
    def sizes(side: int) -> list:
        full, rest = divmod(side, vision.window)
        return [vision.window] * full + ([rest] if rest else [])
    hs, ws = sizes(grid_h), sizes(grid_w)
    n = grid_h * grid_w
    return sum((a * b) ** 2 for a in hs for b in ws) / n if n else 0.0


def vision_flops_for_tokens(vision: VisionDims, visual_tokens: int) -> float:
    """A row's ViT FLOPs from its merged visual-token count, taken as one square image (rows with
    several images differ only in the attention term)."""
    side = max(1, round(math.sqrt(max(visual_tokens, 1)))) * vision.merge
    per_patch = vision_flops(vision, side, side) / (side * side)
    return per_patch * visual_tokens * vision.merge**2


def vip_flops(vip: VipDims, n: int) -> float:
    """The VIP on one image of n visual tokens."""
    f, c = vip.fuse, vip.cond
    per_level = (2 * n * vip.vision_hidden * c + 4 * n * (f + c) ** 2 + 4 * n * f**2
                 + 2 * n * n * (f + c) + 2 * n * n * f + 12 * n * f**2)
    return float(2 * n * vip.attn_in * f + 2 * n * f + vip.levels * per_level)


def glimpse_extra_flops(text: TextDims, reduce_layer: int, selected_layers: int, visual: int) -> float:
    """The glimpse pass beyond one more token per layer: le_proj at layers 0..K and the glimpse row's
    attention logits over the visual keys at each selected layer."""
    return float((reduce_layer + 1) * 2 * text.hidden**2 + selected_layers * 2 * text.heads * text.head_dim * visual)


@dataclass(frozen=True)
class PrefillFlops:
    """Prefill FLOPs of one row, unpruned and pruned (the ViT counted in both)."""

    unpruned: float
    pruned: float
    vit: float = 0.0
    vip: float = 0.0

    @property
    def ratio(self) -> float:
        return self.pruned / self.unpruned if self.unpruned else 1.0


def prefill_flops(text: TextDims, prompt: int, visual: int, stages: Sequence[int], kept: Sequence[int],
                  vision: Optional[VisionDims] = None, vip: Optional[VipDims] = None, glimpse_tokens: int = 0,
                  selected_layers: int = 0) -> PrefillFlops:
    """One row of `prompt` tokens, `visual` of them visual, pruned after each decoder layer in `stages`
    (ascending; -1 = before the LLM) down to the matching `kept` visual tokens. GlimpsePrune:
    glimpse_tokens=1 up to the first stage, `vip` and `selected_layers` set; explicit masks or other
    methods: 0 / None (their own selection cost is not counted). `vision` None leaves the ViT out."""
    vit = vision_flops_for_tokens(vision, visual) if vision is not None and visual else 0.0
    unpruned = vit + text_flops(text, prompt)
    pruned, start, width = vit, 0, prompt + glimpse_tokens
    for layer, left in zip(stages, kept):
        pruned += (layer + 1 - start) * layer_flops(text, width) if layer + 1 > start else 0.0
        start, width = layer + 1, prompt - visual + left
    pruned += (text.layers - start) * layer_flops(text, width)
    vip_part = 0.0
    if vip is not None and visual:
        vip_part = vip_flops(vip, visual)
        pruned += vip_part + glimpse_extra_flops(text, stages[0], selected_layers, visual)
    return PrefillFlops(unpruned=unpruned, pruned=pruned, vit=vit, vip=vip_part)
