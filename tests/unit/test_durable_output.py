"""Unit tests of the pieces behind streaming writes and resume (no Ray): row identity, part merging,
passthrough packing, per-row UTF-8 decoding, per-shard schema checks, fingerprints, the lease."""
from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shards, state, writer
from schemas.job import InputColumns, OutputSpec
from schemas.rows import ROW_COLUMN, TRANSIENT_COLUMN


def test_contiguous_runs():
    assert writer.contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (3, 5), (5, 6)]
    assert writer.contiguous_runs([]) == []


def test_merge_parts_prefers_final_rows_and_drops_duplicates():
    a = pa.table({ROW_COLUMN: [0, 1, 2], TRANSIENT_COLUMN: [False, True, False], "v": ["a0", "a1-transient", "a2"]})
    b = pa.table({ROW_COLUMN: [1, 2], TRANSIENT_COLUMN: [False, False], "v": ["b1", "b2"]})
    merged = state.merge_parts([a, b])
    assert merged.column(ROW_COLUMN).to_pylist() == [0, 1, 2]
    values = merged.column("v").to_pylist()
    assert values[0] == "a0" and values[1] == "b1" and values[2] in ("a2", "b2")


def test_passthrough_blobs_keep_each_shards_types():
    ints = pa.table({"id": [1, 2], "extra": pa.array([7, None], pa.int64())})
    strings = pa.table({"id": ["x"], "extra": ["seven"]})
    back = writer.passthrough_table(writer.passthrough_blobs(ints).to_pylist())
    assert back.equals(ints)
    assert writer.passthrough_table(writer.passthrough_blobs(strings).to_pylist()).schema.field("extra").type == pa.string()


def test_invalid_utf8_is_a_row_error_not_a_lost_block(tmp_path):
    bad = pa.Array.from_buffers(pa.string(), 3, pa.array([b"fine", b"bad \xff byte", b"ok"], pa.binary()).buffers()[:3])
    table = pa.table({"id": ["a", "b", "c"], "question": bad})
    path = tmp_path / "s.parquet"
    pq.write_table(table, path)
    fixed, errors = shards.decode_text_columns(pq.read_table(path))
    assert errors[0] is None and errors[2] is None
    assert "question" in errors[1] and "UTF-8" in errors[1]
    assert fixed.column("question").to_pylist()[1].startswith("bad ")
    fixed.column("question").validate(full=True)


@pytest.mark.parametrize("schema, problem", [
    (pa.schema([("id", pa.string()), ("image", pa.int64())]), "image column"),
    (pa.schema([("id", pa.string())]), "missing column"),
    (pa.schema([("id", pa.list_(pa.int32())), ("image", pa.binary())]), "id column"),
    (pa.schema([("id", pa.string()), ("image", pa.binary()), ("question", pa.int32())]), "question column"),
])
def test_shards_that_do_not_fit_the_job_are_refused(schema, problem):
    with pytest.raises(shards.ShardProblem, match=problem):
        shards.check_schema(schema, InputColumns())


@pytest.mark.parametrize("type_", [pa.binary(), pa.string(), pa.list_(pa.binary()), pa.list_(pa.string()),
                                   pa.struct([("bytes", pa.binary()), ("path", pa.string())])])
def test_image_column_types_that_fit(type_):
    shards.check_schema(pa.schema([("id", pa.int64()), ("image", type_)]), InputColumns())


def test_what_changed_names_the_setting():
    settings = {"sampling": {"max_new_tokens": 16, "temperature": 0.0}, "model": {"base": "m"}}
    source = state.input_fingerprint(10, "v1", 3)
    record = {"settings": settings, "input": source}
    assert state.what_changed(record, {**settings, "sampling": {"max_new_tokens": 32, "temperature": 0.0}}, source) \
        == "settings changed: sampling.max_new_tokens"
    assert "input changed" in state.what_changed(record, settings, state.input_fingerprint(11, "v2", 3))
    assert state.shard_fingerprint(settings, source) != state.shard_fingerprint(settings, state.input_fingerprint(10, "v2", 3))


def test_lease_refuses_a_second_run_and_takes_over_a_dead_one(tmp_path):
    output = OutputSpec(uri=str(tmp_path / "out"))
    first = state.Lease(output).acquire()
    try:
        with pytest.raises(state.OutputBusy, match="in use by run"):
            state.Lease(output).acquire()
        state.check_lease(output.uri, output.storage, first.run_id)
        with pytest.raises(state.OutputBusy):
            state.check_lease(output.uri, output.storage, "someone-else")
    finally:
        first.release()
    assert not (tmp_path / "out" / state.LEASE_NAME).exists()
    # A lease left by a killed process (same host, pid gone) is taken over.
    dead = state.Lease(output)
    body = dead._body().replace(str(os.getpid()).encode(), b"999999999")
    (tmp_path / "out" / state.LEASE_NAME).write_bytes(body)
    second = state.Lease(output).acquire()
    assert second.holder()["run_id"] == second.run_id
    second.release()


def test_release_waits_for_a_heartbeat_under_way(tmp_path, monkeypatch):
    """A heartbeat write still in flight at release must land before the removal: otherwise it
    recreates the lease and the next run on this output is refused (seen under a fault proxy)."""
    import threading

    output = OutputSpec(uri=str(tmp_path / "out"))
    writing = threading.Event()
    real_write = state.storage.write_bytes

    def slow_write(*args, **kwargs):
        writing.set()
        time.sleep(0.5)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(state, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(state.storage, "write_bytes", slow_write)
    lease = state.Lease(output).acquire()
    assert writing.wait(10)
    lease.release()
    time.sleep(0.7)  # past the end of a write that release did not wait for
    assert not (tmp_path / "out" / state.LEASE_NAME).exists()


def test_a_lease_left_by_an_ended_run_of_this_process_is_taken_over(tmp_path):
    output = OutputSpec(uri=str(tmp_path / "out"))
    ended = state.Lease(output)  # never acquired here: as if its release had not got through
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / state.LEASE_NAME).write_bytes(ended._body())
    second = state.Lease(output).acquire()
    try:
        assert second.holder()["run_id"] == second.run_id
        with pytest.raises(state.OutputBusy, match="in use by run"):  # a live run of this process still holds it
            state.Lease(output).acquire()
    finally:
        second.release()
