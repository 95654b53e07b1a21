"""Row schemas, defined once: the output's fixed columns and the image-stage -> model-stage contract.

Output row = `id` + passthrough input columns (in input order) + `OUTPUT_SCHEMA` (fixed columns, in
this order). Exactly one output row per input row; a failed row is a full row with defaults, status
`error` and a non-empty one-line `error`.

Input columns whose names clash with the fixed or stage columns (a VQA set's ground-truth `answer`,
say) are renamed `input_<name>` (see `passthrough_renames`), so nothing from the input is lost.

Defaults for a row that never reached the model: counts 0, `keep_ratio` null (a ratio of nothing is
undefined, and nulls keep means honest), timings 0.0, `kept_per_image` empty.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional

import pyarrow as pa

from schemas.job import JobSpec, redact_url

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_ERROR)

ID_COLUMN = "id"
RENAME_PREFIX = "input_"
MAX_ERROR_CHARS = 1000


def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


OUTPUT_SCHEMA = pa.schema(
    [
        _field("answer", pa.string(), "Generated text; null when status is error."),
        _field("status", pa.string(), "'ok' or 'error'.", nullable=False),
        _field("error", pa.string(), "One-line error message; null when status is ok."),
        _field("visual_tokens", pa.int32(), "Visual tokens before pruning (after the 2x2 merge), all images."),
        _field("kept_tokens", pa.int32(), "Visual tokens kept after pruning, all images."),
        _field("keep_ratio", pa.float64(), "kept_tokens / visual_tokens; null when not computed."),
        _field("kept_per_image", pa.list_(pa.int32()), "Kept visual tokens per image, in image order."),
        _field("kept_mask", pa.binary(), "Which visual tokens were kept: one bit per token over all the row's images in "
               "token order (raster order of each image's merged grid), first token in the highest bit of the first "
               "byte (numpy.unpackbits(..)[:visual_tokens]); null when not pruned."),
        _field("prompt_tokens", pa.int32(), "Prompt tokens before pruning (text + all visual tokens); after pruning: prompt_tokens - visual_tokens + kept_tokens."),
        _field("output_tokens", pa.int32(), "Generated tokens."),
        _field("finish_reason", pa.string(), "'stop' (end of sequence) or 'length' (max_new_tokens)."),
        _field("image_s", pa.float64(), "Seconds spent loading, decoding and resizing this row's images."),
        _field("prefill_s", pa.float64(), "Seconds of prefill (glimpse pass + pruning) attributed to the row."),
        _field("decode_s", pa.float64(), "Seconds of decoding attributed to the row."),
        _field("pad_fraction", pa.float64(), "Padding share of the generation batch the row ran in (0..1); continuous "
               "scheduler: mean over the decode steps the row took part in."),
        _field("decode_rows", pa.float64(), "Mean rows in the decode batch over the row's decode steps (its achieved "
               "concurrency); null for a row with one output token."),
        _field("kv_use", pa.float64(), "Continuous scheduler: mean share of the KV budget the decode batch held over "
               "the row's decode steps; null otherwise."),
        _field("prefill_work_ratio", pa.float64(), "Predicted decoder prefill work with pruning over without, for this "
               "row: ((K+1)(T+N+1) + (L-K-1)(T+kept)) / (L(T+N)) with T text and N visual tokens, K the pruning layer "
               "of L; null when not pruned."),
        _field("prefill_flops_ratio", pa.float64(), "Predicted prefill matmul FLOPs with pruning over without, for this "
               "row: the ViT, the decoder at each length and GlimpsePrune's glimpse pass and VIP (workers.modeling.flops); "
               "above 1 the pruning costs more than it saves; null when not pruned."),
        _field("model", pa.string(), "model.base of the job (credentials redacted)."),
        _field("glimpse_modules", pa.string(), "model.glimpse_modules of the job, if any."),
        _field("pruning", pa.string(), "The job's pruning settings as compact JSON, e.g. {\"mode\":\"glimpse\",...}."),
    ]
)
FIXED_COLUMNS = tuple(OUTPUT_SCHEMA.names)

# Image stage -> model stage contract (internal; dropped by the writer).
PROMPT_COLUMN = "_prompt"
PRUNE_COLUMN = "_prune"
SAMPLING_COLUMN = "_sampling"
IMAGES_COLUMN = "_images"
IMAGE_TOKENS_COLUMN = "_image_tokens"
STAGE_SCHEMA = pa.schema(
    [
        _field(PROMPT_COLUMN, pa.string(), "Resolved prompt text (question or input.prompt); null on error."),
        _field(IMAGES_COLUMN, pa.list_(pa.binary()), "Resized RGB images as raw frames (`encode_frame`), in row order."),
        _field(IMAGE_TOKENS_COLUMN, pa.list_(pa.int32()), "Visual tokens per resized image."),
        _field(PRUNE_COLUMN, pa.float64(), "The row's own pruning setting (input.columns.pruning); null = the job's."),
        _field(SAMPLING_COLUMN, pa.string(), "The row's own decoding settings as checked JSON (input.columns.sampling); "
               "null = the job's."),
    ]
)
STAGE_COLUMNS = tuple(STAGE_SCHEMA.names)

# Pipeline bookkeeping (internal; never in the committed output). Every block between the read
# stage and the writer carries `_key` + `_row`: the row's identity for resume and de-duplication.
KEY_COLUMN = "_key"
ROW_COLUMN = "_row"
READ_ERROR_COLUMN = "_read_error"
PASSTHROUGH_COLUMN = "_passthrough"
TRANSIENT_COLUMN = "_transient"
PIPELINE_SCHEMA = pa.schema(
    [
        _field(KEY_COLUMN, pa.string(), "Output key of the row's input shard."),
        _field(ROW_COLUMN, pa.int64(), "Index of the row in its input shard (0-based)."),
        _field(READ_ERROR_COLUMN, pa.string(), "Problem found while reading the row (e.g. invalid UTF-8)."),
        _field(PASSTHROUGH_COLUMN, pa.binary(), "The row's id + passthrough columns as a 1-row Arrow IPC stream "
               "(keeps each shard's own column types through stages that concatenate blocks)."),
        _field(TRANSIENT_COLUMN, pa.bool_(), "True when the row failed for a transient reason (retried on re-run)."),
    ]
)
PIPELINE_COLUMNS = tuple(PIPELINE_SCHEMA.names)
RESERVED_COLUMNS = frozenset((ID_COLUMN,) + FIXED_COLUMNS + STAGE_COLUMNS + PIPELINE_COLUMNS)


def fixed_defaults() -> dict[str, Any]:
    """Default value of every fixed output column (fresh objects each call)."""
    return {
        "answer": None, "status": STATUS_ERROR, "error": None,
        "visual_tokens": 0, "kept_tokens": 0, "keep_ratio": None, "kept_per_image": [], "kept_mask": None,
        "prompt_tokens": 0, "output_tokens": 0, "finish_reason": None,
        "image_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "pad_fraction": None, "decode_rows": None, "kv_use": None, "prefill_work_ratio": None,
        "prefill_flops_ratio": None,
        "model": None, "glimpse_modules": None, "pruning": None,
    }


def settings_values(job: JobSpec) -> dict[str, Optional[str]]:
    """The model/pruning columns every row of a job carries."""
    pruning = json.dumps(job.pruning.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return {
        "model": redact_url(job.model.base),
        "glimpse_modules": redact_url(job.model.glimpse_modules),
        "pruning": pruning,
    }


def one_line(message: object, limit: int = MAX_ERROR_CHARS) -> str:
    """Collapse a message to one non-empty line of at most `limit` characters."""
    text = re.sub(r"\s+", " ", str(message)).strip() or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_fixed(fixed: Mapping[str, Any]) -> None:
    unknown = sorted(set(fixed) - set(FIXED_COLUMNS))
    if unknown:
        raise TypeError(f"not output columns: {unknown} (expected some of {list(FIXED_COLUMNS)})")


def _full_row(input_row: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    _check_fixed(fixed)
    row = {k: v for k, v in input_row.items() if k not in STAGE_COLUMNS}
    for name, default in fixed_defaults().items():
        row.setdefault(name, default)
    row.update(fixed)
    return row


def error_row(input_row: Mapping[str, Any], message: object, **fixed: Any) -> dict[str, Any]:
    """A complete failed row: passthrough values, known fixed values, defaults, one-line `error`.

    Fixed values already in `input_row` (e.g. `visual_tokens` from the image stage) are kept; `fixed`
    overrides them. Stage columns are dropped. `answer` is always null.
    """
    row = _full_row(input_row, fixed)
    row.update(status=STATUS_ERROR, error=one_line(message), answer=None)
    return row


def ok_row(input_row: Mapping[str, Any], answer: str, **fixed: Any) -> dict[str, Any]:
    """A complete successful row (error null); missing fixed values take their defaults."""
    row = _full_row(input_row, fixed)
    row.update(status=STATUS_OK, error=None, answer=answer)
    return row


def passthrough_renames(column_names: list[str], id_column: str) -> dict[str, str]:
    """Renames that make input columns safe to carry next to the fixed/stage columns.

    The id column becomes `id`; any other column named like a reserved column gets the `input_`
    prefix (repeated until unique). Columns not in the result keep their names.
    """
    taken = set(column_names) | RESERVED_COLUMNS
    renames: dict[str, str] = {}
    if id_column != ID_COLUMN:
        renames[id_column] = ID_COLUMN
    for name in column_names:
        if name == id_column or name not in RESERVED_COLUMNS:
            continue
        new = RENAME_PREFIX + name
        while new in taken:
            new = RENAME_PREFIX + new
        taken.add(new)
        renames[name] = new
    return renames


# A resized image on its way from the image stage to the model stage: b"RGB8", width and height
# (uint32 little-endian), then the 8-bit RGB pixels, row-major. Raw, not PNG: encoding a PNG in the
# image stage and decoding it again in the model actor cost more CPU (the actor's most of all) than
# moving the ~8x larger bytes through the object store, which is sized for decoded images anyway.
FRAME_MAGIC = b"RGB8"
_FRAME_HEADER = 12


def encode_frame(image) -> bytes:
    """An RGB PIL image -> frame bytes."""
    import struct

    if image.mode != "RGB":
        image = image.convert("RGB")
    return FRAME_MAGIC + struct.pack("<II", image.width, image.height) + image.tobytes()


def decode_frame(data: bytes):
    """Frame bytes (or any encoded image file, e.g. PNG) -> an RGB PIL image."""
    import io
    import struct

    from PIL import Image

    if data[:4] == FRAME_MAGIC:
        width, height = struct.unpack("<II", data[4:_FRAME_HEADER])
        if len(data) != _FRAME_HEADER + 3 * width * height:
            raise ValueError(f"a {width}x{height} image frame of {len(data)} bytes is truncated or padded")
        return Image.frombuffer("RGB", (width, height), data[_FRAME_HEADER:], "raw", "RGB", 0, 1)
    return Image.open(io.BytesIO(data)).convert("RGB")
