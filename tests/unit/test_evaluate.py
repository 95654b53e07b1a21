"""The quality evaluator on the tiny random model: scoring rules, paired intervals, the baseline masks,
the summary on hand-made records, and the command end to end (files, the training world regenerated
from world.json, every baseline fed through the engine's keep-mask API)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.tiny import TinySpec, save_tiny_model_dir
from workers.toyworld import WorldConfig, make_sample, row_images, save_world
from workers.training import evaluate
from workers.training.data import box_masks
from workers.training.eval_report import (
    SETTINGS, caption_objects, normalise, object_f1, paired_bootstrap, render_markdown, summarise, token_f1,
)
from workers.training.evaluate import EvalConfig, baseline_masks, keep_mask_rows

from engine_helpers import random_modules


pytestmark = pytest.mark.usefixtures("one_thread")


def test_scoring_rules():
    assert normalise("  Red. ") == "red" and normalise("3") == "3" and normalise("Blue   Square.") == "blue square"
    gold = "a red circle, a blue square and an orange star"
    assert caption_objects(gold) == {("red", "circle"): 1, ("blue", "square"): 1, ("orange", "star"): 1}
    assert object_f1(gold + ".", gold) == 1.0
    assert object_f1("a red circle and a green square", gold) == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert object_f1("nothing here", gold) == 0.0
    # Multi-token answers: exact match is all-or-nothing, token F1 gives partial credit.
    assert normalise("blue square") == normalise("Blue square.") and normalise("blue circle") != normalise("blue square")
    assert token_f1("blue circle", "blue square") == pytest.approx(0.5)
    assert token_f1("Blue square.", "blue square") == 1.0 and token_f1("red", "blue square") == 0.0
    assert token_f1("a red circle and a blue square", "a blue square and a red circle") == 1.0


def test_paired_bootstrap_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = a & (rng.random(400) < 0.9)  # b is a minus ~10% of its hits: strongly paired
    got = paired_bootstrap(a, b, 4000, seed=1)
    diff = a.astype(float) - b.astype(float)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
    assert got["n"] == 400 and got["diff"] == pytest.approx(diff.mean())
    assert got["lo"] == pytest.approx(diff.mean() - half, abs=0.01) and got["hi"] == pytest.approx(diff.mean() + half, abs=0.01)
    assert got["lo"] > 0  # the pairing is what makes this difference significant
    same = paired_bootstrap(a, a, 500, seed=1)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    assert paired_bootstrap([], [], 10, 0)["diff"] is None


def test_baseline_masks():
    gen = torch.Generator().manual_seed(0)
    boxes = [torch.rand(64, generator=gen) < share for share in (0.1, 0.5, 0.0, 0.9)]
    glimpse_counts = [7, 3, 0, 64]
    masks = baseline_masks(boxes, glimpse_counts, seeds=[1, 2, 3, 4])
    assert set(masks) == {"oracle", "anti_oracle", "outside_all", "random", "no_visual"}
    for b, box in enumerate(boxes):
        assert torch.equal(masks["oracle"][b], box) and torch.equal(masks["outside_all"][b], ~box)
        assert not (masks["anti_oracle"][b] & box).any()
        assert int(masks["anti_oracle"][b].sum()) == min(int(box.sum()), int((~box).sum()))
        assert int(masks["random"][b].sum()) == glimpse_counts[b]
        assert not masks["no_visual"][b].any() and masks["no_visual"][b].numel() == 64
    again = baseline_masks(boxes, glimpse_counts, seeds=[1, 2, 3, 4])
    assert all(torch.equal(x, y) for x, y in zip(masks["random"], again["random"]))


def _fake_record(qtype, correct: dict, keep: dict, num_objects=2):
    row = {"id": "x", "qtype": qtype, "num_objects": num_objects, "answer": "a", "question": "q",
           "visual_tokens": 10, "box_ratio": 0.2}
    for name in SETTINGS:
        ok = correct.get(name, True)
        row[name] = {"text": "a" if ok else "b", "correct": ok, "token_f1": float(ok), "keep_ratio": keep.get(name, 0.2)}
        if qtype == "captioning":
            row[name]["object_f1"] = 0.5 if ok else 0.0
        if name != "unpruned":
            row[name]["mask"] = {"tp": 2, "fp": 0, "fn": 0}
        if name == "glimpse":
            row[name]["predicted_mask"] = {"tp": 1, "fp": 1, "fn": 1}
    return row


def test_summary_on_hand_made_records():
    records = [_fake_record("attribute", {}, {"unpruned": 1.0}) for _ in range(3)]
    records.append(_fake_record("attribute", {"anti_oracle": False, "glimpse": False}, {"unpruned": 1.0}))
    records += [_fake_record("captioning", {"no_visual": False, "unpruned": ok}, {"unpruned": 1.0}, num_objects=5) for ok in (True, False)]
    summary = summarise(records, n_boot=200, seed=0)
    s = summary["settings"]
    assert summary["qtypes"] == ["attribute", "captioning"] and summary["rows"] == 6
    assert s["unpruned"]["accuracy"] == pytest.approx(5 / 6) and s["glimpse"]["by_qtype"]["attribute"]["accuracy"] == 0.75
    assert s["glimpse"]["by_qtype"]["attribute"]["relative_accuracy"] == 0.75  # relative to its own type's base
    assert s["glimpse"]["relative_accuracy"] == pytest.approx(1.0) and s["no_visual"]["relative_accuracy"] == pytest.approx(0.8)
    assert s["glimpse"]["by_qtype"]["captioning"]["relative_accuracy"] == 2.0
    assert s["unpruned"]["keep_ratio"] == 1.0 and s["glimpse"]["keep_ratio"] == pytest.approx(0.2)
    assert s["no_visual"]["by_qtype"]["captioning"]["object_f1"] == 0.0 and s["oracle"]["object_f1"] == 0.5
    assert set(s["glimpse"]["by_objects"]) == {"2", "5"}
    d = summary["differences"]
    assert d["oracle - anti_oracle"]["attribute"]["accuracy"]["diff"] == pytest.approx(0.25)
    assert d["oracle - anti_oracle"]["captioning"]["accuracy"]["diff"] == 0.0
    assert d["unpruned - no_visual"]["captioning"]["object_f1"]["diff"] == pytest.approx(0.25)
    assert summary["predicted_mask_vs_boxes"]["all"] == {"precision": 0.5, "recall": 0.5, "iou": pytest.approx(1 / 3)}
    table = render_markdown(summary)
    assert all(f"| {name} |" in table for name in SETTINGS) and "| oracle - anti_oracle | +16.7 [" in table


def test_keep_mask_rows_equal_the_glimpse_stage(tiny_model, tiny_processor, tiny_modules):
    """The old helper (now the engine's masked stage) with the glimpse's own keep masks gives the same
    rows and tokens: the glimpse is the last token, so causally no prompt token sees it."""
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


def test_held_out_world_comes_from_world_json(tmp_path):
    trained = WorldConfig(image_size=112, max_objects=4, seed=5)
    save_world(trained, tmp_path / "base")
    world, source = evaluate.trained_world(str(tmp_path / "base"), str(tmp_path / "none"))
    assert world == trained and source.endswith("world.json")
    held_out = EvalConfig(seed=11).world(world)
    assert held_out == dataclasses.replace(trained, seed=11)
    assert EvalConfig(seed=11, max_objects=2).world(world).max_objects == 2
    with pytest.raises(ValueError, match="training world's seed"):
        EvalConfig(seed=5).world(world)


def test_evaluate_command_end_to_end(tmp_path, tiny_model):
    base = save_tiny_model_dir(tmp_path / "base", TinySpec(rope_theta=10_000.0))
    save_world(WorldConfig(image_size=112, max_objects=4, seed=3), base)
    modules = random_modules(tiny_model, seed=1)
    modules.save(tmp_path / "modules", base_config=tiny_model.config.to_dict())
    out = tmp_path / "eval"
    assert evaluate.main(["--base", str(base), "--modules", str(tmp_path / "modules"), "--out", str(out),
                          "--rows", "5", "--batch-size", "3", "--seed", "11", "--max-new-tokens", "4",
                          "--bootstrap", "100"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    rows = [json.loads(x) for x in (out / "eval_rows.jsonl").read_text().splitlines()]
    table = (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["rows"] == len(rows) == 5 and summary["world"]["seed"] == 11 and summary["world"]["image_size"] == 112
    assert summary["training_seed"] == 3 and summary["keep_layer"] == modules.config.reduce_layer
    assert set(summary["settings"]) == set(SETTINGS) and all(f"| {name} |" in table for name in SETTINGS)
    assert "glimpse - random" in summary["differences"] and "paired percentile bootstrap" in table
    for entry in summary["settings"].values():
        assert {"accuracy", "relative_accuracy", "keep_ratio", "token_f1", "by_qtype", "by_objects"} <= set(entry)
    assert summary["settings"]["unpruned"]["keep_ratio"] == 1.0
    assert set(summary["predicted_mask_vs_boxes"]) == {"all", *summary["settings"]["glimpse"]["by_qtype"]}
    for row in rows:
        assert row["oracle"]["keep_ratio"] == pytest.approx(row["box_ratio"])
        assert row["oracle"]["mask"]["fp"] == row["oracle"]["mask"]["fn"] == 0
        assert row["anti_oracle"]["mask"]["tp"] == 0
        assert row["anti_oracle"]["keep_ratio"] == pytest.approx(min(row["box_ratio"], 1 - row["box_ratio"]))
        assert row["outside_all"]["keep_ratio"] == pytest.approx(1 - row["box_ratio"])
        assert row["random"]["keep_ratio"] == pytest.approx(row["glimpse"]["keep_ratio"])
        assert row["no_visual"]["keep_ratio"] == 0.0
        assert row["glimpse_cap"]["keep_ratio"] <= max(0.111, 1 / row["visual_tokens"]) + 1e-9

    # The masked settings are the engine's keep-mask API: the same masks through `generate` give the
    # evaluator's answers.
    engine = GlimpseEngine(tiny_model, evaluate_processor(base), modules)
    world = WorldConfig(image_size=112, max_objects=4, seed=11)
    samples = [make_sample(world, i) for i in range(3)]
    inputs = engine.build_inputs([GenerationRequest(images=(s.image,), prompt=s.question) for s in samples])
    boxes = box_masks(samples, inputs.image_grid_thw, 2)
    for name, masks in (("oracle", boxes), ("outside_all", [~b for b in boxes])):
        got = engine.generate([GenerationRequest(images=(s.image,), prompt=s.question, keep_mask=m) for s, m in zip(samples, masks)],
                              SamplingParams(max_new_tokens=4))
        assert [r.text for r in got] == [row[name]["text"] for row in rows[:3]]


def evaluate_processor(model_dir):
    from workers.modeling.loading import load_engine

    return load_engine(str(model_dir), None, device="cpu").processor


def test_header_flags_a_keep_layer_other_than_the_reduce_layer():
    meta = {"base": "b", "modules": "m", "world_source": None, "keep_layer": 2, "reduce_layer": 2,
            "world": {"seed": 9, "image_size": 224, "min_objects": 1, "max_objects": 12}}
    assert "Note:" not in evaluate.report_header(meta)
    assert "after layer -1: a difference between the two groups" in evaluate.report_header({**meta, "keep_layer": -1})


def test_two_image_rows_put_every_mask_on_the_right_image(tiny_model, tiny_processor, tiny_modules):
    engines = evaluate.build_engines(tiny_model, tiny_processor, tiny_modules, EvalConfig())
    world = WorldConfig(image_size=112, max_objects=4, seed=4, two_image_share=0.5)
    samples = [make_sample(world, i) for i in range(12)]
    samples = [s for s in samples if s.images and s.boxes][:2] + [s for s in samples if not s.images][:2]
    assert len(samples) == 4
    rows = evaluate.evaluate_batch(engines, samples, 0, EvalConfig(max_new_tokens=2))
    for s, row in zip(samples, rows):
        per_image = 16  # 112 px: 4 x 4 merged tokens per image
        assert row["images"] == len(row_images(s)) and row["visual_tokens"] == per_image * row["images"]
        assert row["oracle"]["mask"]["fp"] == row["oracle"]["mask"]["fn"] == 0
        if s.images:
            # The oracle keeps the asked image's box tokens and nothing of the other image; the
            # outside_all mask keeps the whole other image.
            assert row["oracle"]["other_image_share"] == 0.0
            assert row["outside_all"]["other_image_share"] > 0.4
            assert 0.0 <= row["glimpse"]["other_image_share"] <= 1.0
            # The swapped control is the engine's answer with the images in reverse order.
            engine = engines["glimpse"]
            back = engine.generate_from_inputs(engine.build_inputs([GenerationRequest(images=row_images(s)[::-1], prompt=s.question)]),
                                               SamplingParams(max_new_tokens=2), prune=False)[0]
            assert row["unpruned_swapped"]["text"] == back.text
        else:
            assert "other_image_share" not in row["oracle"] and "unpruned_swapped" not in row
    summary = summarise(rows, n_boot=50)
    assert set(summary["by_images"]) == {"1", "2"} and summary["by_images"]["2"]["oracle"]["other_image_share"] == 0.0
    assert summary["by_images"]["2"]["unpruned_swapped"]["n"] == 2 and summary["by_images"]["1"]["unpruned_swapped"]["n"] == 0
    assert "By images per row" in render_markdown(summary)


def test_count_bias_splits_wrong_counts_by_direction():
    def row(qtype, answer, said):
        r = _fake_record(qtype, {}, {})
        r["answer"] = answer
        for name in SETTINGS:
            r[name]["text"] = said.get(name, answer)
        return r

    records = [row("counting", "3", {"glimpse": "5", "random": "1"}), row("counting", "2", {"glimpse": "4"}),
               row("counting", "0", {"glimpse": "0", "random": "none"}), row("region_count", "1", {"glimpse": "2."}),
               row("attribute", "red", {})]
    bias = summarise(records, n_boot=50, seed=0)["count_bias"]
    assert set(bias) == {"counting", "region_count"}  # only question types with numeric answers
    assert bias["counting"]["glimpse"] == {"n": 3, "over": pytest.approx(2 / 3), "exact": pytest.approx(1 / 3), "under": 0.0, "other": 0.0}
    assert bias["counting"]["random"] == {"n": 3, "over": 0.0, "exact": pytest.approx(1 / 3), "under": pytest.approx(1 / 3),
                                          "other": pytest.approx(1 / 3)}
    assert bias["region_count"]["glimpse"]["over"] == 1.0 and bias["region_count"]["unpruned"]["exact"] == 1.0
    table = render_markdown(summarise(records, n_boot=50, seed=0))
    assert "| counting | 3 | 0 / 100 / 0 | 67 / 33 / 0 |" in table


def test_paired_runs_of_two_stages_on_the_same_rows(tmp_path, capsys):
    import json

    from workers.training import eval_report

    old = [_fake_record("attribute", {"glimpse": i % 2 == 0}, {}) for i in range(4)] + [_fake_record("counting", {}, {})]
    new = [_fake_record("attribute", {}, {}) for _ in range(4)] + [_fake_record("counting", {"glimpse": False}, {})]
    for i, (a, b) in enumerate(zip(old, new)):
        a["id"] = b["id"] = f"r{i}"
    diffs = eval_report.paired_runs(new, old, settings=("glimpse", "unpruned"), n_boot=100)
    assert diffs["glimpse"]["attribute"]["diff"] == 0.5 and diffs["glimpse"]["counting"]["diff"] == -1.0
    assert diffs["glimpse"]["all"]["diff"] == pytest.approx(0.2) and diffs["unpruned"]["all"]["diff"] == 0.0
    with pytest.raises(ValueError, match="same rows"):
        eval_report.paired_runs(new[::-1], old)
    for name, rows in (("new", new), ("old", old)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert eval_report.main([str(tmp_path / "new.jsonl"), str(tmp_path / "old.jsonl"), "--bootstrap", "50"]) == 0
    assert "| glimpse | +20.0 [" in capsys.readouterr().out
