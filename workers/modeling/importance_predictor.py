"""The visual-token importance predictor (VIP), `AttnFuserV1` of the paper (section 3).

Input per image: the glimpse's raw attention logits over that image's visual tokens (all heads of all
selected LLM layers, layer-major) and the multi-level ViT features (one per selected ViT block,
averaged over each 2x2 merge unit, raster order). Output: one importance logit per visual token.

    x = attn_in_proj(A)                                  # [N, F]
    for each level i (in the order of selected_visual_layers):
        c = cond_in_projs[i](V_i)                        # [N, C]
        x = x + CondAttention_i(RMSNorm1(x), c)          # q, k see cat(x, c) with 2D RoPE; v sees x
        x = x + SwiGLU_i(RMSNorm2(x))                    # F -> 2F -> F, with biases
    logit = attn_out_projs[-1](x)                        # [N]

Module and parameter names equal the released checkpoint's `attn_fuser` state dict, so the official
`new_modules_gp.pt` loads strictly. Deliberate differences from the reference code (same maths):
attention runs per image on raster-ordered tokens instead of on window-permuted tokens with a
block-diagonal mask (attention restricted to one image does not depend on token order), and only the
last output row is computed (the keep rule only reads row -1; the optional `ori_attn_supervision`
row is a visualisation aid and is not produced).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PredictorConfig:
    """Shapes of the VIP. attn_in: selected LLM layers x heads; vision_hidden: ViT width."""

    attn_in: int
    vision_hidden: int
    num_levels: int
    fuse_size: int = 256
    cond_size: int = 512
    num_heads: int = 4
    hidden_act: str = "silu"
    deep_supervision: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if (self.fuse_size + self.cond_size) % self.num_heads or self.fuse_size % self.num_heads:
            raise ValueError(
                f"attn_fuse_size {self.fuse_size} and attn_fuse_size + visual_cond_size "
                f"{self.fuse_size + self.cond_size} must both be divisible by heads {self.num_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"attn_fuse_hidden_act {self.hidden_act!r} is not supported (only 'silu')")


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Qwen2RMSNorm does."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def grid_rope(height: int, width: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables for a raster-ordered h x w grid: cos, sin [h*w, 1, 4*len(inv_freq)]."""
    rows = torch.arange(height, device=inv_freq.device).repeat_interleave(width)
    cols = torch.arange(width, device=inv_freq.device).repeat(height)
    freqs = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # [N, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [N, 1, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate in fp32 and cast back (apply_rotary_pos_emb_vision). x: [N, H, D]."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class CondAttention(nn.Module):
    """Conditional self-attention: q and k from cat(x, c), v from x alone."""

    def __init__(self, fuse_size: int, cond_size: int, num_heads: int):
        super().__init__()
        qk_size = fuse_size + cond_size
        self.q_proj = nn.Linear(qk_size, qk_size, bias=False)
        self.k_proj = nn.Linear(qk_size, qk_size, bias=False)
        self.v_proj = nn.Linear(fuse_size, fuse_size, bias=False)
        self.o_proj = nn.Linear(fuse_size, fuse_size, bias=False)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple) -> torch.Tensor:
        n = x.shape[0]
        qk_in = torch.cat([x, cond], dim=-1)  # [n, F + C]
        q = apply_rope(self.q_proj(qk_in).view(n, self.num_heads, -1), *rope)  # [n, H, Dqk]
        k = apply_rope(self.k_proj(qk_in).view(n, self.num_heads, -1), *rope)
        v = self.v_proj(x).view(n, self.num_heads, -1)  # [n, H, F/H]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class SwiGLU(nn.Module):
    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(size, hidden)
        self.up_proj = nn.Linear(size, hidden)
        self.down_proj = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PredictorBlock(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.fuse_size)
        self.norm2 = RMSNorm(cfg.fuse_size)
        self.attn = CondAttention(cfg.fuse_size, cfg.cond_size, cfg.num_heads)
        self.mlp = SwiGLU(cfg.fuse_size, 2 * cfg.fuse_size)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cond, rope)
        return x + self.mlp(self.norm2(x))


class ImportancePredictor(nn.Module):
    """The VIP. Parameter names match the official `attn_fuser` state dict."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_in_proj = nn.Linear(cfg.attn_in, cfg.fuse_size)
        self.cond_in_projs = nn.ModuleList(
            nn.Linear(cfg.vision_hidden, cfg.cond_size) for _ in range(cfg.num_levels)
        )
        self.layers = nn.ModuleList(PredictorBlock(cfg) for _ in range(cfg.num_levels))
        last = cfg.num_levels - 1
        self.attn_out_projs = nn.ModuleList(
            nn.Linear(cfg.fuse_size, 1) if (cfg.deep_supervision or i == last) else nn.Identity()
            for i in range(cfg.num_levels)
        )

    def inv_freq(self, device) -> torch.Tensor:
        """2D-RoPE inverse frequencies, always fp32 (reference 10.6); not a buffer, so casting the
        module to bf16 cannot round them (the official non-persistent buffer would be cast)."""
        rope_dim = (self.cfg.fuse_size + self.cfg.cond_size) // self.cfg.num_heads // 2
        steps = torch.arange(0, rope_dim, 2, dtype=torch.float, device=device) / rope_dim
        return 1.0 / (self.cfg.rope_theta**steps)

    def forward(
        self, attn_logits: torch.Tensor, vit_features: Sequence[torch.Tensor], grids: Sequence[tuple]
    ) -> torch.Tensor:
        """attn_logits [N, attn_in]; vit_features: num_levels x [N, vision_hidden]; grids: (h, w) per
        image, sum(h*w) == N, images concatenated in order. Returns logits [N] (fp32)."""
        x = self.attn_in_proj(attn_logits.to(self.attn_in_proj.weight.dtype))
        conds = [proj(feat.to(x.dtype)) for proj, feat in zip(self.cond_in_projs, vit_features)]
        outputs, start = [], 0
        inv_freq = self.inv_freq(x.device)
        for h, w in grids:
            end = start + h * w
            rope = grid_rope(h, w, inv_freq)
            xi = x[start:end]
            for block, cond in zip(self.layers, conds):
                xi = block(xi, cond[start:end], rope)
            outputs.append(self.attn_out_projs[-1](xi).squeeze(-1))
            start = end
        if start != x.shape[0]:
            raise ValueError(f"grids cover {start} tokens, attention logits have {x.shape[0]}")
        return torch.cat(outputs).float() if outputs else x.new_zeros(0, dtype=torch.float)
