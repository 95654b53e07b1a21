"""Parquet shards of the toy world in the pipeline's input format (``SHARD_SCHEMA``).

``write_shards(config, n_rows, out)`` writes rows 0..n_rows-1 of ``config``'s world as
``part-00000.parquet``, ... to a local directory, a URI (``s3://bucket/prefix``) or a path on a given
pyarrow filesystem. Columns: ``id``, ``image`` (PNG bytes), ``question`` plus passthrough columns
(the generator's answer, question type, object count, relevant boxes, objects as JSON). A world with
two-image rows (``two_image_share > 0``) writes ``MULTI_SHARD_SCHEMA``: ``image`` is a list of PNG
bytes (one or two per row; the pipeline reads a list as a multi-image row) and ``target_image`` says
which image the question, the boxes and the objects are about.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from workers.toyworld.world import Sample, WorldConfig, generate_samples, row_images

logger = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # PNG bytes
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("qtype", pa.string(), nullable=False),
    pa.field("num_objects", pa.int32(), nullable=False),
    # The relevant boxes, normalised xyxy.
    pa.field("boxes", pa.list_(pa.list_(pa.float32())), nullable=False),
    pa.field("objects", pa.string(), nullable=False),  # JSON list of SceneObject.to_dict()
])


MULTI_SHARD_SCHEMA = pa.schema(
    [pa.field("image", pa.list_(pa.binary()), nullable=False) if f.name == "image" else f for f in SHARD_SCHEMA]
    + [pa.field("target_image", pa.int32(), nullable=False)])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def samples_to_table(samples: Iterable[Sample], multi: bool = False) -> pa.Table:
    """Rows of ``SHARD_SCHEMA``, or with ``multi`` of ``MULTI_SHARD_SCHEMA`` (any two-image row needs it)."""
    samples = list(samples)
    if not multi and any(s.images for s in samples):
        raise ValueError("two-image rows need samples_to_table(..., multi=True)")
    rows = [{"id": s.id, "image": [png_bytes(i) for i in row_images(s)] if multi else png_bytes(s.image),
             "question": s.question, "answer": s.answer, "qtype": s.qtype, "num_objects": s.num_objects,
             "boxes": s.boxes, "objects": json.dumps(s.objects), **({"target_image": s.target} if multi else {})}
            for s in samples]
    return pa.Table.from_pylist(rows, schema=MULTI_SHARD_SCHEMA if multi else SHARD_SCHEMA)


def _resolve_filesystem(out: str | os.PathLike,
                        filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    out = os.fspath(out)
    if filesystem is not None:
        return filesystem, out
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out)


def write_shards(config: WorldConfig, n_rows: int, out: str | os.PathLike,
                 rows_per_shard: int = 1000,
                 filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Write rows 0..n_rows-1 as ``part-00000.parquet``, ... (``rows_per_shard`` each, the last
    one shorter) under ``out``: a local directory (created), a URI such as ``s3://bucket/prefix``,
    or a path on ``filesystem``. Returns the written paths on that filesystem."""
    if n_rows < 0 or rows_per_shard < 1:
        raise ValueError(f"need n_rows >= 0 and rows_per_shard >= 1, "
                         f"got {n_rows}, {rows_per_shard}")
    fs, root = _resolve_filesystem(out, filesystem)
    fs.create_dir(root, recursive=True)
    paths = []
    for shard, start in enumerate(range(0, n_rows, rows_per_shard)):
        count = min(rows_per_shard, n_rows - start)
        path = f"{root.rstrip('/')}/part-{shard:05d}.parquet"
        table = samples_to_table(generate_samples(config, count, start), multi=config.two_image_share > 0)
        pq.write_table(table, path, filesystem=fs)
        logger.info("wrote %s (%d rows from index %d)", path, count, start)
        paths.append(path)
    return paths
