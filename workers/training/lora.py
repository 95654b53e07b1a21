"""LoRA on chosen linear layers of the LLM, trained with the glimpse modules and saved as a PEFT adapter.

The GlimpsePrune+ directory layout (reference 6.2): `adapter_config.json` + `adapter_model.safetensors`
next to the glimpse modules; `workers.modeling.loading.load_engine` merges such an adapter into the
base (W += alpha / r * B @ A) before loading the modules, so a modules dir written here loads through
the same path as the released GlimpsePrune+ checkpoints. Tensor names follow PEFT
(`base_model.model.<module path>.lora_A.weight`, A [r, in], B [out, r]); initialisation too (A
Kaiming-uniform with a = sqrt(5), B zeros: the adapted model starts equal to the base).

What differs from the reference's Stage A: which layers and what loss are the caller's choice (the
trainer uses the mask loss plus a distillation term to the frozen base; the reference uses RL on pruned
inputs). Only nn.Linear targets; no dropout.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.modeling.loading import ADAPTER_CONFIG

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the name loading.read_adapter reads first


@dataclass(frozen=True)
class LoraConfig:
    layers: tuple[int, ...]  # LLM decoder layers to adapt
    targets: tuple[str, ...] = ("q_proj", "k_proj")  # linear names inside a decoder layer (self_attn.* / mlp.*)
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not self.layers or not self.targets:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0, layers and targets: {self}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """base(x) + scale * B(A(x)); the base stays frozen, `enabled=False` gives the base alone."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale, self.enabled = base, scale, True
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        bound = math.sqrt(6.0 / ((1 + 5.0) * base.in_features))  # kaiming_uniform_(a=sqrt(5)), as PEFT/nn.Linear
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    @property
    def weight(self) -> torch.Tensor:  # code that reads layer.weight (dtype, device) still works
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return out + (self.scale * delta).to(out.dtype)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from workers.modeling import compat

    return compat.language_model(model).layers


def attach(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> dict[str, LoraLinear]:
    """Wrap the target linears in place; returns {module path in `model`: wrapper}."""
    layers = _decoder_layers(model)
    paths = {id(m): name for name, m in model.named_modules()}
    generator = torch.Generator().manual_seed(seed)
    wrapped: dict[str, LoraLinear] = {}
    for i in cfg.layers:
        if not 0 <= i < len(layers):
            raise ValueError(f"LoRA layer {i} outside 0..{len(layers) - 1}")
        for target in cfg.targets:
            parent = layers[i].self_attn if hasattr(layers[i].self_attn, target) else layers[i].mlp
            base = getattr(parent, target, None)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"layer {i} has no linear {target!r}")
            path = paths[id(base)]
            wrapper = LoraLinear(base, cfg.rank, cfg.scale, generator).to(base.weight.device)
            setattr(parent, target, wrapper)
            wrapped[path] = wrapper
    return wrapped


def set_enabled(wrapped: dict[str, LoraLinear], enabled: bool) -> None:
    for w in wrapped.values():
        w.enabled = enabled


def parameters(wrapped: dict[str, LoraLinear]) -> list[nn.Parameter]:
    return [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]


def state_dict(wrapped: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """PEFT-named tensors (fp32, contiguous, detached)."""
    out = {}
    for path, w in wrapped.items():
        out[f"base_model.model.{path}.lora_A.weight"] = w.lora_A.detach().float().contiguous().cpu()
        out[f"base_model.model.{path}.lora_B.weight"] = w.lora_B.detach().float().contiguous().cpu()
    return out


def load_state(wrapped: dict[str, LoraLinear], state: dict[str, torch.Tensor]) -> None:
    for path, w in wrapped.items():
        with torch.no_grad():
            w.lora_A.copy_(state[f"base_model.model.{path}.lora_A.weight"])
            w.lora_B.copy_(state[f"base_model.model.{path}.lora_B.weight"])


def save(wrapped: dict[str, LoraLinear], cfg: LoraConfig, directory: Path, base_name: str = "") -> None:
    """adapter_config.json + adapter_model.safetensors in `directory` (PEFT layout)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": 0.0, "target_modules": list(cfg.targets), "layers_to_transform": list(cfg.layers),
              "fan_in_fan_out": False, "use_rslora": False, "bias": "none", "base_model_name_or_path": base_name}
    save_file(state_dict(wrapped), str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
