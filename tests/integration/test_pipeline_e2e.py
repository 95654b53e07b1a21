"""YAML -> Ray Data -> Parquet, end to end on a local Ray runtime (and on a loopback S3 server)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.run import run_job
from workers.toyworld import WorldConfig, write_shards
from pipeline_helpers import job_for, png, read_output

pytestmark = pytest.mark.integration


def test_bad_rows_become_error_rows_and_reruns_skip_done_shards(tmp_path, ray_runtime, model_dirs):
    inputs = tmp_path / "in"
    write_shards(WorldConfig(seed=3, max_objects=4), 6, inputs, rows_per_shard=3)  # part-00000/1
    ok_img = Image.new("RGB", (84, 56), (200, 30, 30))
    rows = [
        ("good-rgb", png(ok_img), "What color is the square?"),
        ("good-gray", png(Image.new("L", (56, 56), 128)), "Is there a circle?"),
        ("good-rgba", png(Image.new("RGBA", (56, 84), (0, 0, 255, 100))), "What shape is it?"),
        ("corrupt", b"\x89PNG not really", "What is this?"),
        ("empty-question", png(ok_img), "   "),
        ("huge", png(Image.new("RGB", (1200, 1000), (1, 2, 3))), "Too big?"),
    ]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows], "question": [r[2] for r in rows]}),
                   inputs / "bad-rows.parquet")
    (inputs / "broken.parquet").write_bytes(b"this is not parquet")
    out = tmp_path / "out"

    summary = run_job(job_for(inputs, out, model_dirs))
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6 + 6  # rows in = rows out (readable shards)
    by_id = {r["id"]: r for r in table.to_pylist()}
    errors = {i: r["error"] for i, r in by_id.items() if r["status"] == "error"}
    assert set(errors) == {"corrupt", "empty-question", "huge"}, errors
    assert "cannot identify image" in errors["corrupt"] or "corrupt" in errors["corrupt"]
    assert "question" in errors["empty-question"]
    assert "1200000" in errors["huge"].replace(",", "") or "pixels" in errors["huge"]
    assert all("\n" not in e for e in errors.values())
    for i, r in by_id.items():
        if i not in errors:
            assert r["answer"] is not None and r["output_tokens"] >= 1
            assert 0 < r["kept_tokens"] <= r["visual_tokens"] and r["keep_ratio"] == pytest.approx(r["kept_tokens"] / r["visual_tokens"])
            assert sum(r["kept_per_image"]) == r["kept_tokens"] and r["pruning"].startswith('{"max_remain_ratio"')
    synthetic = [r for r in by_id.values() if r["id"].startswith("synth-")]
    assert all("input_answer" in r and r["qtype"] for r in synthetic)  # passthrough columns survive

    assert summary["rows_total"] == 12 and summary["rows_error"] == 3
    assert [f["error"] for f in summary["shards_failed"]][0].startswith("not a readable Parquet file")
    assert not (out / "_SUCCESS").exists()  # a shard failed: no success marker
    assert json.loads((out / "_summary.json").read_text())["rows_ok"] == 9

    # Re-run in skip_existing mode with the broken shard fixed (removed) and one new shard.
    (inputs / "broken.parquet").unlink()
    write_shards(WorldConfig(seed=4, max_objects=2), 2, inputs / "new", rows_per_shard=2)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    summary = run_job(job_for(inputs, out, model_dirs, "output.mode=skip_existing"))
    assert summary["shards_skipped"] == 3 and summary["shards_processed"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert {k: v for k, v in after.items() if k in before} == before  # old outputs untouched
    assert (out / "_SUCCESS").exists()
    assert read_output(out).num_rows == 14


def test_s3_shards_in_and_out(ray_runtime, model_dirs, s3_server, tmp_path):
    """Shards and the images they reference (by s3:// URL) live on the S3 server; outputs go back there."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    for k in range(4):
        client.put_object(Bucket=bucket, Key=f"images/{k}.png", Body=png(Image.new("RGB", (56 + 28 * k, 56), (40 * k, 90, 200))))
    urls = [f"s3://{bucket}/images/{k}.png" for k in range(4)] + [f"s3://{bucket}/images/missing.png"]
    for shard, rows in (("a", range(0, 3)), ("b", range(3, 5))):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": [f"row-{i}" for i in rows], "image": [urls[i] for i in rows],
                                 "question": ["What color is the square?"] * len(rows)}), buf)
        client.put_object(Bucket=bucket, Key=f"input/{shard}.parquet", Body=buf.getvalue())
    storage = [f"input.storage.{k}={v}" for k, v in (("endpoint_url", s3_server.endpoint_url), ("region", "us-east-1"),
                                                     ("key_env", s3_server.key_env), ("secret_env", s3_server.secret_env))]
    storage += [s.replace("input.", "output.", 1) for s in storage]
    job = job_for(f"s3://{bucket}/input/", f"s3://{bucket}/output/", model_dirs, *storage)
    summary = run_job(job)
    assert summary["rows_total"] == 5 and summary["rows_ok"] == 4
    listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"])
    assert "output/_SUCCESS" in listed and "output/_summary.json" in listed
    data = [k for k in listed if k.endswith(".parquet")]
    assert len(data) == 2
    rows = []
    for key in data:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        rows += pq.read_table(io.BytesIO(body)).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"row-{i}" for i in range(5)]
    missing = [r for r in rows if r["status"] == "error"]
    assert [r["id"] for r in missing] == ["row-4"] and "not found" in missing[0]["error"]
    assert all(r["image"].startswith("s3://") for r in rows)  # URL columns pass through
    text = client.get_object(Bucket=bucket, Key="output/_summary.json")["Body"].read().decode()
    assert s3_server.secret_key not in text and s3_server.access_key not in text
