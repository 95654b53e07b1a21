"""The glimpse modules: learned glimpse token + importance predictor, and their checkpoint format.

Checkpoint format (reference section 5), read and written unchanged:
  config.json        the full base config plus the GP fields (model_type "qwen2_5_vl_gp")
  new_modules_gp.pt  torch.save of {"learnable_embeddings": Tensor [n_le_layers, le_length, d],
                     "le_proj": {weight, bias}, "le_norm": {weight}, "attn_fuser": VIP state dict}
Loading uses `torch.load(weights_only=True)` and strict key/shape checks; any missing, extra or
mis-shaped tensor fails with one `GlimpseCheckpointError` naming the key.

Glimpse vector of layer l (section 2): e_l = RMSNorm(W * learnable_embeddings[le_layers.index(l)] + b),
cast to the parameter dtype (dropout only while training).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .importance_predictor import ImportancePredictor, PredictorConfig, RMSNorm
from .keep_rule import KeepRule

WEIGHTS_NAME = "new_modules_gp.pt"
CONFIG_NAME = "config.json"


class GlimpseCheckpointError(ValueError):
    """A glimpse-module checkpoint that cannot be loaded; the message names the file and key."""


@dataclass(frozen=True)
class GlimpseConfig:
    """The GP fields of the official config.json, plus the base dims they depend on."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vision_hidden_size: int
    rms_norm_eps: float = 1e-6
    selected_layers: tuple = ()
    reduce_layer: int = 1000
    use_attention_logits: bool = True
    attn_fuse_type: str = "AttnFuserV1"
    attn_fuse_size: int = 256
    visual_cond_size: int = 512
    attn_fuse_num_heads: int = 4
    attn_fuse_hidden_act: str = "silu"
    attn_fuse_global: bool = True
    selected_visual_layers: tuple = (8,)
    ori_attn_supervision: bool = False
    deep_supervision: bool = False
    le_layers: tuple = (0,)
    le_length: int = 1
    le_norm_type: str = "rmsnorm"
    le_dropout_prob: float = 0.0
    reduce_threshold: float = 0.5
    min_remain_num: Optional[int] = 1
    max_remain_ratio: Optional[float] = None
    fixed_remain_ratio: Optional[float] = None
    attn_fuse_use_flash_attn: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.attn_fuse_type != "AttnFuserV1":
            problems.append(f"attn_fuse_type {self.attn_fuse_type!r} (only AttnFuserV1 is supported)")
        if self.attn_fuse_use_flash_attn:
            problems.append("attn_fuse_use_flash_attn=true (the CondFA2Attention variant is a different function)")
        if not self.attn_fuse_global:
            problems.append("attn_fuse_global=false (per-window VIP attention is not supported)")
        if not self.use_attention_logits:
            problems.append("use_attention_logits=false (log-softmax input is the LLaVA variant)")
        if self.le_length != 1:
            problems.append(f"le_length {self.le_length} (only a single glimpse token is supported)")
        if 0 not in self.le_layers:
            problems.append("le_layers must contain layer 0")
        if not self.selected_layers:
            problems.append("selected_layers is empty")
        if self.le_norm_type != "rmsnorm":
            problems.append(f"le_norm_type {self.le_norm_type!r} (only rmsnorm)")
        if problems:
            raise GlimpseCheckpointError("unsupported glimpse config: " + "; ".join(problems))

    @property
    def last_prefill_layer(self) -> int:
        """Layers 0..this run at full length with the glimpse; later layers see the pruned sequence."""
        return max(max(self.selected_layers), self.reduce_layer)

    def keep_rule(self) -> KeepRule:
        return KeepRule(self.reduce_threshold, self.max_remain_ratio, self.min_remain_num, self.fixed_remain_ratio)

    def predictor_config(self) -> PredictorConfig:
        return PredictorConfig(
            attn_in=len(self.selected_layers) * self.num_attention_heads,
            vision_hidden=self.vision_hidden_size,
            num_levels=len(self.selected_visual_layers),
            fuse_size=self.attn_fuse_size,
            cond_size=self.visual_cond_size,
            num_heads=self.attn_fuse_num_heads,
            hidden_act=self.attn_fuse_hidden_act,
            deep_supervision=self.deep_supervision,
        )

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "GlimpseConfig":
        """Read the GP fields from an official (4.51-style) or 5.x-style config dict."""
        text = raw.get("text_config") or {}
        vision = raw.get("vision_config") or {}

        def base(key: str) -> Any:
            value = raw.get(key, text.get(key))
            if value is None:
                raise GlimpseCheckpointError(f"{source}: missing base field {key!r}")
            return value

        if raw.get("anchor_positions"):
            raise GlimpseCheckpointError(f"{source}: anchor_positions {raw['anchor_positions']} are not supported")
        if raw.get("use_ref_masks") or raw.get("use_zero_masks"):
            raise GlimpseCheckpointError(f"{source}: use_ref_masks/use_zero_masks are training/ablation modes, not inference")
        if "hidden_size" not in vision:
            raise GlimpseCheckpointError(f"{source}: missing vision_config.hidden_size")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: raw[k] for k in known if k in raw and k not in ("hidden_size", "num_attention_heads")}
        for key in ("selected_layers", "selected_visual_layers", "le_layers"):
            if key in values:
                values[key] = tuple(values[key])
        values.pop("vision_hidden_size", None)
        values.pop("num_hidden_layers", None)
        values.pop("rms_norm_eps", None)
        return cls(
            hidden_size=base("hidden_size"),
            num_attention_heads=base("num_attention_heads"),
            num_hidden_layers=base("num_hidden_layers"),
            rms_norm_eps=base("rms_norm_eps"),
            vision_hidden_size=vision["hidden_size"],
            **values,
        )

    def gp_fields(self) -> dict:
        out = asdict(self)
        for key in ("extra", "hidden_size", "num_attention_heads", "num_hidden_layers", "vision_hidden_size", "rms_norm_eps"):
            out.pop(key)
        for key in ("selected_layers", "selected_visual_layers", "le_layers"):
            out[key] = list(out[key])
        return out


