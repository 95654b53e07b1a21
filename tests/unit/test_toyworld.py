"""Invariants of the synthetic visual-question world (workers/toyworld)."""

import dataclasses
import io
import itertools
import json
import math
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from workers.toyworld import __main__ as cli
from workers.toyworld import record
from workers.toyworld import shards
from workers.toyworld import world as syn

MIXED = syn.WorldConfig(seed=7)
PLURALS = {syn._plural(shape): shape for shape in syn.SHAPES}


@pytest.fixture(scope="module")
def mixed_samples():
    return list(syn.generate_samples(MIXED, 300))


def _only(qtype, **changes):
    return syn.WorldConfig(question_mix=((qtype, 1.0),), **changes)


def _box(obj):
    return obj["box"]


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_and_index_give_identical_samples():
    a, b = syn.make_sample(MIXED, 42), syn.make_sample(MIXED, 42)
    assert shards.png_bytes(a.image) == shards.png_bytes(b.image)
    assert (a.id, a.question, a.answer, a.qtype, a.boxes, a.objects) == \
        (b.id, b.question, b.answer, b.qtype, b.boxes, b.objects)
    assert a.id == "synth-7-0000042"


def test_different_index_or_seed_gives_different_samples():
    base = shards.png_bytes(syn.make_sample(MIXED, 42).image)
    assert shards.png_bytes(syn.make_sample(MIXED, 43).image) != base
    other_seed = dataclasses.replace(MIXED, seed=8)
    assert shards.png_bytes(syn.make_sample(other_seed, 42).image) != base


def test_sample_depends_only_on_seed_and_index():
    shard = list(syn.generate_samples(MIXED, 3, start_index=10))
    for sample in shard:
        alone = syn.make_sample(MIXED, int(sample.id.rsplit("-", 1)[1]))
        assert (alone.question, alone.objects) == (sample.question, sample.objects)
    # The question mix never changes the scene.
    counting_only = dataclasses.replace(MIXED, question_mix=(("counting", 1.0),))
    assert syn.make_sample(counting_only, 10).objects == shard[0].objects


# ---------------------------------------------------------------------------------------------
# Scenes


@pytest.mark.parametrize("image_size", [224, 336])
def test_objects_inside_image_and_never_overlap(image_size):
    config = syn.WorldConfig(image_size=image_size, min_objects=8, max_objects=12)
    for sample in syn.generate_samples(config, 60):
        assert 1 <= sample.num_objects == len(sample.objects) <= 12
        boxes = [o["box_px"] for o in sample.objects]
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_object_records_are_consistent():
    sample = syn.make_sample(MIXED, 3)
    for obj in sample.objects:
        assert obj["shape"] in syn.SHAPES and obj["colour"] in syn.COLOURS
        assert obj["size"] in syn.SIZES
        np.testing.assert_allclose(obj["box"], np.array(obj["box_px"]) / 224, rtol=1e-6)


def test_curriculum_knob_fixes_the_object_count():
    config = syn.WorldConfig(min_objects=3, max_objects=3)
    assert {s.num_objects for s in syn.generate_samples(config, 30)} == {3}


def test_recorded_boxes_are_tight():
    sample = syn.make_sample(MIXED, 5)
    ids = syn.object_id_map(sample.objects, 224)  # [S, S]
    for k, obj in enumerate(sample.objects):
        ys, xs = np.nonzero(ids == k + 1)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box_px"]


@pytest.mark.parametrize("image_size", [224, 336])
def test_image_size_and_colour_at_box_centre(image_size):
    config = syn.WorldConfig(image_size=image_size, seed=1)
    shapes_seen = set()
    for sample in syn.generate_samples(config, 10):
        decoded = Image.open(io.BytesIO(shards.png_bytes(sample.image)))
        assert decoded.size == (image_size, image_size) and decoded.mode == "RGB"
        pixels = np.asarray(decoded)  # [S, S, 3]
        for obj in sample.objects:  # every shape here contains its box centre
            x1, y1, x2, y2 = obj["box_px"]
            centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
            assert tuple(centre) == syn.PALETTE[obj["colour"]], obj
            shapes_seen.add(obj["shape"])
    assert shapes_seen == set(syn.SHAPES)


