"""Per-row pruning settings: an input column (input.columns.pruning) holding a row's own keep ratio or
threshold overrides the job's for that row; bad values are error rows; the job refuses the column
without a pruning mode."""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.images import ImageStageConfig, row_pruning_value
from pipeline.jobfile import JobFileError, load_job
from pipeline.stages import to_block
from schemas.rows import KEY_COLUMN, PASSTHROUGH_COLUMN, READ_ERROR_COLUMN, ROW_COLUMN

REPO = Path(__file__).resolve().parents[2]
BASE, GLIMPSE = REPO / "models" / "small-qwen2_5_vl-v2", REPO / "models" / "small-qwen2_5_vl-v2-glimpse"

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (BASE / "model.safetensors").exists(), reason="the v2 small model is not shipped")]


def _job(*extra):
    return load_job(REPO / "jobs" / "demo.yaml", [f"model.base={BASE}", f"model.glimpse_modules={GLIMPSE}",
                                                   "sampling.max_new_tokens=2", "input.columns.pruning=keep", *extra])


def _block(job, values) -> pa.Table:
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 30, 30)).save(buf, format="PNG")
    n = len(values)
    raw = pa.table({"id": [f"r{i}" for i in range(n)], "image": [buf.getvalue()] * n, "question": ["Any shape?"] * n,
                    "keep": pa.array(values, pa.float64()), KEY_COLUMN: ["k"] * n,
                    ROW_COLUMN: pa.array(range(n), pa.int64()), READ_ERROR_COLUMN: pa.nulls(n, pa.string())})
    return to_block(raw, ImageStageConfig.from_job(job))


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_a_rows_keep_ratio_overrides_the_jobs(scheduler):
    from workers.generate import GlimpseUDF

    job = _job("pruning.mode=fixed_ratio", "pruning.keep_ratio=0.5", f"batching.scheduler={scheduler}")
    out = GlimpseUDF(job)(_block(job, [0.25, None, 1.0, 0.1, 1.5])).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "ok", "ok", "error"]
    assert [r["kept_tokens"] for r in out[:4]] == [16, 32, 64, 6]  # 64 visual tokens: int(r * 64)
    assert "keep ratio 1.5 is outside (0, 1]" in out[4]["error"]
    from pipeline.writer import passthrough_table

    passed = passthrough_table([r[PASSTHROUGH_COLUMN] for r in out])
    assert passed.column("keep").to_pylist() == [0.25, None, 1.0, 0.1, 1.5]  # the user's column passes through


def test_a_rows_threshold_overrides_the_jobs():
    from workers.generate import GlimpseUDF

    job = _job("pruning.mode=glimpse", "pruning.threshold=0.5")
    out = GlimpseUDF(job)(_block(job, [0.01, 0.99, None])).to_pylist()
    low, high, default = (r["kept_tokens"] for r in out)
    assert low >= default >= high and low > high


def test_values_are_checked():
    assert row_pruning_value(None, "glimpse", "c") == (None, None)
    assert row_pruning_value("0.3", "glimpse", "c") == (0.3, None)
    assert "outside (0, 1)" in row_pruning_value(1.0, "glimpse", "c")[1]
    assert row_pruning_value(1.0, "fixed_ratio", "c") == (1.0, None)
    assert "not a number" in row_pruning_value("lots", "fixed_ratio", "c")[1]
    assert "not a number" in row_pruning_value(True, "fixed_ratio", "c")[1]
    with pytest.raises(JobFileError, match="input.columns.pruning"):
        _job("pruning.mode=none")
