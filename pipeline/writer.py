"""The last stage: processed rows -> staged parts (streaming, in Ray tasks) -> per-shard commits
(driver) -> run summary and `_SUCCESS`. The layout and its invariants: `pipeline.state`.

`key` is the shard's path relative to the input root (the input directory, or the directory before the
first wildcard of a glob), without `.parquet`, with '/' -> '__' and other unsafe characters -> '_'.
It depends only on the shard's own name, so adding shards never renames old outputs.

Rows: `output_table` keeps `id`, the passthrough columns in input order, then `schemas.rows.OUTPUT_SCHEMA`
(missing fixed columns get their defaults, the model/pruning settings are filled in), drops the
stage columns, and enforces the status invariants (error rows have a message, ok rows none). Rows of a
committed shard are in input order.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import state, storage
from schemas.job import JobSpec, OutputSpec, redact_url
from schemas.rows import (
    ID_COLUMN,
    IMAGE_TOKENS_COLUMN,
    PRUNE_COLUMN,
    SAMPLING_COLUMN,
    IMAGES_COLUMN,
    KEY_COLUMN,
    PASSTHROUGH_COLUMN,
    PROMPT_COLUMN,
    READ_ERROR_COLUMN,
    ROW_COLUMN,
    TRANSIENT_COLUMN,
    OUTPUT_SCHEMA,
    RESERVED_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    STATUSES,
    fixed_defaults,
)

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


# ---------------------------------------------------------------------------------------------------
# Shard names


def input_root(input_uri: str, shard_urls: Sequence[str]) -> str:
    """The directory shard keys are relative to."""
    if storage.has_glob(input_uri):
        return storage.glob_root(input_uri)
    root = storage.normalize_url(input_uri)
    if list(shard_urls) == [root]:  # a single file
        scheme, path = storage.split_url(root)
        return storage.to_url(scheme, posixpath.dirname(path))
    return root


def shard_key(shard_url: str, root: str) -> str:
    """'s3://b/in/2024/part-0.parquet' under 's3://b/in' -> '2024__part-0'."""
    url, root = storage.normalize_url(shard_url), storage.normalize_url(root).rstrip("/")
    relative = url[len(root) + 1:] if url.startswith(root + "/") else posixpath.basename(url)
    for suffix in (".parquet", ".csv", ".jsonl", ".ndjson", ".json"):
        if relative.endswith(suffix):
            relative = relative[: -len(suffix)]
            break
    key = _UNSAFE.sub("_", relative.replace("/", "__")).strip("._") or "shard"
    return key


def shard_keys(shard_urls: Sequence[str], input_uri: str) -> dict[str, str]:
    """{shard_url: key} for a listing; raises ValueError if two shards would share output names."""
    root = input_root(input_uri, shard_urls)
    keys = {url: shard_key(url, root) for url in shard_urls}
    seen: dict[str, str] = {}
    for url, key in keys.items():
        if key in seen:
            raise ValueError(f"input shards {redact_url(seen[key])} and {redact_url(url)} map to the same output name {key!r}")
        seen[key] = url
    return keys


def data_file_name(key: str, chunk: int) -> str:
    return f"{key}-{chunk:05d}.parquet"


# ---------------------------------------------------------------------------------------------------
# Rows -> output table


def output_table(processed: pa.Table, settings: Mapping[str, Optional[str]], drop: Sequence[str] = ()) -> pa.Table:
    """Final output rows: `id`, passthrough columns, then the fixed columns in schema order.

    processed: rows after the image (and model) stages; `settings` from `schemas.rows.settings_values`;
    `drop`: extra columns not to pass through (e.g. Ray's `path` column from `include_paths=True`).
    """
    if ID_COLUMN not in processed.column_names:
        raise ValueError(f"processed rows have no {ID_COLUMN!r} column (have {processed.column_names})")
    passthrough = [n for n in processed.column_names if n not in RESERVED_COLUMNS and n not in drop]
    names = [ID_COLUMN] + passthrough
    out_fields = [processed.schema.field(n) for n in names]
    arrays = [processed.column(n) for n in names]
    for out_field, array in zip(OUTPUT_SCHEMA, _fixed_arrays(processed, settings)):
        out_fields.append(out_field)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(out_fields))


def _fixed_arrays(processed: pa.Table, settings: Mapping[str, Optional[str]]) -> list[pa.Array]:
    rows = processed.num_rows
    defaults = fixed_defaults()
    values: dict[str, Any] = {}
    for out_field in OUTPUT_SCHEMA:
        name = out_field.name
        if name in settings:
            values[name] = [settings[name]] * rows
        elif name in processed.column_names:
            values[name] = processed.column(name).to_pylist()
        else:
            values[name] = [defaults[name]] * rows
    _enforce_status(values, "status" in processed.column_names)
    return [pa.array(values[f.name], type=f.type) for f in OUTPUT_SCHEMA]


def _enforce_status(values: dict[str, list], had_status: bool) -> None:
    """Status in {ok, error}; error rows carry a message and no answer; ok rows carry no error."""
    for i, status in enumerate(values["status"]):
        if status not in STATUSES:
            values["status"][i] = STATUS_ERROR
            reason = f"invalid status {status!r}" if had_status else "row was not processed (no status)"
            values["error"][i] = values["error"][i] or reason
        if values["status"][i] == STATUS_ERROR:
            values["error"][i] = values["error"][i] or "unknown error"
            values["answer"][i] = None
        else:
            values["error"][i] = None


# ---------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class RunStats:
    """Counters over output rows; token sums and keep ratios over ok rows only. Adds with `+`."""

    rows_total: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    keep_ratio_sum: float = 0.0
    keep_ratio_rows: int = 0
    visual_tokens: int = 0
    kept_tokens: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefill_work_full: int = 0  # sum of prompt_tokens over rows with a prefill_work_ratio
    prefill_work_pruned: float = 0.0  # sum of prefill_work_ratio * prompt_tokens
    prefill_flops_full: int = 0  # sum of prompt_tokens over rows with a prefill_flops_ratio
    prefill_flops_pruned: float = 0.0  # sum of prefill_flops_ratio * prompt_tokens

    def __add__(self, other: "RunStats") -> "RunStats":
        return RunStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def of(cls, table: pa.Table) -> "RunStats":
        """Stats of an output table (as built by `output_table`)."""
        ok = table.filter(pc.equal(table.column("status"), STATUS_OK))
        ratios = ok.column("keep_ratio").drop_null()
        total = lambda name: int(pc.sum(ok.column(name)).as_py() or 0)  # noqa: E731
        work_full, work_pruned = _weighted(ok, "prefill_work_ratio")
        flops_full, flops_pruned = _weighted(ok, "prefill_flops_ratio")
        return cls(
            prefill_work_full=work_full, prefill_work_pruned=work_pruned,
            prefill_flops_full=flops_full, prefill_flops_pruned=flops_pruned,
            rows_total=table.num_rows, rows_ok=ok.num_rows, rows_error=table.num_rows - ok.num_rows,
            keep_ratio_sum=float(pc.sum(ratios).as_py() or 0.0), keep_ratio_rows=len(ratios),
            visual_tokens=total("visual_tokens"), kept_tokens=total("kept_tokens"),
            prompt_tokens=total("prompt_tokens"), output_tokens=total("output_tokens"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunStats":
        return cls(**{f.name: data.get(f.name, 0) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weighted(ok: pa.Table, column: str) -> tuple[int, float]:
    """(sum of prompt_tokens, sum of column * prompt_tokens) over the rows where `column` is set."""
    rows = ok.filter(pc.invert(pc.is_null(ok.column(column))))
    weights = pc.cast(rows.column("prompt_tokens"), pa.float64())
    return int(pc.sum(rows.column("prompt_tokens")).as_py() or 0), float(pc.sum(pc.multiply(rows.column(column), weights)).as_py() or 0.0)


# ---------------------------------------------------------------------------------------------------
# Streaming writes (tasks) and per-shard commits (driver)


PART_DROP = (IMAGE_TOKENS_COLUMN, PROMPT_COLUMN, IMAGES_COLUMN, PRUNE_COLUMN, SAMPLING_COLUMN, READ_ERROR_COLUMN)
STATS_SCHEMA = pa.schema([
    ("key", pa.string()), ("first", pa.int64()), ("last", pa.int64()), ("rows", pa.int64()),
    ("errors", pa.int64()), ("transient", pa.int64()), ("pad_sum", pa.float64()), ("pad_rows", pa.int64()),
    ("kept_tokens", pa.int64()), ("visual_tokens", pa.int64()), ("output_tokens", pa.int64()),
    ("prompt_tokens", pa.int64()), ("prefill_s", pa.float64()), ("decode_s", pa.float64()),
    ("decode_steps", pa.int64()), ("decode_share", pa.float64()), ("kv_use_steps", pa.float64()), ("kv_rows", pa.int64()),
])


@dataclass(frozen=True)
class PartContext:
    """What a write task needs (picklable): where parts go and which run may write them."""

    output: OutputSpec
    run_id: str
    fingerprints: Mapping[str, str]  # shard key -> fingerprint


def contiguous_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """[(start_index, end_index)] of runs of consecutive values in a sorted list."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def write_parts(batch: pa.Table, context: PartContext) -> pa.Table:
    """Write processed rows to `_staging` as one part per (shard, contiguous row range); returns one
    stats row per part (the driver's only view of the data). Same rows -> same part name, so a retried
    task overwrites its own earlier attempt."""
    state.check_lease(context.output.uri, context.output.storage, context.run_id)
    table = batch.drop_columns([c for c in PART_DROP if c in batch.column_names])
    stats = []
    for key in sorted(set(table.column(KEY_COLUMN).to_pylist())):
        rows_of_key = table.filter(pc.equal(table.column(KEY_COLUMN), key))
        rows_of_key = rows_of_key.take(pc.sort_indices(rows_of_key.column(ROW_COLUMN)))
        row_ids = rows_of_key.column(ROW_COLUMN).to_pylist()
        for start, end in contiguous_runs(row_ids):
            part = rows_of_key.slice(start, end - start)
            url = state.part_url(context.output, key, context.fingerprints[key], row_ids[start], row_ids[end - 1])
            storage.write_parquet(part, url, context.output.storage)
            stats.append(_part_stats(key, row_ids[start], row_ids[end - 1], part))
    return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)


