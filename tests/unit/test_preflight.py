"""Checks before any work (pipeline/preflight.py): the model and modules are what the job declares, the
output is writable, the dry run prints an estimate; every failure is one line before Ray starts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jobfile import load_job
from pipeline.preflight import PreflightError, check_models, check_output_writable

REPO = Path(__file__).resolve().parents[2]
V2, V2_MODULES = "models/small-qwen2_5_vl-v2", "models/small-qwen2_5_vl-v2-glimpse"


def _job(tmp_path, *extra):
    return load_job(REPO / "jobs" / "demo.yaml", [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}", *extra])


def test_the_shipped_model_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    found = check_models(_job(tmp_path))
    assert "qwen2_5_vl, 8 decoder layers" in found["model.base"] and "after layer 1" in found["model.glimpse_modules"]


@pytest.mark.parametrize("setup, overrides, message", [
    ("other_type", [], "model_type 'llama' is not one this engine runs"),
    ("empty_dir", [], "not a model directory (no config.json)"),
    (None, ["model.base=models/small-qwen2_5_vl-v3"], "no such directory (did you mean 'models/small-qwen2_5_vl-v2'?)"),
    (None, ["model.base=./nowhere"], "model.base ./nowhere: no such directory"),
    ("bad_modules", [], "reduce_layer 12 >= the model's 8 decoder layers"),
    ("no_weights", [], "no new_modules_gp.pt"),
    (None, ["pruning.mode=fastv", "pruning.keep_ratio=0.1", "pruning.layer=8"], "pruning.layer 8: the model has 8 decoder layers"),
    (None, ["pruning.mode=visionzip", "pruning.keep_ratio=0.1", "pruning.vit_layer=9"], "the vision tower has 4 blocks"),
])
def test_what_is_not_what_the_job_declares_fails_in_one_line(tmp_path, monkeypatch, setup, overrides, message):
    monkeypatch.chdir(REPO)
    extra = list(overrides)
    if setup == "other_type":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        extra.append(f"model.base={tmp_path / 'm'}")
    elif setup == "empty_dir":
        (tmp_path / "m").mkdir()
        extra.append(f"model.base={tmp_path / 'm'}")
    elif setup in ("bad_modules", "no_weights"):
        modules = tmp_path / "mods"
        shutil.copytree(REPO / V2_MODULES, modules)
        if setup == "bad_modules":
            config = json.loads((modules / "config.json").read_text())
            (modules / "config.json").write_text(json.dumps({**config, "reduce_layer": 12}))
        else:
            (modules / "new_modules_gp.pt").unlink()
        extra.append(f"model.glimpse_modules={modules}")
    with pytest.raises(PreflightError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        check_models(_job(tmp_path, *extra))


def test_hub_ids_not_cached_are_left_to_the_actors_unless_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    job = _job(tmp_path, "model.base=Qwen/Qwen2.5-VL-7B-Instruct", "pruning.mode=none")
    assert "not in the local cache" in check_models(job)["model.base"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreflightError, match="not in the local hub cache and HF_HUB_OFFLINE=1"):
        check_models(job)


def test_output_must_be_writable_and_the_probe_leaves_nothing(tmp_path):
    assert check_output_writable(_job(tmp_path)).endswith("writable")
    assert not (tmp_path / "out").exists()  # the probe's folder is removed again
    (tmp_path / "afile").write_text("x")
    job = load_job(REPO / "jobs" / "demo.yaml", [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'afile' / 'out'}"])
    with pytest.raises(PreflightError, match="is not writable"):
        check_output_writable(job)


def test_dry_run_prints_checks_and_an_estimate_or_one_line(tmp_path):
    from workers.toyworld import load_world, write_shards

    write_shards(load_world(REPO / V2, seed=77), 6, tmp_path / "in", rows_per_shard=3)
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "pipeline", "run", "jobs/vqa.yaml", "--profile", "local", "--set", f"input.uri={tmp_path / 'in'}",
           "--set", f"output.uri={tmp_path / 'out'}", "--dry-run"]
    ok = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert plan["estimate"]["rows_to_compute"] == 6 and plan["estimate"]["visual_tokens_per_row"] == 144.0
    assert set(plan["checks"]) == {"model.base", "model.glimpse_modules", "output.uri"}
    bad = subprocess.run(cmd + ["--set", "model.base=models/small-qwen2_5_vl-v3"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "did you mean 'models/small-qwen2_5_vl-v2'" in lines[0], bad.stderr
