"""Stage 1 (CPU): load, guard, decode, convert and resize each row's images; count visual tokens.

Batch format: a `pyarrow.Table` in and out (Ray `map_batches(..., batch_format="pyarrow")`; a dict of
column lists is accepted too). Arrow keeps binary and nested passthrough columns exactly as read; a
pandas round trip would turn nullable ints into floats and copy every image.

Contract (columns, see `schemas.rows`):
  in:  the input columns; `config.columns` names the id, image and question columns.
  out: `id` (the id column, renamed) + passthrough columns (clashing names get an `input_` prefix;
       the question column stays; the image column is dropped when it holds bytes and kept when it
       holds URLs/paths) + `status`, `error`, `visual_tokens`, `image_s`, `_transient` + stage columns
       `_prompt`, `_images` (raw RGB frames per image, `schemas.rows.encode_frame`), `_image_tokens`.
Rows in = rows out, same order. A bad row never raises: it gets status "error" and a one-line
message naming the image index and the numbers ("image 0: 20000x20000 = 400000000 pixels exceeds
image.max_source_pixels 100000000").

`_transient` (bool) is True only for an error row whose image read failed for a transient reason
(throttling, 5xx, reset, timeout) that outlasted `storage.retry_deadline_s`: such a row must not mark
its shard complete, so a re-run retries it. Permanent problems (not found, too large, corrupt image)
are error rows with `_transient` False. Image URLs/paths (http(s)://, s3://, gs://, local) are read
through `pipeline.storage` (one filesystem per URL + the input's `StorageOptions`, retried with
backoff). Within one batch, once a read has exhausted its deadline, later reads in that batch get a
single attempt, so a dead image host costs one deadline per batch, not one per row.

Per image: bytes or URL/path (a list of either for multi-image rows; Hugging Face `{bytes, path}`
structs too) -> size cap (max_image_bytes, from metadata before download) -> header-only open ->
decompression-bomb guard (max_source_pixels from the header, before any pixel is decoded) -> JPEG
draft decoding near the target size -> EXIF orientation -> RGB (alpha composited on white, 16-bit
scaled) -> `smart_resize` -> raw RGB frame. visual_tokens = sum over images of (h/28) * (w/28).
"""
from __future__ import annotations

import io
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Union

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import storage
from schemas.job import IMAGE_FACTOR, KEEP_RATIO_MODES, ImageSpec, InputColumns, JobSpec, StorageOptions, redact_url
from schemas.rows import (
    IMAGE_TOKENS_COLUMN,
    IMAGES_COLUMN,
    OUTPUT_SCHEMA,
    PIPELINE_SCHEMA,
    PROMPT_COLUMN,
    PRUNE_COLUMN,
    SAMPLING_COLUMN,
    STAGE_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    TRANSIENT_COLUMN,
    encode_frame,
    one_line,
    passthrough_renames,
)

MAX_ASPECT_RATIO = 200  # Qwen2.5-VL refuses more extreme images
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transpose/rotate 90/270: width and height swap
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class RowError(Exception):
    """A problem with one row; its message becomes the row's `error`. `transient`: a storage fault that
    outlasted the retry deadline (a re-run may succeed)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class ImageStageConfig:
    """What the image stage needs from the job (picklable, so Ray can ship it to workers)."""

    columns: InputColumns
    image: ImageSpec
    prompt: Optional[str] = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    pruning_mode: str = "none"  # what a per-row pruning value means (threshold or keep ratio)

    @classmethod
    def from_job(cls, job: JobSpec) -> "ImageStageConfig":
        return cls(columns=job.input.columns, image=job.image, prompt=job.input.prompt, storage=job.input.storage,
                   pruning_mode=job.pruning.mode)


@dataclass(frozen=True)
class PreparedRow:
    """One row after the image stage: either prompt + images, or an error."""

    prompt: Optional[str] = None
    images: tuple[bytes, ...] = ()
    image_tokens: tuple[int, ...] = ()
    error: Optional[str] = None
    transient: bool = False

    @property
    def visual_tokens(self) -> int:
        return sum(self.image_tokens)


# ---------------------------------------------------------------------------------------------------
# The resize rule


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: (height, width) -> (h, w), both multiples of `factor`.

    Rounds each side to the nearest multiple of `factor` (at least one `factor`), then, if the area
    falls outside [min_pixels, max_pixels], rescales both sides by the same factor (floor when
    shrinking, ceil when growing) so the aspect ratio is kept. Invariants: h % factor == w % factor
    == 0; h * w <= max_pixels whenever max_pixels >= factor**2 (an extra step shortens the long side
    when a side is already at its minimum); h * w >= min_pixels unless that would break max_pixels.
    Raises ValueError for non-positive sides or an aspect ratio above 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 exceeds {MAX_ASPECT_RATIO}:1")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h * w > max_pixels:  # a side clamped to `factor` (or ceil overshot): shorten the long side
        if h >= w:
            h = max(factor, max_pixels // w // factor * factor)
        else:
            w = max(factor, max_pixels // h // factor * factor)
    return h, w


def visual_tokens(height: int, width: int, factor: int = IMAGE_FACTOR) -> int:
    """Visual tokens of a resized image (after the 2x2 merge): one per factor x factor cell."""
    return (height // factor) * (width // factor)


# ---------------------------------------------------------------------------------------------------
# One image


def image_sources(value: Any) -> list[Union[bytes, str]]:
    """Normalize a cell to a list of image sources (bytes or URL/path strings)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_one_source(item, index) for index, item in enumerate(value)]
    return [_one_source(value, 0)]


