"""Helpers shared by the pipeline's integration tests: job files, outputs, counting rows."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def job_overrides(input_uri, output_uri, model_dirs, *extra) -> list[str]:
    base, glimpse = model_dirs
    return [f"input.uri={input_uri}", f"output.uri={output_uri}", f"model.base={base}",
            f"model.glimpse_modules={glimpse}", "sampling.max_new_tokens=4", "image.max_source_pixels=1000000", *extra]


def job_for(input_uri, output_uri, model_dirs, *extra):
    from pipeline.jobfile import load_job

    return load_job(REPO / "jobs" / "demo.yaml", job_overrides(input_uri, output_uri, model_dirs, *extra))


def read_output(output_dir: Path) -> pa.Table:
    """The committed output as a user reads it: every top-level *.parquet file."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(Path(output_dir).glob("*.parquet"))], promote_options="permissive")


def staged_rows(output_dir: Path) -> int:
    """Rows durable in `_staging/` of shards not yet committed. A shard that has its record but still
    has staging was killed between writing the record and removing its staging: its rows count once,
    as committed (the next run only finishes the clean-up)."""
    committed = {p.stem for p in Path(output_dir).glob("_shards/*.json")}
    return sum(pq.read_metadata(p).num_rows for p in Path(output_dir).glob("_staging/*/*/*.parquet")
               if p.parent.parent.name not in committed)


def committed_rows(output_dir: Path) -> int:
    return sum(json.loads(p.read_text())["stats"]["rows_total"] for p in Path(output_dir).glob("_shards/*.json"))
