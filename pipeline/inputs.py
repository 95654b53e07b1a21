"""Input formats besides Parquet shards: CSV and JSON Lines manifests, and folders (or globs) of image files.

`input.format` says which (`auto`: from the URI's suffix, else from what the folder holds: Parquet
files, else CSV / JSONL manifests, else image files). Every format becomes *shards* with stable
keys, so resume, fingerprints, per-shard commits and skip_existing work the same for all:

  parquet   one shard per file (pipeline/shards.py; unchanged);
  csv/jsonl one shard per manifest file: CSV through pyarrow's CSV reader (the one Ray Data's
            read_csv uses; the id, image and question columns are read as text), JSON Lines line by
            line (a column whose rows disagree in type, e.g. one image or a list of them, is kept). Image cells hold a path or URL (s3://, gs://, http(s)://, local),
            or a JSON list of them for multi-image rows (a CSV cell '["a.jpg", "b.jpg"]'); a relative
            path is relative to the manifest's folder;
  images    one shard per folder of image files (the files directly in it, sorted), cut into parts of
            input.images_per_shard; a row per file: id = its path relative to the input root, image =
            its URL, the question = input.prompt. A new folder (or new files at the end of the last
            part) is new work for skip_existing; a part whose files changed is redone.

The durable path reads each shard on its own, with its own schema, rather than through Ray Data's
readers, which unify schemas across files (one bad file would fail the run) and number rows per
block (resume needs a row's index in its shard). `pipeline.api.read_input` gives the Ray Data
readers' dataset for the Python entry point.
"""
from __future__ import annotations

import io
import json
import posixpath
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.shards import ShardInfo, ShardProblem, check_schema, describe
from schemas.job import InputColumns, JobSpec, StorageOptions, redact_url
from schemas.rows import READ_ERROR_COLUMN

SUFFIXES = {"parquet": (".parquet",), "csv": (".csv",), "jsonl": (".jsonl", ".ndjson", ".json")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_GROUP_ROWS = 1024  # rows per virtual row group of a manifest (the planner's unit of work)


def _suffix_of(url: str) -> str:
    return posixpath.splitext(url.lower().split("?", 1)[0])[1]


def detect_format(job: JobSpec, files: Sequence[dict]) -> str:
    """The job's input.format, or for `auto` the one the URI or its files say."""
    fmt = job.input.format
    if fmt != "auto":
        return fmt
    own = _suffix_of(storage.glob_root(job.input.uri) if not storage.has_glob(job.input.uri) else job.input.uri)
    for name, suffixes in SUFFIXES.items():
        if own in suffixes:
            return name
    if own in IMAGE_SUFFIXES:
        return "images"
    found = {_suffix_of(f["url"]) for f in files}
    if ".parquet" in found:
        return "parquet"
    tables = [name for name in ("csv", "jsonl") if found & set(SUFFIXES[name])]
    if len(tables) > 1:
        raise FileNotFoundError(f"{redact_url(job.input.uri)} holds both CSV and JSON Lines files: set input.format")
    if tables:
        return tables[0]
    if found & set(IMAGE_SUFFIXES):
        return "images"
    raise FileNotFoundError(f"{redact_url(job.input.uri)}: no .parquet, .csv, .jsonl or image files found")


def list_input(job: JobSpec) -> tuple[str, list[dict]]:
    """(format, the input's files of that format: url, size, version)."""
    files = storage.list_files(job.input.uri, job.input.storage)
    fmt = detect_format(job, files)
    suffixes = IMAGE_SUFFIXES if fmt == "images" else SUFFIXES[fmt]
    if storage.has_glob(job.input.uri) or len(files) == 1:  # a named file or pattern: what it names
        chosen = files if fmt != "images" else [f for f in files if _suffix_of(f["url"]) in suffixes]
    else:
        chosen = [f for f in files if _suffix_of(f["url"]) in suffixes]
    if not chosen:
        raise FileNotFoundError(f"{redact_url(job.input.uri)}: no {fmt} files found")
    return fmt, chosen


# ---------------------------------------------------------------------------------------------------
# Folders of images


def image_shards(job: JobSpec, files: Sequence[dict], root: str) -> list[ShardInfo]:
    """Virtual shards: the image files of each folder, sorted, in parts of input.images_per_shard."""
    per = job.input.images_per_shard
    folders: dict[str, list] = {}
    for f in files:
        folders.setdefault(posixpath.dirname(f["url"]), []).append(f)
    out = []
    root_norm = storage.normalize_url(root).rstrip("/")
    for folder in sorted(folders):
        members = sorted(folders[folder], key=lambda f: f["url"])
        for part, start in enumerate(range(0, len(members), per)):
            chunk = members[start:start + per]
            url = f"{folder}/images-{part:05d}"
            ids = tuple(_relative(f["url"], root_norm) for f in chunk)
            version = _digest([(i, f["size"], f["version"]) for i, f in zip(ids, chunk)])
            out.append(ShardInfo(url=url, key="", num_rows=len(chunk), row_groups=_groups(len(chunk)),
                                 size=sum(f["size"] or 0 for f in chunk), version=version, kind="images",
                                 files=tuple(f["url"] for f in chunk), ids=ids))
    return out


def _relative(url: str, root: str) -> str:
    url = storage.normalize_url(url)
    return url[len(root) + 1:] if url.startswith(root + "/") else posixpath.basename(url)


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _groups(rows: int) -> tuple:
    return tuple(min(TABLE_GROUP_ROWS, rows - s) for s in range(0, rows, TABLE_GROUP_ROWS))


def image_rows(info_files: Sequence[str], ids: Sequence[str], cols: InputColumns) -> pa.Table:
    return pa.table({cols.id: pa.array(list(ids), pa.string()), cols.image: pa.array(list(info_files), pa.string())})


# ---------------------------------------------------------------------------------------------------
# CSV / JSON Lines manifests


def load_manifest(url: str, fmt: str, cols: InputColumns, options: StorageOptions) -> pa.Table:
    """A whole manifest as a table: id, image and question columns as text (image cells that hold a JSON
    list become lists), relative image paths resolved against the manifest's folder."""
    import pyarrow.csv as pacsv

    def read() -> pa.Table:
        data = storage.read_bytes(url, options)
        if fmt == "csv":
            names = [c for c in (cols.id, cols.image, cols.question) if c]
            return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True, quoted_strings_can_be_null=False))
        return _jsonl_table(data)

    table = storage.with_retries(read, options.retry_deadline_s, f"reading {describe(url)}")
    if cols.image in table.column_names:
        base = posixpath.dirname(storage.normalize_url(url))
        table = resolve_image_column(table, cols.image, [base] * table.num_rows)
    return table