def _one_source(value: Any, index: int) -> Union[bytes, str]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
        raise RowError(f"image {index}: struct has neither bytes nor path")
    raise RowError(f"image {index}: unsupported value type {type(value).__name__} (expected bytes or a URL/path)")


def load_source(source: Union[bytes, str], index: int, config: ImageStageConfig) -> bytes:
    """Encoded bytes of one image, enforcing image.max_image_bytes."""
    limit = config.image.max_image_bytes
    if isinstance(source, bytes):
        if not source:
            raise RowError(f"image {index}: empty bytes")
        if len(source) > limit:
            raise RowError(f"image {index}: {len(source)} bytes exceeds image.max_image_bytes {limit}")
        return source
    shown = redact_url(source)
    if not source.strip():
        raise RowError(f"image {index}: empty URL/path")
    try:
        return storage.read_bytes(source, config.storage, max_bytes=limit)
    except FileNotFoundError:
        raise RowError(f"image {index}: {shown} not found") from None
    except IsADirectoryError:
        raise RowError(f"image {index}: {shown} is a directory") from None
    except storage.TooLargeError as exc:
        raise RowError(f"image {index}: {shown}: {exc}") from None
    except storage.TransientStorageError as exc:
        # "read <url>: transient storage error persisted for 3.1 s over 2 attempt(s) (...): <last error>"
        raise RowError(f"image {index}: {one_line(exc, 400)}", transient=True) from None
    except (OSError, storage.StorageError) as exc:
        raise RowError(f"image {index}: cannot read {shown}: {one_line(exc, 300)}") from None


