"""Import direction (the planner and UDF modules stay light) and the job CLI's failure mode."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_planner_and_udf_modules_import_no_torch_or_ray():
    code = (
        "import sys; import pipeline.run, pipeline.__main__, workers.generate, workers.batching, workers.modeling.api; "
        "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout


def test_model_code_never_imports_ray():
    code = (
        "import sys; import workers.modeling.engine, workers.modeling.loading, workers.modeling.qwen2_5_vl; "
        "sys.exit('ray imported' if 'ray' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout


def test_malformed_job_fails_before_any_work_with_one_line(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("input:\n  uri: in/\noutput:\n  uri: out/\nmodel:\n  base: m\n  bsae: typo\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml: model.bsae: unknown key" in lines[0], result.stderr
    assert "Ray" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_workers_and_schemas_never_import_pipeline():
    """The layers point one way: pipeline -> workers -> schemas (STYLE.md, rule 1)."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+pipeline\b", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for layer in ("workers", "schemas")
                 for p in (REPO / layer).rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"import pipeline from a lower layer: {offenders}"


def test_the_cluster_runtime_env_pins_what_the_project_needs():
    """jobs/cluster/runtime_env.yaml (the `ray job submit --runtime-env` file) lists pyproject's dependencies but Ray."""
    import tomllib

    import yaml

    repo = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((repo / "jobs" / "cluster" / "runtime_env.yaml").read_text())
    assert env["pip"]["packages"] == [d for d in deps if not d.startswith("ray")]
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
