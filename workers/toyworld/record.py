"""The world a model was trained on, recorded next to its weights (``world.json``).

    world = load_world("models/small-qwen2_5_vl-v2")        # -> WorldConfig, the training world
    heldout = dataclasses.replace(world, seed=4242)           # same distribution, new scenes
    rows = list(generate_samples(heldout, 500))

``world.json`` holds every ``WorldConfig`` field (image size, object counts and sizes, backgrounds,
question mix, seed) plus ``version`` (``WORLD_VERSION``: bumped whenever the generator draws
differently for the same config) and ``qtypes`` (the question types the generator knew). An
evaluation regenerates the training distribution from a seed of its own by replacing ``seed``;
``load_world(model_dir, seed=N)`` does both at once. A directory without ``world.json`` (the first
small model) is the default 224 px world.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from workers.toyworld.world import QTYPES, WorldConfig

WORLD_FILE = "world.json"
# 1: attribute / existence / counting / captioning (the first small model);
# 2: + next_to / quadrant / region_count questions.
WORLD_VERSION = 2

_TUPLE_FIELDS = ("backgrounds", "small_size", "large_size")


def world_to_dict(config: WorldConfig) -> dict:
    record = dataclasses.asdict(config)
    record["question_mix"] = [list(pair) for pair in config.question_mix]
    return {"version": WORLD_VERSION, "qtypes": list(QTYPES), **record}


def world_from_dict(record: dict) -> WorldConfig:
    version = record.get("version", 1)
    if version > WORLD_VERSION:
        raise ValueError(f"world version {version} is newer than this generator's ({WORLD_VERSION})")
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    values = {k: v for k, v in record.items() if k in fields}
    for name in _TUPLE_FIELDS:
        if name in values:
            values[name] = tuple(values[name])
    if "question_mix" in values:
        values["question_mix"] = tuple((str(n), float(w)) for n, w in values["question_mix"])
    return WorldConfig(**values)


def save_world(config: WorldConfig, model_dir: str | Path) -> Path:
    path = Path(model_dir) / WORLD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(world_to_dict(config), indent=2) + "\n")
    return path


def load_world(model_dir: str | Path, seed: int | None = None) -> WorldConfig:
    """The world ``model_dir`` was trained on (its ``world.json``; the default world without one),
    with ``seed`` replaced when given."""
    path = Path(model_dir) / WORLD_FILE
    config = world_from_dict(json.loads(path.read_text())) if path.exists() else WorldConfig()
    return config if seed is None else dataclasses.replace(config, seed=seed)


def v2_world(seed: int = 0, max_objects: int = 12) -> WorldConfig:
    """The second small model's world: 336 px (12 x 12 = 144 visual tokens), objects of the same pixel
    sizes as in the 224 px world (so one small object covers ~4 of 144 tokens), region questions."""
    scale = 224 / 336
    return WorldConfig(
        image_size=336, max_objects=max_objects,
        small_size=(round(0.125 * scale, 4), round(0.16 * scale, 4)),
        large_size=(round(0.2 * scale, 4), round(0.25 * scale, 4)),
        question_mix=(("attribute", 0.1), ("existence", 0.15), ("counting", 0.1), ("captioning", 0.05),
                      ("next_to", 0.2), ("quadrant", 0.25), ("region_count", 0.2)),
        seed=seed)
