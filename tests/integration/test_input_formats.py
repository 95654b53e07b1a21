"""Every input format end to end on a local Ray runtime: a folder of image files (id = relative path, a
re-run with skip_existing processes only a new folder), a CSV manifest with relative paths and a
multi-image row, a JSON Lines manifest of http:// image URLs served on 127.0.0.1 (a missing one is an
error row), and `auto` refusing a folder that mixes manifest kinds."""
from __future__ import annotations

import csv
import functools
import http.server
import json
import threading

import pytest
from PIL import Image

from pipeline.run import run_job
from pipeline_helpers import job_for, read_output

pytestmark = pytest.mark.integration


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56 + 28 * (color % 2), 56), (40 * color % 256, 90, 200)).save(path)


def test_a_folder_of_images_then_a_new_folder(tmp_path, ray_runtime, model_dirs):
    root, out = tmp_path / "photos", tmp_path / "out"
    for i in range(3):
        _image(root / "2026-12-06" / f"img{i}.png", i)
    (root / "2026-12-06" / "notes.txt").write_text("not an image: ignored")
    job = job_for(root, out, model_dirs, "input.prompt=Describe the image.", "input.images_per_shard=2",
                  "output.mode=skip_existing")
    first = run_job(job)
    rows = read_output(out).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"2026-12-06/img{i}.png" for i in range(3)]
    assert all(r["status"] == "ok" and r["image"] == str(root / r["id"]) and "question" not in r for r in rows)
    assert first["shards_total"] == 2  # 3 files in parts of 2
    _image(root / "2026-12-07" / "img9.png", 9)
    second = run_job(job)
    assert second["this_run"]["rows_computed"] == 1 and second["shards_skipped"] == 2
    assert sorted(r["id"] for r in read_output(out).to_pylist())[-1] == "2026-12-07/img9.png"


def test_a_csv_manifest_with_relative_paths_and_a_multi_image_row(tmp_path, ray_runtime, model_dirs):
    folder = tmp_path / "set"
    for i in range(3):
        _image(folder / "imgs" / f"{i}.png", i)
    with open(folder / "rows.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "question", "note"])
        w.writerow(["a", "imgs/0.png", "What color?", "x"])
        w.writerow(["b", json.dumps(["imgs/1.png", "imgs/2.png"]), "Same shape?", ""])
        w.writerow(["c", "imgs/missing.png", "What color?", "y"])
    summary = run_job(job_for(folder, tmp_path / "out", model_dirs))  # auto: the folder holds one CSV
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert summary["rows_total"] == 3 and set(rows) == {"a", "b", "c"}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "ok" and rows["c"]["status"] == "error"
    one = rows["a"]["visual_tokens"]
    assert rows["b"]["visual_tokens"] > one and len(rows["b"]["kept_per_image"]) == 2
    assert "not found" in rows["c"]["error"] and rows["a"]["note"] == "x"


def test_a_jsonl_manifest_of_http_urls(tmp_path, ray_runtime, model_dirs):
    served = tmp_path / "www"
    for i in range(2):
        _image(served / f"{i}.png", i)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        manifest = tmp_path / "in" / "urls.jsonl"
        manifest.parent.mkdir()
        lines = [{"id": 1, "image": f"{base}/0.png", "question": "What color?"},
                 {"id": 2, "image": [f"{base}/0.png", f"{base}/1.png"], "question": "Which differs?"},
                 {"id": 3, "image": f"{base}/gone.png", "question": "What color?"}]
        manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        summary = run_job(job_for(manifest, tmp_path / "out", model_dirs))
    finally:
        server.shutdown()
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert summary["rows_total"] == 3 and [rows[i]["status"] for i in (1, 2, 3)] == ["ok", "ok", "error"]
    assert "gone.png not found" in rows[3]["error"]


def test_auto_refuses_a_folder_with_both_manifest_kinds(tmp_path, model_dirs):
    from pipeline.run import make_plan

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,image,question\n")
    (tmp_path / "in" / "b.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="holds both CSV and JSON Lines files: set input.format"):
        make_plan(job_for(tmp_path / "in", tmp_path / "out", model_dirs))
    plan = make_plan(job_for(tmp_path / "in", tmp_path / "out", model_dirs, "input.format=csv"))
    assert [sp.info.kind for sp in plan.todo] == ["csv"]
