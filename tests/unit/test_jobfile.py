"""Job files: shipped jobs load, overrides apply, and every kind of mistake is one line naming file and key."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jobfile import JobFileError, load_job
from schemas.job import FixedRatioPruning, GlimpsePruning, JobSpec, NoPruning, StorageOptions

REPO = Path(__file__).resolve().parents[2]
MINIMAL = """\
input:
  uri: s3://bucket/in/
output:
  uri: s3://bucket/out/
model:
  base: models/tiny-qwen2_5_vl
"""


def write_job(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_error(path: str, overrides=()) -> str:
    with pytest.raises(JobFileError) as info:
        load_job(path, overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_shipped_jobs_load(job):
    spec = load_job(REPO / "jobs" / job)
    assert isinstance(spec, JobSpec) and spec.input.uri and spec.output.uri


def test_shipped_jobs_cover_caption_vqa_demo():
    caption, vqa, demo = (load_job(REPO / "jobs" / f"{n}.yaml") for n in ("caption", "vqa", "demo"))
    assert caption.input.columns.question is None and caption.input.prompt
    assert vqa.input.columns.question == "question"
    assert demo.input.uri == "out/demo/input" and demo.output.uri == "out/demo/output"
    assert demo.model.base == "models/small-qwen2_5_vl-v2" and demo.model.glimpse_modules == "models/small-qwen2_5_vl-v2-glimpse" and isinstance(demo.pruning, GlimpsePruning)


def test_minimal_job_gets_documented_defaults(tmp_path):
    spec = load_job(write_job(tmp_path, MINIMAL))
    assert spec.input.columns.id == "id" and spec.input.columns.image == "image"
    assert isinstance(spec.pruning, GlimpsePruning) and spec.pruning.threshold == 0.5
    assert spec.output.mode == "overwrite" and spec.image.max_pixels == 1_003_520


def test_every_field_is_described():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg)

    walk(JobSpec)
    for strategy in (NoPruning, GlimpsePruning, FixedRatioPruning):
        walk(strategy)


def test_overrides_set_nested_values_as_yaml_scalars(tmp_path):
    path = write_job(tmp_path, MINIMAL)
    spec = load_job(path, [
        "input.uri=s3://other/prefix/*.parquet",
        "sampling.seed=7",
        "output.storage.anonymous=true",
        "input.prompt=Describe: the image",  # would parse as a mapping: kept as text
        "input.columns.image=image_url",
        "resources.num_cpus_per_actor=0.25",
    ])
    assert spec.input.uri == "s3://other/prefix/*.parquet" and spec.sampling.seed == 7
    assert spec.output.storage.anonymous is True and spec.input.prompt == "Describe: the image"
    assert spec.input.columns.image == "image_url" and spec.resources.num_cpus_per_actor == 0.25


def test_override_switches_pruning_strategy(tmp_path):
    path = write_job(tmp_path, MINIMAL + "pruning:\n  mode: glimpse\n  threshold: 0.3\n")
    assert isinstance(load_job(path, ["pruning.mode=none"]).pruning, NoPruning)
    fixed = load_job(path, ["pruning.mode=fixed_ratio", "pruning.keep_ratio=0.25"]).pruning
    assert fixed == FixedRatioPruning(keep_ratio=0.25)
    other = load_job(path, ["pruning.mode=divprune", "pruning.keep_ratio=0.111"]).pruning
    assert (other.mode, other.keep_ratio) == ("divprune", 0.111)  # the glimpse threshold is dropped with its mode
    fastv = load_job(path, ["pruning.mode=fastv", "pruning.keep_ratio=0.2", "pruning.layer=3"]).pruning
    assert (fastv.mode, fastv.layer) == ("fastv", 3)


@pytest.mark.parametrize(
    "extra_yaml, expected",
    [
        ("pruning:\n  mode: foo\n",
         "pruning.mode: unknown value 'foo' (expected one of none, glimpse, fixed_ratio, random, uniform, fastv, pdrop, divprune, dart, visionzip, cdpruner)"),
        ("pruning:\n  threshold: 0.4\n", "pruning.mode: field required (one of none, glimpse, fixed_ratio, random, uniform, fastv, pdrop, divprune, dart, visionzip, cdpruner)"),
        ("pruning:\n  mode: glimpse\n  treshold: 0.4\n", "pruning.treshold: unknown key (did you mean 'threshold'?)"),
        ("pruning:\n  mode: fixed_ratio\n  keep_ratio: 0\n", "pruning.keep_ratio: input should be greater than 0"),
        ("pruning:\n  mode: fastv\n", "pruning.keep_ratio: field required"),
        ("pruning:\n  mode: divprune\n  keep_ratio: 0.1\n  layer: 2\n", "pruning.layer: unknown key"),
        ("pruning:\n  mode: pdrop\n  keep_ratio: 0.1\n  stage_fractions: [0.5, 0.25]\n",
         "pruning.stage_fractions: must be ascending values in (0, 1], got [0.5, 0.25]"),
        ("pruning:\n  mode: dart\n  keep_ratio: 0.1\n  pivots: 0\n", "pruning.pivots: input should be greater than or equal to 1"),
        ("pruning:\n  mode: visionzip\n  keep_ratio: 0.1\n  contextual: 1\n", "pruning.contextual: input should be less than 1"),
        ("sampling:\n  max_new_tokens: lots\n", "sampling.max_new_tokens: input should be a valid integer"),
        ("model2: {}\n", "model2: unknown key (did you mean 'model'?)"),
        ("model:\n  base: x\n  dtype: fp8\n",
         "model.dtype: unknown value 'fp8' (expected one of auto, float32, bfloat16, float16)"),
        ("resources:\n  min_actors: 4\n  max_actors: 2\n",
         "resources.max_actors: must be >= min_actors (got max_actors=2, min_actors=4)"),
        ("image:\n  min_pixels: 5000\n  max_pixels: 4000\n", "image.max_pixels: must be >= min_pixels"),
        ("input:\n  uri: s3://bucket/in/\n  columns:\n    question: null\n", "input.prompt: required when columns.question is null"),
        ("output:\n  uri: s3://bucket/in\n", "output.uri: must differ from input.uri"),
        ("model:\n  base: x\n  device: cuda\nresources:\n  num_gpus_per_actor: 0\n",
         "resources.num_gpus_per_actor: must be > 0 when model.device is 'cuda'"),
        ("input:\n  uri: s3://bucket/in/\n  storage:\n    key_env: K\n", "input.storage.secret_env: key_env and secret_env must be given together"),
        ("input:\n  uri: s3://bucket/in/\n  storage:\n    endpoint_url: minio:9000\n", "input.storage.endpoint_url: must start with http:// or https://"),
        ("input:\n  uri: s3://bucket/in/\n  storage:\n    extra: {requester_pays: [1]}\n",
         "input.storage.extra.requester_pays: expected a string, number or boolean (got list [1])"),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path, extra_yaml, expected):
    # Later top-level sections replace MINIMAL's (PyYAML would merge duplicates; we reject them), so
    # build the file from MINIMAL's sections minus the ones the case redefines.
    sections = {"input": "input:\n  uri: s3://bucket/in/\n", "output": "output:\n  uri: s3://bucket/out/\n",
                "model": "model:\n  base: models/tiny-qwen2_5_vl\n"}
    text = "".join(v for k, v in sections.items() if not extra_yaml.startswith(k + ":")) + extra_yaml
    path = write_job(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: {expected}"), message


def test_missing_uri_names_the_key(tmp_path):
    path = write_job(tmp_path, "input: {}\noutput:\n  uri: s3://b/out/\nmodel:\n  base: m\n")
    assert load_error(path) == f"{path}: input.uri: field required"


def test_unknown_key_from_override(tmp_path):
    path = write_job(tmp_path, MINIMAL)
    message = load_error(path, ["model.bsae=Qwen/Qwen2.5-VL-3B-Instruct"])
    assert message == f"{path}: model.bsae: unknown key (did you mean 'base'?) (set by --set)"


def test_wrong_type_from_override(tmp_path):
    path = write_job(tmp_path, MINIMAL)
    message = load_error(path, ["image.max_pixels=big"])
    assert message.startswith(f"{path}: image.max_pixels: input should be a valid integer") and "'big'" in message


@pytest.mark.parametrize("item", ["no-equals-sign", "=value", "a..b=1", "input.uri.x=1"])
def test_malformed_overrides(tmp_path, item):
    message = load_error(write_job(tmp_path, MINIMAL), [item])
    assert "--set" in message


def test_yaml_syntax_error_has_line_number(tmp_path):
    path = write_job(tmp_path, "input:\n  uri: a\n output: b\n")
    message = load_error(path)
    assert message.startswith(f"{path}: line 3, column 2: invalid YAML:"), message


def test_duplicate_key_is_an_error(tmp_path):
    path = write_job(tmp_path, MINIMAL + "model:\n  base: other\n")
    assert load_error(path) == f"{path}: line 7, column 1: invalid YAML: duplicate key 'model'"


@pytest.mark.parametrize("text, expected", [
    ("", "input: field required (+2 more errors)"),
    ("- a\n", "top level must be a mapping of sections, got list"),
])
def test_empty_or_non_mapping_file(tmp_path, text, expected):
    path = write_job(tmp_path, text)
    assert load_error(path) == f"{path}: {expected}"


def test_unreadable_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    assert load_error(path) == f"{path}: cannot read job file: No such file or directory"


def test_pasted_credential_is_refused_without_echoing_it(tmp_path):
    secret = "AKIAIOSFODNN7EXAMPLE"
    path = write_job(tmp_path, MINIMAL)
    message = load_error(path, [f"input.storage.key_env={secret}", "input.storage.secret_env=S"])
    assert message.startswith(f"{path}: input.storage.key_env: must be the NAME of an environment variable")
    assert secret not in message


def test_manifest_is_redacted():
    spec = JobSpec(
        input={"uri": "s3://bucket/in/", "storage": StorageOptions(
            endpoint_url="https://user:pa55@minio.local:9000", key_env="K", secret_env="S",
            extra={"sse_customer_key": "c2VjcmV0", "requester_pays": True})},
        output={"uri": "https://host/out/?X-Amz-Signature=abc123"},
        model={"base": "models/tiny"},
    )
    manifest = json.dumps(spec.to_manifest())
    for leaked in ("pa55", "user:", "c2VjcmV0", "abc123"):
        assert leaked not in manifest
    assert spec.to_manifest()["input"]["storage"]["key_env"] == "K"  # names are fine to show
    assert spec.to_manifest()["input"]["storage"]["extra"]["requester_pays"] is True


def test_job_spec_is_frozen(tmp_path):
    spec = load_job(write_job(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        spec.input.uri = "elsewhere"


def test_schemas_and_pipeline_modules_do_not_import_torch_or_ray():
    code = (
        "import sys; import schemas, schemas.rows, pipeline.jobfile, pipeline.storage, pipeline.images, "
        "pipeline.writer; bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout


def test_gs_urls_resolve_to_gcsfs_without_network():
    import pyarrow.fs as pafs

    from pipeline.storage import fsspec_filesystem, pyarrow_filesystem
    from schemas.job import StorageOptions

    fs, path = fsspec_filesystem("gs://public-bucket/shards/part-0.parquet", StorageOptions(anonymous=True))
    assert type(fs).__module__.startswith("gcsfs") and path == "public-bucket/shards/part-0.parquet"
    wrapped, _ = pyarrow_filesystem("gs://public-bucket/shards/", StorageOptions(anonymous=True))
    assert isinstance(wrapped, pafs.PyFileSystem)
