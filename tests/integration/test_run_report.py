"""The run report (pipeline/report.py) next to the output: report.md with its PNGs (keep histogram, keep
by question type and by image size, throughput, kept-token overlays of sample rows) and the error table."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.run import run_job
from pipeline_helpers import job_for, png

pytestmark = pytest.mark.integration


def test_report_with_pictures_and_errors(tmp_path, ray_runtime, model_dirs):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = [png(Image.new("RGB", (56 + 28 * (i % 3), 56), (50 * i % 256, 100, 30))) for i in range(6)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(7)], "image": images + [b"broken"],
                             "question": ["What color is it?", "How many shapes?"] * 3 + ["What?"],
                             "qtype": ["attribute", "counting"] * 3 + ["attribute"]}), inputs / "rows.parquet")
    out = tmp_path / "out"
    summary = run_job(job_for(inputs, out, model_dirs))
    report = out / "_report" / "report.md"
    assert summary["report_url"] == str(report) and report.exists()
    text = report.read_text()
    assert "7 rows (6 ok, 1 error)" in text and "| 1 |" in text  # the broken image in the error table
    pictures = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert {"keep_hist.png", "keep_by_type.png", "keep_by_size.png", "throughput.png"} <= set(pictures)
    samples = [p for p in pictures if p.startswith("sample_")]
    assert 1 <= len(samples) <= 6
    for name in pictures:
        with Image.open(out / "_report" / name) as im:
            assert im.size[0] > 20 and im.size[1] > 20
    with Image.open(out / "_report" / "sample_0.png") as im:
        assert im.size == (56, 56)  # r0 as the image stage sized it, one tile
    job = job_for(inputs, tmp_path / "out2", model_dirs, "output.report=false")
    assert run_job(job).get("report_url") is None and not (tmp_path / "out2" / "_report").exists()
