"""The comparison harness (workers/compare.py): every setting answers the same rows, budgets and
reference rows are what they claim, Parquet sets with reference answers are scored by their task's
metric, and the command writes its table, JSON, rows and plot (on the shipped small model)."""
from __future__ import annotations

import dataclasses
import io
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from workers import compare
from workers.compare import CompareConfig, EvalItem, ParquetSet, anti_masks
from workers.metrics import score
from workers.modeling.strategies import keep_count
from workers.toyworld import box_token_mask, generate_samples, load_world, samples_to_table

from engine_helpers import patterned_image

pytestmark = pytest.mark.usefixtures("one_thread")
V2 = "models/small-qwen2_5_vl-v2"
V2_MODULES = "models/small-qwen2_5_vl-v2-glimpse"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _vqa_set(path, rows=5):
    table = pa.table({
        "qid": [f"q{i}" for i in range(rows)],
        "image": [{"bytes": _png(patterned_image(56 + 28 * (i % 3), 56, i)), "path": None} for i in range(rows)],
        "question": ["What is shown?"] * rows,
        "answers": [["2"] * 3 + ["3"] * 7 if i % 2 else ["12.5"] for i in range(rows)],
        "dataset": ["vqav2" if i % 2 else "chartqa" for i in range(rows)],
    })
    pq.write_table(table, path)
    return path


def test_a_parquet_set_runs_every_setting_on_the_same_rows(tiny_model, tiny_processor, tiny_modules, tmp_path):
    data = ParquetSet(str(_vqa_set(tmp_path / "set.parquet")), {"id": "qid", "answer": "answers", "task": "dataset"},
                      post_prompt="Answer briefly.")
    assert len(data) == 5 and not data.has_boxes
    items = data.items(0, 5)
    assert [it.metric for it in items] == ["relaxed_accuracy", "vqa_accuracy"] * 2 + ["relaxed_accuracy"]
    assert items[1].refs == tuple(["2"] * 3 + ["3"] * 7) and items[0].question.endswith("\nAnswer briefly.")
    cfg = CompareConfig(rows=5, ratios=(0.5,), strategies=("fastv", "visionzip", "glimpse"), batch_size=2, max_new_tokens=3,
                        bootstrap=200, boxes=False)
    records, summary = compare.run(tiny_model, tiny_processor, tiny_modules, cfg, data.items)
    names = ["unpruned", "glimpse", "fastv@0.5", "visionzip@0.5", "glimpse@0.5", "anti_glimpse", "no_visual"]
    assert list(summary["settings"]) == names and len(records) == 5
    assert summary["tasks"] == ["chartqa", "vqav2"]
    for r, it in zip(records, items):
        assert r["id"] == it.id and r["task"] == it.task
        assert r["no_visual"]["keep_ratio"] == 0.0 and r["unpruned"]["keep_ratio"] == 1.0
        for name in names:
            assert r[name]["score"] == score(it.metric, r[name]["text"], it.refs)
        n = round(r["fastv@0.5"]["kv_tokens"] - r["no_visual"]["kv_tokens"])  # kept visual tokens
        visual = round(r["unpruned"]["kv_tokens"] - r["no_visual"]["kv_tokens"])
        assert n == keep_count(visual, 0.5) and r["visionzip@0.5"]["kv_tokens"] == r["fastv@0.5"]["kv_tokens"]
        assert r["anti_glimpse"]["kv_tokens"] == r["glimpse"]["kv_tokens"]  # the same count, other tokens
    e = summary["settings"]["fastv@0.5"]
    assert e["vs_glimpse_same_ratio"]["n"] == 5 and e["rows_per_s"] > 0 and e["prefill_ms"] > 0
    assert summary["settings"]["unpruned"]["prefill_work"] == 1.0 and 0 < e["prefill_work"] < 1
    # visionzip prunes before the LLM, fastv after layer 1: at the same budget fastv does more prefill work
    assert summary["settings"]["visionzip@0.5"]["prefill_work"] < e["prefill_work"]


