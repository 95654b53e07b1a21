"""Storage, image loading and the writer against a loopback S3 server (moto), plus the same calls locally.

End to end without Ray or a model: shards on S3 -> list -> read -> image stage (s3:// image URLs
included) -> output table -> Parquet + markers + summary + _SUCCESS back on S3.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from faultproxy import Fault

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


def stage_and_commit(job: JobSpec, shard_urls: list[str], run_id: str) -> dict:
    """The pipeline's data path without Ray: read (shard's own schema) -> image stage -> fake model
    -> staged parts -> per-shard commit, on the S3 server. Returns {key: CommitResult}."""
    from pipeline import shards, state
    from pipeline.stages import to_block

    keys = writer.shard_keys(shard_urls, job.input.uri)
    infos = {u: shards.inspect_shard(u, keys[u], job.input.columns, job.input.storage) for u in shard_urls}
    fps = {keys[u]: state.shard_fingerprint({}, state.input_fingerprint(i.size, i.version, i.num_rows)) for u, i in infos.items()}
    context = writer.PartContext(output=job.output, run_id=run_id, fingerprints=fps)
    config = ImageStageConfig.from_job(job)
    for url, info in infos.items():
        for block in shards.read_rows(url, info.key, range(len(info.row_groups)), 0, None, job.input.storage, 1):
            writer.write_parts(fake_model_stage(to_block(block, config)), context)
    return {keys[u]: writer.commit_shard(job.output, keys[u], fingerprint=fps[keys[u]], num_rows=i.num_rows,
                                         run_id=run_id, record={"fingerprint": fps[keys[u]]}, settings=settings_values(job))
            for u, i in infos.items()}


def test_staged_parts_and_commits_on_s3_with_lease_records_and_no_secrets(s3_server, bucket_with_shards):
    from pipeline import state

    bucket, _ = bucket_with_shards
    job = make_job(s3_server, bucket)  # rows_per_file = 2
    shard_urls = storage.list_shards(job.input.uri, job.input.storage)
    lease = state.Lease(job.output).acquire()  # conditional put on S3
    with pytest.raises(state.OutputBusy):
        state.Lease(job.output).acquire()
    commits = stage_and_commit(job, shard_urls, lease.run_id)
    assert all(c.complete and c.problem is None for c in commits.values())

    out = f"s3://{bucket}/out"
    store = job.output.storage
    files = [f.rsplit("/", 1)[1] for f in storage.glob(f"{out}/*.parquet", store)]
    assert files == [f"2024__part-2-{lease.run_id}-00000.parquet", f"part-0-{lease.run_id}-00000.parquet",
                     f"part-1-{lease.run_id}-00000.parquet"]
    assert storage.glob(f"{out}/_staging/**", store) == []  # staging removed after the commits
    result = pa.concat_tables([storage.read_parquet(f"{out}/{f}", store) for f in files])
    assert sorted(result.column("id").to_pylist()) == ["a", "b", "c", "d"]  # one row per input row
    assert result.column_names == ["id", "question", "input_answer", "meta"] + OUTPUT_SCHEMA.names
    by_id = {row["id"]: row for row in result.to_pylist()}
    assert by_id["d"]["status"] == "error" and by_id["d"]["error"].startswith("image 0: cannot identify image file")
    assert by_id["a"]["status"] == "ok" and by_id["a"]["answer"] == "answer to question a?"
    assert by_id["a"]["input_answer"] == "truth a" and by_id["a"]["kept_per_image"] == [2]
    record = state.read_record(job.output, "part-0")
    assert record["files"] == [f"part-0-{lease.run_id}-00000.parquet"] and record["stats"]["rows_total"] == 2

    # A writer of a run that no longer owns the output stops; the next owner's commit of the same
    # shard replaces its files, and no stale chunk stays.
    lease.release()
    with pytest.raises(state.OutputBusy, match="no longer owns"):
        stage_and_commit(job, shard_urls[1:2], lease.run_id)
    lease = state.Lease(job.output, run_id="run-two").acquire()
    again = stage_and_commit(job, shard_urls[1:2], "run-two")
    assert again["part-0"].files == ["part-0-run-two-00000.parquet"]
    assert sorted(f.rsplit("/", 1)[1] for f in storage.glob(f"{out}/part-0-*.parquet", store)) == ["part-0-run-two-00000.parquet"]
    lease.release()

    # No secret anywhere in what was written.
    written = [storage.read_bytes(u, store) for u in storage.glob(f"{out}/**", store)]
    secrets = (s3_server.secret_key.encode(), s3_server.access_key.encode())
    assert written and not any(secret in blob for blob in written for secret in secrets)


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


# ---------------------------------------------------------------------------------------------------
# One storage layer: SDK variables, metadata, create-only puts


def test_aws_endpoint_url_alone_reaches_every_client(s3_server, monkeypatch):
    """No endpoint in the job file: AWS_ENDPOINT_URL decides for listing, Parquet (pyarrow) and bytes."""
    bucket = s3_server.create_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    options = s3_server.storage(endpoint_url=None)
    assert options.endpoint_url is None
    table = shard(["a", "b"], [png(seed=1), png(seed=2)])
    storage.write_parquet(table, f"s3://{bucket}/in/p.parquet", options)
    storage.write_bytes(f"s3://{bucket}/in/img.png", png(seed=3), options)
    assert storage.list_shards(f"s3://{bucket}/in/", options) == [f"s3://{bucket}/in/p.parquet"]
    assert storage.read_parquet(f"s3://{bucket}/in/p.parquet", options).equals(table)
    assert storage.read_bytes(f"s3://{bucket}/in/img.png", options) == png(seed=3)
    # It really is the variable: the same calls with it pointing at a closed port fail (transiently).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    dead = s3_server.storage(endpoint_url=None, retry_deadline_s=0)
    with pytest.raises(storage.TransientStorageError):
        storage.read_parquet(f"s3://{bucket}/in/p.parquet", dead)
    with pytest.raises(storage.TransientStorageError):
        storage.list_shards(f"s3://{bucket}/in/", dead)


def test_info_gives_size_and_a_change_token(s3_server):
    bucket = s3_server.create_bucket()
    store = s3_server.storage()
    url = f"s3://{bucket}/x.bin"
    storage.write_bytes(url, b"first", store)
    first = storage.info(url, store)
    assert first["size"] == 5 and first["type"] == "file" and first["etag"] and first["version"] == first["etag"]
    storage.write_bytes(url, b"other", store)
    assert storage.info(url, store)["version"] != first["version"]
    with pytest.raises(FileNotFoundError):
        storage.info(f"s3://{bucket}/missing.bin", store)


def test_put_if_absent_on_s3_is_a_conditional_put(s3_server):
    import threading

    bucket = s3_server.create_bucket()
    store = s3_server.storage()
    url = f"s3://{bucket}/out/_lease.json"
    assert storage.put_if_absent(url, b"run 1", store)
    assert not storage.put_if_absent(url, b"run 2", store)
    assert storage.read_bytes(url, store) == b"run 1"

    race = f"s3://{bucket}/out/_race.json"
    results, barrier = [], threading.Barrier(6)

    def contend(i: int) -> None:
        barrier.wait()
        results.append((storage.put_if_absent(race, f"run {i}".encode(), store), i))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for won, i in results if won]
    assert len(winners) == 1 and storage.read_text(race, store) == f"run {winners[0]}"


# ---------------------------------------------------------------------------------------------------
# Faults through the proxy

FIFTEEN_PERCENT = [
    Fault("503", share=0.05), Fault("500", share=0.03), Fault("reset", share=0.03),
    Fault("reset_after", share=0.02), Fault("truncate", share=0.01, methods={"GET"}),
    Fault("delay", share=0.01, delay_s=0.2),
]


def test_fifteen_percent_faults_lose_nothing(s3_server, fault_proxy):
    """Writes, listing, Parquet and byte reads through ~15% injected faults return exactly the data."""
    bucket = s3_server.create_bucket()
    via_proxy = s3_server.storage(endpoint_url=fault_proxy.url, retry_deadline_s=30)
    direct = s3_server.storage()
    tables = {f"in/part-{i}.parquet": shard([f"{i}-{j}" for j in range(3)], [png(seed=10 * i + j) for j in range(3)])
              for i in range(12)}
    images = {f"img/{i}.png": png(seed=100 + i) for i in range(12)}
    fault_proxy.set_rules(FIFTEEN_PERCENT)
    start = time.monotonic()
    for key, table in tables.items():
        storage.write_parquet(table, f"s3://{bucket}/{key}", via_proxy)
    for key, data in images.items():
        storage.write_bytes(f"s3://{bucket}/{key}", data, via_proxy)
    listed = [storage.list_shards(f"s3://{bucket}/in/", via_proxy) for _ in range(5)]
    read = {key: storage.read_parquet(f"s3://{bucket}/{key}", via_proxy) for key in tables}
    fetched = {key: storage.read_bytes(f"s3://{bucket}/{key}", via_proxy) for key in images}
    elapsed = time.monotonic() - start
    fault_proxy.clear()

    expected = sorted(f"s3://{bucket}/{key}" for key in tables)
    assert all(found == expected for found in listed)
    assert all(read[key].equals(table) for key, table in tables.items())
    assert fetched == images
    for key, table in tables.items():  # what landed in the store is exactly what was written
        assert storage.read_parquet(f"s3://{bucket}/{key}", direct).equals(table)
    seen = sum(fault_proxy.requests.values())
    injected = fault_proxy.total_injected()
    print(f"\n15% faults: {injected} injected of {seen} requests ({dict(fault_proxy.injected)}) in {elapsed:.1f} s")
    assert seen >= 100 and 0.08 * seen <= injected <= 0.25 * seen


def test_faults_on_parquet_reads_only(s3_server, fault_proxy):
    """Half of all GETs fail (503/reset/truncated): the pyarrow-wrapped reader still returns the table."""
    bucket = s3_server.create_bucket()
    table = shard(list("abcdef"), [png(seed=i) for i in range(6)])
    url = f"s3://{bucket}/in/p.parquet"
    storage.write_parquet(table, url, s3_server.storage())
    fault_proxy.set_rules([Fault("503", 0.2, methods={"GET"}, path=r"p\.parquet"),
                           Fault("reset", 0.15, methods={"GET"}, path=r"p\.parquet"),
                           Fault("truncate", 0.15, methods={"GET"}, path=r"p\.parquet")])
    via_proxy = s3_server.storage(endpoint_url=fault_proxy.url, retry_deadline_s=30)
    for _ in range(20):
        assert storage.read_parquet(url, via_proxy).equals(table)
    gets = sum(1 for method, target, _ in fault_proxy.log if method == "GET" and "p.parquet" in target)
    print(f"\nParquet GETs: {fault_proxy.total_injected()} of {gets} failed ({dict(fault_proxy.injected)})")
    assert fault_proxy.total_injected() >= 8, fault_proxy.injected


def test_permanent_fault_on_one_key_is_not_transient(s3_server, fault_proxy):
    bucket = s3_server.create_bucket()
    store = s3_server.storage()
    storage.write_bytes(f"s3://{bucket}/img/good.png", png(seed=1), store)
    storage.write_bytes(f"s3://{bucket}/img/bad.png", png(seed=2), store)
    fault_proxy.set_rules([Fault("404", path=r"/img/bad\.png")])
    via_proxy = s3_server.storage(endpoint_url=fault_proxy.url, retry_deadline_s=30)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(f"s3://{bucket}/img/bad.png", via_proxy)
    assert not storage.is_transient(info.value) and time.monotonic() - start < 3  # no retry loop
    assert fault_proxy.injected["404"] == 1
    assert storage.read_bytes(f"s3://{bucket}/img/good.png", via_proxy) == png(seed=1)


def test_transient_fault_past_the_deadline_fails_transient_in_bounded_time(s3_server, fault_proxy):
    bucket = s3_server.create_bucket()
    storage.write_bytes(f"s3://{bucket}/img/a.png", png(seed=1), s3_server.storage())
    fault_proxy.set_rules([Fault("503", path=r"/img/a\.png")])
    deadline = 2.0
    via_proxy = s3_server.storage(endpoint_url=fault_proxy.url, retry_deadline_s=deadline)
    start = time.monotonic()
    with pytest.raises(storage.TransientStorageError, match=r"read s3://.*/img/a\.png: transient") as info:
        storage.read_bytes(f"s3://{bucket}/img/a.png", via_proxy)
    elapsed = time.monotonic() - start
    print(f"\npersistent 503: gave up after {elapsed:.1f} s, {info.value.attempts} attempts, "
          f"{fault_proxy.injected['503']} requests refused")
    # + one attempt: HEAD (and s3fs's listing fallback), each botocore's 3 tries with <= 3 s of backoff
    assert deadline <= elapsed < deadline + 10
    assert fault_proxy.injected["503"] >= 3  # retried (botocore inside each attempt, then our loop)
    fault_proxy.clear()  # the outage passes: the same call succeeds
    assert storage.read_bytes(f"s3://{bucket}/img/a.png", via_proxy) == png(seed=1)


def test_put_if_absent_survives_a_lost_response(s3_server, fault_proxy):
    """The create lands but its response is lost: the retry finds our own bytes and still says True."""
    bucket = s3_server.create_bucket()
    fault_proxy.set_rules([Fault("reset_after", methods={"PUT"}, path=r"_lease", limit=1)])
    via_proxy = s3_server.storage(endpoint_url=fault_proxy.url, retry_deadline_s=10)
    url = f"s3://{bucket}/out/_lease.json"
    assert storage.put_if_absent(url, b"me", via_proxy)
    assert fault_proxy.injected["reset_after"] == 1
    assert storage.read_bytes(url, s3_server.storage()) == b"me"
    assert not storage.put_if_absent(url, b"someone else", via_proxy)


# ---------------------------------------------------------------------------------------------------
# Images over http(s):// and through faults


def test_http_image_urls_are_read(http_files, s3_server):
    good = http_files.add("img/a.png", png(112, 56))
    assert storage.read_bytes(good) == png(112, 56)
    assert storage.info(good)["size"] == len(png(112, 56))
    bucket = s3_server.create_bucket()
    job = make_job(s3_server, bucket)
    urls = [good, http_files.url("img/missing.png")]
    out = decode_batch({"id": [1, 2], "image": urls, "question": ["q", "q"]}, ImageStageConfig.from_job(job))
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert out.column("visual_tokens").to_pylist()[0] == 8
    assert out.column("error").to_pylist()[1] == f"image 0: {urls[1]} not found"
    assert out.column("_transient").to_pylist() == [False, False]


def test_transient_image_failures_are_marked(http_files, http_fault_proxy, s3_server):
    """A 503-ing image host: the rows are error rows flagged `_transient`; after the first row has used
    up the deadline, the rest of the batch gets one attempt each (bounded time)."""
    http_files.add("img/a.png", png(56, 56))
    http_files.add("img/b.png", png(56, 56, seed=1))
    proxy = http_fault_proxy
    proxy.set_rules([Fault("503", path=r"/img/a\.png"), Fault("reset", path=r"/img/c\.png")])
    bucket = s3_server.create_bucket()
    job = make_job(s3_server, bucket, input={"uri": f"s3://{bucket}/in/",
                                             "storage": s3_server.storage(retry_deadline_s=1.5)})
    urls = [f"{proxy.url}/img/a.png", f"{proxy.url}/img/b.png", f"{proxy.url}/img/c.png",
            f"{proxy.url}/img/a.png", f"{proxy.url}/img/none.png"]
    start = time.monotonic()
    out = decode_batch({"id": list(range(5)), "image": urls, "question": ["q"] * 5}, ImageStageConfig.from_job(job))
    elapsed = time.monotonic() - start
    print(f"\nimage faults: {dict(proxy.injected)} in {elapsed:.1f} s")
    assert out.column("status").to_pylist() == ["error", "ok", "error", "error", "error"]
    assert out.column("_transient").to_pylist() == [True, False, True, True, False]
    first = out.column("error").to_pylist()[0]
    assert first.startswith(f"image 0: read {urls[0]}: transient storage error persisted for ") and "503" in first, first
    assert out.column("error").to_pylist()[4].endswith("not found")
    assert proxy.injected["503"] >= 3 and elapsed < 1.5 + 4, elapsed


def test_put_tree_and_env_helpers(s3_server, tmp_path):
    """Fixture helpers for end-to-end tests: upload a local tree; a subprocess reaches the server through
    the variables of `env()` alone (AWS_ENDPOINT_URL, no endpoint in the options)."""
    import subprocess
    import sys

    (tmp_path / "in" / "sub").mkdir(parents=True)
    storage.write_parquet(shard(["a"], [png()]), str(tmp_path / "in" / "sub" / "p.parquet"))
    (tmp_path / "in" / "x.png").write_bytes(png(seed=5))
    bucket = s3_server.create_bucket()
    urls = s3_server.put_tree(tmp_path / "in", bucket, "data")
    assert urls == [f"s3://{bucket}/data/sub/p.parquet", f"s3://{bucket}/data/x.png"]
    code = (f"from pipeline import storage; from schemas.job import StorageOptions; "
            f"print(storage.list_shards('s3://{bucket}/data/', StorageOptions(key_env={s3_server.key_env!r}, "
            f"secret_env={s3_server.secret_env!r})))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **s3_server.env(endpoint_url=s3_server.endpoint_url)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(Path(storage.__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"s3://{bucket}/data/sub/p.parquet" in done.stdout