def _part_stats(key: str, first: int, last: int, part: pa.Table) -> dict:
    ok = pc.equal(part.column("status"), STATUS_OK)
    total = lambda name: int(pc.sum(part.filter(ok).column(name)).as_py() or 0)  # noqa: E731
    pads = part.column("pad_fraction").drop_null()
    done = part.filter(ok)
    seconds = lambda name: float(pc.sum(done.column(name)).as_py() or 0.0)  # noqa: E731
    # Decode batching: per row, its decoder forwards (output_tokens - 1) and the batch size it ran in.
    decoded = done.filter(pc.invert(pc.is_null(done.column("decode_rows"))))
    steps = pc.subtract(pc.cast(decoded.column("output_tokens"), pa.float64()), 1.0)
    with_kv = decoded.filter(pc.invert(pc.is_null(decoded.column("kv_use"))))
    kv_steps = pc.subtract(pc.cast(with_kv.column("output_tokens"), pa.float64()), 1.0)
    return {
        "key": key, "first": first, "last": last, "rows": part.num_rows,
        "errors": part.num_rows - int(pc.sum(ok).as_py() or 0),
        "transient": int(pc.sum(part.column(TRANSIENT_COLUMN)).as_py() or 0),
        "pad_sum": float(pc.sum(pads).as_py() or 0.0), "pad_rows": len(pads),
        "kept_tokens": total("kept_tokens"), "visual_tokens": total("visual_tokens"), "output_tokens": total("output_tokens"),
        "prompt_tokens": total("prompt_tokens"), "prefill_s": seconds("prefill_s"), "decode_s": seconds("decode_s"),
        "decode_steps": int(pc.sum(steps).as_py() or 0),
        "decode_share": float(pc.sum(pc.divide(steps, decoded.column("decode_rows"))).as_py() or 0.0),
        "kv_use_steps": float(pc.sum(pc.multiply(kv_steps, with_kv.column("kv_use"))).as_py() or 0.0),
        "kv_rows": with_kv.num_rows,
    }


