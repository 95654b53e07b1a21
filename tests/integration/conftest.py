"""Integration fixtures: one local Ray runtime per test session, a saved tiny model + glimpse modules."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def ray_runtime():
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    DataContext.get_current().execution_no_progress_timeout_s = 300
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """(base dir, glimpse modules dir) of the tiny random model, as a user would have on disk."""
    from engine_helpers import random_modules

    from workers.modeling.tiny import TinySpec, build_tiny_model, save_tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    spec = TinySpec(rope_theta=10_000.0)
    base = save_tiny_model_dir(root / "base", spec, seed=0)
    model = build_tiny_model(spec, seed=0)
    random_modules(model, seed=1).save(root / "glimpse", base_config=model.config.to_dict())
    return base, root / "glimpse"
