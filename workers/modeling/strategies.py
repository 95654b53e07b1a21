"""Pruning strategies other than GlimpsePrune: where each prunes and how it scores, as small frozen
dataclasses with pure selection functions.

Every strategy runs through the same batched path as GlimpsePrune (`QwenGlimpseModel.strategy_stage`):
one batched prefill up to the strategy's pruning layer(s), per-row selection, the same compaction of
hidden states, positions and KV cache, then `finish_prefill`, the KV cache and the scheduler. A
strategy states:

  * `stages(n_layers)`: the decoder layers after which it prunes, ascending (-1 = before the LLM,
    on the LLM's input embeddings). Most prune once; PDrop prunes at several layers.
  * `needs`: the signals it reads at a pruning point (`Signals`), so the stage computes only those.
  * `select(signals, k)`: a bool mask over the row's currently kept visual tokens with exactly `k`
    True (the budget is exact; `keep_count` gives k). A strategy that merges tokens (VisionZip)
    overrides `apply`, which also returns the kept tokens' new input embeddings.

Budgets are per row: k = max(1, int(keep_ratio * N)) over all of a row's images together (the same
rounding as GlimpsePrune's fixed ratio), and a row may carry its own keep ratio.

Engine-wide deviations from the papers, the same for every strategy here:
  * A pruned token leaves the KV cache of *every* layer, also the layers it went through before
    the pruning point (GlimpsePrune's rule). The engine keeps one cache rectangle per row; FastV and
    PDrop as published keep the token in the earlier layers' cache. Decoding therefore sees
    slightly less than in those papers, and its KV cost is the kept count at every layer.
  * Survivors keep their original M-RoPE positions by default (as TensorRT-Edge-LLM, VisionZip,
    DivPrune and HoloV do). `reindex=True` gives contiguous positions instead, as FastV and PDrop
    do on LLaVA's 1-D RoPE: after each pruning point every kept token's three M-RoPE coordinates
    become its index among the row's kept tokens, and the cached keys of the layers already run
    are rotated to those positions (exact: RoPE rotations compose). On Qwen this also flattens the
    image's 2-D layout for the layers after the pruning point, as the 1-D papers' models have.
  * Attention-based scores use the attention of the *last prompt token* at the layer (FastV's code,
    FastV issue #14), computed as one query row against the layer's cached keys (the single-row
    trick the glimpse uses), so the real attention stays on SDPA / flash-attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch


@dataclass
class Signals:
    """One row's view at a pruning point, over its currently kept visual tokens (in token order).

    grids: per image, its merged token grid (h, w) and the flat indices (into the original visual
    tokens of the row) of its currently kept tokens. embeds: LLM input embeddings [n, d]. hidden:
    the layer's output hidden states [n, d]. keys: the layer's post-RoPE keys [n, kv_heads * hd].
    attn: the last prompt token's attention on each token at the layer (softmax over all keys,
    mean over heads) [n]. generator: the row's own random generator (seeded per row)."""

    n: int
    original: torch.Tensor  # [n] long: indices into the row's original visual tokens
    grids: list  # per image: (h, w, first_index) in original token indices
    embeds: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    attn: Optional[torch.Tensor] = None
    vit_attn: Optional[torch.Tensor] = None  # [n] attention each token receives in one ViT block (VisionZip)
    vit_keys: Optional[torch.Tensor] = None  # [n, C] that block's keys, pre-RoPE, mean over the 2x2 patches
    text: Optional[torch.Tensor] = None  # [t, d] the prompt's text tokens' input embeddings (CDPruner)
    generator: Optional[torch.Generator] = None