def test_background_is_far_from_every_object_colour():
    palette = np.array(list(syn.PALETTE.values()), dtype=float)  # [C, 3]
    for sample in syn.generate_samples(MIXED, 12):
        pixels = np.asarray(sample.image, dtype=float)  # [S, S, 3]
        background = pixels[syn.object_id_map(sample.objects, 224) == 0]  # [N, 3]
        distances = np.linalg.norm(background[:, None, :] - palette[None], axis=-1)  # [N, C]
        assert distances.min() > 50


# ---------------------------------------------------------------------------------------------
# Questions and answers


def _check_attribute(sample):
    objs = sample.objects
    if m := re.fullmatch(r"What color is the (\w+)\?", sample.question):
        referred = [o for o in objs if o["shape"] == m[1]]
        answer = referred[0]["colour"] if len(referred) == 1 else None
    else:
        m = re.fullmatch(r"What shape is the (\w+) object\?", sample.question)
        referred = [o for o in objs if o["colour"] == m[1]]
        answer = referred[0]["shape"] if len(referred) == 1 else None
    assert len(referred) == 1, "attribute questions refer to a unique object"
    assert sample.answer == answer and sample.boxes == [_box(referred[0])]


def _check_existence(sample):
    colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", sample.question).groups()
    matches = [o for o in sample.objects if (o["colour"], o["shape"]) == (colour, shape)]
    assert sample.answer == ("yes" if matches else "no")
    if not matches:
        matches = [o for o in sample.objects if o["colour"] == colour or o["shape"] == shape]
    assert sample.boxes == [_box(o) for o in matches]


def _check_counting(sample):
    if m := re.fullmatch(r"How many (\w+) objects are there\?", sample.question):
        counted = [o for o in sample.objects if o["colour"] == m[1]]
    else:
        plural = re.fullmatch(r"How many (\w+) are there\?", sample.question)[1]
        counted = [o for o in sample.objects if o["shape"] == PLURALS[plural]]
    assert sample.answer == str(len(counted))
    assert sample.boxes == [_box(o) for o in counted]


def _check_captioning(sample):
    assert sample.question == "Describe the image."
    ordered = sorted(sample.objects, key=lambda o: ((o["box_px"][1] + o["box_px"][3]) / 2,
                                                    (o["box_px"][0] + o["box_px"][2]) / 2))
    phrases = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}"
               for o in ordered]
    expected = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    assert sample.answer == expected
    assert sorted(sample.boxes) == sorted(_box(o) for o in sample.objects)


def test_answers_match_recorded_objects(mixed_samples):
    checks = {"attribute": _check_attribute, "existence": _check_existence,
              "counting": _check_counting, "captioning": _check_captioning}
    for sample in mixed_samples:
        checks[sample.qtype](sample)
    assert {s.qtype for s in mixed_samples} == {name for name, _ in MIXED.question_mix}


def test_existence_answers_are_balanced():
    answers = [s.answer for s in syn.generate_samples(_only("existence"), 400)]
    assert set(answers) == {"yes", "no"}
    assert 0.42 <= answers.count("yes") / len(answers) <= 0.58


def _objects(*pairs):
    return [syn.SceneObject(shape, colour, "small", 30, (40 * k, 0, 40 * k + 30, 30))
            for k, (colour, shape) in enumerate(pairs)]


def test_attribute_questions_only_refer_to_unique_objects():
    config = _only("attribute")
    scene = _objects(("red", "triangle"), ("blue", "triangle"), ("red", "circle"))
    asked = {syn.ask_question(config, scene, np.random.default_rng(i)).question for i in range(40)}
    assert asked == {"What color is the circle?", "What shape is the blue object?"}


def test_attribute_falls_back_to_counting_without_a_unique_object():
    config = _only("attribute")
    scene = _objects(("red", "triangle"), ("red", "triangle"))
    qa = syn.ask_question(config, scene, np.random.default_rng(0))
    assert qa.qtype == "counting"


def test_caption_format():
    scene = _objects(("red", "circle"), ("blue", "square"), ("orange", "star"))
    assert syn.caption(scene) == "a red circle, a blue square and an orange star"
    assert syn.caption(scene[:2]) == "a red circle and a blue square"
    assert syn.caption(scene[:1]) == "a red circle"


# ---------------------------------------------------------------------------------------------
# Token-grid labels


