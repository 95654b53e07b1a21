"""The storage layer without a server: URL handling, location overlap, atomic local writes, the
create-only put, metadata, fault classification and the retry loop."""
from __future__ import annotations

import errno
import os
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline import storage
from schemas.job import StorageOptions


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


# ---------------------------------------------------------------------------------------------------
# URLs and locations


@pytest.mark.parametrize("url, expected", [
    ("s3://b/k/", ("s3", "b/k")),
    ("s3a://b/k", ("s3", "b/k")),
    ("S3N://b/k", ("s3", "b/k")),
    ("gcs://b/k", ("gs", "b/k")),
    ("https://host:8080/a/b.png?x=1", ("https", "host:8080/a/b.png?x=1")),
    ("file:///tmp/x/", ("file", "/tmp/x")),
])
def test_split_url(url, expected):
    assert storage.split_url(url) == expected
    assert storage.normalize_url(url) == storage.to_url(*expected)


def test_relative_and_home_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.split_url("in/x.parquet") == ("file", str(tmp_path / "in" / "x.parquet"))
    assert storage.split_url("~/x") == ("file", str(tmp_path / "home" / "x"))
    fs, path = storage.fsspec_filesystem("in/x.parquet")
    assert path == str(tmp_path / "in" / "x.parquet")


def test_http_urls_keep_their_full_url_and_query():
    fs, path = storage.fsspec_filesystem("https://example.test/img/a.png?sig=abc")
    assert path == "https://example.test/img/a.png?sig=abc"
    assert type(fs).__name__ == "HTTPFileSystem"
    assert not storage.has_glob("https://example.test/a.png?x=1")  # '?' starts the query


def test_glob_root_and_has_glob():
    assert storage.has_glob("s3://b/in/*/x.parquet") and not storage.has_glob("s3://b/in/x.parquet")
    assert storage.glob_root("s3://b/in/*/x.parquet") == "s3://b/in"
    assert storage.glob_root("s3a://b/in/") == "s3://b/in"


def test_unknown_protocol_is_a_storage_error():
    with pytest.raises(storage.StorageError, match="not a known storage protocol"):
        storage.fsspec_filesystem("nosuchproto://x/y")


def test_overlap_in_many_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "in").mkdir(parents=True)
    os.symlink(tmp_path / "data", tmp_path / "link")
    inside = [
        "data/in", "./data/in/", f"file://{tmp_path}/data/in", f"{tmp_path}/data/x/../in",
        str(tmp_path / "link" / "in"), "data/in/out", "link/in/not/yet/made", "data/in/*.parquet",
    ]
    for spelling in inside:
        assert storage.overlaps("data/in", spelling), spelling
        assert storage.overlaps(spelling, f"file://{tmp_path}/data/in/"), spelling
    assert storage.overlaps("data", "data/in")  # output containing the input
    for apart in ("data/input", "data/i", "other/in", "s3://b/data/in"):
        assert not storage.overlaps("data/in", apart), apart
    assert storage.canonical_location("link/in/") == str(tmp_path / "data" / "in")


def test_object_store_overlap():
    assert storage.overlaps("s3://b/in/", "s3a://b/in")
    assert storage.overlaps("s3://b/in", "s3://b/in/out/")
    assert storage.overlaps("s3://b/./in/x/..", "s3n://b//in/")
    assert storage.overlaps("s3://b/", "s3://b/in")
    assert not storage.overlaps("s3://b/in", "s3://b/input")
    assert not storage.overlaps("s3://b/in", "s3://c/in")
    assert not storage.overlaps("s3://b/in", "gs://b/in")
    assert storage.canonical_location("s3a://b/./x//y/") == "s3://b/x/y"


# ---------------------------------------------------------------------------------------------------
# Local writes, put_if_absent, info


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "out" / "x.json"
    storage.write_text(str(target), "old")
    real_replace = os.replace

    def crash(*args):
        raise OSError(errno.ENOSPC, "disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(str(target), "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_text() == "old"  # the old file untouched
    assert os.listdir(target.parent) == ["x.json"]  # the temp file removed

    table = pa.table({"a": [1, 2]})
    storage.write_parquet(table, str(tmp_path / "out" / "t.parquet"))
    assert storage.read_parquet(str(tmp_path / "out" / "t.parquet")).equals(table)
    assert sorted(os.listdir(target.parent)) == ["t.parquet", "x.json"]


def test_local_parquet_write_failure_keeps_the_previous_file(tmp_path):
    url = str(tmp_path / "t.parquet")
    storage.write_parquet(pa.table({"a": [1]}), url)
    with pytest.raises(Exception):
        storage.write_parquet(pa.table({"a": [1]}), url, compression="no-such-codec")
    assert storage.read_parquet(url).column("a").to_pylist() == [1]
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_put_if_absent_local_is_create_only(tmp_path):
    url = str(tmp_path / "o" / "_lease.json")
    assert storage.put_if_absent(url, b"first")
    assert not storage.put_if_absent(url, b"second")
    assert storage.read_bytes(url) == b"first" and os.listdir(tmp_path / "o") == ["_lease.json"]


def test_put_if_absent_local_race_has_one_winner(tmp_path):
    url = str(tmp_path / "_lease.json")
    results, barrier = [], threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        results.append((storage.put_if_absent(url, f"run {i}".encode()), i))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for won, i in results if won]
    assert len(winners) == 1 and storage.read_text(url) == f"run {winners[0]}"


