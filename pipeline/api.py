"""The Python entry point: glimpse-pruned inference over any Ray Dataset, composable like `ray.data.llm`.

    import ray
    from pipeline.api import annotate, load, read_input

    job = load("jobs/vqa.yaml", profiles=["local"])            # or a JobSpec, or a dict
    ds = ray.data.read_parquet("s3://bucket/rows/")              # any Dataset with the job's columns
    out = annotate(ds, job, preprocess=lambda row: {**row, "question": row["q"].strip()})
    out.write_parquet("s3://bucket/answers/")                    # lazy until consumed

`annotate` runs the same stages as the CLI: the image stage (decode, guard, resize, count visual tokens;
a bad row becomes an error row) in CPU tasks, the model stage (`GlimpseUDF`: continuous batching by KV
budget, the job's pruning; `stages.model_stage`, the CLI's too) in an actor pool sized from the cluster, and returns the output rows: `id`,
the input's other columns, then the fixed output columns (`schemas.rows.OUTPUT_SCHEMA`). Rows in = rows
out. Hooks: `preprocess` (a row dict -> row dict, before the image stage) and `postprocess` (an output
row -> row dict), as `ray.data.llm`'s processors take them.

`read_input(job)` reads `input.uri` through Ray Data's readers by `input.format` (read_parquet, read_csv,
read_json, read_binary_files for image folders, with relative image paths resolved and ids = relative
paths), for use with `annotate`.

What this path does not do (the CLI `python -m pipeline run` does, around the very same model stage):
durable per-shard commits, row-level resume, fingerprints and skip_existing, the output lease, the run
summary. A row's random choices (sampling with a seed, the random strategy) are seeded from its id.
"""
from __future__ import annotations

import os
import posixpath
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pyarrow as pa

from schemas.job import JobSpec
from schemas.rows import KEY_COLUMN, PASSTHROUGH_COLUMN, READ_ERROR_COLUMN, ROW_COLUMN, settings_values

API_KEY = "api"  # the shard key of rows that come through `annotate`


def load(job: Union[str, os.PathLike, Mapping[str, Any], JobSpec], overrides: Sequence[str] = (),
         profiles: Sequence[str] = ()) -> JobSpec:
    """A validated job from a path (with profiles and overrides, as the CLI), a dict, or a JobSpec."""
    from pipeline.jobfile import load_job

    if isinstance(job, JobSpec):
        return job
    if isinstance(job, Mapping):
        return JobSpec.model_validate(dict(job))
    return load_job(job, overrides, profiles)


def _prepare(batch: pa.Table, config, columns) -> pa.Table:
    """User rows -> the image stage's blocks (a row's number is a hash of its id, for per-row seeds)."""
    from pipeline.stages import to_block

    ids = batch.column(columns.id).to_pylist() if columns.id in batch.column_names else [None] * batch.num_rows
    rows = [zlib.crc32(repr(i).encode()) for i in ids]
    batch = batch.append_column(KEY_COLUMN, pa.array([API_KEY] * batch.num_rows, pa.string()))
    batch = batch.append_column(ROW_COLUMN, pa.array(rows, pa.int64()))
    batch = batch.append_column(READ_ERROR_COLUMN, pa.nulls(batch.num_rows, pa.string()))
    return to_block(batch, config)


def _finish(batch: pa.Table, settings: Mapping[str, Optional[str]]) -> pa.Table:
    from pipeline.writer import PART_DROP, _final_rows

    table = batch.drop_columns([c for c in PART_DROP if c in batch.column_names])
    if PASSTHROUGH_COLUMN not in table.column_names or table.num_rows == 0:
        return table
    return _final_rows(table, settings)


def annotate(ds, job: Union[JobSpec, str, os.PathLike, Mapping[str, Any]], *,
             preprocess: Optional[Callable[[dict], dict]] = None, postprocess: Optional[Callable[[dict], dict]] = None):
    """Output rows for every row of `ds` (lazy). Starts a local Ray (or joins RAY_ADDRESS) if none is up."""
    import ray

    from pipeline.images import ImageStageConfig
    from pipeline.resources import READ_TASK_CPUS, cluster_from_ray_nodes
    from pipeline.run import READ_TASK_MEMORY, _block_rows, actor_resources, credential_env, start_ray
    from pipeline.stages import model_stage

    job = load(job)
    start_ray(job)
    actors = actor_resources(job, cluster_from_ray_nodes(ray.nodes()))
    env = credential_env(job)
    if preprocess is not None:
        ds = ds.map(preprocess)
    ds = ds.map_batches(_prepare, fn_kwargs={"config": ImageStageConfig.from_job(job), "columns": job.input.columns},
                        batch_format="pyarrow", batch_size=_block_rows(job), num_cpus=READ_TASK_CPUS, memory=READ_TASK_MEMORY)
    ds = model_stage(ds, job, actors, env, _block_rows(job))
    ds = ds.map_batches(_finish, fn_kwargs={"settings": settings_values(job)}, batch_format="pyarrow", batch_size=None,
                        num_cpus=READ_TASK_CPUS)
    if postprocess is not None:
        ds = ds.map(postprocess)
    return ds


def read_input(job: Union[JobSpec, str, os.PathLike, Mapping[str, Any]]):
    """The job's input as a Ray Dataset, through Ray Data's readers (see the module docstring)."""
    import ray

    from pipeline import inputs, storage, writer
    from pipeline.run import start_ray

    job = load(job)
    start_ray(job)
    fmt, files = inputs.list_input(job)
    urls = [f["url"] for f in files]
    cols = job.input.columns
    fs, _ = storage.pyarrow_filesystem(urls[0], job.input.storage)
    if fmt == "parquet":
        return ray.data.read_parquet(urls, filesystem=fs)
    if fmt == "images":
        root = storage.normalize_url(writer.input_root(job.input.uri, urls)).rstrip("/")
        ds = ray.data.read_binary_files(urls, filesystem=fs, include_paths=True)
        return ds.map_batches(_image_rows, fn_kwargs={"root": root, "columns": cols}, batch_format="pyarrow")
    reader = ray.data.read_csv if fmt == "csv" else ray.data.read_json
    ds = reader(urls, filesystem=fs, include_paths=True)
    return ds.map_batches(_manifest_rows, fn_kwargs={"columns": cols}, batch_format="pyarrow")


def _image_rows(batch: pa.Table, root: str, columns) -> pa.Table:
    from pipeline import storage

    paths = [storage.normalize_url(p) for p in batch.column("path").to_pylist()]
    ids = [p[len(root) + 1:] if p.startswith(root + "/") else posixpath.basename(p) for p in paths]
    return pa.table({columns.id: pa.array(ids, pa.string()), columns.image: batch.column("bytes")})


def _manifest_rows(batch: pa.Table, columns) -> pa.Table:
    """Relative image paths resolved against their manifest's folder; Ray's `path` column dropped."""
    from pipeline.inputs import resolve_image_column

    if columns.image in batch.column_names:
        batch = resolve_image_column(batch, columns.image, [posixpath.dirname(p) for p in batch.column("path").to_pylist()])
    return batch.drop_columns(["path"])
