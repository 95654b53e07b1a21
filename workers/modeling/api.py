"""The engine's public request/result types: plain dataclasses, no torch at import time.

`GlimpseEngine.generate(requests, sampling) -> list[GenerationResult]` is the contract the pipeline
(`workers/`), the one-question command and the benchmarks use. One result per request, same order.

Explicit keep masks (oracle, anti-oracle, random or any outside strategy) go through the same prefill,
compaction, KV cache, re-left-pad and decode as GlimpsePrune: per request `GenerationRequest.keep_mask`
(with `generate(..., keep_layer=...)`), or `KeepMasks` for `generate_from_inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings shared by one `generate` call.

    temperature == 0 means greedy. `seed` makes sampling reproducible per call (a torch.Generator is
    seeded once per call; rows draw from it in batch order).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    top_k: int = 0  # sample among the k most likely tokens only; 0 = no limit
    repetition_penalty: float = 1.0  # > 1 discourages tokens the row has already generated (CTRL's rule)
    stop: tuple = ()  # strings that end the row; the answer is cut before the first one

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class GenerationRequest:
    """One question about zero or more images.

    images: PIL.Image.Image objects, already RGB (decoding/resizing is the caller's job).
    prompt: the user's text; the engine applies the model's chat template.
    """

    images: tuple = ()
    prompt: str = ""
    system: Optional[str] = None
    # Optional explicit keep mask over this row's visual tokens (all its images, in token order; bool
    # sequence or BoolTensor [N_v]); it replaces the keep rule. All-False keeps no visual token.
    keep_mask: Optional[Any] = None
    # Optional: the visual-token count the caller sized its images to (the pipeline's image stage).
    # `build_inputs` raises if the processor's image_grid_thw gives another count (its resize bounds
    # differ from the caller's), instead of the model silently seeing fewer or more tokens.
    visual_tokens: Optional[int] = None
    # Optional per-row overrides of the call's SamplingParams: the most tokens this row may generate,
    # and the seed of its sampling generator (a row's draws then depend on nothing else).
    max_new_tokens: Optional[int] = None
    seed: Optional[int] = None
    # Optional: this row's own SamplingParams (temperature, top_p, top_k, repetition penalty, stop
    # strings, max_new_tokens) replacing the call's; the two fields above still apply on top.
    sampling: Optional[Any] = None
    # Optional per-row keep rule (`workers.modeling.keep_rule.KeepRule`) replacing the engine's for
    # this row, e.g. its own threshold or keep ratio.
    keep_rule: Optional[Any] = None
    # Optional seed of a pruning strategy's random choices for this row (the random strategy), so the
    # row's subset depends on nothing else in its batch.
    prune_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class KeepMasks:
    """Explicit per-row keep masks for one batch, replacing the glimpse modules' keep rule.

    masks: one per row, bool [N_v(b)] over that row's visual tokens (all its images, in the row's token
      order; torch.BoolTensor or a sequence of bools); a row without images has an empty mask.
    keep_layer: the decoder layer after whose output the unkept visual tokens are dropped (from its
      KV cache and every later layer); None = the glimpse modules' reduce_layer (the default pruning
      point; an error without modules); -1 = before the LLM (dropped from layer 0's input).
    """

    masks: tuple
    keep_layer: Optional[int] = None

    def __post_init__(self) -> None:
        if self.keep_layer is not None and self.keep_layer < -1:
            raise ValueError(f"keep_layer must be >= -1 (or None), got {self.keep_layer}")


@dataclass
class GenerationResult:
    """What one request produced. Token counts are visual tokens after the 2x2 merge."""

    text: str
    token_ids: list[int]
    visual_tokens: int
    kept_tokens: int
    kept_per_image: list[int]
    keep_ratio: float
    prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    finish_reason: str = "length"  # "stop" (EOS) or "length"
    importance_logits: Optional[Any] = None  # torch.FloatTensor [N_v] when requested (None with explicit keep masks)
    keep_mask: Optional[Any] = None  # torch.BoolTensor [N_v] when requested
    extra: dict = field(default_factory=dict)