def test_box_token_mask_hand_checked():
    assert syn.box_token_mask([[0.0, 0.0, 1.0, 1.0]], 8, 8).all()
    assert not syn.box_token_mask([], 8, 8).any()
    assert syn.box_token_mask([], 2, 3).shape == (2, 3)

    one_cell = syn.box_token_mask([[0.30, 0.30, 0.35, 0.35]], 8, 8)
    assert one_cell.sum() == 1 and one_cell[2, 2]

    clamped = syn.box_token_mask([[0.9, 0.0, 1.0, 0.1]], 8, 8)  # int(1.0 * 8) = 8 -> clamped to 7
    assert clamped.sum() == 1 and clamped[0, 7]

    # An end exactly on a cell boundary switches on the next cell (the processor's inclusive rule).
    boundary = syn.box_token_mask([[0.0, 0.0, 0.25, 0.125]], 8, 8)
    assert boundary.sum() == 6 and boundary[:2, :3].all()


def test_box_token_mask_union_and_non_square_grid():
    mask = syn.box_token_mask([[0.0, 0.0, 0.2, 0.2], [0.8, 0.6, 0.9, 0.9]], 2, 4)
    expected = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_dense_cell_labels_match_pixels_at_cell_centres():
    sample = syn.make_sample(dataclasses.replace(MIXED, image_size=336), 2)
    shape_ids, colour_ids = syn.dense_cell_labels(sample, 12, 12)
    assert shape_ids.shape == colour_ids.shape == (12, 12)
    assert ((shape_ids == syn.BACKGROUND_ID) == (colour_ids == syn.BACKGROUND_ID)).all()
    assert (colour_ids != syn.BACKGROUND_ID).any()
    pixels = np.asarray(sample.image)  # [S, S, 3]
    for r, c in zip(*np.nonzero(colour_ids)):
        centre = pixels[int((r + 0.5) * 28), int((c + 0.5) * 28)]
        assert tuple(centre) == syn.PALETTE[syn.COLOURS[colour_ids[r, c] - 1]]
    labelled = {(syn.SHAPES[s - 1], syn.COLOURS[c - 1]) for s, c in
                zip(shape_ids[shape_ids > 0], colour_ids[colour_ids > 0])}
    assert labelled <= {(o["shape"], o["colour"]) for o in sample.objects}


# ---------------------------------------------------------------------------------------------
# Shards and command line


def _read_shards(paths):
    tables = [pq.read_table(p) for p in paths]
    for table in tables:
        assert table.schema.equals(shards.SHARD_SCHEMA)
    return tables


def test_write_shards_local_path(tmp_path):
    config = syn.WorldConfig(seed=3)
    paths = shards.write_shards(config, 25, tmp_path / "a" / "b", rows_per_shard=10)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"part-0000{i}.parquet" for i in range(3)]
    tables = _read_shards(paths)
    assert [t.num_rows for t in tables] == [10, 10, 5]
    rows = [row for t in tables for row in t.to_pylist()]
    assert [r["id"] for r in rows] == [f"synth-3-{i:07d}" for i in range(25)]
    expected = syn.make_sample(config, 12)
    row = rows[12]
    assert row["image"] == shards.png_bytes(expected.image)
    assert (row["question"], row["answer"], row["qtype"]) == \
        (expected.question, expected.answer, expected.qtype)
    assert row["num_objects"] == expected.num_objects
    assert json.loads(row["objects"]) == expected.objects
    np.testing.assert_array_equal(np.array(row["boxes"], np.float32).reshape(-1, 4),
                                  np.array(expected.boxes, np.float32).reshape(-1, 4))


