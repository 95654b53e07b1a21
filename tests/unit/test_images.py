"""The CPU image stage: decode/convert/resize, guards, error rows, the batch column contract, smart_resize."""
from __future__ import annotations

import io
import random
import struct
import time
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.images import ImageStageConfig, decode_batch, prepare_row, smart_resize, to_rgb
from schemas.job import ImageSpec, InputColumns
from schemas.rows import (
    FIXED_COLUMNS, IMAGE_TOKENS_COLUMN, IMAGES_COLUMN, OUTPUT_SCHEMA, PROMPT_COLUMN, STAGE_COLUMNS, FRAME_MAGIC,
    decode_frame, encode_frame, error_row,
)

FACTOR = 28


def config(prompt=None, columns=None, **image) -> ImageStageConfig:
    return ImageStageConfig(columns=columns or InputColumns(), image=ImageSpec(**image), prompt=prompt)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of data: nothing big is allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def decoded(row) -> list[Image.Image]:
    return [decode_frame(data) for data in row.images]


def run_one(image_value, question="What is this?", cfg=None):
    return prepare_row(image_value, question, cfg or config())


# ---------------------------------------------------------------------------------------------------
# Good images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_good_image_is_resized_to_multiples_of_28(fmt):
    row = run_one(encode(noise(640, 480), fmt))
    assert row.error is None and row.prompt == "What is this?"
    (image,) = decoded(row)
    assert row.images[0][:4] == FRAME_MAGIC and len(row.images[0]) == 12 + 644 * 476 * 3
    assert image.mode == "RGB" and image.size == (644, 476)
    assert row.image_tokens == ((644 // FACTOR) * (476 // FACTOR),) and row.visual_tokens == 23 * 17


def transparent_rgba():
    image = Image.new("RGBA", (56, 56), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white
    return image


def palette_with_transparency():
    image = Image.new("P", (56, 56), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    return image


def sixteen_bit_gray():
    pixels = np.full((56, 56), 65535, dtype=np.uint16)
    pixels[0, 0] = 0
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    "make, fmt, corner, body",
    [
        (transparent_rgba, "PNG", (255, 255, 255), (255, 0, 0)),
        (palette_with_transparency, "PNG", (255, 255, 255), (255, 0, 0)),
        (lambda: Image.new("P", (56, 56), 3), "GIF", None, None),
        (lambda: Image.new("L", (56, 56), 200), "PNG", (200, 200, 200), (200, 200, 200)),
        (lambda: Image.new("LA", (56, 56), (0, 0)), "PNG", (255, 255, 255), (255, 255, 255)),
        (lambda: Image.new("1", (56, 56), 1), "PNG", (255, 255, 255), (255, 255, 255)),
        (lambda: Image.new("CMYK", (56, 56), (0, 255, 255, 0)), "JPEG", None, None),
        (sixteen_bit_gray, "PNG", (0, 0, 0), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((56, 56), 0.5, dtype=np.float32)), "TIFF", (128, 128, 128), (128, 128, 128)),
    ],
    ids=["RGBA", "P+transparency", "P-gif", "L", "LA", "1", "CMYK-jpeg", "I;16", "F-tiff"],
)
def test_any_mode_becomes_rgb(make, fmt, corner, body):
    source = make()
    row = run_one(encode(source, fmt), cfg=config(min_pixels=3136, max_pixels=3136))  # exactly 56x56
    assert row.error is None, row.error
    (image,) = decoded(row)
    assert image.mode == "RGB" and image.size == (56, 56)
    rgb = np.asarray(image)
    if body is not None:  # 56x56 in, 56x56 out: no resampling, so pixels compare exactly
        assert tuple(rgb[28, 28]) == body
    if corner is not None:
        assert tuple(rgb[0, 0]) == corner
    if fmt == "JPEG" and source.mode == "CMYK":
        red, green, blue = rgb[28, 28]
        assert red > 200 and green < 60 and blue < 60  # CMYK (0, 255, 255, 0) is red


def test_to_rgb_scales_sixteen_bit_instead_of_clipping():
    pixels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(pixels)))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


def test_exif_rotation_is_applied_before_resizing():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 560x280 landscape is shown as portrait
    row = run_one(encode(noise(560, 280), "JPEG", exif=exif))
    (image,) = decoded(row)
    assert image.size == (280, 560)


def test_large_jpeg_decodes_through_draft_to_target_size():
    row = run_one(encode(noise(2400, 1800), "JPEG"), cfg=config(max_pixels=200_704))
    (image,) = decoded(row)
    width, height = image.size
    assert width % FACTOR == 0 and height % FACTOR == 0 and width * height <= 200_704
    assert abs(width / height - 2400 / 1800) < 0.1


