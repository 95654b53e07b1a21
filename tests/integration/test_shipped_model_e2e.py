"""The shipped small model through the whole pipeline: real, correct answers with pruning on.

The demo job (jobs/demo.yaml: models/small-qwen2_5_vl-v2 + its glimpse modules, local Ray) runs on
fresh held-out rows of the model's own world (336 px, 1-3 objects, attribute and existence questions,
a seed that no training run used). The answers must match the generator's, and GlimpsePrune must
actually prune.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.jobfile import load_job
from pipeline.run import run_job
from workers.toyworld import generate_samples, load_world, write_shards

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BASE, GLIMPSE = REPO / "models" / "small-qwen2_5_vl-v2", REPO / "models" / "small-qwen2_5_vl-v2-glimpse"
EASY = dataclasses.replace(load_world(BASE, seed=4242), min_objects=1, max_objects=3, two_image_share=0.0,
                           question_mix=(("attribute", 0.6), ("existence", 0.4)))


@pytest.mark.skipif(not (GLIMPSE / "new_modules_gp.pt").exists() or not (BASE / "model.safetensors").exists(),
                    reason="the shipped model or its glimpse modules are missing")
def test_demo_job_answers_easy_rows_correctly_with_pruning(tmp_path, ray_runtime):
    write_shards(EASY, 16, tmp_path / "in", rows_per_shard=8)
    job = load_job(REPO / "jobs" / "demo.yaml", [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}"])
    assert Path(job.model.base).resolve() == BASE and Path(job.model.glimpse_modules).resolve() == GLIMPSE
    summary = run_job(job)
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))])
    rows = table.to_pylist()
    assert len(rows) == 16 and summary["rows_ok"] == 16
    assert all(r["status"] == "ok" for r in rows)
    truth = {s.id: s for s in generate_samples(EASY, 16)}
    assert {r["id"] for r in rows} == set(truth)
    # The shard's own `answer` column passes through as `input_answer`; `answer` is the model's.
    assert all(r["input_answer"] == truth[r["id"]].answer for r in rows)
    answers = [(truth[r["id"]].question, truth[r["id"]].answer, r["answer"].strip()) for r in rows]
    assert sum(want == got for _, want, got in answers) >= 14, answers
    keep = [r["keep_ratio"] for r in rows]
    assert max(keep) < 1.0 and sum(keep) / len(keep) < 0.5, keep


@pytest.mark.skipif(not (BASE / "model.safetensors").exists(), reason="the shipped model is missing")
def test_vqa_job_with_another_pruning_strategy_says_which_and_keeps_its_budget(tmp_path, ray_runtime):
    """`jobs/vqa.yaml --profile local --set pruning.mode=divprune --set pruning.keep_ratio=0.111` runs like
    any job; each row says which strategy and budget produced it and keeps exactly that budget."""
    import json

    from workers.modeling.strategies import keep_count

    write_shards(EASY, 8, tmp_path / "in", rows_per_shard=8)
    job = load_job(REPO / "jobs" / "vqa.yaml", [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}",
                                                "pruning.mode=divprune", "pruning.keep_ratio=0.111"], ["local"])
    summary = run_job(job)
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))]).to_pylist()
    assert len(rows) == 8 and summary["rows_ok"] == 8
    for r in rows:
        assert json.loads(r["pruning"]) == {"mode": "divprune", "keep_ratio": 0.111, "positions": "original"}
        assert r["visual_tokens"] == 144 and r["kept_tokens"] == keep_count(144, 0.111) == 15
        assert 0 < r["prefill_work_ratio"] < 1
