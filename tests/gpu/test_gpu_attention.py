"""GPU checks (skipped without CUDA): bf16, SDPA vs flash-attention-2 give the same kept masks and answers."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from engine_helpers import patterned_image, random_modules  # noqa: E402

from workers.modeling.api import GenerationRequest, SamplingParams  # noqa: E402
from workers.modeling.engine import GlimpseEngine  # noqa: E402
from workers.modeling.keep_rule import KeepRule  # noqa: E402
from workers.modeling.tiny import TinySpec, build_processor, build_tiny_model  # noqa: E402

HAS_FA2 = importlib.util.find_spec("flash_attn") is not None


def engine_for(attn: str) -> GlimpseEngine:
    model = build_tiny_model(TinySpec(rope_theta=10_000.0), seed=0)
    modules = random_modules(model, seed=1)
    model.set_attn_implementation(attn)
    model = model.to("cuda", torch.bfloat16)
    modules = modules.to("cuda", torch.bfloat16)
    return GlimpseEngine(model, build_processor(), modules, KeepRule(fixed_remain_ratio=0.25))


def requests():
    return [
        GenerationRequest(images=(patterned_image(112, 84, 1),), prompt="What color is the circle?"),
        GenerationRequest(images=(patterned_image(56, 56, 2), patterned_image(84, 112, 3)), prompt="How many squares are there?"),
    ]


def test_bf16_sdpa_runs_and_prunes():
    results = engine_for("sdpa").generate(requests(), SamplingParams(max_new_tokens=6), return_masks=True)
    assert all(0 < r.keep_ratio < 1 for r in results)
    assert all(r.output_tokens >= 1 for r in results)


@pytest.mark.skipif(not HAS_FA2, reason="flash-attn not installed")
def test_fa2_matches_sdpa_masks_and_answers():
    sampling = SamplingParams(max_new_tokens=6)
    sdpa = engine_for("sdpa").generate(requests(), sampling, return_masks=True)
    fa2 = engine_for("flash_attention_2").generate(requests(), sampling, return_masks=True)
    for a, b in zip(sdpa, fa2):
        assert torch.equal(a.keep_mask, b.keep_mask)
        assert a.token_ids == b.token_ids