def keep_count(n: int, keep_ratio: float) -> int:
    """The exact per-row budget: max(1, int(keep_ratio * n)), at most n (0 when n is 0)."""
    return 0 if n == 0 else min(n, max(1, int(keep_ratio * n)))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores (ties: lowest index first, so results are batch-invariant)."""
    k = max(0, min(int(k), scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.argsort(scores.float(), descending=True, stable=True)
        mask[order[:k]] = True
    return mask


def _resolve_layer(layer: int, n_layers: int) -> int:
    if not -1 <= layer < n_layers:
        raise ValueError(f"pruning layer {layer} is outside -1..{n_layers - 1} for {n_layers} decoder layers")
    return layer


@dataclass(frozen=True)
class Strategy:
    """Base: one pruning point (`layer`; -1 = before the LLM)."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset] = frozenset()
    params: ClassVar[tuple] = ()  # the fields a job file / make_strategy may set (and `reindex`, for all)
    layer: int = -1
    reindex: bool = False  # contiguous positions after pruning instead of the original M-RoPE ones

    def stages(self, n_layers: int) -> list:
        return [_resolve_layer(self.layer, n_layers)]

    def stage_budgets(self, n: int, k: int, n_layers: int) -> list:
        """Tokens kept after each stage (the last is the row's budget k)."""
        return [k]

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, sig: Signals, k: int) -> tuple:
        """(keep mask, new embeddings [k, d] of the kept tokens in token order, or None = unchanged)."""
        return self.select(sig, k), None

    def describe(self) -> dict:
        out = {"strategy": self.name}
        out.update({f: getattr(self, f) for f in self.params + ("reindex",)})
        return out


@dataclass(frozen=True)
class RandomStrategy(Strategy):
    """Random subset before the LLM (HiPrune's zero-overhead reference). Each row draws from its own
    generator (seeded from the strategy's seed and the row's prune seed), so a row's subset does not
    depend on its batch."""

    name: ClassVar[str] = "random"
    params: ClassVar[tuple] = ("seed",)
    seed: int = 0

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return topk_mask(torch.rand(sig.n, generator=sig.generator), k).to(sig.original.device)


@dataclass(frozen=True)
class UniformStrategy(Strategy):
    """Uniform spatial subsampling of each image's merged token grid before the LLM.

    Deviation: the VTC-Bench / "downsample" baseline averages (or resizes the image); this keeps a
    regular lattice of tokens instead (nearest-neighbour downsampling), so the kept tokens are
    genuine tokens at their own positions. Lowering `image.max_pixels` is the resize variant. A
    row's budget is split over its images in proportion to their token counts (largest remainder)."""

    name: ClassVar[str] = "uniform"

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        sizes = [h * w for h, w, _ in sig.grids]
        shares = _split_budget(k, sizes)
        chosen = []
        for (h, w, first), share in zip(sig.grids, shares):
            chosen.extend(first + i for i in lattice(h, w, share))
        index = {int(o): j for j, o in enumerate(sig.original.tolist())}
        mask = torch.zeros(sig.n, dtype=torch.bool, device=sig.original.device)
        mask[[index[c] for c in chosen]] = True
        return mask


def lattice(h: int, w: int, k: int) -> list:
    """k raster indices spread as a regular lattice over an h x w grid (exactly k, k <= h*w)."""
    if k <= 0:
        return []
    if k >= h * w:
        return list(range(h * w))
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    cols = min(w, math.ceil(k / rows))
    rows = min(h, math.ceil(k / cols))
    ys = [int((i + 0.5) * h / rows) for i in range(rows)]
    xs = [int((j + 0.5) * w / cols) for j in range(cols)]
    cells = [y * w + x for y in ys for x in xs]
    if len(cells) > k:  # drop evenly spread extras so exactly k remain
        picks = [int(i * len(cells) / k) for i in range(k)]
        cells = [cells[p] for p in picks]
    return cells


