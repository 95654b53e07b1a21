"""Checks before any work (the dry run and the start of every run), each failing in one line.

  * the model and the glimpse modules resolve (a local directory, the local hub cache for a hub id,
    or an object-store URL) and are what the job declares: a Qwen2.5-VL config (the model type the
    engine runs), a tokenizer, modules whose config fits the base (hidden size, heads, the pruning
    layer within the depth), a strategy's layers within the model's depth;
  * the output location is writable (a probe object is written and removed; nothing else is touched);
  * an estimate of the work: rows, shards, images and visual tokens per row from a sample of image
    headers (no decoding), the tokens before and after pruning, and the KV budget.

No torch, no Ray: the planner imports this module.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any, Optional

from pipeline import storage
from schemas.job import STRATEGY_MODES, JobSpec, redact_url

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


class PreflightError(RuntimeError):
    """The job cannot run as written; the message is the one line the user sees."""


# ---------------------------------------------------------------------------------------------------
# Model and modules


def _read_config(name: str, value: str, job: JobSpec) -> tuple[Optional[dict], str]:
    """(config.json of a model location, where it was found) or (None, why it is left to the actors)."""
    if "://" in value:
        try:
            raw = storage.read_bytes(storage.join_url(value, "config.json"), job.input.storage)
        except FileNotFoundError:
            raise PreflightError(f"{name} {redact_url(value)}: no config.json there") from None
        except Exception as exc:  # noqa: BLE001 - unreachable store, bad credentials: one line
            raise PreflightError(f"{name} {redact_url(value)}: cannot read config.json ({type(exc).__name__}: {exc})") from None
        return _parse(name, value, raw), "object storage"
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.exists(config):
            raise PreflightError(f"{name} {value}: not a model directory (no config.json)")
        with open(config, "rb") as fh:
            return _parse(name, value, fh.read()), "local directory"
    first = value.split("/", 1)[0]
    if value.startswith((".", "/", "~")) or os.path.exists(path) or value.count("/") != 1 or os.path.isdir(first):
        raise PreflightError(f"{name} {value}: no such directory{_did_you_mean(path)}" + (
            "" if value.count("/") == 1 else " (and not a hub id of the form owner/name)"))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings it
        return None, "hub id (not checked: huggingface_hub missing)"
    cached = try_to_load_from_cache(value, "config.json")
    if isinstance(cached, str):
        with open(cached, "rb") as fh:
            return _parse(name, value, fh.read()), "hub cache"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PreflightError(f"{name} {value}: not in the local hub cache and HF_HUB_OFFLINE=1")
    return None, "hub id, not in the local cache: the actors download it"


def _did_you_mean(path: str) -> str:
    import difflib

    parent, leaf = os.path.split(path.rstrip("/"))
    try:
        names = [n for n in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", n))]
    except OSError:
        return ""
    close = difflib.get_close_matches(leaf, names, n=1)
    return f" (did you mean {os.path.join(parent, close[0])!r}?)" if close else ""


def _parse(name: str, value: str, raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except ValueError:
        raise PreflightError(f"{name} {redact_url(value)}: config.json is not JSON") from None
    if not isinstance(config, dict):
        raise PreflightError(f"{name} {redact_url(value)}: config.json is not a JSON object")
    return config


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def _has_tokenizer(value: str) -> bool:
    path = os.path.expanduser(value)
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def check_models(job: JobSpec) -> dict[str, str]:
    """Resolve the model (and the modules the pruning mode needs); one line per finding. Raises PreflightError."""
    base, where = _read_config("model.base", job.model.base, job)
    found = {"model.base": f"{redact_url(job.model.base)} ({where})"}
    if base is not None:
        kind = base.get("model_type")
        if kind not in SUPPORTED_MODEL_TYPES:
            raise PreflightError(f"model.base {redact_url(job.model.base)}: model_type {kind!r} is not one this engine runs "
                                 f"({', '.join(SUPPORTED_MODEL_TYPES)})")
        if where == "local directory" and not _has_tokenizer(job.model.base):
            raise PreflightError(f"model.base {job.model.base}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        text = _text(base)
        layers = int(text.get("num_hidden_layers", 0))
        found["model.base"] += f": {kind}, {layers} decoder layers x {text.get('hidden_size')}"
        _check_strategy(job, layers, base.get("vision_config") or {})
    if job.pruning.mode in ("glimpse", "fixed_ratio"):
        if not job.model.glimpse_modules:
            raise PreflightError(f"model.glimpse_modules: pruning.mode {job.pruning.mode} needs glimpse modules")
        modules, where = _read_config("model.glimpse_modules", job.model.glimpse_modules, job)
        found["model.glimpse_modules"] = f"{redact_url(job.model.glimpse_modules)} ({where})"
        if modules is not None:
            _check_modules(job, modules, base)
            found["model.glimpse_modules"] += f": prunes after layer {modules.get('reduce_layer')}"
    return found


def _check_modules(job: JobSpec, modules: dict, base: Optional[dict]) -> None:
    name = f"model.glimpse_modules {redact_url(job.model.glimpse_modules)}"
    if "reduce_layer" not in modules or "selected_layers" not in modules:
        raise PreflightError(f"{name}: config.json is not a GlimpsePrune modules config (no reduce_layer / selected_layers)")
    local = os.path.expanduser(job.model.glimpse_modules)
    if os.path.isdir(local) and not os.path.exists(os.path.join(local, "new_modules_gp.pt")):
        raise PreflightError(f"{name}: no new_modules_gp.pt next to its config.json")
    if base is None:
        return
    mine, theirs = _text(modules), _text(base)
    problems = [f"{key} {mine.get(key)} != model {theirs.get(key)}" for key in ("hidden_size", "num_attention_heads")
                if key in mine and mine.get(key) != theirs.get(key)]
    layers = int(theirs.get("num_hidden_layers", 0))
    if layers and int(modules["reduce_layer"]) >= layers:
        problems.append(f"reduce_layer {modules['reduce_layer']} >= the model's {layers} decoder layers")
    if problems:
        raise PreflightError(f"{name} do not fit model.base: " + "; ".join(problems))


def _check_strategy(job: JobSpec, layers: int, vision: dict) -> None:
    p = job.pruning
    if p.mode not in STRATEGY_MODES or not layers:
        return
    layer = getattr(p, "layer", None)
    if layer is not None and layer >= layers:
        raise PreflightError(f"pruning.layer {layer}: the model has {layers} decoder layers (0..{layers - 1})")
    depth = vision.get("depth")
    vit = getattr(p, "vit_layer", -1)
    if depth and vit >= depth:
        raise PreflightError(f"pruning.vit_layer {vit}: the vision tower has {depth} blocks (0..{depth - 1})")


# ---------------------------------------------------------------------------------------------------
# Output


def check_output_writable(job: JobSpec) -> str:
    """Write and remove a probe object under the output; PreflightError if that fails."""
    probe = storage.join_url(job.output.uri, f"_probe-{uuid.uuid4().hex[:12]}")
    local = None if "://" in job.output.uri and not job.output.uri.startswith("file://") else \
        os.path.abspath(os.path.expanduser(job.output.uri.removeprefix("file://")))
    made = [] if local is None else _missing_dirs(local)
    try:
        storage.write_bytes(probe, b"glimpse-batch write probe", job.output.storage)
    except Exception as exc:  # noqa: BLE001 - permissions, full disk, unreachable store: one line
        raise PreflightError(f"output.uri {redact_url(job.output.uri)} is not writable ({type(exc).__name__}: "
                             f"{getattr(exc, 'strerror', None) or exc})") from None
    try:
        storage.remove(probe, job.output.storage)
        for directory in made:  # the folders the probe created (deepest first), if still empty
            os.rmdir(directory)
    except Exception:  # noqa: BLE001 - written but not removed: still writable; the probe is ours
        pass
    return f"{redact_url(job.output.uri)} writable"


def _missing_dirs(path: str) -> list:
    out = []
    while path and not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


# ---------------------------------------------------------------------------------------------------
# Estimate


def estimate(job: JobSpec, plan, sample_rows: int = 16) -> dict[str, Any]:
    """Rows, shards and a visual-token estimate from the image headers of a few rows of the first shards."""
    from pipeline.images import smart_resize, visual_tokens

    rows = sum(sp.pending for sp in plan.todo)
    sizes: list = []
    for sp in plan.todo:
        if len(sizes) >= sample_rows:
            break
        sizes.extend(_sample_image_sizes(job, sp, sample_rows - len(sizes)))
    per_row = None
    if sizes:
        tokens = []
        for images in sizes:
            total = 0
            for w, h in images:
                rh, rw = smart_resize(h, w, job.image.min_pixels, job.image.max_pixels)
                total += visual_tokens(rh, rw)
            tokens.append(total)
        per_row = sum(tokens) / len(tokens)
    out: dict[str, Any] = {
        "rows_to_compute": rows, "shards_to_compute": len(plan.todo), "sampled_rows": len(sizes),
        "visual_tokens_per_row": None if per_row is None else round(per_row, 1),
        "visual_tokens_total": None if per_row is None else int(per_row * rows),
    }
    keep = _expected_keep(job)
    if keep is not None and per_row is not None:
        out["kept_tokens_total_expected"] = int(per_row * rows * keep)
        out["keep_ratio_expected"] = keep
    b = job.batching
    out["kv_budget_tokens"] = b.kv_budget_tokens or f"{b.kv_memory_fraction:g} x free device memory, set per actor"
    return out


def _expected_keep(job: JobSpec) -> Optional[float]:
    p = job.pruning
    if p.mode == "none":
        return 1.0
    if hasattr(p, "keep_ratio"):
        return p.keep_ratio
    return getattr(p, "max_remain_ratio", None)  # glimpse: only its cap is known before the run


def _sample_image_sizes(job: JobSpec, sp, count: int) -> list:
    """Per sampled row, the (width, height) of each image, from the first rows of one shard (headers only)."""
    from PIL import Image

    from pipeline import inputs
    from pipeline.images import ImageStageConfig, image_sources, load_source

    cols = job.input.columns
    config = ImageStageConfig.from_job(job)
    try:
        table = next(iter(inputs.unit_blocks(dict(sp.units[0], wanted=None), cols, job.input.storage, count)))
    except Exception:  # noqa: BLE001 - the plan already reported unreadable shards
        return []
    out = []
    for value in table.column(cols.image).to_pylist():
        images = []
        try:
            for i, source in enumerate(image_sources(value)):
                data = load_source(source, i, config)
                with Image.open(io.BytesIO(data)) as im:
                    images.append(im.size)
        except Exception:  # noqa: BLE001 - a bad row is the run's error row, not the estimate's
            continue
        out.append(images)
    return out
