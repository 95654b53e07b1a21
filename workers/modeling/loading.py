"""Loading base models and glimpse modules from a hub id, a local directory or an object-store URL.

Resolution (`resolve_dir`):
  * an existing local directory (or file:// URL) is used in place;
  * a URL with a scheme fsspec knows (s3://, gs://, ...) is copied once into a local cache directory
    keyed by the URL (storage options: endpoint_url, region, anonymous/anon, key, secret, token);
  * anything else is a hub id, fetched with `huggingface_hub.snapshot_download` (offline machines get
    one clear error naming the id).

GlimpsePrune+ directories hold a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
next to the glimpse modules. `merge_lora` folds it into the LLM's linear layers (W += scale * B @ A),
mapping the official 4.51 module names (model.layers.N...) onto the 5.x layout
(model.language_model.layers.N...). Safetensors are read with safetensors; a .bin adapter only with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .glimpse import GlimpseModules

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"


class ModelLoadError(RuntimeError):
    """A model or module location that cannot be resolved or loaded (one clear line)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("GLIMPSE_BATCH_CACHE", Path.home() / ".cache" / "glimpse-batch"))


def resolve_dir(uri: str | os.PathLike, storage_options: Optional[dict] = None, cache_dir: Optional[Path] = None) -> Path:
    """A local directory holding the files at `uri` (see module docstring)."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if "://" in text:
        return _download_url(text, storage_options or {}, cache_dir or default_cache_dir())
    if local.exists() or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"{text}: not a directory")
    return _download_hub(text)


def _download_url(url: str, storage_options: dict, cache_dir: Path) -> Path:
    import fsspec

    target = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]
    marker = target / ".complete"
    if marker.exists():
        return target
    protocol = url.split("://", 1)[0]
    options = _fsspec_options(protocol, storage_options)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
        files = [f for f in fs.find(root) if not f.endswith("/")]
    except Exception as exc:  # noqa: BLE001 - storage errors come in many types
        raise ModelLoadError(f"{url}: cannot list ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not files:
        raise ModelLoadError(f"{url}: no files found")
    target.mkdir(parents=True, exist_ok=True)
    for remote in files:
        rel = remote[len(root.rstrip("/")) + 1:] if remote.startswith(root.rstrip("/") + "/") else Path(remote).name
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(dest))
    marker.write_text(url.split("?", 1)[0])
    log.info("copied %d files from %s to %s", len(files), url.split("?", 1)[0], target)
    return target


def _fsspec_options(protocol: str, options: dict) -> dict:
    if protocol != "s3":
        return dict(options)
    out: dict = {}
    client: dict = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "endpoint_url":
            out["endpoint_url"] = value
        elif key in ("region", "region_name"):
            client["region_name"] = value
        elif key in ("anonymous", "anon"):
            out["anon"] = bool(value)
        else:
            out[key] = value
    if client:
        out["client_kwargs"] = client
    return out


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{repo_id}: cannot fetch from the model hub ({type(exc).__name__})") from None


def pick_device(name: str = "auto") -> torch.device:
    """"auto": CUDA when present, else CPU; anything else as torch spells it ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def pick_attention(name: str, device: torch.device) -> str:
    """'auto' is flash-attention-2 on GPU when installed, else SDPA."""
    if name != "auto":
        return name
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_base(path: Path, dtype: torch.dtype, attn_implementation: str, device: torch.device):
    """Stock Qwen2.5-VL model + image-only processor from a local directory (no remote code)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .tiny import load_processor

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load the base model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.to(device).eval(), load_processor(path)


def merge_lora(model: nn.Module, adapter_dir: Path) -> int:
    """Fold a PEFT LoRA adapter into the model's linear weights; returns the number of merged layers."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    state = read_adapter(adapter_dir)
    modules = dict(model.named_modules())
    merged = 0
    for key in sorted(k for k in state if ".lora_A." in k):
        name = _module_name(key.split(".lora_A.")[0], modules)
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in state:
            raise ModelLoadError(f"{adapter_dir}: {key} has no matching lora_B tensor")
        layer = modules[name]
        delta = (state[b_key].float() @ state[key].float()) * scale  # [out, in]
        if config.get("fan_in_fan_out"):
            delta = delta.T
        if tuple(delta.shape) != tuple(layer.weight.shape):
            raise ModelLoadError(f"{adapter_dir}: {key} gives shape {tuple(delta.shape)}, {name} has {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight.add_(delta.to(layer.weight.dtype))
        merged += 1
    if merged == 0:
        raise ModelLoadError(f"{adapter_dir}: adapter holds no LoRA tensors")
    return merged


def read_adapter(adapter_dir: Path) -> dict:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    binary = adapter_dir / "adapter_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _module_name(peft_name: str, modules: dict) -> str:
    """Map a PEFT module path onto this model, across the 4.51 and 5.x layouts."""
    name = peft_name[len("base_model.model."):] if peft_name.startswith("base_model.model.") else peft_name
    candidates = [name]
    if name.startswith("model.layers."):
        candidates.append("model.language_model.layers." + name[len("model.layers."):])
    if name.startswith("model.language_model.layers."):
        candidates.append("model.layers." + name[len("model.language_model.layers."):])
    for cand in candidates:
        if isinstance(modules.get(cand), nn.Linear):
            return cand
    raise ModelLoadError(f"LoRA target {peft_name!r} matches no linear layer of the model")


def load_engine(
    base: str,
    glimpse_modules: Optional[str] = None,
    *,
    rule=None,
    strategy=None,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    device: str = "auto",
    storage_options: Optional[dict] = None,
):
    """Build a `GlimpseEngine` from locations. A GlimpsePrune+ modules dir also merges its LoRA. strategy: a
    `strategies.Strategy` pruning instead of the glimpse modules (rule then holds its keep ratio)."""
    from .engine import GlimpseEngine

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    model, processor = load_base(resolve_dir(base, storage_options), torch_dtype, pick_attention(attn_implementation, dev), dev)
    modules = None
    if glimpse_modules:
        modules_dir = resolve_dir(glimpse_modules, storage_options)
        if (modules_dir / ADAPTER_CONFIG).is_file():
            count = merge_lora(model, modules_dir)
            log.info("merged GlimpsePrune+ LoRA adapter into %d layers", count)
        modules = GlimpseModules.from_directory(modules_dir).to(device=dev, dtype=torch_dtype)
    return GlimpseEngine(model, processor, modules, rule, strategy=strategy)
