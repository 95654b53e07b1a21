"""The pipeline never loses or destroys data: faults are caused, then rows are counted.

Driver SIGKILL / SIGINT mid-run then a re-run; actor SIGKILL x3; overlapping input/output spellings;
a failed overwrite run; two runs on one output; shards that cannot be read or do not fit next to good
ones; fingerprints that make `skip_existing` redo what changed. All on the tiny random model (answers
are noise; what is checked is rows in = rows out, exactly once, nothing recomputed that was durable).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import state
from pipeline.run import RunRefused, make_plan, run_job
from workers.toyworld import WorldConfig, write_shards
from pipeline_helpers import REPO, committed_rows, job_for, job_overrides, png, read_output, staged_rows

pytestmark = pytest.mark.integration
SLOW = ["batching.max_rows=2", "sampling.max_new_tokens=24"]  # small blocks, some work per row


def _cli(job_args, tmp_path, name):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "pipeline", "run", str(REPO / "jobs" / "demo.yaml"), "--log-file", str(tmp_path / f"{name}.log")]
    for item in job_args:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate, timeout_s, process=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False


def _ids_exactly_once(out: Path, expected: int) -> list:
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == expected, (len(ids), len(set(ids)), expected)
    return ids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_driver_killed_mid_run_then_rerun_finishes_without_recomputing(tmp_path, ray_runtime, model_dirs, sig):
    inputs, out = tmp_path / "in", tmp_path / "out"
    rows = 96
    write_shards(WorldConfig(seed=11, max_objects=3), rows, inputs, rows_per_shard=16)
    args = job_overrides(inputs, out, model_dirs, *SLOW, "resources.ray_num_cpus=4")
    process = _cli(args, tmp_path, "first")
    durable = lambda: staged_rows(out) + committed_rows(out)  # noqa: E731
    assert _wait_for(lambda: durable() >= rows // 3, 240, process), process.communicate()
    assert process.poll() is None, "the run finished before it could be interrupted; make it slower"
    os.kill(process.pid, sig)
    _, stderr = process.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr.splitlines()[-1] and "re-run" in stderr.splitlines()[-1]
    else:
        assert process.returncode == -signal.SIGKILL
    time.sleep(1.0)  # let writes in flight at the kill land (or not): they are counted below either way
    staged, committed = staged_rows(out), committed_rows(out)
    assert 0 < staged + committed < rows
    # Whatever a kill leaves is valid: committed files are whole Parquet files with unique ids.
    if committed:
        _ids_exactly_once(out, committed)

    summary = run_job(job_for(inputs, out, model_dirs, *SLOW))  # the same job, overwrite mode as before
    run = summary["this_run"]
    skipped_rows = 16 * summary["shards_skipped"]
    # Every row durable at the kill (and any that landed just after it) is reused, not recomputed.
    assert run["rows_resumed"] + skipped_rows >= staged + committed
    assert run["rows_computed"] <= rows - (staged + committed)
    assert run["rows_computed"] + run["rows_resumed"] + skipped_rows == rows
    _ids_exactly_once(out, rows)
    assert (out / "_SUCCESS").exists() and not list(out.glob("_staging/*/*/*.parquet"))
    assert not (out / state.LEASE_NAME).exists()


def test_resume_counts_exactly_what_was_staged(tmp_path, ray_runtime, model_dirs):
    """Rows staged by an interrupted run (simulated by copying parts aside) are not recomputed."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(WorldConfig(seed=12, max_objects=3), 32, inputs, rows_per_shard=16)
    job = job_for(inputs, out, model_dirs, "batching.max_rows=1")
    keep = tmp_path / "kept-staging"
    # Capture the staging of one shard right before its commit removes it.
    import pipeline.writer as writer

    original = writer.commit_shard

    def spy(output, key, **kwargs):
        if key == "part-00001" and not keep.exists():
            shutil.copytree(Path(output.uri) / "_staging" / key, keep)
        return original(output, key, **kwargs)

    writer.commit_shard = spy
    try:
        run_job(job)
    finally:
        writer.commit_shard = original
    staged_parts = sorted(keep.glob("*/*.parquet"))
    assert staged_parts and sum(pq.read_metadata(p).num_rows for p in staged_parts) == 16
    # Drop half of the parts, as if the run had died midway through that shard.
    for part in staged_parts[len(staged_parts) // 2:]:
        part.unlink()
    resumed = sum(pq.read_metadata(p).num_rows for p in keep.glob("*/*.parquet"))
    shutil.copytree(keep, out / "_staging" / "part-00001")
    # The shard was never committed: no record, and the commit's final files only in its intent.
    record = out / "_shards" / "part-00001.json"
    (out / "_shards" / "part-00001.pending").write_text(json.dumps({"files": json.loads(record.read_text())["files"]}))
    record.unlink()
    summary = run_job(job_for(inputs, out, model_dirs, "batching.max_rows=1", "output.mode=skip_existing"))
    assert summary["this_run"]["rows_resumed"] == resumed
    assert summary["this_run"]["rows_computed"] == 16 - resumed
    assert summary["shards_skipped"] == 1
    _ids_exactly_once(out, 32)
    # A run killed after writing a shard's record but before removing its staging: the next run
    # counts the shard once, as committed, and only finishes the clean-up.
    shutil.copytree(keep, out / "_staging" / "part-00001")
    assert staged_rows(out) == 0 and committed_rows(out) == 32
    summary = run_job(job_for(inputs, out, model_dirs, "batching.max_rows=1", "output.mode=skip_existing"))
    assert summary["shards_skipped"] == 2 and summary["this_run"]["rows_computed"] == 0
    assert not list(out.glob("_staging/*/*/*.parquet"))
    _ids_exactly_once(out, 32)


def _model_actor_pids():
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("MapWorker(MapBatches(GlimpseUDF))" in part for part in (p.info["cmdline"] or []))]


