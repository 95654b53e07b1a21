"""The engine's public request/result types: plain dataclasses, no torch at import time.

`GlimpseEngine.generate(requests, sampling) -> list[GenerationResult]` is the contract the pipeline
(`workers/`), the one-question command and the benchmarks use. One result per request, same order.
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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GenerationRequest:
    """One question about zero or more images.

    images: PIL.Image.Image objects, already RGB (decoding/resizing is the caller's job).
    prompt: the user's text; the engine applies the model's chat template.
    """

    images: tuple = ()
    prompt: str = ""
    system: Optional[str] = None


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
    importance_logits: Optional[Any] = None  # torch.FloatTensor [N_v] when requested
    keep_mask: Optional[Any] = None  # torch.BoolTensor [N_v] when requested
    extra: dict = field(default_factory=dict)