def _split_budget(k: int, sizes: list) -> list:
    """k split over parts in proportion to sizes (largest remainder), each share <= its size."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [k * s / total for s in sizes]
    shares = [min(s, int(e)) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    left = k - sum(shares)
    while left > 0:
        progressed = False
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return shares


@dataclass(frozen=True)
class FastVStrategy(Strategy):
    """FastV: after decoder layer `layer` (0-based; default 1 = FastV's K=2), keep the visual tokens the
    last prompt token attends to most (mean over heads). Deviations: see the module docstring (cache
    of earlier layers pruned too; original positions)."""

    name: ClassVar[str] = "fastv"
    params: ClassVar[tuple] = ("layer",)
    needs: ClassVar[frozenset] = frozenset({"attn"})
    layer: int = 1

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return topk_mask(sig.attn, k)


@dataclass(frozen=True)
class PDropStrategy(Strategy):
    """PyramidDrop: several stages; at the end of each, keep the tokens the last prompt token attends to
    most. `fractions`: the stage ends as fractions of the depth (the paper's 8/16/24 of 32 layers ->
    0.25/0.5/0.75, scaled to the model). The row's budget k is what survives the last stage; earlier
    stages keep a geometric schedule: after stage s of S, max(k, int(N * (k/N)^(s/S))) tokens (the
    paper's lambda = 0.5 schedule 50/25/12.5% is the case k/N = 12.5%)."""

    name: ClassVar[str] = "pdrop"
    params: ClassVar[tuple] = ("fractions",)
    needs: ClassVar[frozenset] = frozenset({"attn"})
    fractions: tuple = (0.25, 0.5, 0.75)

    def stages(self, n_layers: int) -> list:
        layers = sorted({_resolve_layer(max(0, round(f * n_layers) - 1), n_layers) for f in self.fractions})
        if not layers:
            raise ValueError("pdrop needs at least one stage")
        return layers

    def stage_budgets(self, n: int, k: int, n_layers: int) -> list:
        s_total = len(self.stages(n_layers))
        if n == 0:
            return [0] * s_total
        ratio = k / n
        return [max(k, int(n * ratio ** (s / s_total))) for s in range(1, s_total)] + [k]

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return topk_mask(sig.attn, k)


@dataclass(frozen=True)
class DivPruneStrategy(Strategy):
    """DivPrune: before the LLM, greedy max-min diversity on the LLM's input embeddings of the visual
    tokens (post-merger), cosine distance. First pick: the token farthest from its nearest neighbour;
    then repeatedly the token whose distance to the chosen set is largest. A running min-distance
    vector keeps it O(N * k) time; the first pick's nearest-neighbour pass runs in row blocks, so no
    N x N matrix is held (the paper's code builds it)."""

    name: ClassVar[str] = "divprune"
    params: ClassVar[tuple] = ("block",)
    needs: ClassVar[frozenset] = frozenset({"embeds"})
    block: int = 1024

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return divprune_select(sig.embeds, k, self.block)


def divprune_select(embeds: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    x = torch.nn.functional.normalize(embeds.float(), dim=-1)
    n = x.shape[0]
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    if k <= 0 or n == 0:
        return mask
    if n == 1:
        mask[0] = True
        return mask
    nearest = torch.empty(n, device=x.device)
    for start in range(0, n, block):
        dist = 1.0 - x[start:start + block] @ x.T  # [b, n]
        idx = torch.arange(start, min(start + block, n), device=x.device)
        dist[torch.arange(len(idx)), idx] = float("inf")  # not its own neighbour
        nearest[start:start + block] = dist.min(dim=1).values
    first = int(torch.argmax(nearest))
    mask[first] = True
    min_dist = 1.0 - x @ x[first]
    for _ in range(k - 1):
        cand = min_dist.masked_fill(mask, float("-inf"))
        nxt = int(torch.argmax(cand))
        mask[nxt] = True
        min_dist = torch.minimum(min_dist, 1.0 - x @ x[nxt])
    return mask


@dataclass(frozen=True)
class DartStrategy(Strategy):
    """DART: duplication, not importance. After decoder layer `layer` (default 1 = the paper's layer 2),
    the `pivots` visual tokens with the largest key norm are pivots; the rest of the budget goes to the
    tokens least similar (cosine, layer hidden states) to their most similar pivot.
    Deviation: the paper takes the least similar tokens per pivot and unites them; one joint score
    (max similarity to any pivot) keeps the budget exact."""

    name: ClassVar[str] = "dart"
    params: ClassVar[tuple] = ("layer", "pivots")
    needs: ClassVar[frozenset] = frozenset({"hidden", "keys"})
    layer: int = 1
    pivots: int = 8

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return dart_select(sig.hidden, sig.keys, k, self.pivots)


def dart_select(hidden: torch.Tensor, keys: torch.Tensor, k: int, pivots: int) -> torch.Tensor:
    n = hidden.shape[0]
    p = min(pivots, k, n)
    pivot_mask = topk_mask(keys.float().norm(dim=-1), p)
    if k <= p:
        return pivot_mask
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    sim = (x @ x[pivot_mask].T).max(dim=1).values  # [n]
    rest = topk_mask((-sim).masked_fill(pivot_mask, float("-inf")), k - p)
    return pivot_mask | rest


@dataclass(frozen=True)
class VisionZipStrategy(Strategy):
    """VisionZip: before the LLM, keep the *dominant* visual tokens (those that receive the most
    attention inside the vision tower) and a few *contextual* tokens into which the rest are merged.

    Dominant: the k_d tokens with the largest attention received in ViT block `vit_layer` (-1: the
    tower's last full-attention block), mean over heads and over the image's queries, summed over
    the 2x2 patches that one merged token covers; the column sums run in query chunks, so no
    S x S matrix is held. Contextual: k_c = round(contextual * k) (at least 1 when k >= 2) targets
    spread evenly (in token order) over the remaining tokens; every other remaining token is merged
    into its most similar target (cosine of that block's pre-RoPE keys, averaged over the 2x2
    patches), and a target's new embedding is the mean of its own and its merged tokens' LLM input
    embeddings. Targets keep their own M-RoPE positions.

    Deviations from the paper: Qwen2.5-VL's ViT has no [CLS] token, so "attention received"
    averages over all of the image's query patches (the paper's variant for encoders without CLS,
    e.g. SigLIP); the merge averages the LLM input embeddings (after Qwen's 2x2 patch merger)
    rather than the ViT output before a linear projector, because Qwen's merger is an MLP over
    four patches; the default dominant/contextual split is the paper's 54/10 for 64 tokens."""

    name: ClassVar[str] = "visionzip"
    params: ClassVar[tuple] = ("contextual", "vit_layer")
    needs: ClassVar[frozenset] = frozenset({"vit_attn", "embeds"})
    contextual: float = 10 / 64  # share of the budget that is contextual (0: dominant tokens only)
    vit_layer: int = -1

    def vit_block(self, n_blocks: int, full_attention: Sequence[int]) -> int:
        """The ViT block whose attention is read: `vit_layer`, or -1 = the last full-attention block."""
        if self.vit_layer == -1:
            return max(full_attention) if full_attention else n_blocks - 1
        if not 0 <= self.vit_layer < n_blocks:
            raise ValueError(f"visionzip vit_layer {self.vit_layer} is outside 0..{n_blocks - 1} for {n_blocks} vision blocks")
        return self.vit_layer

    def split(self, k: int) -> tuple:
        """(dominant, contextual) counts for a budget of k tokens."""
        contextual = 0 if k < 2 or self.contextual <= 0 else min(k - 1, max(1, round(self.contextual * k)))
        return k - contextual, contextual

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return self.apply(sig, k)[0]

    def apply(self, sig: Signals, k: int) -> tuple:
        return visionzip_select(sig.vit_attn, sig.vit_keys, sig.embeds, *self.split(k))


def visionzip_select(scores: torch.Tensor, keys: torch.Tensor, embeds: torch.Tensor, dominant: int, contextual: int) -> tuple:
    """(keep mask [n], embeddings [dominant + contextual, d] of the kept tokens in token order)."""
    n = scores.shape[0]
    mask = topk_mask(scores, dominant)
    out = embeds.clone()
    rest = (~mask).nonzero().squeeze(1)
    if contextual > 0 and rest.numel() > 0:
        contextual = min(contextual, rest.numel())
        picks = torch.tensor([int(i * rest.numel() / contextual) for i in range(contextual)], device=rest.device)
        targets = rest[picks]
        others = rest[~torch.isin(rest, targets)]
        mask[targets] = True
        if others.numel():
            x = torch.nn.functional.normalize(keys.float(), dim=-1)
            owner = targets[(x[others] @ x[targets].T).argmax(dim=1)]  # each merged token's target
            total = embeds.float().clone()
            total.index_add_(0, owner, embeds[others].float())
            count = torch.ones(n, device=embeds.device).index_add_(0, owner, torch.ones(others.numel(), device=embeds.device))
            out[targets] = (total[targets] / count[targets, None]).to(embeds.dtype)
    return mask, out[mask]


@dataclass(frozen=True)
class CDPrunerStrategy(Strategy):
    """CDPruner: before the LLM, the subset of maximal *conditional* diversity: greedy MAP inference of
    a DPP whose kernel is L = diag(r) S diag(r), S the cosine similarity of the visual tokens' input
    embeddings and r their relevance to the instruction (mean cosine similarity to the prompt's text
    token embeddings, min-max normalised to [0, 1], then `relevance_floor` + (1 - floor) * r so no
    token is excluded outright). Greedy MAP with incremental Cholesky updates (Chen et al. 2018): O(N k)
    similarity rows, never the N x N kernel.

    Deviations from the paper: Qwen2.5-VL has no separate text encoder, so the instruction is
    represented by the LLM's input embeddings of the prompt's text tokens (the paper uses CLIP's text
    encoder on LLaVA); when the kernel's determinant cannot grow further (rank exhausted) the remaining
    budget goes to the most relevant unchosen tokens."""

    name: ClassVar[str] = "cdpruner"
    params: ClassVar[tuple] = ("relevance_floor",)
    needs: ClassVar[frozenset] = frozenset({"embeds", "text"})
    relevance_floor: float = 0.1

    def select(self, sig: Signals, k: int) -> torch.Tensor:
        return cdpruner_select(sig.embeds, sig.text, k, self.relevance_floor)


def relevance(embeds: torch.Tensor, text: torch.Tensor, floor: float) -> torch.Tensor:
    """Per visual token, its mean cosine similarity to the text tokens, min-max normalised, floored."""
    if text is None or text.shape[0] == 0:
        return torch.ones(embeds.shape[0], device=embeds.device)
    x = torch.nn.functional.normalize(embeds.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    r = (x @ t.T).mean(dim=1)
    span = r.max() - r.min()
    r = (r - r.min()) / span if span > 0 else torch.ones_like(r)
    return floor + (1.0 - floor) * r


def cdpruner_select(embeds: torch.Tensor, text: torch.Tensor, k: int, floor: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    n = embeds.shape[0]
    mask = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    k = min(k, n)
    if k <= 0:
        return mask
    x = torch.nn.functional.normalize(embeds.float(), dim=-1)
    r = relevance(embeds, text, floor)
    cis = torch.zeros(k, n, device=x.device)
    gains = r * r  # diag(L): S_ii = 1
    for step in range(k):
        pick = gains.masked_fill(mask, float("-inf"))
        j = int(torch.argmax(pick))
        if float(pick[j]) <= eps:  # the kernel's rank is exhausted: most relevant of the rest
            rest = r.masked_fill(mask, float("-inf"))
            mask |= topk_mask(rest, k - step)
            break
        mask[j] = True
        row = r[j] * (x @ x[j]) * r  # L[j, :]
        e = (row - cis[:step, j] @ cis[:step]) / gains[j].sqrt()
        cis[step] = e
        gains = gains - e * e
    return mask


STRATEGIES = {cls.name: cls for cls in (RandomStrategy, UniformStrategy, FastVStrategy, PDropStrategy, DivPruneStrategy, DartStrategy,
                                        VisionZipStrategy, CDPrunerStrategy)}


def make_strategy(name: str, **params) -> Strategy:
    """A strategy by name with its parameters (unknown names/parameters raise ValueError)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    allowed = set(cls.params) | {"reindex"}
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(f"strategy {name!r} has no parameter(s) {', '.join(bad)}; it takes {', '.join(sorted(allowed)) or 'none'}")
    return cls(**params)


def row_generator(strategy_seed: int, row_seed: Optional[int]) -> torch.Generator:
    """The generator a row's random choices draw from: seeded by the strategy's seed and the row's own."""
    return torch.Generator().manual_seed((int(strategy_seed) * 1_000_003 + int(row_seed or 0)) % (2**63 - 1))
