"""Emoji denoiser, PyTorch twin of mlxflow/models/emoji.py.

Same classes, attribute names and structure as the MLX model; only framework idiom
differs (forward vs __call__, nn.ModuleList vs lists, NCHW vs NHWC). Input and output
are channels-first (B, 3, H, W). The network only maps (x_t, t, text) -> output;
config.prediction says what that is.

With config.text_mask, text is (B, L, D) per-token states whose padding rows are exactly
zero: the key-padding mask is `any(text != 0, dim=-1)`, derived inside the graph, so the
traced/Core ML model keeps one text input and an all-zero text masks every key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.emoji import EmojiConfig
from .layers import Attention, TimestepEmbedding, group_norm, upsample_nearest_2x

# Additive attention score for padded text keys: the value of models/text.py. Finite in
# fp16 (the Core ML export computes in fp16), yet exp(-1e4) is exactly 0 in fp16 and fp32.
MASK_VALUE = -1e4
# Floor of the pooled vector's norm: a normal fp16 number, so an all-zero (dropped) text
# pools to 0/1e-4 = 0 even where a device flushes fp16 subnormals to zero.
NORM_FLOOR = 1e-4


def text_context(text: torch.Tensor, masked: bool):
    """(B, L, D) text -> (pooled (B, D), additive key mask (B, 1, 1, L) or None, has_text (B,) or None).

    masked: pooled = L2-normalised mean of the non-zero rows (0 for an all-zero text); the
    mask puts MASK_VALUE on zero rows; has_text is 1.0 where any row is non-zero, else 0.0.
    Unmasked (old configs): the plain mean over L, no mask, no gate.
    """
    if not masked:
        return text.mean(dim=1), None, None
    # not_equal -> cast -> reduce_max rather than torch.any: ops every Core ML target converts.
    keep = (text != 0).to(text.dtype).amax(dim=-1)  # (B, L)
    count = keep.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = text.sum(dim=1) / count  # padding rows are exactly 0, so the plain sum is the masked sum
    pooled = mean / mean.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    additive = ((1.0 - keep) * MASK_VALUE)[:, None, None, :]
    return pooled, additive, keep.amax(dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, FiLM (scale, shift) from the conditioning vector in between."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_ch)
        self.norm2 = group_norm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(cond)).chunk(2, dim=-1)
        h = self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(F.silu(h))
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention2d(nn.Module):
    """Pre-norm self-attention over the H*W pixels of a feature map, residual."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.norm = group_norm(groups, ch)
        self.attn = Attention(ch, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return x + self.attn(h).transpose(1, 2).reshape_as(x)


class CrossAttention2d(nn.Module):
    """Pre-norm cross-attention: pixels (queries) read the text tokens (keys/values), residual."""

    def __init__(self, ch: int, heads: int, groups: int, text_dim: int):
        super().__init__()
        self.norm = group_norm(groups, ch)
        self.attn = Attention(ch, heads, kv_dim=text_dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                has_text: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,C,H,W), text (B,L,D); mask (B,1,1,L) additive; has_text (B,) gates the update."""
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.attn(h, context=text, mask=mask)
        if has_text is not None:
            # A fully masked row attends uniformly to the padding (= the v/out biases), so
            # gate it off: a dropped condition must add exactly nothing.
            out = out * has_text[:, None, None]
        return x + out.transpose(1, 2).reshape_as(x)


class Stage(nn.Module):
    """ResBlocks at one resolution, each followed by optional self- and cross-attention."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, cfg: EmojiConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.cond_dim, cfg.groups) for i in range(n_blocks)])
        self.self_attn = nn.ModuleList(
            [SelfAttention2d(out_ch, cfg.heads, cfg.groups) for _ in range(n_blocks)] if self_attn else [])
        self.cross_attn = nn.ModuleList(
            [CrossAttention2d(out_ch, cfg.heads, cfg.groups, cfg.text_dim) for _ in range(n_blocks)] if cross_attn else [])

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                has_text: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cond)
            if self.self_attn:
                x = self.self_attn[i](x)
            if self.cross_attn:
                x = self.cross_attn[i](x, text, mask, has_text)
        return x


class EmojiFlow(nn.Module):
    """(x_t (B,3,H,W), t (B,), text (B,L,D)) -> (B,3,H,W)."""

    def __init__(self, cfg: EmojiConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        ch = cfg.channels
        self.time_embed = TimestepEmbedding(cfg.cond_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.cond_dim)
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        last = cfg.levels - 1
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for lvl in range(cfg.levels):
            self.down.append(Stage(ch[max(lvl - 1, 0)], ch[lvl], cfg.blocks_per_level, cfg,
                                   lvl in cfg.self_attn_levels, lvl in cfg.cross_attn_levels))
            if lvl < last:
                self.downsample.append(nn.Conv2d(ch[lvl], ch[lvl], 3, stride=2, padding=1))

        # The bottleneck always has both attentions: it is where text and global layout meet.
        self.mid = Stage(ch[last], ch[last], 2, cfg, self_attn=True, cross_attn=True)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(cfg.levels)):
            self.up.append(Stage(ch[lvl] + ch[lvl], ch[lvl], cfg.blocks_per_level, cfg,
                                 lvl in cfg.self_attn_levels, lvl in cfg.cross_attn_levels))
            if lvl > 0:
                # Nearest 2x then a conv that also narrows to the next level's width.
                self.upsample.append(nn.Conv2d(ch[lvl], ch[lvl - 1], 3, padding=1))

        self.out_norm = group_norm(cfg.groups, ch[0])
        self.out_conv = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        pooled, mask, has_text = text_context(text, self.config.text_mask)
        cond = self.time_embed(t) + self.text_proj(pooled)
        h = self.stem(x)
        skips = []
        for lvl, stage in enumerate(self.down):
            h = stage(h, cond, text, mask, has_text)
            skips.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)
        h = self.mid(h, cond, text, mask, has_text)
        for i, stage in enumerate(self.up):
            h = stage(torch.cat([h, skips.pop()], dim=1), cond, text, mask, has_text)
            if i < len(self.upsample):
                h = self.upsample[i](upsample_nearest_2x(h))
        return self.out_conv(F.silu(self.out_norm(h)))
