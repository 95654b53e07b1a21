"""The analytic FLOPs (`workers.modeling.flops`) against torch's own count of the modules they describe,
and the engine's per-row prediction that the run summary uses."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine_helpers import random_modules
from workers.modeling import compat
from workers.modeling import flops as F
from workers.modeling.engine import GlimpseEngine
from workers.modeling.tiny import TinySpec, build_processor, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny ViT: windows of 8x8 patches (a 6x10 grid gets smaller edge windows), full attention in blocks 1 and 3.
SPEC = TinySpec(rope_theta=10_000.0)


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(SPEC, seed=0).eval()


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_vision_flops_equal_torch_count_with_eager_attention(model, grid):
    """Eager attention is matmuls torch counts (CPU SDPA is not counted), so the whole ViT must match."""
    vision = compat.vision_tower(model)
    config = model.config.vision_config
    old = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        h, w = grid
        patch_dim = 3 * config.temporal_patch_size * config.patch_size**2
        pixels = torch.randn(h * w, patch_dim)
        counted = _counted(lambda: vision(pixels, grid_thw=torch.tensor([[1, h, w]])))
    finally:
        config._attn_implementation = old
    assert counted == pytest.approx(F.vision_flops(F.VisionDims.from_config(config.to_dict()), h, w), rel=1e-9)


def test_decoder_layer_flops_equal_torch_count(model):
    """Eager causal attention computes the full n x n scores; the formula counts the causal half."""
    text = model.config.text_config
    lm = compat.language_model(model)
    lm.config._attn_implementation = "eager"
    try:
        n = 37
        hidden = torch.randn(1, n, text.hidden_size)
        pos = torch.arange(n)[None].expand(3, 1, n)
        rope = lm.rotary_emb(hidden, pos)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        counted = _counted(lambda: lm.layers[0](hidden, attention_mask=mask, position_embeddings=rope))
    finally:
        lm.config._attn_implementation = "sdpa"
    dims = F.TextDims.from_config(text.to_dict())
    full_minus_causal = 4 * dims.heads * dims.head_dim * (n * n - n * (n + 1) / 2)
    assert counted == pytest.approx(F.layer_flops(dims, n) + full_minus_causal, rel=1e-9)


def test_vip_flops_equal_torch_count(model):
    """SDPA's math backend runs the VIP's attention as matmuls torch counts: the whole VIP must match."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    modules = random_modules(model, seed=1)
    cfg = modules.config
    n_img, grids = 24, [(4, 6)]
    heads = model.config.text_config.num_attention_heads
    logits = torch.randn(n_img, len(cfg.selected_layers) * heads)
    feats = [torch.randn(n_img, model.config.vision_config.hidden_size) for _ in cfg.selected_visual_layers]
    with sdpa_kernel(SDPBackend.MATH):
        counted = _counted(lambda: modules.attn_fuser(logits, feats, grids))
    dims = F.VipDims.from_glimpse_config(
        {"attn_fuse_size": cfg.attn_fuse_size, "visual_cond_size": cfg.visual_cond_size,
         "selected_visual_layers": cfg.selected_visual_layers, "selected_layers": cfg.selected_layers},
        vision_hidden=model.config.vision_config.hidden_size, heads=heads)
    assert counted == pytest.approx(F.vip_flops(dims, n_img), rel=1e-9)


def test_prefill_flops_ratio_cases():
    text = F.TextDims(layers=8, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128)
    vision = F.VisionDims(depth=4, hidden=32, intermediate=64, patch=14, merge=2, temporal=2, window=8,
                          full_blocks=(1, 3), out_hidden=64)
    vip = F.VipDims(vision_hidden=32, fuse=16, cond=16, levels=2, attn_in=4)
    # nothing dropped and nothing added: exactly the unpruned cost
    assert F.prefill_flops(text, 180, 144, [1], [144], vision=vision).ratio == pytest.approx(1.0)
    assert F.prefill_flops(text, 180, 144, [], [], vision=vision).ratio == 1.0
    # the glimpse token and the VIP make keeping everything a loss
    assert F.prefill_flops(text, 180, 144, [1], [144], vision=vision, vip=vip, glimpse_tokens=1, selected_layers=1).ratio > 1
    pruned = F.prefill_flops(text, 180, 144, [1], [14], vision=vision, vip=vip, glimpse_tokens=1, selected_layers=1)
    no_vit = F.prefill_flops(text, 180, 144, [1], [14], vip=vip, glimpse_tokens=1, selected_layers=1)
    assert pruned.ratio < 1 and no_vit.ratio < pruned.ratio  # the ViT is paid in full either way
    assert pruned.vip == pytest.approx(F.vip_flops(vip, 144)) and pruned.vit > 0


def test_engine_prediction_counts_the_vip():
    """The per-row prediction: a wide VIP next to a small decoder makes pruning a loss; the decoder's
    token-layer ratio alone says it saves."""
    model = build_tiny_model(SPEC, seed=0).eval()
    processor = build_processor(max_pixels=112**2, spec=SPEC)
    narrow = GlimpseEngine(model, processor, random_modules(model, seed=1, attn_fuse_size=8, visual_cond_size=8))
    wide = GlimpseEngine(model, processor, random_modules(model, seed=1, attn_fuse_size=256, visual_cond_size=256))
    plain = GlimpseEngine(model, processor, None)
    prompt, visual, kept = 60, 49, 5
    assert wide.prefill_work_ratio(prompt, visual, kept) == narrow.prefill_work_ratio(prompt, visual, kept) < 1
    assert narrow.prefill_flops(prompt, visual, kept).ratio < 1 < wide.prefill_flops(prompt, visual, kept).ratio
    # explicit masks: no glimpse pass, no VIP
    masks = wide.prefill_flops(prompt, visual, kept, masks=True)
    assert masks.vip == 0 and masks.ratio < narrow.prefill_flops(prompt, visual, kept).ratio
    assert plain.prefill_flops(prompt, visual, visual).ratio == 1.0
