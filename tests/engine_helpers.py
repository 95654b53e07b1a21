"""Helpers shared by the tests of every tier: random glimpse modules, patterned images, bench loading."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from PIL import Image

from workers.modeling.glimpse import GlimpseConfig, GlimpseModules


def tiny_glimpse_config(model, **overrides) -> GlimpseConfig:
    text, vision = model.config.text_config, model.config.vision_config
    values = dict(
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_hidden_layers=text.num_hidden_layers,
        vision_hidden_size=vision.hidden_size,
        rms_norm_eps=text.rms_norm_eps,
        selected_layers=(2,),
        reduce_layer=2,
        attn_fuse_size=16,
        visual_cond_size=16,
        attn_fuse_num_heads=2,
        selected_visual_layers=(3, 1),
        le_layers=tuple(range(text.num_hidden_layers)),
    )
    values.update(overrides)
    return GlimpseConfig(**values)


def random_modules(model, seed: int = 0, **overrides) -> GlimpseModules:
    modules = GlimpseModules(tiny_glimpse_config(model, **overrides))
    gen = torch.Generator().manual_seed(seed)
    modules.reset_parameters(generator=gen)
    with torch.no_grad():  # larger embeddings so the glimpse visibly steers attention
        modules.learnable_embeddings.normal_(0.0, 1.0, generator=gen)
    return modules.eval()


def patterned_image(width: int, height: int, seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def load_bench(name: str):
    """Import bench/<name>.py (not a package) as module `name`; a generator for fixtures (unloads after)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
