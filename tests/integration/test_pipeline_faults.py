"""The whole pipeline through a fault proxy in front of the S3 server: shards, image URLs and the output
all on S3, ~15% of requests failing (503, 500, resets, lost responses, delays). Counted: rows in = rows
out, no duplicate, no transient error left. A persistent fault on one image leaves its row an error row
and its shard incomplete (exit code 1 territory); a re-run after the fault is gone fixes just that row.
Also: AWS_ENDPOINT_URL alone (no endpoint in the job) for listing, reading and writing.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from faultproxy import Fault
from pipeline import storage
from pipeline.run import run_job
from pipeline_helpers import job_for, png

pytestmark = pytest.mark.integration


def _put_dataset(s3_server, bucket: str, shards: int = 3, rows: int = 4) -> list[str]:
    client = s3_server.client()
    ids = []
    for s in range(shards):
        table_rows = []
        for r in range(rows):
            key = f"img/{s}-{r}.png"
            client.put_object(Bucket=bucket, Key=key, Body=png(Image.new("RGB", (56 + 28 * (r % 2), 56), (60 * r, 90, 30 * s))))
            table_rows.append({"id": f"s{s}-r{r}", "image": f"s3://{bucket}/{key}", "question": "What color is it?"})
            ids.append(f"s{s}-r{r}")
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(table_rows), buf)
        client.put_object(Bucket=bucket, Key=f"in/shard-{s}.parquet", Body=buf.getvalue())
    return ids


def _storage_args(endpoint, s3_server, deadline_s=30):
    items = []
    for side in ("input", "output"):
        items += [f"{side}.storage.region=us-east-1", f"{side}.storage.key_env={s3_server.key_env}",
                  f"{side}.storage.secret_env={s3_server.secret_env}", f"{side}.storage.retry_deadline_s={deadline_s}"]
        if endpoint:
            items.append(f"{side}.storage.endpoint_url={endpoint}")
    return items


def _output_rows(s3_server, bucket: str) -> list[dict]:
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    rows = []
    for key in keys:
        if key.endswith(".parquet") and "/_" not in key:
            rows += pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
    return rows


def test_fifteen_percent_faults_lose_nothing_and_a_persistent_fault_is_retried_by_the_rerun(
        ray_runtime, model_dirs, s3_server, fault_proxy):
    bucket = s3_server.create_bucket()
    ids = _put_dataset(s3_server, bucket)
    fault_proxy.set_rules([
        Fault("500", path=r"/img/1-2\.png"),  # persistent on one image: outlasts the deadline
        Fault("503", share=0.06), Fault("500", share=0.03), Fault("reset", share=0.03),
        Fault("reset_after", share=0.02), Fault("delay", share=0.02, delay_s=0.3),
    ])
    job = job_for(f"s3://{bucket}/in/", f"s3://{bucket}/out/", model_dirs,
                  *_storage_args(fault_proxy.url, s3_server, deadline_s=6))
    summary = run_job(job)
    injected = dict(fault_proxy.injected)
    assert sum(injected.values()) >= 10, injected
    rows = _output_rows(s3_server, bucket)
    assert sorted(r["id"] for r in rows) == sorted(ids)  # rows in = rows out, exactly once
    errors = {r["id"]: r["error"] for r in rows if r["status"] == "error"}
    assert list(errors) == ["s1-r2"] and "transient" in errors["s1-r2"], errors
    assert [s["shard"] for s in summary["shards_incomplete"]] == ["shard-1"]
    assert "success_url" not in summary

    # The fault goes away; the same job again retries only the row that failed transiently.
    fault_proxy.clear()
    again = run_job(job_for(f"s3://{bucket}/in/", f"s3://{bucket}/out/", model_dirs,
                            *_storage_args(fault_proxy.url, s3_server), "output.mode=skip_existing"))
    assert again["this_run"]["rows_computed"] == 1 and again["shards_skipped"] == 2
    assert again["this_run"]["rows_resumed"] == 3
    rows = _output_rows(s3_server, bucket)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    assert "success_url" in again


def test_aws_endpoint_url_alone_reaches_the_server(ray_runtime, model_dirs, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    bucket = s3_server.create_bucket()
    ids = _put_dataset(s3_server, bucket, shards=2, rows=2)
    summary = run_job(job_for(f"s3://{bucket}/in/", f"s3://{bucket}/out/", model_dirs, *_storage_args(None, s3_server)))
    assert summary["rows_total"] == 4 and summary["rows_ok"] == 4 and "success_url" in summary
    assert sorted(r["id"] for r in _output_rows(s3_server, bucket)) == sorted(ids)
    assert storage.exists(f"s3://{bucket}/out/_SUCCESS")
