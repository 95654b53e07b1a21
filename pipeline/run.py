"""Job = YAML -> JobSpec -> plan -> run. Only `run_job` has side effects (Ray, I/O).

The plan, as Ray Data stages:
  read_parquet(shards, include_paths)     one block per shard, repartitioned so the pool can scale
  -> map_batches(decode_batch)            CPU tasks: decode, guard, resize, count visual tokens
  -> map_batches(GlimpseUDF, actors)      the model stage (one model per actor, adaptive batching)
  -> groupby(path).map_groups(write)      one output file set + completion marker per input shard
then `_summary.json` and `_SUCCESS` (last). Shards that cannot be read (or lack the id/image
columns) are reported one line each and left out; the run then ends without `_SUCCESS`, and a
`skip_existing` re-run processes just those once fixed.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage, writer
from pipeline.images import ImageStageConfig, decode_batch
from schemas.job import JobSpec, redact_url
from schemas.rows import settings_values

log = logging.getLogger(__name__)
PATH_COLUMN = "path"


@dataclass
class Plan:
    """What a run will do, decided before Ray starts."""

    shards: list  # URLs to process
    keys: dict  # URL -> output key
    skipped: list = field(default_factory=list)  # URLs already done (skip_existing)
    bad: dict = field(default_factory=dict)  # URL -> one-line reason


def make_plan(job: JobSpec) -> Plan:
    """List and check the input shards; no Ray, no writes."""
    urls = storage.list_shards(job.input.uri, job.input.storage)
    keys = writer.shard_keys(urls, job.input.uri)
    done = writer.completed_shards(job.output) if job.output.mode == "skip_existing" else set()
    plan = Plan(shards=[], keys=keys)
    for url in urls:
        if keys[url] in done:
            plan.skipped.append(url)
            continue
        problem = _shard_problem(url, job)
        if problem:
            plan.bad[url] = problem
        else:
            plan.shards.append(url)
    return plan


def _shard_problem(url: str, job: JobSpec) -> Optional[str]:
    fs, path = storage.pyarrow_filesystem(url, job.input.storage)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        return f"not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    cols = job.input.columns
    missing = [c for c in (cols.id, cols.image) if c not in schema.names]
    if missing:
        return f"missing column(s) {missing} (has {schema.names}); set input.columns"
    return None


def start_ray(job: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    res = job.resources
    if res.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=res.ray_address, log_to_driver=True)
    else:
        ray.init(num_cpus=res.ray_num_cpus, include_dashboard=False, log_to_driver=True)


def credential_env(job: JobSpec) -> dict:
    """Values of the credential variables the job names, to hand to Ray workers (which may have
    started before they were set, or on other machines). Never logged or written out."""
    names = set()
    for opts in (job.input.storage, job.output.storage):
        names.update(n for n in (opts.key_env, opts.secret_env, opts.token_env) if n)
    return {n: os.environ[n] for n in sorted(names) if os.environ.get(n)}


def _with_env(env: dict) -> None:
    for name, value in env.items():
        os.environ.setdefault(name, value)


def decode_stage(batch: pa.Table, config: ImageStageConfig, env: dict) -> pa.Table:
    _with_env(env)
    return decode_batch(batch, config)


def build_dataset(job: JobSpec, plan: Plan):
    """The Ray Data plan (lazy)."""
    import ray

    from workers.generate import GlimpseUDF

    fs, _ = storage.pyarrow_filesystem(plan.shards[0], job.input.storage)
    paths = [storage.pyarrow_filesystem(u, job.input.storage)[1] for u in plan.shards]
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
    if job.input.limit:
        ds = ds.limit(job.input.limit)
    b, r = job.batching, job.resources
    rows_per_block = max(4 * b.max_rows, 16)
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    env = credential_env(job)
    ds = ds.map_batches(decode_stage, fn_kwargs={"config": ImageStageConfig.from_job(job), "env": env},
                        batch_format="pyarrow", batch_size=rows_per_block, num_cpus=0.5)
    ds = ds.map_batches(
        GlimpseUDF, fn_constructor_kwargs={"job": job, "env": env}, batch_format="pyarrow", batch_size=rows_per_block,
        compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
        num_gpus=r.num_gpus_per_actor, num_cpus=r.num_cpus_per_actor,
    )
    path_keys = {paths[i]: plan.keys[u] for i, u in enumerate(plan.shards)}
    partitions = max(1, min(len(plan.shards), 64))  # Ray's default of 200 costs seconds per tiny job
    return ds.groupby(PATH_COLUMN, num_partitions=partitions).map_groups(
        write_group, fn_kwargs={"job": job, "path_keys": path_keys, "env": env}, batch_format="pyarrow", num_cpus=0.25
    )


def write_group(group: pa.Table, job: JobSpec, path_keys: dict, env: dict) -> pa.Table:
    """Write one input shard's rows (sorted by id for a stable file) and return its stats row."""
    _with_env(env)
    path = group.column(PATH_COLUMN)[0].as_py()
    key = path_keys.get(path) or path_keys[_match_path(path, path_keys)]
    table = writer.output_table(group, settings_values(job), drop=[PATH_COLUMN])
    # Ray unifies the schemas of all shards; a column from another shard is null here, so nothing
    # may stay declared non-nullable.
    table = table.cast(pa.schema([f.with_nullable(True) for f in table.schema]))
    table = table.sort_by("id") if pa.types.is_string(table.schema.field("id").type) or pa.types.is_integer(table.schema.field("id").type) else table
    stats = writer.write_shard(table, job.output, key, source=path)
    pads = table.column("pad_fraction").drop_null().to_pylist()
    return pa.table({"key": [key], "rows": [stats.rows_total], "pad_sum": [float(sum(pads))], "pad_rows": [len(pads)]})


def _match_path(path: str, path_keys: dict) -> str:
    for candidate in path_keys:
        if candidate.endswith(path) or path.endswith(candidate):
            return candidate
    raise KeyError(f"row path {path!r} matches no planned shard")


def run_job(job: JobSpec) -> dict[str, Any]:
    """Run a validated job end to end; returns the summary (also written next to the data)."""
    start = time.perf_counter()
    plan = make_plan(job)
    for url, reason in plan.bad.items():
        log.error("shard %s skipped: %s", url, reason)
    writer.prepare_output(job.output)
    written: list = []
    if plan.shards:
        start_ray(job)
        written = build_dataset(job, plan).take_all()
    stats = writer.collect_stats(job.output)
    pad_rows = sum(r["pad_rows"] for r in written)
    extra = {
        "shards_failed": [{"shard": redact_url(url), "error": why} for url, why in plan.bad.items()],
        "mean_pad_fraction": (sum(r["pad_sum"] for r in written) / pad_rows) if pad_rows else None,
        "shards_processed": len(written),
    }
    summary = writer.build_summary(stats, time.perf_counter() - start, job, shards_total=len(plan.keys),
                                   shards_skipped=len(plan.skipped), extra=extra)
    summary["summary_url"] = writer.write_summary(job.output, summary)
    if not plan.bad:
        summary["success_url"] = writer.write_success(job.output)
    return summary
