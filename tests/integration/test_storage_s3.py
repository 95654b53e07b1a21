"""Storage, image loading and the writer against a loopback S3 server (moto), plus the same calls locally.

End to end without Ray or a model: shards on S3 -> list -> read -> image stage (s3:// image URLs
included) -> output table -> Parquet + markers + summary + _SUCCESS back on S3.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipeline import storage, writer
from pipeline.images import ImageStageConfig, decode_batch
from schemas.job import JobSpec, StorageOptions
from schemas.rows import OUTPUT_SCHEMA, error_row, ok_row, settings_values


def png(width: int = 56, height: int = 56, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def shard(ids: list[str], images: list, extra: str = "x") -> pa.Table:
    return pa.table({
        "id": ids,
        "image": images,
        "question": [f"question {i}?" for i in ids],
        "answer": [f"truth {i}" for i in ids],
        "meta": [extra] * len(ids),
    })


def make_job(s3_server, bucket: str, **sections) -> JobSpec:
    store = s3_server.storage()
    values = {
        "input": {"uri": f"s3://{bucket}/in/", "storage": store},
        "output": {"uri": f"s3://{bucket}/out/", "storage": store, "rows_per_file": 2},
        "model": {"base": "models/tiny-qwen2_5_vl"},
    }
    values.update(sections)
    return JobSpec(**values)


@pytest.fixture()
def bucket_with_shards(s3_server):
    """A bucket with three shards (one nested), a marker file and a non-Parquet file under in/."""
    bucket = s3_server.create_bucket()
    store = s3_server.storage()
    shards = {
        "in/part-0.parquet": shard(["a", "b"], [png(seed=1), png(seed=2)]),
        "in/part-1.parquet": shard(["c"], [png(seed=3)]),
        "in/2024/part-2.parquet": shard(["d"], [b"corrupt"]),
    }
    for key, table in shards.items():
        storage.write_parquet(table, f"s3://{bucket}/{key}", store)
    storage.write_bytes(f"s3://{bucket}/in/_SUCCESS", b"", store)
    storage.write_text(f"s3://{bucket}/in/README.txt", "not a shard", store)
    return bucket, shards


def test_list_shards_by_prefix_glob_and_file(s3_server, bucket_with_shards):
    bucket, _ = bucket_with_shards
    store = s3_server.storage()
    expected = [f"s3://{bucket}/in/2024/part-2.parquet", f"s3://{bucket}/in/part-0.parquet", f"s3://{bucket}/in/part-1.parquet"]
    assert storage.list_shards(f"s3://{bucket}/in/", store) == expected
    assert storage.list_shards(f"s3://{bucket}/in", store) == expected
    assert storage.list_shards(f"s3://{bucket}/in/part-*.parquet", store) == expected[1:]
    assert storage.list_shards(f"s3://{bucket}/in/part-1.parquet", store) == expected[2:]
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.list_shards(f"s3://{bucket}/nothing/", store)
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files"):
        storage.list_shards(f"s3://{bucket}/nothing/*.parquet", store)


def test_read_back_through_the_one_fsspec_filesystem(s3_server, bucket_with_shards):
    """pyarrow always gets the fsspec filesystem wrapped (never its native S3FileSystem, whose options
    could diverge from the listing's), with or without `extra`, named or default-chain credentials."""
    bucket, shards = bucket_with_shards
    url = f"s3://{bucket}/in/part-0.parquet"
    plain = s3_server.storage()
    with_extra = s3_server.storage(extra={"default_block_size": 1048576})
    for options in (plain, with_extra, s3_server.storage(key_env=None, secret_env=None)):  # default chain too
        fs, path = storage.pyarrow_filesystem(url, options)
        assert isinstance(fs, pafs.PyFileSystem) and path == f"{bucket}/in/part-0.parquet"
        assert fs.handler.fs is storage.fsspec_filesystem(url, options)[0]  # the same client
        assert storage.read_parquet(url, options).equals(shards["in/part-0.parquet"])
        assert storage.read_parquet(url.replace("s3://", "s3a://"), options).equals(shards["in/part-0.parquet"])


def test_missing_credential_variable_is_a_clear_error(s3_server):
    options = StorageOptions(endpoint_url=s3_server.endpoint_url, key_env="GB_UNSET_KEY", secret_env="GB_UNSET_SECRET")
    with pytest.raises(storage.StorageError, match=r"environment variable GB_UNSET_KEY \(storage.key_env\) is not set"):
        storage.fsspec_filesystem("s3://bucket/x", options)


def test_images_referenced_by_s3_url(s3_server):
    bucket = s3_server.create_bucket()
    store = s3_server.storage()
    storage.write_bytes(f"s3://{bucket}/img/a.png", png(112, 56), store)
    storage.write_bytes(f"s3://{bucket}/img/big.png", png(200, 200), store)
    urls = [[f"s3://{bucket}/img/a.png", f"s3://{bucket}/img/a.png"], [f"s3://{bucket}/img/missing.png"],
            [f"s3://{bucket}/img/big.png"]]
    job = make_job(s3_server, bucket, image={"max_image_bytes": 60_000})
    out = decode_batch({"id": [1, 2, 3], "image": urls, "question": ["q", "q", "q"]}, ImageStageConfig.from_job(job))
    assert out.column("status").to_pylist() == ["ok", "error", "error"]
    assert out.column("visual_tokens").to_pylist()[0] == 16
    errors = out.column("error").to_pylist()
    assert errors[1] == f"image 0: s3://{bucket}/img/missing.png not found"
    assert errors[2].startswith(f"image 0: s3://{bucket}/img/big.png: ") and "exceeds image.max_image_bytes 60000" in errors[2]
    assert out.column("image").to_pylist() == urls  # URL columns pass through


def fake_model_stage(processed: pa.Table) -> pa.Table:
    """Stands in for the model UDF: ok rows get an answer and token counts, error rows stay errors."""
    rows = []
    for row in processed.to_pylist():
        if row["status"] != "ok":
            rows.append(error_row(row, row["error"]))
            continue
        kept = [max(1, t // 2) for t in row["_image_tokens"]]
        rows.append(ok_row(row, f"answer to {row['_prompt']}", kept_tokens=sum(kept), kept_per_image=kept,
                           keep_ratio=sum(kept) / row["visual_tokens"], prompt_tokens=10 + sum(kept),
                           output_tokens=3, finish_reason="stop"))
    return pa.Table.from_pylist(rows)


def run_shards(job: JobSpec, shard_urls: list[str]) -> writer.RunStats:
    keys = writer.shard_keys(shard_urls, job.input.uri)
    settings = settings_values(job)
    stats = writer.RunStats()
    for url in shard_urls:
        processed = decode_batch(storage.read_parquet(url, job.input.storage), ImageStageConfig.from_job(job))
        table = writer.output_table(fake_model_stage(processed), settings)
        stats = stats + writer.write_shard(table, job.output, keys[url], source=url)
    return stats


def test_end_to_end_write_to_s3_with_markers_summary_and_success(s3_server, bucket_with_shards):
    bucket, shards = bucket_with_shards
    job = make_job(s3_server, bucket)
    shard_urls = storage.list_shards(job.input.uri, job.input.storage)
    assert writer.prepare_output(job.output) == set()
    stats = run_shards(job, shard_urls)
    summary = writer.build_summary(stats, wall_s=2.0, job=job, shards_total=3)
    writer.write_summary(job.output, summary)
    writer.write_success(job.output)

    out = f"s3://{bucket}/out"
    store = job.output.storage
    assert storage.exists(f"{out}/_SUCCESS", store)
    files = storage.glob(f"{out}/*.parquet", store)
    assert [f.rsplit("/", 1)[1] for f in files] == [
        "2024__part-2-00000.parquet", "part-0-00000.parquet", "part-1-00000.parquet"]
    result = pa.concat_tables([storage.read_parquet(f, store) for f in files])
    assert sorted(result.column("id").to_pylist()) == ["a", "b", "c", "d"]  # one row per input row
    assert result.column_names == ["id", "question", "input_answer", "meta"] + OUTPUT_SCHEMA.names
    by_id = {row["id"]: row for row in result.to_pylist()}
    assert by_id["d"]["status"] == "error" and by_id["d"]["error"].startswith("image 0: cannot identify image file")
    assert by_id["a"]["status"] == "ok" and by_id["a"]["answer"] == "answer to question a?"
    assert by_id["a"]["input_answer"] == "truth a" and by_id["a"]["kept_per_image"] == [2]
    assert json.loads(by_id["a"]["pruning"]) == {"mode": "glimpse", "threshold": 0.5, "max_remain_ratio": None, "min_remain_num": 1}

    saved = json.loads(storage.read_text(f"{out}/_summary.json", store))
    assert (saved["rows_total"], saved["rows_ok"], saved["rows_error"]) == (4, 3, 1)
    assert saved["mean_keep_ratio"] == pytest.approx(0.5) and saved["rows_per_s"] == pytest.approx(2.0)
    assert saved["tokens_per_s"] == pytest.approx(4.5) and saved["job"]["input"]["storage"]["key_env"] == s3_server.key_env
    assert writer.completed_shards(job.output) == {"2024__part-2", "part-0", "part-1"}
    assert writer.collect_stats(job.output) == stats

    # No secret anywhere in what was written.
    written = [storage.read_bytes(u, store) for u in storage.glob(f"{out}/**", store)]
    secrets = (s3_server.secret_key.encode(), s3_server.access_key.encode())
    assert len(written) == 8 and not any(secret in blob for blob in written for secret in secrets)


def test_skip_existing_processes_only_new_shards_and_overwrite_clears(s3_server, bucket_with_shards):
    bucket, _ = bucket_with_shards
    job = make_job(s3_server, bucket)
    shard_urls = storage.list_shards(job.input.uri, job.input.storage)
    writer.prepare_output(job.output)
    run_shards(job, shard_urls[:2])
    writer.write_success(job.output)

    skip = make_job(s3_server, bucket, output={**job.output.model_dump(), "mode": "skip_existing"})
    done = writer.prepare_output(skip.output)
    assert done == {"2024__part-2", "part-0"}
    assert not storage.exists(f"s3://{bucket}/out/_SUCCESS", job.output.storage)  # a run in progress
    keys = writer.shard_keys(shard_urls, job.input.uri)
    todo = [u for u in shard_urls if keys[u] not in done]
    assert todo == [f"s3://{bucket}/in/part-1.parquet"]

    assert writer.prepare_output(job.output) == set()  # overwrite
    assert storage.glob(f"s3://{bucket}/out/**", job.output.storage) == []


def test_rows_per_file_splits_and_stale_chunks_are_removed(s3_server):
    bucket = s3_server.create_bucket()
    job = make_job(s3_server, bucket)  # rows_per_file = 2
    table = writer.output_table(
        fake_model_stage(decode_batch(shard(list("abcde"), [png()] * 5), ImageStageConfig.from_job(job))),
        settings_values(job),
    )
    writer.write_shard(table, job.output, "s")
    names = [u.rsplit("/", 1)[1] for u in storage.glob(f"s3://{bucket}/out/*.parquet", job.output.storage)]
    assert names == ["s-00000.parquet", "s-00001.parquet", "s-00002.parquet"]
    writer.write_shard(table.slice(0, 1), job.output, "s")
    names = [u.rsplit("/", 1)[1] for u in storage.glob(f"s3://{bucket}/out/*.parquet", job.output.storage)]
    assert names == ["s-00000.parquet"]


def test_same_calls_on_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("in/b.parquet", "in/sub/a.parquet"):
        storage.write_parquet(shard(["x"], [png()]), name)
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / ".hidden.parquet").write_text("")
    expected = [str(tmp_path / "in" / "b.parquet"), str(tmp_path / "in" / "sub" / "a.parquet")]
    assert storage.list_shards("in") == expected
    assert storage.list_shards(f"file://{tmp_path}/in/") == expected
    assert storage.list_shards("in/*.parquet") == expected[:1]
    assert writer.shard_keys(expected, "in") == {expected[0]: "b", expected[1]: "sub__a"}
    assert writer.shard_keys(expected[:1], "in/b.parquet") == {expected[0]: "b"}
    storage.write_text("out/deep/x.json", "{}")
    assert storage.exists("out/deep/x.json") and storage.read_text(str(tmp_path / "out/deep/x.json")) == "{}"


def test_output_table_fills_defaults_and_enforces_status():
    processed = pa.table({
        "id": [1, 2, 3], "meta": ["m"] * 3, "path": ["p"] * 3, "_prompt": ["q"] * 3,
        "status": ["ok", "error", "weird"], "error": ["stale", None, None], "answer": ["x", "y", "z"],
    })
    out = writer.output_table(processed, {"model": "m", "glimpse_modules": None, "pruning": "{}"}, drop=["path"])
    assert out.schema.names == ["id", "meta"] + OUTPUT_SCHEMA.names
    first, second, third = out.to_pylist()
    assert (first["status"], first["error"], first["answer"]) == ("ok", None, "x")
    assert (second["status"], second["error"], second["answer"]) == ("error", "unknown error", None)
    assert (third["status"], third["error"]) == ("error", "invalid status 'weird'")
    assert first["kept_per_image"] == [] and first["keep_ratio"] is None and first["model"] == "m"
    assert out.schema.field("kept_per_image").type == pa.list_(pa.int32())