def test_info_local_size_and_change_token(tmp_path):
    url = str(tmp_path / "a.bin")
    storage.write_bytes(url, b"12345")
    first = storage.info(url)
    assert first["size"] == 5 and first["type"] == "file" and first["etag"] is None
    assert first["version"] == str(os.stat(url).st_mtime_ns) and isinstance(first["mtime"], float)
    os.utime(url, ns=(1, os.stat(url).st_mtime_ns + 1000))
    assert storage.info(url)["version"] != first["version"]
    with pytest.raises(FileNotFoundError):
        storage.info(str(tmp_path / "missing"))


def test_local_pyarrow_filesystem_is_native(tmp_path):
    fs, path = storage.pyarrow_filesystem(f"file://{tmp_path}/x.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x.parquet"


# ---------------------------------------------------------------------------------------------------
# Classification


def _wrapped(cause: BaseException, outer: type = OSError) -> BaseException:
    """What s3fs raises: its own exception with the botocore error as __cause__."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise outer(errno.EIO, str(exc)) from exc
    except BaseException as final:
        return final


@pytest.mark.parametrize("exc", [
    client_error("SlowDown", 503), client_error("ServiceUnavailable", 503), client_error("InternalError", 500),
    client_error("Whatever", 502), client_error("TooManyRequests", 429), client_error("RequestTimeout", 400),
    _wrapped(client_error("ServiceUnavailable", 503)), ConnectionResetError(104, "reset"),
    ConnectionAbortedError("aborted"), TimeoutError("timed out"), BrokenPipeError(),
    OSError(errno.ETIMEDOUT, "x"), storage.TransientStorageError("x"),
    pa.ArrowIOError("When reading: AWS Error SLOW_DOWN during GetObject: Please reduce your request rate."),
    OSError("HTTP 503 Service Unavailable"),
])
def test_transient_errors(exc):
    assert storage.is_transient(exc)


@pytest.mark.parametrize("exc", [
    client_error("NoSuchKey", 404), client_error("AccessDenied", 403), client_error("InvalidArgument", 400),
    _wrapped(client_error("NoSuchKey", 404), FileNotFoundError), FileNotFoundError("x"), PermissionError("x"),
    storage.TooLargeError("x"), storage.StorageError("x"), ValueError("corrupt"),
    pa.ArrowInvalid("Parquet magic bytes not found in footer"), OSError("file of 5000 bytes is corrupt"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
])
def test_permanent_errors(exc):
    assert not storage.is_transient(exc)


def test_http_errors_are_classified_by_status():
    import aiohttp

    def response_error(status: int) -> BaseException:
        return aiohttp.ClientResponseError(None, (), status=status, message="x")

    assert storage.is_transient(response_error(503)) and storage.is_transient(response_error(429))
    assert not storage.is_transient(response_error(404)) and not storage.is_transient(response_error(403))
    assert storage.is_transient(aiohttp.ServerDisconnectedError())
    assert storage.is_transient(aiohttp.ClientConnectionError("reset"))
    # fsspec's HTTP `info` turns any failure into FileNotFoundError: its cause decides.
    assert storage.is_transient(_wrapped(response_error(503), FileNotFoundError))
    assert not storage.is_transient(_wrapped(response_error(404), FileNotFoundError))


# ---------------------------------------------------------------------------------------------------
# The retry loop


def test_with_retries_recovers_from_transient_errors():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise client_error("SlowDown", 503)
        return "ok"

    assert storage.with_retries(flaky, 10, "read x") == "ok" and len(calls) == 4


def test_with_retries_raises_permanent_errors_at_once():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError, match="gone"):
        storage.with_retries(missing, 10, "read x")
    assert calls == [1]


def test_with_retries_gives_up_transient_at_the_deadline():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    start = time.monotonic()
    with pytest.raises(storage.TransientStorageError, match=r"read s3://b/k: transient .* over \d+ attempt") as info:
        storage.with_retries(down, 1.5, "read s3://b/k")
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 2.5 and len(calls) >= 4
    assert isinstance(info.value.__cause__, ConnectionResetError) and info.value.attempts == len(calls)
    assert storage.is_transient(info.value) and isinstance(info.value, OSError)


def test_zero_deadline_is_one_attempt_still_marked_transient():
    calls = []

    def down():
        calls.append(1)
        raise client_error("ServiceUnavailable", 503)

    with pytest.raises(storage.TransientStorageError):
        storage.with_retries(down, 0, "x")
    assert calls == [1]


def test_retry_deadline_option_bounds():
    assert StorageOptions().retry_deadline_s == 60
    assert StorageOptions(retry_deadline_s=0).retry_deadline_s == 0
    for bad in (-1, 3601):
        with pytest.raises(ValueError):
            StorageOptions(retry_deadline_s=bad)


def test_local_reads_retry_transient_errors(tmp_path, monkeypatch):
    """read_bytes goes through the retry loop: two injected resets, then the data."""
    url = str(tmp_path / "a.bin")
    storage.write_bytes(url, b"data")
    fs, _ = storage.fsspec_filesystem(url)
    real = type(fs).cat_file
    failures = iter([ConnectionResetError(104, "reset"), ConnectionResetError(104, "reset")])

    def flaky(self, path, *args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", flaky)
    assert storage.read_bytes(url, StorageOptions(retry_deadline_s=5)) == b"data"
    assert next(failures, None) is None


def test_give_up_message_names_the_cause_and_hides_signatures():
    import aiohttp
    from yarl import URL

    info = aiohttp.RequestInfo(URL("https://h/a.png?X-Amz-Signature=secret123"), "GET", {},
                               URL("https://h/a.png?X-Amz-Signature=secret123"))

    def outage():
        try:
            raise aiohttp.ClientResponseError(info, (), status=503, message="Service Unavailable")
        except aiohttp.ClientResponseError as exc:  # what fsspec's HTTP `info` does with it
            raise FileNotFoundError("https://user:pw@h/a.png?X-Amz-Signature=secret123") from exc

    with pytest.raises(storage.TransientStorageError) as caught:
        storage.with_retries(outage, 0.2, "read https://h/a.png")
    text = str(caught.value)
    assert "from ClientResponseError: 503" in text and "Service Unavailable" in text
    assert "secret123" not in text and "pw@" not in text


def test_shard_footer_read_is_retried_and_a_lasting_transient_fault_is_one_retryable_line(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from pipeline import shards
    from schemas.job import InputColumns

    url = str(tmp_path / "part.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "image": [b"x", b"y"], "question": ["q", "q"]}), url)
    real, calls = shards._footer, []

    def flaky(u, options):
        calls.append(u)
        if len(calls) <= 2:
            raise ConnectionResetError("reset by peer")
        return real(u, options)

    monkeypatch.setattr(shards, "_footer", flaky)
    info = shards.inspect_shard(url, "part", InputColumns(), StorageOptions(retry_deadline_s=5))
    assert info.num_rows == 2 and len(calls) == 3

    monkeypatch.setattr(shards, "_footer", lambda u, o: (_ for _ in ()).throw(ConnectionResetError("reset by peer")))
    with pytest.raises(shards.ShardProblem, match="could not be read .*transient.*a re-run retries it"):
        shards.inspect_shard(url, "part", InputColumns(), StorageOptions(retry_deadline_s=0.2))


def test_row_reads_resume_after_a_mid_file_fault_without_losing_or_repeating_rows(tmp_path, monkeypatch):
    """A reset after two blocks: the shard is reopened, the rows already passed on are skipped; every
    row comes out once, in order. A fault that outlasts the deadline is a TransientStorageError."""
    import pyarrow.parquet as pq

    from pipeline import shards

    url = str(tmp_path / "part.parquet")
    n = 50
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "image": [b"x"] * n, "question": ["q"] * n}),
                   url, row_group_size=20)
    real, opened = shards._open_batches, []

    def flaky_open(u, options, row_groups, block_rows):
        handle, batches = real(u, options, row_groups, block_rows)
        opened.append(u)

        def gen():
            for index, batch in enumerate(batches):
                if len(opened) == 1 and index == 2:
                    raise ConnectionResetError(104, "reset by peer")
                yield batch
        return handle, gen()

    monkeypatch.setattr(shards, "_open_batches", flaky_open)
    blocks = list(shards.read_rows(url, "part", [0, 1, 2], 0, None, StorageOptions(retry_deadline_s=5), 8))
    ids = [i for b in blocks for i in b.column("id").to_pylist()]
    rows = [r for b in blocks for r in b.column("_row").to_pylist()]
    assert ids == [f"r{i}" for i in range(n)] and rows == list(range(n))
    assert len(opened) == 2  # one reopen

    # only some rows wanted, and a fault on every open: the deadline ends it with a transient error
    def dead_open(u, options, row_groups, block_rows):
        raise ConnectionResetError(104, "reset by peer")

    monkeypatch.setattr(shards, "_open_batches", dead_open)
    with pytest.raises(storage.TransientStorageError, match="reading rows of"):
        list(shards.read_rows(url, "part", [1], 20, [21, 25], StorageOptions(retry_deadline_s=0.2), 8))
    monkeypatch.setattr(shards, "_open_batches", real)
    wanted = list(shards.read_rows(url, "part", [1], 20, [21, 25], StorageOptions(retry_deadline_s=0.2), 8))
    assert [r for b in wanted for r in b.column("_row").to_pylist()] == [21, 25]
