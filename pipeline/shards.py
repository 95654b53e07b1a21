"""Input shards, one at a time: inspect (schema, row count, change token) and read row ranges.

Each shard is read with its own schema, never unified with the others' (Ray Data's `read_parquet`
does unify, so one shard whose column types differ used to fail the whole run, and a URL-string
image column next to a bytes one was silently coerced). Consequences:
  - `inspect_shard` is the per-shard gate at plan time: a file that cannot be read, lacks the id or
    image column, or holds a type the job cannot use becomes ONE failed-shard line; the rest go on;
  - `read_rows` is the read stage: it streams the rows of one unit (a shard's row groups, minus the
    rows already durable) as small blocks, each block tagged with `_key` and `_row` (the row's index
    in its shard: the identity used for resume and de-duplication) and `_read_error`;
  - string cells that are not valid UTF-8 are decoded per row (lossily, U+FFFD) and the row gets a
    clear `_read_error` instead of a `UnicodeDecodeError` that would lose the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from schemas.job import InputColumns, StorageOptions, redact_url
from schemas.rows import KEY_COLUMN, READ_ERROR_COLUMN, ROW_COLUMN, one_line


@dataclass(frozen=True)
class ShardInfo:
    """What the planner knows about one readable input shard."""

    url: str
    key: str
    num_rows: int
    row_groups: tuple  # rows per row group, in file order
    size: Optional[int]
    version: Optional[str]  # etag (object stores) or mtime (local): changes when the content does
    kind: str = "parquet"  # parquet, csv, jsonl or images (pipeline/inputs.py)
    files: tuple = ()  # images: the files of this shard, one row each
    ids: tuple = ()  # images: their ids (paths relative to the input root)


class ShardProblem(ValueError):
    """A shard the job cannot use; the message is the one line the user sees."""


def _image_type_ok(type_: pa.DataType) -> bool:
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_string(type_) \
            or pa.types.is_large_string(type_) or pa.types.is_fixed_size_binary(type_):
        return True
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _image_type_ok(type_.value_type)
    if pa.types.is_struct(type_):
        names = {type_.field(i).name for i in range(type_.num_fields)}
        return bool(names & {"bytes", "path"})
    return False


def _text_type_ok(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_binary(type_) \
        or pa.types.is_large_binary(type_) or pa.types.is_null(type_)


def check_schema(schema: pa.Schema, cols: InputColumns) -> None:
    """Raise ShardProblem if the shard's columns do not fit the job."""
    missing = [c for c in (cols.id, cols.image) if c not in schema.names]
    if missing:
        raise ShardProblem(f"missing column(s) {missing} (has {schema.names}); set input.columns")
    id_type = schema.field(cols.id).type
    if pa.types.is_nested(id_type) or pa.types.is_binary(id_type) or pa.types.is_large_binary(id_type):
        raise ShardProblem(f"id column {cols.id!r} has type {id_type}; ids must be scalar strings or numbers")
    image_type = schema.field(cols.image).type
    if not _image_type_ok(image_type):
        raise ShardProblem(f"image column {cols.image!r} has type {image_type}; expected bytes, a URL/path "
                           "string, a {bytes, path} struct or a list of these")
    if cols.question and cols.question in schema.names and not _text_type_ok(schema.field(cols.question).type):
        raise ShardProblem(f"question column {cols.question!r} has type {schema.field(cols.question).type}; expected text")


def inspect_shard(url: str, key: str, cols: InputColumns, options: StorageOptions) -> ShardInfo:
    """Footer + object metadata of one shard (no row data is read). Raises ShardProblem."""
    try:
        meta = storage.info(url, options)
        schema, groups = storage.with_retries(lambda: _footer(url, options), options.retry_deadline_s,
                                              f"reading the footer of {describe(url)}")
    except storage.TransientStorageError as exc:
        raise ShardProblem(f"could not be read ({one_line(exc, 300)}); a re-run retries it") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise ShardProblem(f"not a readable Parquet file ({type(exc).__name__}: {one_line(exc, 200)})") from None
    check_schema(schema, cols)
    return ShardInfo(url=url, key=key, num_rows=sum(groups), row_groups=groups, size=meta.get("size"),
                     version=None if meta.get("version") is None else str(meta.get("version")))


def _footer(url: str, options: StorageOptions) -> tuple[pa.Schema, tuple[int, ...]]:
    fs, path = storage.pyarrow_filesystem(url, options)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.schema_arrow, tuple(parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups))


def row_group_spans(info: ShardInfo) -> list[tuple[int, int, int]]:
    """[(row_group, first_row, end_row)] of a shard."""
    spans, start = [], 0
    for index, rows in enumerate(info.row_groups):
        spans.append((index, start, start + rows))
        start += rows
    return spans


