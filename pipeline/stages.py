"""The Ray Data stages around the model stage (plain functions, run in Ray tasks).

  read_stage:  work units (a shard's row groups, minus rows already durable) -> blocks of input rows
               read with the shard's own schema -> the image stage -> blocks in ONE internal schema
               (`BLOCK_SCHEMA`): the row's identity (`_key`, `_row`), its id + passthrough columns
               packed as a 1-row Arrow IPC blob (so shards whose column types differ never meet in a
               schema unification), the image-stage columns;
  [GlimpseUDF: the model stage, `workers.generate`]
  write_stage: processed rows -> staged Parquet parts (`pipeline.writer.write_parts`) -> stats rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import inputs, writer
from pipeline.images import ImageStageConfig, decode_batch
from schemas.job import JobSpec, StorageOptions
from schemas.rows import (
    IMAGE_TOKENS_COLUMN,
    IMAGES_COLUMN,
    KEY_COLUMN,
    OUTPUT_SCHEMA,
    PASSTHROUGH_COLUMN,
    PIPELINE_SCHEMA,
    PROMPT_COLUMN,
    PRUNE_COLUMN,
    SAMPLING_COLUMN,
    READ_ERROR_COLUMN,
    ROW_COLUMN,
    STAGE_SCHEMA,
    STATUS_ERROR,
    TRANSIENT_COLUMN,
)

_FIXED = {f.name: f for f in OUTPUT_SCHEMA}
BLOCK_SCHEMA = pa.schema(
    [PIPELINE_SCHEMA.field(n) for n in (KEY_COLUMN, ROW_COLUMN, PASSTHROUGH_COLUMN, TRANSIENT_COLUMN)]
    + [_FIXED[n] for n in ("status", "error", "visual_tokens", "image_s")]
    + list(STAGE_SCHEMA)
)
_IMAGE_STAGE_COLUMNS = {"status", "error", "visual_tokens", "image_s", TRANSIENT_COLUMN} | set(STAGE_SCHEMA.names)


@dataclass(frozen=True)
class ReadContext:
    """What a read task needs (picklable)."""

    image: ImageStageConfig
    storage: StorageOptions
    block_rows: int
    env: Mapping[str, str]


def with_env(env: Mapping[str, str]) -> None:
    """Credential variables the job names, for workers started before they were set."""
    for name, value in env.items():
        os.environ.setdefault(name, value)


def read_stage(units: pa.Table, context: ReadContext) -> Iterator[pa.Table]:
    """One or more work units -> blocks in `BLOCK_SCHEMA` (a generator: blocks stream out)."""
    with_env(context.env)
    for unit in units.to_pylist():
        for block in inputs.unit_blocks(unit, context.image.columns, context.storage, context.block_rows):
            yield to_block(block, context.image)


def to_block(block: pa.Table, config: ImageStageConfig) -> pa.Table:
    """Input rows (with `_key`, `_row`, `_read_error`) -> the image stage -> `BLOCK_SCHEMA`."""
    raw = block.drop_columns([KEY_COLUMN, ROW_COLUMN, READ_ERROR_COLUMN])
    decoded = decode_batch(raw, config)
    passthrough = decoded.select([c for c in decoded.column_names if c not in _IMAGE_STAGE_COLUMNS])
    read_error = block.column(READ_ERROR_COLUMN)
    failed = pc.invert(pc.is_null(read_error))
    status = pc.if_else(failed, pa.scalar(STATUS_ERROR), decoded.column("status"))
    error = pc.if_else(failed, read_error, decoded.column("error"))
    transient = decoded.column(TRANSIENT_COLUMN) if TRANSIENT_COLUMN in decoded.column_names else pa.array([False] * block.num_rows)
    columns = {
        KEY_COLUMN: block.column(KEY_COLUMN), ROW_COLUMN: block.column(ROW_COLUMN),
        PASSTHROUGH_COLUMN: writer.passthrough_blobs(passthrough), TRANSIENT_COLUMN: transient,
        "status": status, "error": error, "visual_tokens": decoded.column("visual_tokens"), "image_s": decoded.column("image_s"),
        PROMPT_COLUMN: decoded.column(PROMPT_COLUMN), IMAGES_COLUMN: decoded.column(IMAGES_COLUMN),
        IMAGE_TOKENS_COLUMN: decoded.column(IMAGE_TOKENS_COLUMN), PRUNE_COLUMN: decoded.column(PRUNE_COLUMN),
        SAMPLING_COLUMN: decoded.column(SAMPLING_COLUMN),
    }
    arrays = [pc.cast(columns[f.name], f.type) for f in BLOCK_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=BLOCK_SCHEMA)


def write_stage(batch: pa.Table, context: writer.PartContext, env: Mapping[str, str]) -> pa.Table:
    with_env(env)
    return writer.write_parts(batch, context)


def model_stage(ds, job: JobSpec, actors, env: Mapping[str, str], block_rows: int):
    """The GlimpseUDF actor pool over blocks in `BLOCK_SCHEMA` (the CLI's plan and `pipeline.api.annotate`)."""
    import ray

    from workers.generate import GlimpseUDF

    ahead = job.resources.blocks_ahead_per_actor
    # Continuous scheduler: the blocks in flight run as concurrent calls feeding the actor's one running
    # batch (workers.generate.EngineLoop); static: one call at a time, the others queued.
    calls = {"max_concurrent_calls_per_actor": ahead, "enable_true_multi_threading": True} \
        if job.batching.scheduler == "continuous" and ahead > 1 else {}
    return ds.map_batches(
        GlimpseUDF, fn_constructor_kwargs={"job": job, "env": dict(env)}, batch_format="pyarrow", batch_size=block_rows,
        compute=ray.data.ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors,
                                           max_tasks_in_flight_per_actor=ahead, **calls),
        num_gpus=actors.num_gpus, num_cpus=actors.num_cpus,
        **({"accelerator_type": job.resources.accelerator_type} if job.resources.accelerator_type else {}),
    )
