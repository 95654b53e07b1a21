"""Everything that differs between transformers releases, in one place (style rule 3).

Supported: transformers 5.x (model.model.language_model / model.model.visual, DynamicCache with
`.layers[i].keys`). The 4.5x layout (model.model.layers / model.visual) is accepted by the accessors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (has .layers, .norm, .rotary_emb, .embed_tokens)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def vision_tower(model: nn.Module) -> nn.Module:
    inner = model.model
    return getattr(inner, "visual", None) or getattr(model, "visual")


def rope_index_owner(model: nn.Module) -> nn.Module:
    """The module that owns `get_rope_index` (model.model in >= 4.52)."""
    return model.model if hasattr(model.model, "get_rope_index") else model


def text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def attn_implementation(model: nn.Module) -> str:
    return getattr(text_config(model), "_attn_implementation", None) or "sdpa"


def cache_keys(cache, layer_idx: int) -> torch.Tensor:
    """Post-RoPE cached keys of one layer: [B, kv_heads, L, head_dim]."""
    if hasattr(cache, "layers"):
        return cache.layers[layer_idx].keys
    return cache.key_cache[layer_idx]  # transformers <= 4.55


def cache_values(cache, layer_idx: int) -> torch.Tensor:
    if hasattr(cache, "layers"):
        return cache.layers[layer_idx].values
    return cache.value_cache[layer_idx]


def run_decoder_layer(layer: nn.Module, hidden, mask, position_embeddings, cache) -> torch.Tensor:
    """One decoder layer; 4.5x layers return a tuple, 5.x a tensor."""
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=None,
        past_key_values=cache,
        use_cache=True,
        position_embeddings=position_embeddings,
    )
    return out[0] if isinstance(out, tuple) else out


def attention_mask(pad_mask: torch.Tensor, q_len: int, impl: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Mask for `q_len` new queries over all `pad_mask.shape[1]` keys (the last q_len are the queries).

    pad_mask: [B, KV] with 1 for real tokens (left padding). Flash-attention takes the 2D mask (or
    None when nothing is padded) and applies bottom-right causality itself. SDPA/eager get a 4D mask
    [B, 1, Q, KV], bottom-right causal; a padded query row may see itself so no row is all-masked
    (an all-masked SDPA row yields NaN, which would then leak through 0 * NaN in later layers).
    """
    pad = pad_mask.bool()
    if impl.startswith("flash"):
        return None if bool(pad.all()) else pad_mask.to(torch.int32)
    b, kv = pad.shape
    device = pad.device
    q_pos = torch.arange(kv - q_len, kv, device=device)[:, None]  # [Q, 1]
    k_pos = torch.arange(kv, device=device)[None, :]  # [1, KV]
    causal = k_pos <= q_pos  # [Q, KV]
    diagonal = k_pos == q_pos
    mask = (causal[None] & pad[:, None, :]) | diagonal[None]  # [B, Q, KV]
    mask = mask[:, None]  # [B, 1, Q, KV]
    if impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
