"""One token count end to end: the image stage sizes an image to N visual tokens, the model actor's
processor (transformers 5.x `SizeDict` bounds) gives the model exactly N, and kept_tokens,
keep_ratio and the summary's ratios are all measured against that N. A processor that would resize
differently is an error row, not a silent difference."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.images import ImageStageConfig
from pipeline.jobfile import load_job
from pipeline.stages import to_block
from schemas.rows import KEY_COLUMN, READ_ERROR_COLUMN, ROW_COLUMN

REPO = Path(__file__).resolve().parents[2]
BASE, GLIMPSE = REPO / "models" / "small-qwen2_5_vl-v2", REPO / "models" / "small-qwen2_5_vl-v2-glimpse"
MAX_PIXELS = 448 * 448
SIZES = {"224": (224, 224), "448": (448, 448), "4000x3000": (4000, 3000)}

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (BASE / "model.safetensors").exists(), reason="the v2 small model is not shipped")]


def _job(mode: str):
    return load_job(REPO / "jobs" / "demo.yaml", [f"model.base={BASE}", f"model.glimpse_modules={GLIMPSE}",
                                                   f"pruning.mode={mode}", f"image.max_pixels={MAX_PIXELS}",
                                                   "sampling.max_new_tokens=2"])


def _block(job) -> pa.Table:
    images = []
    for w, h in SIZES.values():
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
        images.append(buf.getvalue())
    n = len(images)
    raw = pa.table({"id": list(SIZES), "image": images, "question": ["What colour is the shape?"] * n,
                    KEY_COLUMN: ["k"] * n, ROW_COLUMN: pa.array(range(n), pa.int64()), READ_ERROR_COLUMN: pa.nulls(n, pa.string())})
    return to_block(raw, ImageStageConfig.from_job(job))


def test_processor_takes_the_jobs_bounds_on_transformers_sizedict():
    from workers.generate import _match_resize, resize_bounds
    from workers.modeling.tiny import load_processor

    processor = load_processor(BASE)
    assert resize_bounds(processor) == (112896, 112896)  # the shipped processor's own bounds
    _match_resize(processor, 3136, MAX_PIXELS)
    assert resize_bounds(processor) == (3136, MAX_PIXELS)
    grid = processor(images=[Image.new("RGB", (448, 448))], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                     return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 32]]  # 256 visual tokens, not the shipped cap's 144


@pytest.mark.parametrize("mode", ["none", "glimpse"])
def test_stage_model_and_stats_count_the_same_tokens(mode):
    from pipeline import writer
    from workers.generate import GlimpseUDF

    job = _job(mode)
    block = _block(job)
    names = [list(SIZES)[r] for r in block.column(ROW_COLUMN).to_pylist()]
    stage = dict(zip(names, block.column("visual_tokens").to_pylist()))
    assert stage["224"] == 64 and stage["448"] == 256 and 200 <= stage["4000x3000"] <= MAX_PIXELS // 784
    out = GlimpseUDF(job)(block)
    rows = {list(SIZES)[r[ROW_COLUMN]]: r for r in out.to_pylist()}
    for name, row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert row["visual_tokens"] == stage[name]
        assert 1 <= row["kept_tokens"] <= row["visual_tokens"]
        # keep_ratio is kept over the model's own count: the same count the stage recorded
        assert row["keep_ratio"] == pytest.approx(row["kept_tokens"] / row["visual_tokens"])
        if mode == "none":
            assert row["kept_tokens"] == row["visual_tokens"]
    summary = writer.build_summary(writer.RunStats.of(out), 1.0, job, shards_total=1, shards_skipped=0, extra={})
    kept, visual = sum(r["kept_tokens"] for r in rows.values()), sum(stage.values())
    assert summary["overall_keep_ratio"] == pytest.approx(kept / visual)
    assert summary["mean_keep_ratio"] == pytest.approx(sum(r["kept_tokens"] / r["visual_tokens"] for r in rows.values()) / 3)
    prediction = summary["pruning_prediction"]
    if mode == "none":
        assert prediction is None and all(r["prefill_work_ratio"] is None for r in rows.values())
    else:
        from workers.modeling.engine import prefill_work_ratio

        layers, k = 8, 1  # the v2 small model: 8 text layers, pruned after layer 1
        for r in rows.values():
            assert r["prefill_work_ratio"] == pytest.approx(
                prefill_work_ratio(r["prompt_tokens"], r["visual_tokens"], r["kept_tokens"], layers, k))
        prompt = sum(r["prompt_tokens"] for r in rows.values())
        expected = sum(r["prefill_work_ratio"] * r["prompt_tokens"] for r in rows.values()) / prompt
        assert prediction["prefill_work_ratio"] == pytest.approx(expected)
        assert (k + 1) / layers < prediction["prefill_work_ratio"]
        # FLOPs (ViT, glimpse pass and VIP included): computed from the shipped dirs' config.json files
        from workers.training.flops import prefill_report

        base, glimpse = (json.loads((d / "config.json").read_text()) for d in (BASE, GLIMPSE))
        r = rows["224"]
        report = prefill_report(base, 224, r["prompt_tokens"] - r["visual_tokens"], r["kept_tokens"] / r["visual_tokens"], k, glimpse)
        assert r["prefill_flops_ratio"] == pytest.approx(report["prefill_pruned_over_unpruned"], rel=1e-9)
        assert all(row["prefill_flops_ratio"] > row["prefill_work_ratio"] for row in rows.values())  # the ViT is paid in full
        flops = sum(r["prefill_flops_ratio"] * r["prompt_tokens"] for r in rows.values()) / prompt
        assert prediction["prefill_flops_ratio"] == pytest.approx(flops)
        assert prediction["pays"] == (prediction["prefill_flops_ratio"] < 0.97 or prediction["kv_cache_ratio"] < 0.9)


def test_prefill_work_ratio_bounds():
    from workers.modeling.engine import prefill_work_ratio

    assert prefill_work_ratio(100, 80, 80, 28, 18) > 1.0  # nothing dropped: the glimpse token costs
    assert prefill_work_ratio(100, 80, 0, 28, 18) == pytest.approx((19 * 101 + 9 * 20) / 2800)
    assert prefill_work_ratio(100, 80, 0, 28, 18) > 19 / 28


def test_a_processor_that_resizes_differently_gives_error_rows_not_silent_counts():
    from transformers.image_utils import SizeDict

    from workers.generate import GlimpseUDF

    job = _job("glimpse")
    udf = GlimpseUDF(job)
    udf.engine.processor.image_processor.size = SizeDict(shortest_edge=3136, longest_edge=224 * 224)
    out = udf(_block(job)).to_pylist()
    # The 224 px image gives 64 tokens under both bounds: it is answered; the others are error rows
    # (the failed chunk is retried row by row, so the good row is not lost with them).
    assert [r["visual_tokens"] for r in out] == [64, 256, 234]
    assert out[0]["status"] == "ok" and out[0]["kept_tokens"] is not None
    assert all(r["status"] == "error" for r in out[1:])
    assert all("resize bounds differ from the job's image.min_pixels/max_pixels" in r["error"] for r in out[1:])
