"""The model-dir FLOPs report (its formulas are checked against torch's count in test_model_flops) and its timer."""
from __future__ import annotations

import dataclasses

import pytest

from engine_helpers import random_modules
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.tiny import build_processor, build_tiny_model
from workers.toyworld import WorldConfig, generate_samples
from workers.training import flops
from workers.training.train_base import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefill_report_and_measure_on_a_tiny_model():
    spec = PRESETS["test"]
    model = build_tiny_model(spec, seed=0).eval()
    report = flops.prefill_report(model.config.to_dict(), 112, 30, 0.25, reduce_layer=0)
    assert report["visual_tokens"] == 16 and 0 < report["vit_share"] < 1
    assert report["prefill_pruned_over_unpruned"] < 1  # fewer tokens after layer 0
    modules = random_modules(model, seed=1, selected_layers=(0,), reduce_layer=0)
    engine = GlimpseEngine(model, build_processor(max_pixels=112**2, spec=spec), modules, KeepRule(0.5))
    # with the glimpse modules' config the report adds the glimpse pass and the VIP, as the engine's
    # per-row prediction does for the same row (16 visual + 30 text tokens, 4 kept)
    with_vip = flops.prefill_report(model.config.to_dict(), 112, 30, 0.25, 0, glimpse=dataclasses.asdict(modules.config))
    assert with_vip["prefill_pruned_over_unpruned"] > report["prefill_pruned_over_unpruned"]
    assert with_vip["prefill_pruned_over_unpruned"] == pytest.approx(engine.prefill_flops(46, 16, 4).ratio, rel=1e-12)
    samples = list(generate_samples(WorldConfig(image_size=112, max_objects=3, seed=2), 4))
    measured = flops.measure(engine, samples, rounds=1, batch_size=2, max_new_tokens=2)
    assert measured["rows"] == 4 and measured["wall_s_pruned"] > 0 and 0 < measured["mean_keep_ratio"] <= 1
    assert measured["mean_text_tokens"] > 0