def read_rows(url: str, key: str, row_groups: Sequence[int], first_row: int, wanted: Optional[Sequence[int]],
              options: StorageOptions, block_rows: int) -> Iterator[pa.Table]:
    """Blocks of at most `block_rows` rows of the given row groups (contiguous, starting at shard row
    `first_row`), keeping only the shard rows in `wanted` (None = all), with `_key`, `_row` and
    `_read_error` appended.

    Each block is fetched under `storage.with_retries` (deadline `options.retry_deadline_s`, counted
    afresh for every block): a transient fault mid-file reopens the shard and resumes after the rows
    already passed on, so a reset costs a re-read, never a lost or repeated row. A fault that outlasts
    the deadline raises TransientStorageError (Ray then retries the whole task); permanent errors
    propagate at once."""
    wanted_set = None if wanted is None else set(wanted)
    reader = _ResumableBatches(url, options, list(row_groups), block_rows)
    row = first_row
    try:
        while True:
            batch = storage.with_retries(reader.next_batch, options.retry_deadline_s,
                                         f"reading rows of {describe(url)} after row {row}")
            if batch is None:
                return
            table = pa.Table.from_batches([batch])
            rows = pa.array(range(row, row + table.num_rows), pa.int64())
            row += table.num_rows
            if wanted_set is not None:
                keep = pa.array([r in wanted_set for r in rows.to_pylist()])
                table, rows = table.filter(keep), rows.filter(keep)
            if table.num_rows:
                yield _tagged(table, key, rows)
    finally:
        reader.close()


def _open_batches(url: str, options: StorageOptions, row_groups: list, block_rows: int):
    """(file handle, record-batch iterator) over the row groups of one shard."""
    fs, path = storage.pyarrow_filesystem(url, options)
    handle = fs.open_input_file(path)
    try:
        batches = pq.ParquetFile(handle).iter_batches(batch_size=block_rows, row_groups=row_groups, use_threads=False)
    except BaseException:
        handle.close()
        raise
    return handle, batches


class _ResumableBatches:
    """The record batches of some row groups, one `next_batch()` at a time. After a failed call the
    next one reopens the file and skips the rows already returned (Parquet batch boundaries are the
    same for the same file, row groups and batch size)."""

    def __init__(self, url: str, options: StorageOptions, row_groups: list, block_rows: int):
        self.url, self.options, self.row_groups, self.block_rows = url, options, row_groups, block_rows
        self.returned = 0  # rows handed out so far
        self._handle = self._batches = None

    def next_batch(self) -> Optional[pa.RecordBatch]:
        try:
            if self._batches is None:
                self._handle, self._batches = _open_batches(self.url, self.options, self.row_groups, self.block_rows)
                skipped = 0
                while skipped < self.returned and (batch := next(self._batches, None)) is not None:
                    skipped += batch.num_rows
                if skipped != self.returned:  # cannot happen with a file that did not change
                    raise ShardProblem(f"{describe(self.url)} changed while it was read")
            batch = next(self._batches, None)
        except BaseException:
            self.close()
            raise
        if batch is not None:
            self.returned += batch.num_rows
        return batch

    def close(self) -> None:
        handle, self._handle, self._batches = self._handle, None, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass


def _tagged(table: pa.Table, key: str, rows: pa.Array) -> pa.Table:
    table, errors = decode_text_columns(table)
    table = table.append_column(KEY_COLUMN, pa.array([key] * table.num_rows, pa.string()))
    table = table.append_column(ROW_COLUMN, rows)
    return table.append_column(READ_ERROR_COLUMN, pa.array(errors, pa.string()))


def decode_text_columns(table: pa.Table) -> tuple[pa.Table, list[Optional[str]]]:
    """Validate every string column per row; invalid UTF-8 is replaced (U+FFFD) and reported.

    Returns the repaired table and one error message (or None) per row."""
    errors: list[Optional[str]] = [None] * table.num_rows
    for index, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(index)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = pc.cast(column, pa.large_binary() if pa.types.is_large_string(field.type) else pa.binary()).to_pylist()
        fixed = []
        for i, value in enumerate(raw):
            if value is None:
                fixed.append(None)
                continue
            try:
                fixed.append(value.decode("utf-8"))
            except UnicodeDecodeError as exc:
                fixed.append(value.decode("utf-8", errors="replace"))
                errors[i] = errors[i] or f"column {field.name!r}: invalid UTF-8 at byte {exc.start}"
        table = table.set_column(index, field, pa.array(fixed, field.type))
    return table, errors


def describe(url: str) -> str:
    return redact_url(url) or url
