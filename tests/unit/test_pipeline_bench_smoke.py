"""Smoke test of bench/pipeline_bench.py: `main(["--quick", ...])` (tiny model, no Ray) into a temp dir.

Checks the JSON structure and the invariants that do not depend on timing: retained-token packing pads
generation batches no more than fixed-row batching of the same rows, and both policies answer every
row. Timings are reported by the benchmark, never asserted.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import load_bench

POLICIES = ("adaptive", "fixed")


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("pipeline_bench")


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results" / "pipeline_bench.json"
    threads = torch.get_num_threads()
    returned = bench.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads, "main() must restore torch's thread count"
    written = json.loads(out.read_text())
    assert written["batching"]["median"] == returned["batching"]["median"]
    return written


def test_json_has_expected_keys(report):
    assert set(report) == {"config", "environment", "image_stage_s", "batching", "pipeline"}
    assert report["pipeline"] is None  # --quick runs no Ray unless --with-ray
    for key in ("rows", "fixed_rows", "max_rows", "block_rows", "repeats", "model_spec", "glimpse", "job"):
        assert key in report["config"]
    for key in ("torch", "transformers", "ray", "torch_threads", "cpu_count", "load_average_at_start"):
        assert key in report["environment"]
    batching = report["batching"]
    for key in ("median", "ratios", "raw", "rows_answered", "keep_ratio", "paired_rows_per_s_ratio_median"):
        assert key in batching
    for policy in POLICIES:
        assert len(batching["raw"][policy]) == report["config"]["repeats"]
        for key in ("rows_per_s", "wall_s", "glimpse_pad_fraction", "generation_pad_fraction", "generation_batches"):
            assert key in batching["median"][policy]
    for key in ("rows_per_s", "glimpse_pad_fraction", "generation_pad_fraction"):
        assert key in batching["ratios"]


def test_adaptive_packing_pads_generation_no_more_than_fixed_rows(report):
    median = report["batching"]["median"]
    for policy in POLICIES:
        assert 0.0 <= median[policy]["generation_pad_fraction"] < 1.0
    assert median["adaptive"]["generation_pad_fraction"] <= median["fixed"]["generation_pad_fraction"]


def test_both_policies_answer_every_row(report):
    batching, rows = report["batching"], report["config"]["rows"]
    assert batching["rows_answered"] == {policy: rows for policy in POLICIES}
    for policy in POLICIES:
        for run in batching["raw"][policy]:
            assert run["rows"] == run["rows_answered"] == rows
            assert sum(run["generation_batch_rows"]) == rows
    fixed = report["config"]["fixed_rows"]
    assert all(n <= fixed for run in batching["raw"]["fixed"] for n in run["generation_batch_rows"])
    assert 0.0 < batching["keep_ratio"]["mean"] <= 1.0
