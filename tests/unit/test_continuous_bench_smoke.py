"""Smoke test of bench/continuous_bench.py --quick: structure and invariants only (timings are the
benchmark's to report, never asserted)."""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import load_bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "continuous_bench.json"
    threads = torch.get_num_threads()
    for bench in load_bench("continuous_bench"):
        bench.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads
    return json.loads(out.read_text())


def test_static_and_continuous_agree_and_occupancy_is_counted(report):
    p1 = report["part1_continuous_vs_static"]
    assert p1["same_tokens"] is True  # greedy: the scheduler changes when rows run, never what they say
    occ = p1["slot_occupancy"]
    assert 0 < occ["static"] <= 1 and 0 < occ["continuous"] <= 1
    assert p1["decode_steps"]["continuous"] <= p1["decode_steps"]["static"]
    assert p1["predicted_ratio_equal_step_cost"] >= 1.0


def test_equal_kv_budget_rows(report):
    p2 = report["part2_pruned_vs_unpruned_equal_kv"]
    assert [e["max_rows"] for e in p2["by_limit"]] == [2, 8]
    for e in p2["by_limit"]:
        u, p = e["unpruned"], e["pruned"]
        assert u["predicted_concurrency_cap"] <= p["predicted_concurrency_cap"] <= e["max_rows"]
        assert p["mean_cache_tokens_after_prefill"] < u["mean_cache_tokens_after_prefill"]
        for mode in (u, p):
            assert 0 < mode["achieved_concurrency"] <= mode["peak_rows"] <= e["max_rows"]
            assert 0 < mode["kv_budget_use"] <= 1.0
    p3 = report["part3_engine_vs_prediction"]
    assert p3["analytic_lower_bound"] <= p3["analytic_decoder_prefill_flops_ratio"] < 1.0


def test_across_blocks_same_tokens_and_fewer_steps(report):
    p4 = report["part4_across_blocks"]
    assert p4["same_tokens"] is True  # sharing the batch across blocks never changes what a row says
    assert p4["decode_steps"]["shared"] <= p4["decode_steps"]["one_call"] <= p4["decode_steps"]["static"]
    assert 0 < p4["slot_occupancy"]["one_call"] <= p4["slot_occupancy"]["shared"] <= 1
