"""Smoke test of bench/gpu_throughput_bench.py --quick: the device benchmark's code path (engine,
scheduler, both modes, FLOP accounting, report) on CPU with the tiny model, so the script runs
unchanged when a GPU is lent. Structure and invariants only: timings are the benchmark's to report."""
from __future__ import annotations

import json

import pytest

from engine_helpers import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_reports_both_modes_and_tasks(tmp_path):
    out = tmp_path / "gpu.json"
    for bench in load_bench("gpu_throughput_bench"):
        bench.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [a["attn_implementation"] for a in report["by_attention"]] == ["sdpa"]
    attn = report["by_attention"][0]
    assert attn["kv_budget_tokens"] > 0
    for task, new_tokens in (("vqa", 3), ("caption", 8)):
        t = attn["tasks"][task]
        p, u = t["median"]["pruned"], t["median"]["unpruned"]
        assert p["output_tokens"] == u["output_tokens"] == 6 * new_tokens  # stop tokens silenced: every row runs its length
        assert p["kept_tokens_mean"] < p["visual_tokens_mean"] == u["visual_tokens_mean"] == 16
        assert 0 < p["model_tflops"] < u["model_tflops"]  # pruning does less work ...
        assert p["achieved_concurrency"] > 0 and u["achieved_concurrency"] > 0
        assert t["images_per_s_ratio_pruned_over_unpruned"] > 0
        assert p["mfu"] is None  # no peak known on CPU


def test_cpu_without_quick_is_refused():
    for bench in load_bench("gpu_throughput_bench"):
        with pytest.raises(SystemExit, match="GPU"):
            bench.parse_args(["--device", "cpu"])