def test_anti_glimpse_keeps_the_lowest_ranked_tokens():
    logits = torch.tensor([0.9, -1.0, 0.3, -2.0, 0.1])
    res = SimpleNamespace(importance_logits=logits, kept_tokens=2)
    assert anti_masks([res])[0].nonzero().flatten().tolist() == [1, 3]


def test_bad_eval_sets_fail_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="no column"):
        ParquetSet(str(_vqa_set(tmp_path / "set.parquet")))  # the id column is "qid" here
    with pytest.raises(ValueError, match="no Parquet files"):
        ParquetSet(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(SystemExit, match="known metrics"):
        compare._metric_arg("bleu", {"anls": None})
    assert compare._metric_arg("captioning=object_f1,quadrant=object_f1", {"object_f1": None}) == {
        "captioning": "object_f1", "quadrant": "object_f1"}


def test_the_command_on_the_shipped_model_synthetic_set(tmp_path):
    out = tmp_path / "cmp"
    assert compare.main(["--base", V2, "--modules", V2_MODULES, "--rows", "4", "--batch-size", "4", "--ratios", "0.111",
                         "--strategies", "divprune,glimpse", "--max-new-tokens", "8", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["settings"]) == ["unpruned", "glimpse", "divprune@0.111", "glimpse@0.111", "oracle", "anti_oracle",
                                        "no_visual"]
    assert result["world"]["seed"] == CompareConfig.seed != result["training_seed"]
    rows = [json.loads(line) for line in (out / "compare_rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["oracle"]["kv_tokens"] == r["anti_oracle"]["kv_tokens"] for r in rows)
    assert "| divprune@0.111 |" in (out / "compare.md").read_text()
    assert Image.open(out / "compare.png").size[0] > 300
    with pytest.raises(SystemExit, match="training world's seed"):
        compare.main(["--base", V2, "--modules", V2_MODULES, "--seed", str(result["training_seed"]), "--out", str(out)])


def test_the_command_on_a_parquet_set_with_boxes(tmp_path):
    """The demo's shards (id, image, question, answer, qtype, boxes) as an eval set: boxes give the oracle rows."""
    world = load_world(V2, seed=31338)  # the shipped world: row 2 of this seed holds two images (list column + target_image)
    assert [len(s.images) for s in generate_samples(world, 3)] == [0, 0, 2]
    pq.write_table(samples_to_table(generate_samples(world, 3), multi=True), tmp_path / "part-0.parquet")
    out = tmp_path / "cmp"
    assert compare.main(["--base", V2, "--modules", V2_MODULES, "--eval-set", str(tmp_path), "--columns", "task=qtype",
                         "--metric", "captioning=object_f1,quadrant=object_f1", "--ratios", "0.2", "--strategies", "uniform",
                         "--max-new-tokens", "8", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["rows"] == 3 and {"oracle", "anti_oracle", "no_visual"} <= set(result["settings"])
    assert "anti_glimpse" not in result["settings"]


def test_two_image_rows_get_their_boxes_on_the_asked_image(tmp_path):
    """A toy-world shard with two images per row (list column + target_image) as an eval set: each row's
    oracle mask covers its boxes on the asked image and nothing of the other one."""
    world = dataclasses.replace(load_world(V2, seed=31337), two_image_share=1.0)
    samples = list(generate_samples(world, 4))
    pq.write_table(samples_to_table(samples, multi=True), tmp_path / "part-0.parquet")
    items = compare.ParquetSet(str(tmp_path), columns={"task": "qtype"}).items(0, 4)
    assert [it.box_image for it in items] == [s.target for s in samples] and {s.target for s in samples} == {0, 1}
    grids = torch.tensor([[1, 24, 24]] * 8)  # 336 px: 12 x 12 merged tokens per image
    for item, s, mask in zip(items, samples, compare._box_masks(items, grids, 2)):
        assert len(item.images) == 2 and mask.shape == (288,)
        want = box_token_mask(s.boxes, 12, 12).reshape(-1)
        assert torch.equal(mask[144 * s.target:144 * (s.target + 1)], torch.from_numpy(want))
        assert not mask[144 * (1 - s.target):144 * (2 - s.target)].any()
    with pytest.raises(ValueError, match="hold 8 images, 6 grids"):
        compare._box_masks(items, grids[:6], 2)