def test_list_of_images_and_hf_struct():
    first, second = encode(noise(56, 56)), encode(noise(112, 56), "JPEG")
    row = run_one([first, {"bytes": second, "path": None}])
    assert row.error is None and len(row.images) == 2
    assert row.image_tokens == (4, 8) and row.visual_tokens == 12


# ---------------------------------------------------------------------------------------------------
# Bad rows -> one-line errors


def test_corrupt_bytes():
    row = run_one(b"this is not an image")
    assert row.error == "image 0: cannot identify image file (corrupt or unsupported format)"


def test_truncated_image():
    data = encode(noise(300, 300))
    row = run_one(data[: len(data) // 2])
    assert row.error.startswith("image 0: cannot decode (")


def test_missing_file_path(tmp_path):
    missing = str(tmp_path / "missing.png")
    assert run_one(missing).error == f"image 0: {missing} not found"


def test_image_from_local_path(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(encode(noise(56, 56)))
    assert run_one(str(path)).error is None
    assert run_one(f"file://{path}").error is None


def test_second_image_error_names_its_index():
    row = run_one([encode(noise(56, 56)), b"junk"])
    assert row.error.startswith("image 1: cannot identify image file")


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question_without_prompt_is_an_error(question):
    row = run_one(encode(noise(56, 56)), question=question)
    assert row.error == "empty question and no input.prompt to fall back on"


def test_empty_question_falls_back_to_job_prompt():
    row = run_one(encode(noise(56, 56)), question=" ", cfg=config(prompt="Describe the image."))
    assert row.error is None and row.prompt == "Describe the image."


def test_header_beyond_max_source_pixels_is_rejected_before_decoding():
    data = png_header_only(12_000, 10_000)
    start = time.perf_counter()
    row = run_one(data, cfg=config(max_source_pixels=100_000_000))
    assert time.perf_counter() - start < 0.5  # 120 MP never decoded
    assert row.error == "image 0: 12000x10000 = 120000000 pixels exceeds image.max_source_pixels 100000000"
    row = run_one(png_header_only(300, 200), cfg=config(max_source_pixels=50_000))
    assert row.error == "image 0: 300x200 = 60000 pixels exceeds image.max_source_pixels 50000"


def test_pillow_bomb_guard_is_caught_with_both_limits():
    # 30000x30000 is past Pillow's own hard limit, which fires while the header is read
    start = time.perf_counter()
    row = run_one(png_header_only(30_000, 30_000), cfg=config(max_source_pixels=100_000_000))
    assert time.perf_counter() - start < 0.5
    assert row.error.startswith("image 0: header declares 900000000 pixels, over the decompression-bomb limit "
                                "(image.max_source_pixels 100000000; Pillow refuses more than ")


@pytest.mark.parametrize(
    "value, cfg, expected",
    [
        (None, None, "no image (the image cell is null or empty)"),
        ([], None, "no image (the image cell is null or empty)"),
        (b"x" * 2000, config(max_image_bytes=1000), "image 0: 2000 bytes exceeds image.max_image_bytes 1000"),
        ([b"a"] * 3, config(max_images_per_row=2), "3 images exceeds image.max_images_per_row 2"),
        (12345, None, "image 0: unsupported value type int (expected bytes or a URL/path)"),
    ],
)
def test_row_level_guards(value, cfg, expected):
    assert run_one(value, cfg=cfg).error == expected


def test_extreme_aspect_ratio_is_an_error_row():
    row = run_one(encode(Image.new("RGB", (3000, 10))))
    assert row.error == "image 0: aspect ratio 300:1 exceeds 200:1"


# ---------------------------------------------------------------------------------------------------
# The batch contract


def test_batch_keeps_rows_order_and_passthrough():
    good = encode(noise(56, 56))
    batch = pa.table({
        "key": pa.array(["a", "b", "c", "d"]),
        "img": pa.array([good, b"junk", good, None], type=pa.binary()),
        "q": ["What?", "Why?", "", "Who?"],
        "answer": ["gt1", "gt2", "gt3", "gt4"],  # clashes with the output column -> input_answer
        "boxes": pa.array([[[0.1, 0.2]], [], None, [[0.5]]], type=pa.list_(pa.list_(pa.float32()))),
        "n": pa.array([1, None, 3, 4], type=pa.int64()),
    })
    cfg = config(columns=InputColumns(id="key", image="img", question="q"))
    out = decode_batch(batch, cfg)
    assert out.num_rows == 4
    assert out.column_names[:5] == ["id", "q", "input_answer", "boxes", "n"]  # bytes image column dropped
    assert out.column("id").to_pylist() == ["a", "b", "c", "d"]
    for name in ("boxes", "n", "q"):
        assert out.column(name).equals(batch.column(name)) and out.schema.field(name).type == batch.schema.field(name).type
    assert out.column("input_answer").to_pylist() == ["gt1", "gt2", "gt3", "gt4"]
    assert out.column("status").to_pylist() == ["ok", "error", "error", "error"]
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[1].startswith("image 0: cannot identify")
    assert errors[2] == "empty question and no input.prompt to fall back on"
    assert errors[3] == "no image (the image cell is null or empty)"
    assert out.column("visual_tokens").to_pylist() == [4, 0, 0, 0]
    assert out.column(PROMPT_COLUMN).to_pylist() == ["What?", None, None, None]
    assert [len(x) for x in out.column(IMAGES_COLUMN).to_pylist()] == [1, 0, 0, 0]
    assert out.column(IMAGE_TOKENS_COLUMN).to_pylist() == [[4], [], [], []]
    for name in ("status", "error", "visual_tokens", "image_s"):
        assert out.schema.field(name).type == OUTPUT_SCHEMA.field(name).type
    assert set(STAGE_COLUMNS) <= set(out.column_names)


def test_url_image_column_passes_through_and_missing_question_column_uses_prompt(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(noise(56, 56)))
    batch = {"id": [1, 2], "image": [str(path), str(tmp_path / "b.png")]}
    out = decode_batch(batch, config(prompt="Caption this.", columns=InputColumns(question=None)))
    assert out.column("image").to_pylist() == batch["image"]
    assert out.column(PROMPT_COLUMN).to_pylist() == ["Caption this.", None]
    assert out.column("error").to_pylist()[1] == f"image 0: {tmp_path / 'b.png'} not found"


def test_empty_batch_has_the_contract_columns():
    out = decode_batch(pa.table({"id": pa.array([], pa.int64()), "image": pa.array([], pa.binary()),
                                 "question": pa.array([], pa.string())}), config())
    assert out.num_rows == 0 and {"status", "error", "visual_tokens", *STAGE_COLUMNS} <= set(out.column_names)


def test_missing_id_column_is_a_configuration_error():
    with pytest.raises(ValueError, match=r"\['key'\] not found"):
        decode_batch({"id": [1], "image": [b"x"]}, config(columns=InputColumns(id="key")))


# ---------------------------------------------------------------------------------------------------
# smart_resize


@pytest.mark.parametrize("min_pixels, max_pixels", [(3136, 1_003_520), (3136, 200_704), (784, 784 * 4), (50_176, 50_176)])
def test_smart_resize_invariants(min_pixels, max_pixels):
    rng = random.Random(0)
    for _ in range(2000):
        height = rng.randint(1, 6000)
        width = rng.randint(max(1, height // 150), min(6000, height * 150))
        h, w = smart_resize(height, width, min_pixels, max_pixels)
        assert h % FACTOR == 0 and w % FACTOR == 0 and h >= FACTOR and w >= FACTOR
        assert h * w <= max_pixels
        if max_pixels >= 2 * min_pixels:  # a narrow band cannot always hold a 28-multiple area
            assert h * w >= min_pixels
        if min(h, w) >= 10 * FACTOR:  # aspect ratio kept up to rounding
            assert abs((h / w) / (height / width) - 1) < 0.12


def test_smart_resize_examples():
    assert smart_resize(448, 448, 3136, 200_704) == (448, 448)
    assert smart_resize(480, 640, 3136, 1_003_520) == (476, 644)
    assert smart_resize(10, 10, 3136, 1_003_520) == (56, 56)  # grown to min_pixels
    h, w = smart_resize(4000, 3000, 3136, 200_704)  # shrunk under max_pixels, aspect kept
    assert h * w <= 200_704 and (h, w) == (504, 364)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 3136, 1_003_520)


# ---------------------------------------------------------------------------------------------------
# The row helpers the stages share


def test_error_row_is_a_full_row_with_defaults():
    row = error_row({"id": 1, "meta": "m", "visual_tokens": 12, IMAGES_COLUMN: [b"x"]}, "boom\n  at line 2", model="m")
    assert set(FIXED_COLUMNS) <= set(row) and IMAGES_COLUMN not in row
    assert (row["status"], row["error"], row["answer"]) == ("error", "boom at line 2", None)
    assert (row["id"], row["meta"], row["visual_tokens"], row["model"]) == (1, "m", 12, "m")
    assert row["kept_per_image"] == [] and row["keep_ratio"] is None and row["output_tokens"] == 0
    assert error_row({}, "  ")["error"] == "unknown error"
    with pytest.raises(TypeError, match="not output columns"):
        error_row({}, "x", bogus=1)


def test_frames_round_trip_and_a_cut_frame_is_an_error():
    image = noise(56, 84)
    frame = encode_frame(image)
    assert decode_frame(frame).tobytes() == image.convert("RGB").tobytes() and decode_frame(frame).size == (56, 84)
    assert decode_frame(encode(image, "PNG")).tobytes() == image.convert("RGB").tobytes()  # encoded files still work
    with pytest.raises(ValueError, match="truncated or padded"):
        decode_frame(frame[:-3])