def decode_image(data: bytes, index: int, config: ImageStageConfig) -> Image.Image:
    """Decode, orient, convert to RGB and resize one image; guards run before pixels are decoded."""
    spec = config.image
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS; our own limit (max_source_pixels) decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise RowError(f"image {index}: {_bomb_message(exc, spec.max_source_pixels)}") from None
    except UnidentifiedImageError:
        raise RowError(f"image {index}: cannot identify image file (corrupt or unsupported format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RowError(f"image {index}: cannot open ({one_line(exc, 300)})") from None
    width, height = image.size
    if width * height > spec.max_source_pixels:
        raise RowError(
            f"image {index}: {width}x{height} = {width * height} pixels exceeds "
            f"image.max_source_pixels {spec.max_source_pixels}"
        )
    swapped = _orientation(image) in _SWAPPING_ORIENTATIONS  # EXIF in the header (JPEG)
    target_h, target_w = _target(height, width, swapped, index, spec)
    try:
        # JPEG only: decode at the smallest 1/2^k scale still >= the target (file orientation).
        image.draft(None, (target_h, target_w) if swapped else (target_w, target_h))
        image.load()
        loaded = image.size
        image = to_rgb(_upright(image))
    except (OSError, ValueError, SyntaxError) as exc:
        raise RowError(f"image {index}: cannot decode ({one_line(exc, 300)})") from None
    if (image.size != loaded) != swapped:  # EXIF found only after the pixels (PNG eXIf chunk)
        target_h, target_w = _target(height, width, not swapped, index, spec)
    if image.size != (target_w, target_h):
        image = image.resize((target_w, target_h), Image.Resampling.BICUBIC)
    return image


def _target(height: int, width: int, turned: bool, index: int, spec: ImageSpec) -> tuple[int, int]:
    """smart_resize of the upright image; `turned`: EXIF rotates by 90/270 degrees."""
    try:
        return smart_resize(*((width, height) if turned else (height, width)), spec.min_pixels, spec.max_pixels)
    except ValueError as exc:
        raise RowError(f"image {index}: {exc}") from None


def _bomb_message(exc: Exception, max_source_pixels: int) -> str:
    """Pillow refuses headers over 2x Image.MAX_IMAGE_PIXELS inside Image.open, before our own check
    can run; restate its numbers next to ours (fall back to its text if the wording changes)."""
    numbers = re.findall(r"\((\d+) pixels\)|limit of (\d+) pixels", str(exc))
    declared = next((a for a, _ in numbers if a), None)
    pillow_limit = next((b for _, b in numbers if b), None)
    if declared is None or pillow_limit is None:
        return f"decompression bomb guard: {one_line(exc, 300)}"
    return (f"header declares {declared} pixels, over the decompression-bomb limit "
            f"(image.max_source_pixels {max_source_pixels}; Pillow refuses more than {pillow_limit})")


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16-bit/int/float scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale one channel of 16-bit/int/float samples to 0..255 (a plain clip would saturate to white)."""
    values = pixels.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if pixels.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif (pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2) or (low >= 0 and 255 < high <= 65535):
        values = values / 257.0
    elif low < 0 or high > 255:
        values = (values - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# One row


def resolve_prompt(question: Any, default_prompt: Optional[str]) -> str:
    """The row's prompt: its question, else the job's prompt; neither is a row error."""
    if question is not None and not isinstance(question, str):
        raise RowError(f"question is a {type(question).__name__}, expected text")
    if question is not None and question.strip():
        return question
    if default_prompt and default_prompt.strip():
        return default_prompt
    raise RowError("empty question and no input.prompt to fall back on")


def prepare_row(image_value: Any, question: Any, config: ImageStageConfig) -> PreparedRow:
    """Prompt + resized image frames for one row, or a `PreparedRow` carrying a one-line error."""
    try:
        prompt = resolve_prompt(question, config.prompt)
        sources = image_sources(image_value)
        if not sources:
            raise RowError("no image (the image cell is null or empty)")
        if len(sources) > config.image.max_images_per_row:
            raise RowError(f"{len(sources)} images exceeds image.max_images_per_row {config.image.max_images_per_row}")
        images, tokens = [], []
        for index, source in enumerate(sources):
            image = decode_image(load_source(source, index, config), index, config)
            images.append(encode_frame(image))
            tokens.append(visual_tokens(image.height, image.width))
        return PreparedRow(prompt=prompt, images=tuple(images), image_tokens=tuple(tokens))
    except RowError as exc:
        return PreparedRow(error=one_line(exc), transient=exc.transient)
    except Exception as exc:  # noqa: BLE001 - a bad row must become an error row, never kill the batch
        return PreparedRow(error=one_line(f"unexpected {type(exc).__name__}: {exc}"))


# ---------------------------------------------------------------------------------------------------
# One batch


def decode_batch(batch: Union[pa.Table, Mapping[str, list]], config: ImageStageConfig) -> pa.Table:
    """The image stage over a batch: see the module docstring for the column contract.

    Raises ValueError only for a configuration problem (the id or image column is missing), never
    for a bad row.
    """
    table = batch if isinstance(batch, pa.Table) else pa.table(dict(batch))
    cols = config.columns
    missing = [name for name in (cols.id, cols.image, cols.pruning, cols.sampling) if name and name not in table.column_names]
    if missing:
        raise ValueError(f"input column(s) {missing} not found (have {table.column_names}); set input.columns")
    has_question = cols.question is not None and cols.question in table.column_names
    questions = table.column(cols.question).to_pylist() if has_question else [None] * table.num_rows
    rows, seconds = [], []
    for image_value, question in zip(table.column(cols.image).to_pylist(), questions):
        start = time.perf_counter()
        rows.append(prepare_row(image_value, question, config))
        seconds.append(time.perf_counter() - start)
        if rows[-1].transient and config.storage.retry_deadline_s > 0:  # see module docstring
            config = replace(config, storage=config.storage.model_copy(update={"retry_deadline_s": 0.0}))
    prunes = [None] * table.num_rows
    if cols.pruning:
        for i, value in enumerate(table.column(cols.pruning).to_pylist()):
            prunes[i], problem = row_pruning_value(value, config.pruning_mode, cols.pruning)
            if problem and not rows[i].error:
                rows[i] = PreparedRow(error=problem)
    samplings = [None] * table.num_rows
    if cols.sampling:
        for i, value in enumerate(table.column(cols.sampling).to_pylist()):
            samplings[i], problem = row_sampling_value(value, cols.sampling)
            if problem and not rows[i].error:
                rows[i] = PreparedRow(error=problem)
    return _with_stage_columns(_passthrough(table, cols), rows, seconds, prunes, samplings)


def row_sampling_value(value, column: str) -> tuple[Optional[str], Optional[str]]:
    """A row's own decoding settings (a JSON object string, or a struct/map) -> (checked compact JSON,
    None), or (None, one-line problem). Null or empty = the job's."""
    from pydantic import ValidationError

    from schemas.job import RowSamplingSpec

    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    try:
        data = json.loads(value) if isinstance(value, (str, bytes)) else value
        if isinstance(data, list) and not isinstance(value, (str, bytes)):  # a map column: [(key, value), ...]
            data = dict(data)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        data = {k: v for k, v in data.items() if v is not None}
        spec = RowSamplingSpec.model_validate(data)
    except (ValueError, TypeError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
        what = f"{'.'.join(str(p) for p in detail['loc'])}: {detail['msg'].lower()}" if detail else str(exc)[:80]
        return None, f"input column {column!r}: bad sampling settings ({what})"
    return json.dumps(spec.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":")), None


