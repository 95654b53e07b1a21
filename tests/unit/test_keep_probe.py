"""The keep probe: each setting prunes what it says, through the same forward as the engine."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import random_modules
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.tiny import build_processor, build_tiny_model
from workers.toyworld import WorldConfig
from workers.training import keep_probe
from workers.training.train_base import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_settings_keep_what_they_say():
    spec = PRESETS["test"]
    model = build_tiny_model(spec, seed=0).eval()
    processor = build_processor(max_pixels=112**2, spec=spec)
    modules = random_modules(model, seed=1)
    engine = GlimpseEngine(model, processor, modules, KeepRule(0.5))
    world = WorldConfig(image_size=112, max_objects=4, seed=9)
    out = keep_probe.probe(model, processor, world, rows=10, prune_layer=modules.config.reduce_layer,
                           batch_size=5, engine=engine)
    keep = {s: out["keep_ratio"][s]["all"] for s in keep_probe.SETTINGS + keep_probe.GLIMPSE_SETTINGS}
    assert keep["unpruned"] == 1.0 and keep["no_visual"] == 0.0
    assert keep["oracle"] + keep["anti_oracle"] == pytest.approx(1.0)
    assert 0.0 < keep["oracle"] < 1.0
    assert keep["random"] == pytest.approx(keep["glimpse"])  # same count per row
    assert sum(out["n"].values()) == 10
    assert 0.0 <= out["glimpse_mask"]["iou"] <= 1.0
    # The glimpse drop mask is the complement of the engine's own keep mask for that row.
    from workers.modeling.api import GenerationRequest, SamplingParams

    samples = list(keep_probe.generate_samples(world, 2))
    batch = keep_probe.BatchEncoder(processor).encode(samples)
    is_image = batch.input_ids == model.config.image_token_id
    drops = keep_probe.glimpse_drops(engine, samples, is_image, torch.Generator().manual_seed(0))
    results = engine.generate([GenerationRequest(images=(s.image,), prompt=s.question) for s in samples],
                              SamplingParams(max_new_tokens=1), return_masks=True)
    for b, r in enumerate(results):
        assert torch.equal(~drops["glimpse"][b][is_image[b]], r.keep_mask.bool())
        assert int((is_image[b] & ~drops["random"][b]).sum()) == int(r.keep_mask.sum())
