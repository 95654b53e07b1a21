"""The quality evaluator on the tiny random model: the keep-mask override against the engine, the
scoring helpers, and the command end to end (files, structure, oracle = box masks, random = same count)."""
from __future__ import annotations

import json

import pytest
import torch

from workers.toyworld import WorldConfig, make_sample
from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.tiny import TinySpec, save_tiny_model_dir
from workers.training import evaluate
from workers.training.evaluate import SETTINGS, caption_objects, keep_mask_rows, normalise, object_f1

from engine_helpers import random_modules


pytestmark = pytest.mark.usefixtures("one_thread")


def test_scoring_helpers():
    assert normalise("  Red. ") == "red" and normalise("3") == "3"
    gold = "a red circle, a blue square and an orange star"
    assert caption_objects(gold) == {("red", "circle"): 1, ("blue", "square"): 1, ("orange", "star"): 1}
    assert object_f1(gold + ".", gold) == 1.0
    assert object_f1("a red circle and a green square", gold) == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert object_f1("nothing here", gold) == 0.0


def test_keep_mask_rows_equal_the_glimpse_stage(tiny_model, tiny_processor, tiny_modules):
    """Pruning with the glimpse's own keep masks but no glimpse gives the same rows and tokens: the
    glimpse is the last token, so causally no prompt token sees it."""
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(fixed_remain_ratio=0.4))
    world = WorldConfig(image_size=112, max_objects=4)
    inputs = engine.build_inputs([GenerationRequest(images=(make_sample(world, i).image,), prompt=q)
                                  for i, q in enumerate(["What color is the star?", "Describe the image."])])
    with torch.inference_mode():
        glimpsed = engine.core.glimpse_stage(inputs, engine.rule)
        rows = keep_mask_rows(engine.core, inputs, [r.keep_mask for r in glimpsed])
    for got, ref in zip(rows, glimpsed):
        torch.testing.assert_close(got.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.positions, ref.positions, atol=0, rtol=0)
        for k_got, k_ref in zip(got.keys, ref.keys):
            torch.testing.assert_close(k_got, k_ref, atol=1e-5, rtol=1e-5)
    sampling = SamplingParams(max_new_tokens=5)
    assert [r.token_ids for r in engine.generate_from_rows(rows, sampling)] == \
        [r.token_ids for r in engine.generate_from_inputs(inputs, sampling)]


def test_evaluate_command_end_to_end(tmp_path, tiny_model):
    base = save_tiny_model_dir(tmp_path / "base", TinySpec(rope_theta=10_000.0))
    random_modules(tiny_model, seed=1).save(tmp_path / "modules", base_config=tiny_model.config.to_dict())
    out = tmp_path / "eval"
    assert evaluate.main(["--base", str(base), "--modules", str(tmp_path / "modules"), "--out", str(out),
                          "--rows", "5", "--batch-size", "3", "--seed", "11", "--image-size", "112",
                          "--max-objects", "4", "--max-new-tokens", "4"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    rows = [json.loads(x) for x in (out / "eval_rows.jsonl").read_text().splitlines()]
    table = (out / "eval.md").read_text()
    assert summary["rows"] == len(rows) == 5 and summary["config"]["seed"] == 11
    assert set(summary["settings"]) == set(SETTINGS) and all(f"| {name} |" in table for name in SETTINGS)
    for entry in summary["settings"].values():
        assert {"accuracy", "relative_accuracy", "keep_ratio", "by_qtype", "by_objects"} <= set(entry)
    assert summary["settings"]["unpruned"]["keep_ratio"] == 1.0
    assert set(summary["predicted_mask_vs_boxes"]["all"]) == {"precision", "recall", "iou"}
    assert set(summary["predicted_mask_vs_boxes"]) == {"all", *summary["settings"]["glimpse"]["by_qtype"]}
    for row in rows:
        assert row["oracle"]["keep_ratio"] == pytest.approx(row["box_ratio"])
        assert row["oracle"]["mask"]["fp"] == row["oracle"]["mask"]["fn"] == 0
        assert row["random"]["keep_ratio"] == pytest.approx(row["glimpse"]["keep_ratio"])
        assert row["glimpse_cap"]["keep_ratio"] <= max(0.111, 1 / row["visual_tokens"]) + 1e-9
    assert summary["settings"]["oracle"]["keep_ratio"] == pytest.approx(summary["box_ratio"]["all"])
    assert summary["settings"]["oracle"]["keep_mask_vs_boxes"] == {"precision": 1.0, "recall": 1.0, "iou": 1.0} \
        or summary["box_ratio"]["all"] == 0
