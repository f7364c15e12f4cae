"""Emoji denoiser: a small pixel-space U-Net for text-conditioned flow matching.

Seeds 000/001: RGB residual conv blocks with self- and cross-attention, conditioned on
a frozen text embedding. Every residual block is FiLM-modulated by one conditioning
vector (time MLP + projected pooled text); cross-attention lets image tokens read the
text tokens at the coarse levels. Input and output are channels-last (B, H, W, 3).
The network only maps (x_t, t, text) -> output; config.prediction says what that is.

With config.text_mask, text is (B, L, D) per-token states whose padding rows are exactly
zero: the key-padding mask is `any(text != 0, axis=-1)`, so padding never needs a second
input and an all-zero text (CFG's dropped condition) masks every key.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..configs.emoji import EmojiConfig
from ..layers import Attention, TimestepEmbedding, group_norm, upsample_nearest_2x

# Additive attention score for padded text keys: the value of models/text.py. Finite in
# fp16 (the Core ML export computes in fp16), yet exp(-1e4) is exactly 0 in fp16 and fp32.
MASK_VALUE = -1e4
# Floor of the pooled vector's norm: a normal fp16 number, so an all-zero (dropped) text
# pools to 0/1e-4 = 0 even where a device flushes fp16 subnormals to zero.
NORM_FLOOR = 1e-4


def text_context(text: mx.array, masked: bool) -> tuple[mx.array, mx.array | None, mx.array | None]:
    """(B, L, D) text -> (pooled (B, D), additive key mask (B, 1, 1, L) or None, has_text (B,) or None).

    masked: pooled = L2-normalised mean of the non-zero rows (0 for an all-zero text); the
    mask puts MASK_VALUE on zero rows; has_text is 1.0 where any row is non-zero, else 0.0.
    Unmasked (old configs): the plain mean over L, no mask, no gate.
    """
    if not masked:
        return text.mean(axis=1), None, None
    keep = mx.any(text != 0, axis=-1).astype(text.dtype)  # (B, L)
    count = mx.maximum(keep.sum(axis=1, keepdims=True), 1.0)
    mean = text.sum(axis=1) / count  # padding rows are exactly 0, so the plain sum is the masked sum
    pooled = mean / mx.maximum(mx.linalg.norm(mean, axis=-1, keepdims=True), NORM_FLOOR)
    additive = ((1.0 - keep) * MASK_VALUE)[:, None, None, :]
    return pooled, additive, keep.max(axis=1)


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

    def __call__(self, x: mx.array, cond: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        scale, shift = mx.split(self.film(nn.silu(cond)), 2, axis=-1)
        h = self.norm2(h) * (1 + scale[:, None, None]) + shift[:, None, None]
        h = self.conv2(nn.silu(h))
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention2d(nn.Module):
    """Pre-norm self-attention over the H*W pixels of a feature map, residual."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.norm = group_norm(groups, ch)
        self.attn = Attention(ch, heads)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.norm(x).reshape(B, H * W, C)
        return x + self.attn(h).reshape(B, H, W, C)


class CrossAttention2d(nn.Module):
    """Pre-norm cross-attention: pixels (queries) read the text tokens (keys/values), residual."""

    def __init__(self, ch: int, heads: int, groups: int, text_dim: int):
        super().__init__()
        self.norm = group_norm(groups, ch)
        self.attn = Attention(ch, heads, kv_dim=text_dim)

    def __call__(self, x: mx.array, text: mx.array, mask: mx.array | None = None,
                 has_text: mx.array | None = None) -> mx.array:
        """x (B,H,W,C), text (B,L,D); mask (B,1,1,L) additive; has_text (B,) gates the update."""
        B, H, W, C = x.shape
        h = self.norm(x).reshape(B, H * W, C)
        out = self.attn(h, context=text, mask=mask)
        if has_text is not None:
            # A fully masked row attends uniformly to the padding (= the v/out biases), so
            # gate it off: a dropped condition must add exactly nothing.
            out = out * has_text[:, None, None]
        return x + out.reshape(B, H, W, C)


class Stage(nn.Module):
    """ResBlocks at one resolution, each followed by optional self- and cross-attention."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, cfg: EmojiConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.blocks = [ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.cond_dim, cfg.groups) for i in range(n_blocks)]
        self.self_attn = [SelfAttention2d(out_ch, cfg.heads, cfg.groups) for _ in range(n_blocks)] if self_attn else []
        self.cross_attn = (
            [CrossAttention2d(out_ch, cfg.heads, cfg.groups, cfg.text_dim) for _ in range(n_blocks)] if cross_attn else []
        )

    def __call__(self, x: mx.array, cond: mx.array, text: mx.array, mask: mx.array | None = None,
                 has_text: mx.array | None = None) -> mx.array:
        for i, block in enumerate(self.blocks):
            x = block(x, cond)
            if self.self_attn:
                x = self.self_attn[i](x)
            if self.cross_attn:
                x = self.cross_attn[i](x, text, mask, has_text)
        return x


class EmojiFlow(nn.Module):
    """(x_t (B,H,W,3), t (B,), text (B,L,D)) -> (B,H,W,3)."""

    def __init__(self, cfg: EmojiConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        ch = cfg.channels
        self.time_embed = TimestepEmbedding(cfg.cond_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.cond_dim)
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        last = cfg.levels - 1
        self.down = []
        self.downsample = []
        for lvl in range(cfg.levels):
            self.down.append(Stage(ch[max(lvl - 1, 0)], ch[lvl], cfg.blocks_per_level, cfg,
                                   lvl in cfg.self_attn_levels, lvl in cfg.cross_attn_levels))
            if lvl < last:
                self.downsample.append(nn.Conv2d(ch[lvl], ch[lvl], 3, stride=2, padding=1))

        # The bottleneck always has both attentions: it is where text and global layout meet.
        self.mid = Stage(ch[last], ch[last], 2, cfg, self_attn=True, cross_attn=True)

        self.up = []
        self.upsample = []
        for lvl in reversed(range(cfg.levels)):
            self.up.append(Stage(ch[lvl] + ch[lvl], ch[lvl], cfg.blocks_per_level, cfg,
                                 lvl in cfg.self_attn_levels, lvl in cfg.cross_attn_levels))
            if lvl > 0:
                # Nearest 2x then a conv that also narrows to the next level's width.
                self.upsample.append(nn.Conv2d(ch[lvl], ch[lvl - 1], 3, padding=1))

        self.out_norm = group_norm(cfg.groups, ch[0])
        self.out_conv = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def __call__(self, x: mx.array, t: mx.array, text: mx.array) -> mx.array:
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
            h = stage(mx.concatenate([h, skips.pop()], axis=-1), cond, text, mask, has_text)
            if i < len(self.upsample):
                h = self.upsample[i](upsample_nearest_2x(h))
        return self.out_conv(nn.silu(self.out_norm(h)))
