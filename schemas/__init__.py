"""Typed contracts shared by every layer: the job file (`job`) and the row schemas (`rows`).

This is the bottom layer: it imports only pydantic and pyarrow, never `pipeline`, `workers`, ray or
torch, so a job file can be validated and an output schema inspected anywhere.
"""
from schemas.job import (
    BatchingSpec,
    FixedRatioPruning,
    GlimpsePruning,
    ImageSpec,
    InputColumns,
    InputSpec,
    JobSpec,
    ModelSpec,
    NoPruning,
    OutputSpec,
    PruningSpec,
    ResourcesSpec,
    SamplingSpec,
    StorageOptions,
    StrictModel,
)

__all__ = [
    "BatchingSpec",
    "FixedRatioPruning",
    "GlimpsePruning",
    "ImageSpec",
    "InputColumns",
    "InputSpec",
    "JobSpec",
    "ModelSpec",
    "NoPruning",
    "OutputSpec",
    "PruningSpec",
    "ResourcesSpec",
    "SamplingSpec",
    "StorageOptions",
    "StrictModel",
]
