"""The tensor-op image half (workers.modeling.pixels) equals the transformers processor exactly: same
pixel_values bit for bit, same grid, same token ids and mask, same answers; an image the processor
would resize is left to the processor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule

from engine_helpers import patterned_image

REPO = Path(__file__).resolve().parents[2]


def _requests():
    return [
        GenerationRequest(images=(patterned_image(112, 84, 1),), prompt="What color is the circle?"),
        GenerationRequest(images=(patterned_image(56, 56, 2), patterned_image(84, 112, 3)), prompt="How many squares?"),
        GenerationRequest(prompt="No image here."),
        GenerationRequest(images=(patterned_image(140, 56, 4),), prompt="Describe the image."),
    ]


def _both(engine, requests):
    engine.fast_pixels = True
    fast = engine.build_inputs(requests)
    prep = engine._prep
    assert prep is not None and all(prep.applies(im) for r in requests for im in r.images)  # the fast path ran
    engine.fast_pixels, engine._prep = False, None
    slow = engine.build_inputs(requests)
    engine.fast_pixels = True
    return fast, slow


def test_fast_inputs_equal_the_processors(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5))
    requests = _requests()
    fast, slow = _both(engine, requests)
    assert torch.equal(fast.input_ids, slow.input_ids) and torch.equal(fast.attention_mask, slow.attention_mask)
    assert torch.equal(fast.image_grid_thw.cpu(), slow.image_grid_thw)
    assert fast.pixel_values.dtype == slow.pixel_values.dtype
    assert torch.equal(fast.pixel_values.cpu(), slow.pixel_values)  # bit for bit
    sampling = SamplingParams(max_new_tokens=4)
    engine.fast_pixels = False
    ref = [r.token_ids for r in engine.generate(requests, sampling)]
    engine.fast_pixels = True
    assert [r.token_ids for r in engine.generate(requests, sampling)] == ref


def test_the_shipped_processor_too():
    from workers.modeling.tiny import load_processor

    base = REPO / "models" / "small-qwen2_5_vl-v2"
    if not (base / "model.safetensors").exists():
        pytest.skip("the v2 small model is not shipped")
    from workers.modeling.pixels import PixelPrep

    processor = load_processor(base)
    prep = PixelPrep(processor.image_processor)
    images = [patterned_image(336, 336, 7), patterned_image(336, 336, 8)]
    assert all(prep.applies(im) for im in images)
    want = processor.image_processor(images=images, return_tensors="pt")
    got, grid = prep(images)
    assert torch.equal(got, want["pixel_values"]) and torch.equal(grid, want["image_grid_thw"])


def test_images_the_processor_would_resize_go_through_it(tiny_processor):
    from workers.modeling.pixels import PixelPrep

    prep = PixelPrep(tiny_processor.image_processor)
    assert not prep.applies(patterned_image(100, 84, 1))  # 100 is not a multiple of 28
    lo, hi = tiny_processor.image_processor.size["shortest_edge"], tiny_processor.image_processor.size["longest_edge"]
    side = 28
    while side * side <= hi:
        side += 28
    assert not prep.applies(patterned_image(side, side, 1))  # over the processor's max_pixels
    assert prep.applies(patterned_image(56, 56, 1)) == (56 * 56 >= lo)


def test_the_accelerator_branch_gives_the_same_values(tiny_processor):
    """`_device` (the path a CUDA engine takes) run on CPU tensors equals the processor too."""
    from workers.modeling.pixels import PixelPrep

    prep = PixelPrep(tiny_processor.image_processor)
    images = [patterned_image(112, 84, 5), patterned_image(56, 140, 6)]
    assert all(prep.applies(im) for im in images)
    want = tiny_processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    got = torch.cat([prep._device(im, torch.device("cpu")) for im in images])
    assert torch.equal(got, want)
