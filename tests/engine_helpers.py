"""Helpers shared by the engine tests of every tier: random glimpse modules, patterned images."""
from __future__ import annotations

import torch
from PIL import Image

from workers.modeling.glimpse import GlimpseConfig, GlimpseModules
from workers.modeling.tiny import TinySpec, build_processor, build_tiny_model


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