def test_three_actor_kills_lose_and_duplicate_nothing(tmp_path, ray_runtime, model_dirs):
    inputs, out = tmp_path / "in", tmp_path / "out"
    rows = 64
    write_shards(WorldConfig(seed=13, max_objects=3), rows, inputs, rows_per_shard=16)
    kills = []

    def killer():
        deadline = time.monotonic() + 180
        while len(kills) < 3 and time.monotonic() < deadline:
            pids = _model_actor_pids()
            if pids and staged_rows(out) + committed_rows(out) >= 4 * len(kills):
                os.kill(pids[0], signal.SIGKILL)
                kills.append(pids[0])
                time.sleep(3.0)
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_job(job_for(inputs, out, model_dirs, *SLOW))
    thread.join(timeout=5)
    assert len(kills) == 3, f"only {len(kills)} actor kills happened"
    assert summary["rows_total"] == rows
    _ids_exactly_once(out, rows)


OVERLAPS = ["same", "file-url", "dot-and-slash", "symlink", "output-contains-input"]


@pytest.mark.parametrize("spelling", OVERLAPS)
def test_overlapping_output_is_refused_and_input_untouched(tmp_path, spelling, model_dirs):
    inputs = tmp_path / "data" / "in"
    write_shards(WorldConfig(seed=14, max_objects=2), 4, inputs, rows_per_shard=2)
    (tmp_path / "link").symlink_to(inputs)
    before = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()}
    output = {"same": str(inputs), "file-url": f"file://{inputs}/", "dot-and-slash": f"{tmp_path}/data/./in/sub/",
              "symlink": str(tmp_path / "link"), "output-contains-input": str(tmp_path / "data")}[spelling]
    job = job_for(inputs, output, model_dirs, "output.mode=overwrite") if spelling != "same" else None
    if job is None:  # the plain string check already fails the job file
        from pipeline.jobfile import JobFileError

        with pytest.raises(JobFileError, match="output.uri"):
            job_for(inputs, output, model_dirs)
    else:
        with pytest.raises(RunRefused, match="overlaps input.uri"):
            run_job(job)
    # The CLI says it in one line and exits 2 before Ray starts.
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(REPO / "jobs" / "demo.yaml"),
                             *sum((["--set", a] for a in job_overrides(inputs, output, model_dirs)), [])],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "output.uri" in result.stderr
    assert {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()} == before


def test_failed_overwrite_keeps_previous_output_and_second_run_is_refused(tmp_path, ray_runtime, model_dirs):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(WorldConfig(seed=15, max_objects=2), 8, inputs, rows_per_shard=4)
    run_job(job_for(inputs, out, model_dirs))
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("_summary.json", "_run.json")}
    assert (out / "_SUCCESS").exists()

    # An overwrite run whose model cannot load fails; the previous output stays complete.
    broken = tmp_path / "broken-modules"
    shutil.copytree(model_dirs[1], broken)
    (broken / "new_modules_gp.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        run_job(job_for(inputs, out, (model_dirs[0], broken), "output.mode=overwrite"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("_summary.json", "_run.json")}
    assert after == snapshot
    assert read_output(out).num_rows == 8 and not (out / state.LEASE_NAME).exists()

    # While a run holds the output, a second one is refused (and changes nothing).
    lease = state.Lease(job_for(inputs, out, model_dirs).output).acquire()
    try:
        with pytest.raises(RunRefused, match="in use by run"):
            run_job(job_for(inputs, out, model_dirs))
    finally:
        lease.release()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("_summary.json", "_run.json")} == snapshot


