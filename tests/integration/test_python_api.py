"""The Python entry point (pipeline/api.py): any Ray Dataset in, output rows out, with hooks; and the
job's input read through Ray Data's readers (a folder of images, a CSV manifest)."""
from __future__ import annotations

import csv
import io

import pytest
import ray
from PIL import Image

from pipeline.api import annotate, read_input
from pipeline_helpers import job_for

pytestmark = pytest.mark.integration


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return buf.getvalue()


def test_any_dataset_in_output_rows_out_with_hooks(tmp_path, ray_runtime, model_dirs):
    job = job_for(tmp_path / "unused", tmp_path / "out", model_dirs, "sampling.max_new_tokens=3")
    items = [{"id": f"r{i}", "image": _png((30 * i, 80, 160)), "q": " What color? ", "extra": i} for i in range(5)]
    items.append({"id": "bad", "image": b"not an image", "q": "What?", "extra": 99})
    ds = ray.data.from_items(items)
    out = annotate(ds, job, preprocess=lambda row: {**row, "question": row.pop("q").strip()},
                   postprocess=lambda row: {**row, "short": (row["answer"] or "")[:3]})
    rows = {r["id"]: r for r in out.take_all()}
    assert set(rows) == {f"r{i}" for i in range(5)} | {"bad"}  # rows in = rows out
    assert all(rows[f"r{i}"]["status"] == "ok" and rows[f"r{i}"]["extra"] == i for i in range(5))
    assert rows["bad"]["status"] == "error" and rows["bad"]["answer"] is None
    assert all(r["question"] == "What color?" for k, r in rows.items() if k != "bad")
    assert all(r["short"] == (r["answer"] or "")[:3] and 0 < r["visual_tokens"] for k, r in rows.items() if k != "bad")
    assert "image" not in rows["r0"] and "_passthrough" not in rows["r0"]  # bytes column dropped, internals too


def test_read_input_through_ray_data_readers(tmp_path, ray_runtime, model_dirs):
    folder = tmp_path / "photos" / "day1"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png((60 * i, 10, 10)))
    job = job_for(tmp_path / "photos", tmp_path / "out", model_dirs, "input.prompt=Describe it.")
    rows = annotate(read_input(job), job).take_all()
    assert sorted(r["id"] for r in rows) == ["day1/0.png", "day1/1.png", "day1/2.png"] and all(r["status"] == "ok" for r in rows)
    with open(tmp_path / "rows.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "question"])
        w.writerows([["a", "photos/day1/0.png", "What color?"], ["b", "photos/day1/9.png", "What color?"]])
    job = job_for(tmp_path / "rows.csv", tmp_path / "out", model_dirs)
    rows = {r["id"]: r for r in annotate(read_input(job), job).take_all()}
    assert rows["a"]["status"] == "ok" and rows["a"]["image"] == str(tmp_path / "photos" / "day1" / "0.png")
    assert rows["b"]["status"] == "error" and "not found" in rows["b"]["error"]
