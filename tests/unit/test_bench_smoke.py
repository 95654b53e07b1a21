"""Smoke test of bench/engine_bench.py: `main(["--quick", ...])` end to end into a temp dir.

Only structure and invariants are checked (keys, keep count, KV bytes, analytic bounds); timings are
reported by the benchmark, never asserted.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import load_bench



@pytest.fixture(scope="module")
def bench():
    yield from load_bench("engine_bench")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results" / "engine_bench.json"
    threads = torch.get_num_threads()
    returned = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    assert torch.get_num_threads() == threads, "main() must restore torch's thread count"
    return returned, json.loads(out.read_text())


def test_json_has_expected_keys(run):
    returned, report = run
    assert set(report) == {"config", "environment", "measured", "analytic"}
    for key in ("torch", "transformers", "device", "torch_threads", "dtype", "attn_implementation"):
        assert key in report["environment"]
    assert report["environment"]["device"] == "cpu"
    measured = report["measured"]
    for key in ("median", "ratios", "keep", "raw", "prompt_tokens", "early_stops"):
        assert key in measured
    for mode in ("pruned", "unpruned"):
        for key in ("prefill_s", "prefill_cpu_s", "decode_s", "decode_s_per_step", "kv_cache_bytes"):
            assert key in measured["median"][mode]
        assert len(measured["raw"][mode]) == report["config"]["repeats"]
    for key in ("prefill_s", "decode_s", "decode_s_per_step", "kv_cache_bytes"):
        assert key in measured["ratios"]
    assert report["config"]["keep_ratio"] == pytest.approx(0.111)
    assert report["measured"]["keep"] == returned["measured"]["keep"]


def test_pruned_run_keeps_a_ninth_of_visual_tokens(run):
    _, report = run
    keep = report["measured"]["keep"]
    assert keep["ok"]
    for visual, kept in zip(keep["visual_tokens"], keep["kept_tokens"]):
        assert visual > 0
        assert kept == max(1, int(0.111 * visual))
        assert abs(kept / visual - 0.111) < 1 / visual  # within one token of rounding


def test_pruned_kv_cache_is_smaller(run):
    _, report = run
    median = report["measured"]["median"]
    assert 0 < median["pruned"]["kv_cache_bytes"] < median["unpruned"]["kv_cache_bytes"]
    assert median["pruned"]["kv_cache_tokens_per_row"] < median["unpruned"]["kv_cache_tokens_per_row"]


def test_analytic_7b_ratio_between_lower_bound_and_one(run):
    _, report = run
    rows = [r for r in report["analytic"]["qwen2_5_vl"] if r["model"] == "Qwen2.5-VL-7B"]
    assert {r["visual_tokens"] for r in rows} == {1024, 4096}
    for row in rows:
        assert row["lower_bound_ratio"] == pytest.approx(19 / 28)
        assert 19 / 28 <= row["prefill_flops_ratio"] < 1
        assert 0 < row["kv_cache_bytes_ratio"] < 1


def test_analytic_formula_invariants(bench):
    vip = bench.VipDims()
    for dims in (bench.QWEN25_VL_3B, bench.QWEN25_VL_7B):
        bound = (dims.reduce_layer + 1) / dims.num_layers
        ratios = [bench.prefill_flops(dims, vip, n, 64)["prefill_flops_ratio"] for n in (256, 1024, 4096, 16384)]
        assert all(bound <= r < 1 for r in ratios)
        # keeping every token costs slightly more than not pruning (glimpse token + VIP)
        assert bench.prefill_flops(dims, vip, 1024, 64, keep_ratio=1.0)["prefill_flops_ratio"] > 1