def test_write_shards_on_a_given_filesystem(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    paths = shards.write_shards(syn.WorldConfig(), 4, "shards", rows_per_shard=4, filesystem=fs)
    assert paths == ["shards/part-00000.parquet"]
    assert (tmp_path / "shards" / "part-00000.parquet").exists()
    assert pq.read_table(paths[0], filesystem=fs).num_rows == 4


def test_cli_writes_shards(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["--out", str(out), "--rows", "5", "--seed", "2", "--image-size", "336",
                     "--rows-per-shard", "2", "--min-objects", "2", "--max-objects", "4"]) == 0
    assert "wrote 5 rows in 3 shard(s)" in capsys.readouterr().out
    table = pq.read_table(out / "part-00002.parquet")
    assert table.num_rows == 1 and 2 <= table["num_objects"][0].as_py() <= 4
    image = Image.open(io.BytesIO(table["image"][0].as_py()))
    assert image.size == (336, 336)


def test_config_validation():
    with pytest.raises(ValueError, match="min_objects"):
        syn.WorldConfig(min_objects=5, max_objects=4)
    with pytest.raises(ValueError, match="question_mix"):
        syn.WorldConfig(question_mix=(("riddles", 1.0),))
    with pytest.raises(ValueError, match="backgrounds"):
        syn.SceneConfig(backgrounds=("marble",))


def test_import_pulls_in_neither_torch_nor_ray():
    code = ("import sys, workers.toyworld, workers.toyworld.__main__; "
            "assert not {'torch', 'ray'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Region questions (world v2) and the recorded world


def _centre(obj):  # (y, x) in px
    x1, y1, x2, y2 = obj["box_px"]
    return (y1 + y2) / 2, (x1 + x2) / 2


def _named(question, objects):
    """The indices of the objects a "the triangle" / "the red object" reference matches."""
    ref = re.search(r"next to the (\w+)( object)?\?", question)
    word, by_colour = ref.group(1), ref.group(2) is not None
    return [i for i, o in enumerate(objects) if (o["colour"] if by_colour else o["shape"]) == word]


def _v2_only(qtype, seed=11):
    return dataclasses.replace(record.v2_world(seed), question_mix=((qtype, 1.0),))


def test_next_to_names_one_object_and_answers_its_clear_nearest_neighbour():
    asked = [s for s in syn.generate_samples(_v2_only("next_to"), 200) if s.qtype == "next_to"]
    assert len(asked) >= 100
    for s in asked:
        named = _named(s.question, s.objects)
        assert len(named) == 1, s.question
        anchor = _centre(s.objects[named[0]])
        dist = sorted((math.dist(anchor, _centre(o)), j) for j, o in enumerate(s.objects) if j != named[0])
        nearest = s.objects[dist[0][1]]
        assert s.answer == f"{nearest['colour']} {nearest['shape']}"
        assert len(dist) == 1 or dist[1][0] >= 1.3 * dist[0][0]
        assert s.boxes == [s.objects[named[0]]["box"], nearest["box"]]


def _quadrant(obj, size):
    y, x = _centre(obj)
    return f"{'top' if y < size / 2 else 'bottom'} {'left' if x < size / 2 else 'right'}"


def test_quadrant_and_region_count_answers_follow_the_box_centres():
    world = record.v2_world(12)
    size = world.image_size
    seen = Counter()
    for qtype in ("quadrant", "region_count"):
        for s in syn.generate_samples(dataclasses.replace(world, question_mix=((qtype, 1.0),)), 300):
            if s.qtype != qtype:
                continue
            seen[qtype] += 1
            where = re.search(r"in the (\w+ \w+) corner", s.question).group(1)
            inside = [o for o in s.objects if _quadrant(o, size) == where]
            for o in s.objects:  # no centre near a midline, so the answer is unambiguous
                y, x = _centre(o)
                assert min(abs(y - size / 2), abs(x - size / 2)) >= 0.02 * size
            if qtype == "quadrant":
                assert 1 <= len(inside) <= 3
                assert s.answer == syn.caption([syn.SceneObject.from_dict(o) for o in inside])
            else:
                assert s.answer == str(len(inside))
            assert sorted(map(tuple, s.boxes)) == sorted(tuple(o["box"]) for o in inside)
    assert seen["quadrant"] >= 60 and seen["region_count"] >= 60, seen


def test_v2_world_is_336px_with_small_objects_and_every_question_type():
    world = record.v2_world(3)
    samples = list(syn.generate_samples(world, 300))
    assert {s.image.size for s in samples} == {(336, 336)}
    assert {s.qtype for s in samples} == set(syn.QTYPES)
    # One object of the smallest size class touches at most 3 x 3 of the 12 x 12 token cells (6%).
    small = [o for s in samples for o in s.objects if o["size"] == "small"]
    cells = [syn.box_token_mask([o["box"]], 12, 12).sum() for o in small]
    assert max(cells) <= 9 and np.mean(cells) <= 5


def test_world_json_round_trip_and_new_seed(tmp_path):
    world = record.v2_world(7)
    path = record.save_world(world, tmp_path)
    assert json.loads(path.read_text())["version"] == record.WORLD_VERSION
    assert record.load_world(tmp_path) == world
    fresh = record.load_world(tmp_path, seed=4242)
    assert fresh == dataclasses.replace(world, seed=4242)
    a, b = syn.make_sample(world, 0), syn.make_sample(fresh, 0)
    assert a.image.size == b.image.size and a.question != b.question or a.objects != b.objects
    assert record.load_world(tmp_path / "nowhere") == syn.WorldConfig()  # the first model's world
    newer = {**json.loads(path.read_text()), "version": record.WORLD_VERSION + 1}
    path.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="newer"):
        record.load_world(tmp_path)


# ---- two-image rows -------------------------------------------------------------------------------
TWO = syn.WorldConfig(image_size=112, max_objects=6, seed=21, two_image_share=0.5)


def test_two_image_rows_keep_the_first_scene_and_name_the_asked_image():
    one = dataclasses.replace(TWO, two_image_share=0.0)
    rows = [syn.make_sample(TWO, i) for i in range(40)]
    pairs = [r for r in rows if r.images]
    assert 10 <= len(pairs) <= 30 and {r.target for r in pairs} == {0, 1}
    for i, row in enumerate(rows):
        plain = syn.make_sample(one, i)
        # The first scene never depends on the share; a one-image row is the plain world's row.
        assert np.array_equal(np.asarray(syn.row_images(row)[0]), np.asarray(plain.image))
        if not row.images:
            assert (row.question, row.answer, row.boxes) == (plain.question, plain.answer, plain.boxes)
            continue
        assert len(row.images) == len(row.scenes) == 2 and row.image is row.images[row.target]
        assert row.question.startswith(("First image: ", "Second image: ")[row.target])
        assert row.objects == row.scenes[row.target] and row.num_objects == len(row.objects)
        # The answer and boxes are about the asked scene: its boxes are among that scene's objects.
        boxes = [o["box"] for o in row.scenes[row.target]]
        assert all(b in boxes for b in row.boxes)
        assert not np.array_equal(np.asarray(row.images[0]), np.asarray(row.images[1]))


def test_row_box_masks_lie_on_the_asked_image_only():
    row = next(r for r in (syn.make_sample(TWO, i) for i in range(40)) if r.images and r.target == 1 and r.boxes)
    mask = syn.row_box_masks(row, [(4, 4), (4, 4)])
    assert mask.shape == (32,) and not mask[:16].any()
    assert np.array_equal(mask[16:], syn.box_token_mask(row.boxes, 4, 4).reshape(-1))
    every = syn.row_box_masks(row, [(4, 4), (4, 4)], every_object=True)
    assert every[:16].any() and every[16:].any() and (every | ~mask).all()
    with pytest.raises(ValueError, match="2 images but 1 grids"):
        syn.row_box_masks(row, [(4, 4)])


def test_more_questions_share_the_images_and_pick_either():
    index = next(i for i in range(40) if syn.make_sample(TWO, i).images)
    first = syn.make_sample(TWO, index)
    rows = syn.more_questions(TWO, first, index, 8)
    assert rows[0] is first and len({r.id for r in rows}) == 8
    assert all(r.images[0] is first.images[0] and r.images[1] is first.images[1] for r in rows)
    assert {r.target for r in rows} == {0, 1}
    assert [r.question for r in rows] == [r.question for r in syn.more_questions(TWO, syn.make_sample(TWO, index), index, 8)]


def test_two_image_shards_hold_image_lists(tmp_path):
    paths = shards.write_shards(TWO, 12, tmp_path / "s", rows_per_shard=12)
    table = pq.read_table(paths[0])
    assert table.schema.equals(shards.MULTI_SHARD_SCHEMA)
    for row, sample in zip(table.to_pylist(), syn.generate_samples(TWO, 12)):
        assert len(row["image"]) == len(syn.row_images(sample)) and row["target_image"] == sample.target
        decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in row["image"]]
        assert all(np.array_equal(d, np.asarray(i)) for d, i in zip(decoded, syn.row_images(sample)))
    with pytest.raises(ValueError, match="multi=True"):
        shards.samples_to_table(syn.generate_samples(TWO, 12))
    with pytest.raises(ValueError, match="two_image_share"):
        dataclasses.replace(TWO, two_image_share=1.5)
    # The recorded world round-trips the share.
    record.save_world(TWO, tmp_path / "m")
    assert record.load_world(tmp_path / "m") == TWO