def test_bad_shards_fail_alone_and_types_are_kept_per_shard(tmp_path, ray_runtime, model_dirs):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    img = png(Image.new("RGB", (56, 56), (200, 30, 30)))
    url_image = tmp_path / "images" / "red.png"
    url_image.parent.mkdir()
    url_image.write_bytes(img)
    pq.write_table(pa.table({"id": ["b0", "b1"], "image": [img, img], "question": ["What color?"] * 2,
                             "extra": pa.array([1, 2], pa.int64())}), inputs / "a-bytes.parquet")
    pq.write_table(pa.table({"id": ["u0"], "image": [str(url_image)], "question": ["What color?"],
                             "extra": ["one"]}), inputs / "b-urls.parquet")
    pq.write_table(pa.table({"id": ["i0"], "image": pa.array([7], pa.int64()), "question": ["?"]}), inputs / "c-int-image.parquet")
    bad_text = pa.Array.from_buffers(pa.string(), 2, pa.array([b"What color?", b"bad \xff"], pa.binary()).buffers()[:3])
    pq.write_table(pa.table({"id": ["t0", "t1"], "image": [img, img], "question": bad_text}), inputs / "d-utf8.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                             "question": pa.array([], pa.string())}), inputs / "e-empty.parquet")
    summary = run_job(job_for(inputs, out, model_dirs))
    assert [f["shard"].rsplit("/", 1)[-1] for f in summary["shards_failed"]] == ["c-int-image.parquet"]
    assert "image column" in summary["shards_failed"][0]["error"]
    rows = {r["id"]: r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    assert sorted(rows) == ["b0", "b1", "t0", "t1", "u0"]
    assert rows["t0"]["status"] == "ok" and rows["t1"]["status"] == "error" and "UTF-8" in rows["t1"]["error"]
    assert rows["u0"]["image"] == str(url_image) and rows["u0"]["status"] == "ok"  # URL stays a URL
    assert pq.read_table(next(out.glob("a-bytes-*.parquet"))).schema.field("extra").type == pa.int64()
    assert pq.read_table(next(out.glob("b-urls-*.parquet"))).schema.field("extra").type == pa.string()
    assert state.read_record(job_for(inputs, out, model_dirs).output, "e-empty")["complete"]
    assert not (out / "_SUCCESS").exists()  # one shard failed


def test_skip_existing_redoes_what_changed(tmp_path, ray_runtime, model_dirs, caplog):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(WorldConfig(seed=16, max_objects=2), 6, inputs, rows_per_shard=2)
    first = run_job(job_for(inputs, out, model_dirs, "output.mode=skip_existing"))
    assert first["this_run"]["rows_computed"] == 6
    again = run_job(job_for(inputs, out, model_dirs, "output.mode=skip_existing"))
    assert again["this_run"]["rows_computed"] == 0 and again["shards_skipped"] == 3 and again["rows_total"] == 6

    # Change one shard's content: only it is redone, and the log says why.
    table = pq.read_table(inputs / "part-00001.parquet")
    pq.write_table(table.set_column(table.column_names.index("question"), "question",
                                    pa.array(["What shape is it?"] * 2)), inputs / "part-00001.parquet")
    changed = run_job(job_for(inputs, out, model_dirs, "output.mode=skip_existing"))
    assert changed["this_run"]["rows_computed"] == 2 and changed["shards_skipped"] == 2
    assert "input changed" in changed["shards_redone"]["part-00001"]
    questions = {r["id"]: r["question"] for r in read_output(out).to_pylist()}
    assert sum(q == "What shape is it?" for q in questions.values()) == 2 and len(questions) == 6

    # Change an answer-changing setting: everything is redone, old files replaced, not duplicated.
    redone = run_job(job_for(inputs, out, model_dirs, "output.mode=skip_existing", "sampling.max_new_tokens=3"))
    assert redone["this_run"]["rows_computed"] == 6
    assert all("sampling.max_new_tokens" in why for why in redone["shards_redone"].values())
    _ids_exactly_once(out, 6)
    assert make_plan(job_for(inputs, out, model_dirs, "output.mode=skip_existing", "sampling.max_new_tokens=3")).todo == []


def test_dead_endpoint_is_one_line_and_exit_2(tmp_path, model_dirs):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = job_overrides("s3://nowhere/in/", tmp_path / "out", model_dirs, f"input.storage.endpoint_url=http://127.0.0.1:{port}",
                         "input.storage.retry_deadline_s=2", "input.storage.anonymous=true")
    process = _cli(args, tmp_path, "run")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "traceback:" in lines[0], lines
    log = lines[0].rsplit("traceback: ", 1)[1].rstrip(")")
    assert "Traceback" in Path(log).read_text()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_in_one_line_keeps_what_was_done_and_rerun_finishes(tmp_path, ray_runtime, model_dirs, small_disk):
    inputs, out = tmp_path / "in", small_disk / "out"
    rows = 48
    write_shards(WorldConfig(seed=17, max_objects=2), rows, inputs, rows_per_shard=8)
    before = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()}
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024**2 - 96 * 1024))  # ~96 KiB left: a few parts, then ENOSPC
    process = _cli(job_overrides(inputs, out, model_dirs, "batching.max_rows=2", "resources.ray_num_cpus=4"), tmp_path, "full")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last and "traceback:" in last, last
    assert {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()} == before
    durable = staged_rows(out) + committed_rows(out)
    filler.unlink()
    summary = run_job(job_for(inputs, out, model_dirs, "batching.max_rows=2"))
    assert summary["this_run"]["rows_computed"] + summary["this_run"]["rows_resumed"] + 8 * summary["shards_skipped"] == rows
    assert summary["this_run"]["rows_computed"] <= rows - durable
    _ids_exactly_once(out, rows)


