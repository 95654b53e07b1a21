"""Analytic prefill FLOPs of a model dir agree with the engine benchmark's formula; the timer runs."""
from __future__ import annotations

import pytest

from engine_helpers import load_bench, random_modules
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.tiny import build_processor, build_tiny_model
from workers.toyworld import WorldConfig, generate_samples
from workers.training import flops
from workers.training.train_base import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench():
    yield from load_bench("engine_bench")


def test_text_flops_match_the_engine_benchmark(bench):
    dims = bench.QWEN25_VL_7B
    text = {"hidden_size": dims.hidden, "num_attention_heads": dims.heads, "num_key_value_heads": dims.kv_heads,
            "intermediate_size": dims.intermediate, "num_hidden_layers": dims.num_layers}
    assert flops.text_flops(text, 1100) == pytest.approx(dims.num_layers * bench.layer_flops(dims, 1100))


def test_prefill_report_and_measure_on_a_tiny_model():
    spec = PRESETS["test"]
    model = build_tiny_model(spec, seed=0).eval()
    report = flops.prefill_report(model.config.to_dict(), 112, 30, 0.25, reduce_layer=0)
    assert report["visual_tokens"] == 16 and 0 < report["vit_share"] < 1
    assert report["prefill_pruned_over_unpruned"] < 1  # fewer tokens after layer 0
    engine = GlimpseEngine(model, build_processor(max_pixels=112**2, spec=spec), random_modules(model, seed=1), KeepRule(0.5))
    samples = list(generate_samples(WorldConfig(image_size=112, max_objects=3, seed=2), 4))
    measured = flops.measure(engine, samples, rounds=1, batch_size=2, max_new_tokens=2)
    assert measured["rows"] == 4 and measured["wall_s_pruned"] > 0 and 0 < measured["mean_keep_ratio"] <= 1
    assert measured["mean_text_tokens"] > 0