def resolve_image_column(table: pa.Table, column: str, folders: Sequence[str]) -> pa.Table:
    """The image column with JSON-list cells as lists and relative paths resolved against each row's
    manifest folder; a list column when any row has several images."""
    values = [_image_cell(v, f) for v, f in zip(table.column(column).to_pylist(), folders)]
    kind = pa.list_(pa.string()) if any(isinstance(v, list) for v in values) else pa.string()
    if kind != pa.string():
        values = [v if isinstance(v, list) or v is None else [v] for v in values]
    return table.set_column(table.column_names.index(column), column, pa.array(values, kind))


LINE_ERROR = "_line_error"


def _jsonl_table(data: bytes) -> pa.Table:
    """JSON Lines -> a table, line by line (a column whose rows disagree in type, e.g. an image that is a
    string in one row and a list in the next, becomes JSON text, which the image stage reads back).
    A line that is not UTF-8 is decoded with U+FFFD and its row gets an error (LINE_ERROR); a line that
    is not a JSON object makes the file unreadable (ValueError naming the line)."""
    records, problems = [], []
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line, problem = raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            line, problem = raw.decode("utf-8", errors="replace"), f"line {number}: invalid UTF-8 at byte {exc.start}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number} is not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is not a JSON object")
        records.append(record)
        problems.append(problem)
    names: dict = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())
    if any(problems):
        columns[LINE_ERROR] = pa.array(problems, pa.string())
    return pa.table(columns) if columns else pa.table({})


def _image_cell(value, base: str):
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return value  # the image stage reports it as a bad path, on this row only
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    return _resolve(value, base)


def _resolve(value, base: str):
    if not isinstance(value, str) or not value or "://" in value or value.startswith(("/", "~")):
        return value
    return storage.join_url(base, value)


def inspect_manifest(url: str, key: str, fmt: str, cols: InputColumns, options: StorageOptions) -> ShardInfo:
    """Read and check one manifest (ShardProblem: one line)."""
    try:
        meta = storage.info(url, options)
        table = load_manifest(url, fmt, cols, options)
    except storage.TransientStorageError as exc:
        raise ShardProblem(f"could not be read ({exc}); a re-run retries it") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is one clear line
        name = "CSV" if fmt == "csv" else "JSON Lines"
        raise ShardProblem(f"not a readable {name} file ({type(exc).__name__}: {str(exc)[:200]})") from None
    check_schema(table.schema, cols)
    return ShardInfo(url=url, key=key, num_rows=table.num_rows, row_groups=_groups(table.num_rows), size=meta.get("size"),
                     version=None if meta.get("version") is None else str(meta.get("version")), kind=fmt)


def unit_blocks(unit: dict, cols: InputColumns, options: StorageOptions, block_rows: int) -> Iterator[pa.Table]:
    """The rows of any work unit (Parquet, manifest or image shard), in tagged blocks."""
    from pipeline.shards import read_rows

    if unit.get("kind", "parquet") == "parquet":
        return read_rows(unit["url"], unit["key"], unit["row_groups"], unit["first_row"], unit["wanted"], options, block_rows)
    return read_unit_rows(unit, cols, options, block_rows)


def read_unit_rows(unit: dict, cols: InputColumns, options: StorageOptions, block_rows: int) -> Iterator[pa.Table]:
    """The rows of one work unit of a manifest or image shard, in blocks, tagged like Parquet rows."""
    from pipeline.shards import _tagged

    first = unit["first_row"]
    if unit["kind"] == "images":
        table = image_rows(unit["files"], unit["ids"], cols)  # the unit's own rows, from `first`
    else:
        table = load_manifest(unit["url"], unit["kind"], cols, options).slice(first, unit["rows"])
    rows = pa.array(range(first, first + table.num_rows), pa.int64())
    if unit["wanted"] is not None:
        wanted = set(unit["wanted"])
        keep = pa.array([r in wanted for r in rows.to_pylist()])
        table, rows = table.filter(keep), rows.filter(keep)
    line_errors = None
    if LINE_ERROR in table.column_names:
        line_errors = table.column(LINE_ERROR)
        table = table.drop_columns([LINE_ERROR])
    for start in range(0, table.num_rows, block_rows):
        block = _tagged(table.slice(start, block_rows), unit["key"], rows.slice(start, block_rows))
        if line_errors is not None:
            index = block.column_names.index(READ_ERROR_COLUMN)
            merged = pc.coalesce(line_errors.slice(start, block_rows), block.column(READ_ERROR_COLUMN))
            block = block.set_column(index, READ_ERROR_COLUMN, merged)
        yield block
