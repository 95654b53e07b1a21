"""The last stage: processed rows -> output Parquet, per-shard markers, run summary, `_SUCCESS`.

Output layout under `output.uri` (all names deterministic):
  {key}-{chunk:05d}.parquet   the rows of input shard `key`, `output.rows_per_file` rows per file
  _shards/{key}.json          completion marker of one shard (files, row counts), written after its data
  _summary.json               run summary + redacted job spec
  _SUCCESS                    written last; removed when a run starts

`key` is the shard's path relative to the input root (the input directory, or the directory before the
first wildcard of a glob), without `.parquet`, with '/' -> '__' and other unsafe characters -> '_'.
It depends only on the shard's own name, so adding shards never renames old outputs, and
`skip_existing` re-runs process exactly the shards without a marker.

Rows: `output_table` keeps `id`, the passthrough columns in input order, then `schemas.rows.OUTPUT_SCHEMA`
(missing fixed columns get their defaults, the model/pruning settings are filled in), drops the
stage columns, and enforces the status invariants (error rows have a message, ok rows none).
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

from pipeline import storage
from schemas.job import JobSpec, OutputSpec, redact_url
from schemas.rows import (
    ID_COLUMN,
    OUTPUT_SCHEMA,
    RESERVED_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    STATUSES,
    fixed_defaults,
)

logger = logging.getLogger(__name__)

SUCCESS_NAME = "_SUCCESS"
SUMMARY_NAME = "_summary.json"
MARKERS_DIR = "_shards"
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
    if relative.endswith(".parquet"):
        relative = relative[: -len(".parquet")]
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

    def __add__(self, other: "RunStats") -> "RunStats":
        return RunStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def of(cls, table: pa.Table) -> "RunStats":
        """Stats of an output table (as built by `output_table`)."""
        ok = table.filter(pc.equal(table.column("status"), STATUS_OK))
        ratios = ok.column("keep_ratio").drop_null()
        total = lambda name: int(pc.sum(ok.column(name)).as_py() or 0)  # noqa: E731
        return cls(
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


# ---------------------------------------------------------------------------------------------------
# Writing


def write_shard(table: pa.Table, output: OutputSpec, key: str, source: Optional[str] = None) -> RunStats:
    """Write one shard's output rows (`output_table` result), then its completion marker.

    Files: {key}-00000.parquet, {key}-00001.parquet, ... (`output.rows_per_file` rows each; an empty
    shard still gets one file with the schema). Stale files of the same key are removed first.
    """
    for stale in storage.glob(storage.join_url(output.uri, f"{key}-*.parquet"), output.storage):
        storage.remove(stale, output.storage)
    names = []
    for chunk, start in enumerate(range(0, max(table.num_rows, 1), output.rows_per_file)):
        names.append(data_file_name(key, chunk))
        part = table.slice(start, output.rows_per_file)
        storage.write_parquet(part, storage.join_url(output.uri, names[-1]), output.storage)
    stats = RunStats.of(table)
    marker = {"key": key, "source": redact_url(source), "files": names, "stats": stats.to_dict()}
    storage.write_text(_marker_url(output.uri, key), json.dumps(marker, indent=1), output.storage)
    return stats


def _marker_url(output_uri: str, key: str) -> str:
    return storage.join_url(output_uri, MARKERS_DIR, f"{key}.json")


def completed_shards(output: OutputSpec) -> set[str]:
    """Keys of shards that already have a completion marker."""
    pattern = storage.join_url(output.uri, MARKERS_DIR, "*.json")
    return {posixpath.basename(url)[: -len(".json")] for url in storage.glob(pattern, output.storage)}


def collect_stats(output: OutputSpec, keys: Optional[Sequence[str]] = None) -> RunStats:
    """Sum of the stats in the shard markers (all completed shards, or only `keys`)."""
    stats = RunStats()
    for key in sorted(completed_shards(output) if keys is None else keys):
        marker = json.loads(storage.read_text(_marker_url(output.uri, key), output.storage))
        stats = stats + RunStats.from_dict(marker.get("stats", {}))
    return stats


def prepare_output(output: OutputSpec) -> set[str]:
    """Start a run: remove `_SUCCESS`; in overwrite mode also clear previous outputs (the top-level
    *.parquet files, `_shards/` and `_summary.json`; nothing else). Returns the keys of shards to
    skip (skip_existing mode), else an empty set."""
    storage.remove(storage.join_url(output.uri, SUCCESS_NAME), output.storage)
    if output.mode == "skip_existing":
        done = completed_shards(output)
        logger.info("skip_existing: %d shard(s) already done in %s", len(done), redact_url(output.uri))
        return done
    for stale in storage.glob(storage.join_url(output.uri, "*.parquet"), output.storage):
        storage.remove(stale, output.storage)
    storage.remove(storage.join_url(output.uri, MARKERS_DIR), output.storage, recursive=True)
    storage.remove(storage.join_url(output.uri, SUMMARY_NAME), output.storage)
    return set()


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
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": job.to_manifest(),
    }
    summary.update(extra or {})
    return summary


def write_summary(output: OutputSpec, summary: Mapping[str, Any]) -> str:
    """Write `_summary.json` next to the data; returns its URL."""
    url = storage.join_url(output.uri, SUMMARY_NAME)
    storage.write_text(url, json.dumps(summary, indent=2, sort_keys=True, default=str), output.storage)
    return url


def write_success(output: OutputSpec) -> str:
    """Write the `_SUCCESS` marker; call it last. Returns its URL."""
    url = storage.join_url(output.uri, SUCCESS_NAME)
    storage.write_bytes(url, b"", output.storage)
    return url