def passthrough_blobs(table: pa.Table) -> pa.Array:
    """Each row of `table` as a 1-row Arrow IPC stream (see schemas.rows.PASSTHROUGH_COLUMN)."""
    blobs = []
    for i in range(table.num_rows):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table.slice(i, 1))
        blobs.append(sink.getvalue().to_pybytes())
    return pa.array(blobs, pa.binary())


def passthrough_table(blobs: Sequence[bytes]) -> pa.Table:
    """Inverse of `passthrough_blobs` (one shard's rows: one schema)."""
    tables = [pa.ipc.open_stream(pa.py_buffer(b)).read_all() for b in blobs]
    return pa.concat_tables(tables, promote_options="permissive")


@dataclass
class CommitResult:
    key: str
    rows: int
    complete: bool
    files: list
    stats: RunStats
    problem: Optional[str] = None  # why the shard could not be committed
    duplicate_ids: int = 0
    null_ids: int = 0


def commit_shard(output: OutputSpec, key: str, *, fingerprint: str, num_rows: int, run_id: str,
                 record: Mapping[str, Any], settings: Mapping[str, Optional[str]]) -> CommitResult:
    """Staged parts of one shard -> final files + record (atomic) -> superseded files removed.

    `record` is what the shard's new record says besides files/stats (fingerprint, input, settings).
    Nothing is written (and nothing removed) unless every row 0..num_rows-1 is staged."""
    parts = [storage.read_parquet(u, output.storage) for u in state.staged_parts(output, key, fingerprint)]
    merged = state.merge_parts(parts)
    rows = merged.column(ROW_COLUMN).to_pylist() if merged.num_columns else []
    if rows != list(range(num_rows)):
        missing = num_rows - len(rows)
        return CommitResult(key, len(rows), False, [], RunStats(), problem=f"{missing} of {num_rows} rows missing from staging")
    table = _final_rows(merged, settings) if num_rows else None
    files = [f"{key}-{run_id}-{chunk:05d}.parquet" for chunk in range(-(-num_rows // output.rows_per_file))]
    # Intent first: a run killed before the record is replaced leaves files that only this names.
    storage.write_text(state.pending_url(output, key), json.dumps({"files": files}), output.storage)
    for chunk, name in enumerate(files):
        part = table.slice(chunk * output.rows_per_file, output.rows_per_file)
        storage.write_parquet(part, storage.join_url(output.uri, name), output.storage)
    transient = int(pc.sum(merged.column(TRANSIENT_COLUMN)).as_py() or 0) if num_rows else 0
    stats = RunStats.of(table) if table is not None else RunStats()
    ids = table.column(ID_COLUMN) if table is not None else pa.array([], pa.string())
    nulls = ids.null_count
    duplicates = len(ids) - nulls - len(pc.unique(ids.drop_null()))
    previous = state.read_record(output, key) or {}
    new_record = dict(record, key=key, files=files, stats=stats.to_dict(), complete=transient == 0, run_id=run_id,
                      transient_rows=transient, duplicate_ids=duplicates, null_ids=nulls,
                      superseded=[f for f in previous.get("files", []) if f not in files],
                      committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_text(state.record_url(output, key), json.dumps(new_record, indent=1, default=str), output.storage)
    finish_commit(output, key, new_record, keep_staging=fingerprint if transient else None)
    return CommitResult(key, num_rows, transient == 0, files, stats, duplicate_ids=duplicates, null_ids=nulls)


def cross_shard_duplicate_ids(output: OutputSpec, records: Mapping[str, Mapping[str, Any]],
                              max_rows: int = 50_000_000) -> Optional[int]:
    """Ids that occur in more than one shard's committed output, counted once per extra shard (ids
    repeated within one shard are the records' own `duplicate_ids`). Reads only the id column of the
    files the records list; 8 bytes per row in memory (a 64-bit hash of each id). None when the
    output holds more than `max_rows` rows (the check is skipped there, and the summary says so)."""
    import numpy as np
    from pandas.util import hash_array

    if sum(int((r.get("stats") or {}).get("rows_total", 0)) for r in records.values()) > max_rows:
        return None

    def shard_hashes(record: Mapping[str, Any]):
        ids = [storage.read_parquet(storage.join_url(output.uri, name), output.storage, columns=[ID_COLUMN]).column(ID_COLUMN)
               for name in record.get("files", [])]
        if not ids:
            return np.empty(0, np.uint64)
        values = pc.cast(pa.chunked_array([c for col in ids for c in col.chunks], ids[0].type), pa.string()).drop_null()
        return np.unique(hash_array(values.to_numpy()))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        per_shard = list(pool.map(shard_hashes, records.values()))
    if len(per_shard) < 2:
        return 0
    every = np.concatenate(per_shard)
    return int(len(every) - len(np.unique(every)))


def finish_commit(output: OutputSpec, key: str, record: Mapping[str, Any], keep_staging: Optional[str] = None) -> None:
    """After a record is written: remove the files it superseded and the shard's staging (all of it,
    or all but `keep_staging`, the fingerprint whose transient rows a re-run retries). Idempotent,
    so a run killed in between is finished by the next one."""
    for name in record.get("superseded", []):
        storage.remove(storage.join_url(output.uri, name), output.storage)
    storage.remove(state.pending_url(output, key), output.storage)
    if keep_staging is None:
        storage.remove(state.staging_dir(output, key), output.storage, recursive=True)
        return
    for fingerprint in state.staged_fingerprints(output, key):
        if fingerprint != keep_staging:
            storage.remove(state.staging_dir(output, key, fingerprint), output.storage, recursive=True)


def _final_rows(merged: pa.Table, settings: Mapping[str, Optional[str]]) -> pa.Table:
    passthrough = passthrough_table(merged.column(PASSTHROUGH_COLUMN).to_pylist())
    fixed = merged.drop_columns([c for c in merged.column_names if c not in OUTPUT_SCHEMA.names])
    processed = passthrough
    for name in fixed.column_names:
        processed = processed.append_column(fixed.schema.field(name), fixed.column(name))
    return output_table(processed, settings)



def build_summary(stats: RunStats, wall_s: float, job: JobSpec, *, shards_total: int = 0,
                  shards_skipped: int = 0, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The run summary: row counts, mean keep ratio, throughput, and the redacted job spec.

    mean_keep_ratio: mean of per-row keep_ratio over ok rows (null if none); overall_keep_ratio:
    kept_tokens / visual_tokens over ok rows; tokens_per_s: generated tokens per wall second.
    """
    wall = max(wall_s, 1e-9)
    summary: dict[str, Any] = {
        "rows_total": stats.rows_total,
        "rows_ok": stats.rows_ok,
        "rows_error": stats.rows_error,
        "mean_keep_ratio": stats.keep_ratio_sum / stats.keep_ratio_rows if stats.keep_ratio_rows else None,
        "overall_keep_ratio": stats.kept_tokens / stats.visual_tokens if stats.visual_tokens else None,
        "rows_per_s": stats.rows_total / wall,
        "tokens_per_s": stats.output_tokens / wall,
        "wall_s": wall_s,
        "visual_tokens": stats.visual_tokens,
        "kept_tokens": stats.kept_tokens,
        "prompt_tokens": stats.prompt_tokens,
        "output_tokens": stats.output_tokens,
        "shards_total": shards_total,
        "shards_skipped": shards_skipped,
        "pruning_prediction": pruning_prediction(stats),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": job.to_manifest(),
    }
    summary.update(extra or {})
    return summary


def pruning_prediction(stats: RunStats) -> Optional[dict[str, Any]]:
    """What pruning can save on these rows, from their token counts (None when nothing was pruned).

    prefill_work_ratio: predicted decoder prefill work pruned / unpruned (per row
      ((K+1)(T+N+1) + (L-K-1)(T+kept)) / (L(T+N)), weighted by prompt length; token-layers, so the
      quadratic attention term, the ViT and the VIP are left out);
    kv_cache_ratio: the decode cache pruned / unpruned at the answers' mid-point,
      (P - V + kept + O/2) / (P + O/2) with totals P prompt, V visual, O output tokens; it is the
      ratio that bounds how many more rows decode at once under one memory budget;
    prefill_flops_ratio: predicted prefill matmul FLOPs pruned / unpruned (per row from
      `workers.modeling.flops`: the ViT, the decoder, the glimpse pass and the VIP; weighted by prompt
      length; None for outputs written before the column existed);
    pays: False when the prefill saves little and the cache shrinks little (prefill ratio >= 0.97,
      the FLOPs one where known, and cache ratio >= 0.9): the ViT, the layers before the pruning point,
      the VIP and the text dominate, so pruning costs its glimpse pass and saves next to nothing.
    """
    if not stats.prefill_work_full:
        return None
    half_out = stats.output_tokens / 2
    prefill = stats.prefill_work_pruned / stats.prefill_work_full
    flops = stats.prefill_flops_pruned / stats.prefill_flops_full if stats.prefill_flops_full else None
    kv = (stats.prompt_tokens - stats.visual_tokens + stats.kept_tokens + half_out) / max(stats.prompt_tokens + half_out, 1e-9)
    return {"prefill_work_ratio": prefill, "prefill_flops_ratio": flops, "kv_cache_ratio": kv,
            "visual_share_of_prompt": stats.visual_tokens / max(stats.prompt_tokens, 1),
            "pays": not ((flops if flops is not None else prefill) >= 0.97 and kv >= 0.9)}


def write_summary(output: OutputSpec, summary: Mapping[str, Any]) -> str:
    """Write `_summary.json` next to the data; returns its URL."""
    url = storage.join_url(output.uri, state.SUMMARY_NAME)
    storage.write_text(url, json.dumps(summary, indent=2, sort_keys=True, default=str), output.storage)
    return url


def write_success(output: OutputSpec) -> str:
    """Write the `_SUCCESS` marker; call it last. Returns its URL."""
    url = storage.join_url(output.uri, state.SUCCESS_NAME)
    storage.write_bytes(url, b"", output.storage)
    return url
