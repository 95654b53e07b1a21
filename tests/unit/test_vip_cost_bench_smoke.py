"""Smoke test of bench/vip_cost_bench.py on the shipped v2 model: structure only, timings never asserted."""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import load_bench


@pytest.fixture
def bench():
    yield from load_bench("vip_cost_bench")


def test_vip_cost_bench_runs_and_reports_each_modules_dir(bench, tmp_path):
    out = tmp_path / "vip_cost.json"
    threads = torch.get_num_threads()
    modules = str(bench.REPO / "models" / "small-qwen2_5_vl-v2-glimpse")
    assert bench.main(["--modules", modules, "--rows", "4", "--batch-size", "4", "--rounds", "2",
                       "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads
    result = json.loads(out.read_text())["results"][modules]
    assert len(result["all_wall_ratios"]) == 2 and result["wall_pruned_over_unpruned"] > 0
    assert 0 < result["mean_keep_ratio"] < 1
    # the shipped VIP is sized so that pruning saves FLOPs at its keep ratio
    assert 0.5 < result["analytic_prefill_flops_ratio"] < 1
    assert result["vip"] == {"fuse": 64, "cond": 64, "levels": 2}