def row_pruning_value(value, mode: str, column: str) -> tuple[Optional[float], Optional[str]]:
    """A row's own pruning setting -> (value, None), or (None, one-line problem). Null = the job's."""
    if value is None:
        return None, None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        return None, f"input column {column!r}: {str(value)[:40]!r} is not a number"
    if mode in KEEP_RATIO_MODES:
        if not 0.0 < number <= 1.0:
            return None, f"input column {column!r}: keep ratio {number} is outside (0, 1]"
    elif not 0.0 < number < 1.0:
        return None, f"input column {column!r}: threshold {number} is outside (0, 1)"
    return number, None


def _is_binary_like(type_: pa.DataType) -> bool:
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_):
        return True
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _is_binary_like(type_.value_type)
    if pa.types.is_struct(type_):
        return any(type_.field(i).name == "bytes" for i in range(type_.num_fields))
    return getattr(pa.types, "is_binary_view", lambda _: False)(type_)


def _passthrough(table: pa.Table, cols: InputColumns) -> pa.Table:
    """Input columns as they continue: bytes image column dropped, clashing names renamed."""
    if _is_binary_like(table.schema.field(cols.image).type):
        table = table.drop_columns([cols.image])
    renames = passthrough_renames(table.column_names, cols.id)
    return table.rename_columns([renames.get(name, name) for name in table.column_names])


def _with_stage_columns(table: pa.Table, rows: list[PreparedRow], seconds: list[float], prunes: list, samplings: list) -> pa.Table:
    fixed = {out.name: out for out in OUTPUT_SCHEMA}
    columns = {
        "status": [STATUS_ERROR if row.error else STATUS_OK for row in rows],
        "error": [row.error for row in rows],
        "visual_tokens": [row.visual_tokens for row in rows],
        "image_s": seconds,
    }
    for name, values in columns.items():
        table = table.append_column(fixed[name], pa.array(values, type=fixed[name].type))
    transient = PIPELINE_SCHEMA.field(TRANSIENT_COLUMN)
    table = table.append_column(transient, pa.array([row.transient for row in rows], type=transient.type))
    stage = {
        PROMPT_COLUMN: [row.prompt for row in rows],
        IMAGES_COLUMN: [list(row.images) for row in rows],
        IMAGE_TOKENS_COLUMN: [list(row.image_tokens) for row in rows],
        PRUNE_COLUMN: prunes,
        SAMPLING_COLUMN: samplings,
    }
    for stage_field in STAGE_SCHEMA:
        table = table.append_column(stage_field, pa.array(stage[stage_field.name], type=stage_field.type))
    return table
