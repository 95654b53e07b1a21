"""Shared tiny-model fixtures for the engine tests (built offline, fp32, SDPA)."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import random_modules
from workers.modeling.tiny import TinySpec, build_processor, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model():
    # rope_theta 1e4 (not the stock 1e6) so that positions visibly change the tiny model's logits.
    return build_tiny_model(TinySpec(rope_theta=10_000.0), seed=0)


@pytest.fixture(scope="session")
def tiny_processor():
    return build_processor()


@pytest.fixture(scope="session")
def tiny_modules(tiny_model):
    return random_modules(tiny_model, seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: under load, two OpenMP threads per process spin and run tiny models 10-60x
    slower than one thread. Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