def test_duplicate_and_null_ids_are_reported(tmp_path, ray_runtime, model_dirs):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    img = png(Image.new("RGB", (56, 56), (10, 200, 30)))
    pq.write_table(pa.table({"id": ["x", "x", None], "image": [img] * 3, "question": ["What color?"] * 3}), inputs / "dups.parquet")
    # "x" again and "y" in a second shard, "y" in a third: 2 ids occur in more than one shard
    pq.write_table(pa.table({"id": ["x", "y"], "image": [img] * 2, "question": ["What color?"] * 2}), inputs / "more.parquet")
    pq.write_table(pa.table({"id": ["y", "z"], "image": [img] * 2, "question": ["What color?"] * 2}), inputs / "third.parquet")
    summary = run_job(job_for(inputs, out, model_dirs))
    assert summary["duplicate_ids"] == 1 and summary["null_ids"] == 1
    assert summary["duplicate_ids_across_shards"] == 2
    assert read_output(out).num_rows == 7  # rows in = rows out, even so


@pytest.mark.parametrize("base", ["/no/such/model", "EMPTY"])
def test_missing_model_directory_fails_before_ray_in_one_line(tmp_path, model_dirs, base):
    if base == "EMPTY":
        base = tmp_path / "empty"
        base.mkdir()
    inputs = tmp_path / "in"
    write_shards(WorldConfig(seed=18, max_objects=2), 2, inputs, rows_per_shard=2)
    args = job_overrides(inputs, tmp_path / "out", (base, model_dirs[1]))
    process = _cli(args, tmp_path, "run")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "model.base" in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing written


def test_model_actors_that_cannot_start_fail_in_one_line_instead_of_hanging(tmp_path, ray_runtime, model_dirs):
    """A GPU per actor on a CPU-only cluster: Ray would wait forever; the run refuses it against the
    running cluster's nodes before it writes anything (pipeline.resources)."""
    from pipeline.run import CouldNotStart

    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(WorldConfig(seed=19, max_objects=2), 4, inputs, rows_per_shard=2)
    job = job_for(inputs, out, model_dirs, "resources.num_gpus_per_actor=1", "resources.actor_start_timeout_s=10")
    started = time.monotonic()
    with pytest.raises(CouldNotStart, match=r"^resources.num_gpus_per_actor: 1 GPU per actor, but the Ray cluster has 8 CPU and 0 GPU"):
        run_job(job)
    assert time.monotonic() - started < 30
    assert committed_rows(out) == 0 and not out.exists()  # refused before the lease or any marker


def test_first_unit_is_one_block(tmp_path, model_dirs):
    """The run's first unit is cut to one block so the first durable output comes after one block."""
    inputs = tmp_path / "in"
    write_shards(WorldConfig(seed=20, max_objects=2), 40, inputs, rows_per_shard=20)
    plan = make_plan(job_for(inputs, tmp_path / "out", model_dirs, "batching.max_rows=2"))  # blocks of 16 rows
    first, second = plan.todo[0].units[:2]
    assert first["wanted"] == list(range(16)) and second["wanted"] == list(range(16, 20))
    assert all(u["wanted"] is None for sp in plan.todo[1:] for u in sp.units)
    rows = sorted(r for sp in plan.todo[:1] for u in sp.units for r in (u["wanted"] or []))
    assert rows == list(range(20))


def test_model_that_cannot_load_is_one_could_not_start_error(tmp_path, ray_runtime, model_dirs):
    """Weights that pass the directory check but cannot be loaded: the actors' constructor fails; the
    run says so in one line (exit 2 in the CLI), not after retries and tracebacks."""
    from pipeline.run import CouldNotStart

    bad = tmp_path / "bad-model"
    shutil.copytree(model_dirs[0], bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_shards(WorldConfig(seed=21, max_objects=2), 4, inputs, rows_per_shard=2)
    with pytest.raises(CouldNotStart, match=r"^the model stage could not start: ModelLoadError: .*bad-model: cannot load"):
        run_job(job_for(inputs, out, (bad, model_dirs[1])))
    assert committed_rows(out) == 0
