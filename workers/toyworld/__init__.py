"""The toy world: synthetic scenes and questions for training, evaluating and demoing the small model.

- ``world``: scenes, questions, samples, token-grid labels (``WorldConfig``, ``make_sample``, ...).
- ``record``: the world a model was trained on, as ``world.json`` (``load_world(model_dir)``).
- ``shards``: Parquet shards in the pipeline's input format (``write_shards``).
- ``python -m workers.toyworld --out DIR --rows N``: the shard writer's command line.

Pure numpy + PIL + pyarrow: importing this package never imports torch or ray.
"""

from workers.toyworld.record import WORLD_FILE, WORLD_VERSION, load_world, save_world, v2_world
from workers.toyworld.shards import MULTI_SHARD_SCHEMA, SHARD_SCHEMA, png_bytes, samples_to_table, write_shards
from workers.toyworld.world import (
    BACKGROUND_ID, BACKGROUNDS, COLOURS, PALETTE, QTYPES, QUADRANTS, REGION_QTYPES, SHAPES, SIZES, QA, Sample, SceneConfig,
    SceneObject, WorldConfig, ask_question, box_token_mask, boxes_on_grids, caption, dense_cell_labels,
    generate_samples, make_sample, more_questions, name_image, object_id_map, render_scene, row_box_masks, row_images,
    row_scenes, sample_scene,
)

__all__ = [
    "BACKGROUND_ID", "BACKGROUNDS", "COLOURS", "PALETTE", "QTYPES", "SHAPES", "SIZES", "QA", "Sample",
    "SceneConfig", "SceneObject", "WorldConfig", "ask_question", "box_token_mask", "boxes_on_grids", "caption",
    "dense_cell_labels", "generate_samples", "make_sample", "object_id_map", "render_scene",
    "sample_scene", "more_questions", "name_image", "row_box_masks", "row_images", "row_scenes", "QUADRANTS", "REGION_QTYPES", "WORLD_FILE", "WORLD_VERSION", "load_world",
    "save_world", "v2_world", "MULTI_SHARD_SCHEMA", "SHARD_SCHEMA", "png_bytes", "samples_to_table", "write_shards",
]