class GlimpseModules(nn.Module):
    """Glimpse token + VIP. Holds weights and config only (no per-request state)."""

    def __init__(self, config: GlimpseConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.learnable_embeddings = nn.Parameter(torch.zeros(len(config.le_layers), config.le_length, d))
        self.le_proj = nn.Linear(d, d, bias=True)
        self.le_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.le_dropout = nn.Dropout(config.le_dropout_prob)
        self.attn_fuser = ImportancePredictor(config.predictor_config())
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """The official init: N(0, 0.02) embeddings, Xavier-uniform projections, zero biases, unit norms."""
        with torch.no_grad():
            self.learnable_embeddings.normal_(0.0, 0.02, generator=generator)
            for name, param in self.named_parameters():
                if name == "learnable_embeddings":
                    continue
                if "norm" in name:
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    bound = (6.0 / (param.shape[0] + param.shape[1])) ** 0.5
                    param.uniform_(-bound, bound, generator=generator)

    def glimpse_vector(self, layer: int) -> Optional[torch.Tensor]:
        """e_l [le_length, d] for a layer listed in le_layers, else None."""
        if layer not in self.config.le_layers:
            return None
        raw = self.learnable_embeddings[self.config.le_layers.index(layer)]
        return self.le_dropout(self.le_norm(self.le_proj(raw))).to(raw.dtype)

    # ---- checkpoint I/O -------------------------------------------------------------------
    def official_state(self) -> dict:
        return {
            "learnable_embeddings": self.learnable_embeddings.data,
            "le_proj": self.le_proj.state_dict(),
            "le_norm": self.le_norm.state_dict(),
            "attn_fuser": self.attn_fuser.state_dict(),
        }

    def load_official_state(self, state: dict, source: str = WEIGHTS_NAME) -> None:
        expected = self.official_state()
        if not isinstance(state, dict):
            raise GlimpseCheckpointError(f"{source}: expected a dict of modules, got {type(state).__name__}")
        for key in sorted(set(state) - set(expected)):
            raise GlimpseCheckpointError(f"{source}: unexpected key {key!r}")
        for key in sorted(set(expected) - set(state)):
            raise GlimpseCheckpointError(f"{source}: missing key {key!r}")
        flat_expected = _flatten(expected)
        flat_given = _flatten(state)
        for key in sorted(flat_expected):
            if key not in flat_given:
                raise GlimpseCheckpointError(f"{source}: missing tensor {key!r}")
            if not isinstance(flat_given[key], torch.Tensor):
                raise GlimpseCheckpointError(f"{source}: {key!r} is not a tensor")
            if tuple(flat_given[key].shape) != tuple(flat_expected[key].shape):
                raise GlimpseCheckpointError(
                    f"{source}: tensor {key!r} has shape {tuple(flat_given[key].shape)}, "
                    f"expected {tuple(flat_expected[key].shape)}"
                )
        for key in sorted(set(flat_given) - set(flat_expected)):
            raise GlimpseCheckpointError(f"{source}: unexpected tensor {key!r}")
        with torch.no_grad():
            self.learnable_embeddings.copy_(state["learnable_embeddings"])
            for name in ("le_proj", "le_norm", "attn_fuser"):
                getattr(self, name).load_state_dict(state[name], strict=True)

    def save(self, directory: str | Path, base_config: Optional[dict] = None) -> Path:
        """Write config.json + new_modules_gp.pt in the official format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dict(base_config or {})
        if not config:
            config.update(
                hidden_size=self.config.hidden_size,
                num_attention_heads=self.config.num_attention_heads,
                num_hidden_layers=self.config.num_hidden_layers,
                rms_norm_eps=self.config.rms_norm_eps,
                vision_config={"hidden_size": self.config.vision_hidden_size},
            )
        config.update(self.config.gp_fields())
        config["model_type"] = "qwen2_5_vl_gp"
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        state = {k: (v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else
                     {n: t.detach().cpu().contiguous() for n, t in v.items()})
                 for k, v in self.official_state().items()}
        torch.save(state, directory / WEIGHTS_NAME)
        return directory

    @classmethod
    def from_directory(cls, directory: str | Path, **overrides: Any) -> "GlimpseModules":
        """Load an official-format directory strictly. `overrides` replace GP config fields."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        weights_path = directory / WEIGHTS_NAME
        if not config_path.is_file():
            raise GlimpseCheckpointError(f"{config_path}: not found")
        if not weights_path.is_file():
            raise GlimpseCheckpointError(f"{weights_path}: not found")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise GlimpseCheckpointError(f"{config_path}: invalid JSON ({exc})") from None
        config = GlimpseConfig.from_dict({**raw, **overrides}, source=str(config_path))
        modules = cls(config)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is one clear error
            raise GlimpseCheckpointError(f"{weights_path}: cannot be read safely ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        modules.load_official_state(state, source=str(weights_path))
        return modules


def _flatten(state: dict) -> dict:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            for sub, tensor in value.items():
                flat[f"{key}.{sub}"] = tensor
        else:
            flat[key] = value
    return flat
