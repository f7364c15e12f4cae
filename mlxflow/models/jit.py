"""JiT, "Just image Transformer" (Li & He 2025, "Back to Basics: Let Denoising Generative
Models Denoise"): a plain ViT on pixel patches that predicts the clean image.

Seed 003. Patches (optionally overlapping) -> low-rank bottleneck embedding + fixed 2-D
sin-cos positions -> transformer blocks (RMSNorm, QK-norm, 2-D axial RoPE, SwiGLU,
adaLN-Zero) with in-context condition tokens joining part-way -> adaLN final layer ->
patches folded back into an image. Input and output are channels-last (B, H, W, C).
The network only maps (x_t, t, cond) -> output; the family entry says what that is (clean x).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxflowError
from ..configs.jit import JiTConfig
from ..layers import (Attention, RMSNorm, SwiGLU, TimestepEmbedding, apply_rope, axial_rope_2d, modulate,
                      sincos_position_embedding_2d)

# --- patches -------------------------------------------------------------------------
# A patch vector is the (p, p, C) block in row-major order; patches are numbered row-major
# over the grid of top-left corners (0, s, 2s, ...). torch_ref/jit.py uses the same order.


@lru_cache(maxsize=32)
def _patch_index(height: int, width: int, patch: int, stride: int) -> tuple[mx.array, mx.array]:
    """(flat pixel index of every patch element (T*p*p,), overlap count per pixel (H*W,))."""
    rows = np.arange(0, height - patch + 1, stride)[:, None, None, None] + np.arange(patch)[None, None, :, None]
    cols = np.arange(0, width - patch + 1, stride)[None, :, None, None] + np.arange(patch)[None, None, None, :]
    index = (rows * width + cols).reshape(-1)  # (gh, gw, p, p) -> flat
    count = np.bincount(index, minlength=height * width).astype(np.float32)
    return mx.array(index.astype(np.int32)), mx.array(count)


def unfold(x: mx.array, patch: int, stride: int) -> mx.array:
    """(B, H, W, C) -> (B, T, p*p*C) patches, T = gh*gw, gh = (H - p) // stride + 1."""
    B, H, W, C = x.shape
    gh, gw = (H - patch) // stride + 1, (W - patch) // stride + 1
    if stride == patch and gh * patch == H and gw * patch == W:
        # Non-overlapping tiling: a reshape is cheaper than a gather and gives the same order.
        x = x.reshape(B, gh, patch, gw, patch, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, gh * gw, patch * patch * C)
    index, _ = _patch_index(H, W, patch, stride)
    return x.reshape(B, H * W, C)[:, index].reshape(B, gh * gw, patch * patch * C)


def fold(patches: mx.array, size: tuple[int, int], patch: int, stride: int, normalize: bool = True) -> mx.array:
    """(B, T, p*p*C) patches -> (B, H, W, C) image, the inverse of `unfold`.

    Overlapping patches are summed (scatter-add) and, with normalize, divided by the
    number of patches covering each pixel, so overlaps average instead of brightening.
    MLX has no fold op; the index tables are built once per geometry.
    """
    H, W = size
    B, T, D = patches.shape
    C = D // (patch * patch)
    gh, gw = (H - patch) // stride + 1, (W - patch) // stride + 1
    if stride == patch and gh * patch == H and gw * patch == W:
        x = patches.reshape(B, gh, gw, patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, H, W, C)
    index, count = _patch_index(H, W, patch, stride)
    out = mx.zeros((B, H * W, C), dtype=patches.dtype).at[:, index].add(patches.reshape(B, T * patch * patch, C))
    if normalize:
        out = out / count[None, :, None].astype(patches.dtype)
    return out.reshape(B, H, W, C)


# --- network ---------------------------------------------------------------------------


class BottleneckPatchEmbed(nn.Module):
    """(B, T, p*p*C) -> (B, T, dim) through a narrow linear bottleneck.

    Pixel patches are high-dimensional but the clean data is low-dimensional; the
    paper's low-rank first projection costs nothing and helps at large patches.
    Plain Linear layers (not a strided conv) so the weights map by identity.
    """

    def __init__(self, patch_dim: int, bottleneck: int, dim: int):
        super().__init__()
        self.proj1 = nn.Linear(patch_dim, bottleneck, bias=False)
        self.proj2 = nn.Linear(bottleneck, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj2(self.proj1(x))


class JiTAttention(Attention):
    """Self-attention with QK-norm, RoPE on q and k, and scores/softmax in fp32.

    x: (B, N, dim); rope: callable on (B, heads, N, head_dim). Reuses the shared
    Attention's q/k/v/out projections and q/k RMSNorms (qkv_bias sets their bias; the
    output projection always has one), so parameter names match the torch twin.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__(dim, heads, qk_norm=True, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, rope) -> mx.array:
        B, N, _ = x.shape
        q = self.q_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        # fp32 from here: bf16 logits over hundreds of tokens lose the small differences
        # that the softmax amplifies (the reference computes attention in fp32 too).
        q = rope(self.q_norm(q).astype(mx.float32))
        k = rope(self.k_norm(k).astype(mx.float32))
        o = mx.fast.scaled_dot_product_attention(q, k, v.astype(mx.float32), scale=self.head_dim ** -0.5)
        return self.out_proj(o.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, N, -1))


class JiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each shifted/scaled/gated by adaLN-Zero from c (B, dim)."""

    def __init__(self, cfg: JiTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = JiTAttention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)
        self.modulation = nn.Linear(cfg.dim, 6 * cfg.dim)

    def __call__(self, x: mx.array, c: mx.array, rope) -> mx.array:
        shift1, scale1, gate1, shift2, scale2, gate2 = mx.split(self.modulation(nn.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """(B, T, dim), c (B, dim) -> (B, T, p*p*C): RMSNorm, adaLN shift/scale, linear."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_dim)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        shift, scale = mx.split(self.modulation(nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class JiT(nn.Module):
    """(x_t (B,H,W,C), t (B,), cond) -> predicted clean image (B,H,W,C).

    cond by config.conditioning:
      "class": (B,) int labels in [0, num_classes]; num_classes is the null (CFG) class.
      "text":  (B, text_tokens, text_dim) float; all zeros is the unconditional input.
      "none":  ignored.
    None means unconditional for every kind (null class / zero text).
    """

    def __init__(self, cfg: JiTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.time_embed = TimestepEmbedding(cfg.dim, freq_dim=256)
        if cfg.conditioning == "class":
            self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        elif cfg.conditioning == "text":
            # Flatten (L*D), not mean-pool: a fixed-length token sequence keeps which token
            # said what; for one pooled sentence embedding (text_tokens=1) they are the same.
            self.text_proj = nn.Linear(cfg.text_tokens * cfg.text_dim, cfg.dim)
        self.patch_embed = BottleneckPatchEmbed(cfg.patch_dim, cfg.bottleneck, cfg.dim)
        if cfg.in_context_tokens:
            # Learned positions tell the in-context copies apart (they carry no RoPE).
            self.in_context_pos = mx.zeros((cfg.in_context_tokens, cfg.dim))
        self.blocks = [JiTBlock(cfg) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(cfg.dim, cfg.patch_dim)

        # Fixed tables, not parameters: MLX makes every mx.array attribute a parameter, so
        # they are set past Module.__setattr__ (the torch twin registers non-persistent buffers).
        g = cfg.grid
        object.__setattr__(self, "pos_embed", sincos_position_embedding_2d(cfg.dim, g, g))
        cos, sin = axial_rope_2d(cfg.head_dim, g, g)
        object.__setattr__(self, "rope_cos", cos)
        object.__setattr__(self, "rope_sin", sin)
        cos, sin = axial_rope_2d(cfg.head_dim, g, g, prefix=cfg.in_context_tokens)
        object.__setattr__(self, "rope_cos_ctx", cos)
        object.__setattr__(self, "rope_sin_ctx", sin)
        self.initialize()

    def initialize(self):
        """The JiT/DiT init: xavier linears with zero bias, N(0, 0.02) embeddings, adaLN-Zero.

        Zeroed modulations make every block start as the identity, and the zeroed output
        layer makes a fresh model predict exactly 0.
        """
        xavier = nn.init.glorot_uniform()
        for _, m in self.named_modules():
            if isinstance(m, nn.Linear):
                m.weight = xavier(m.weight)
                if "bias" in m:
                    m.bias = mx.zeros_like(m.bias)
        normal = nn.init.normal(std=0.02)
        self.time_embed.linear1.weight = normal(self.time_embed.linear1.weight)
        self.time_embed.linear2.weight = normal(self.time_embed.linear2.weight)
        if "class_embed" in self:
            self.class_embed.weight = normal(self.class_embed.weight)
        if "in_context_pos" in self:
            self.in_context_pos = normal(self.in_context_pos)
        for m in [b.modulation for b in self.blocks] + [self.final_layer.modulation, self.final_layer.linear]:
            m.weight = mx.zeros_like(m.weight)
            m.bias = mx.zeros_like(m.bias)

    def embed_condition(self, cond, batch: int) -> mx.array | None:
        """cond -> (B, dim) condition embedding, or None for conditioning "none"."""
        cfg = self.config
        if cfg.conditioning == "class":
            if cond is None:
                cond = mx.full((batch,), cfg.num_classes, dtype=mx.int32)
            return self.class_embed(cond.astype(mx.int32))
        if cfg.conditioning == "text":
            if cond is None:
                cond = mx.zeros((batch, cfg.text_tokens, cfg.text_dim), dtype=self.text_proj.weight.dtype)
            if tuple(cond.shape[1:]) != (cfg.text_tokens, cfg.text_dim):
                raise MlxflowError(f"text embedding of shape {tuple(cond.shape)} does not match the model's "
                                   f"(B, {cfg.text_tokens}, {cfg.text_dim})")
            return self.text_proj(cond.reshape(batch, -1))
        return None

    def __call__(self, x: mx.array, t: mx.array, cond=None) -> mx.array:
        cfg = self.config
        B, H, W, _ = x.shape
        if H != cfg.image_size or W != cfg.image_size:
            raise MlxflowError(f"JiT built for {cfg.image_size}x{cfg.image_size} images got {H}x{W}")
        e = self.embed_condition(cond, B)
        c = self.time_embed(t).astype(x.dtype)
        if e is not None:
            c = c + e

        h = self.patch_embed(unfold(x, cfg.patch_size, cfg.patch_stride))
        h = h + self.pos_embed.astype(h.dtype)
        rope = lambda z: apply_rope(z, self.rope_cos, self.rope_sin)  # noqa: E731
        n_ctx = cfg.in_context_tokens
        for i, block in enumerate(self.blocks):
            if n_ctx and i == cfg.in_context_start:
                ctx = self.in_context_pos.astype(h.dtype)[None]
                ctx = ctx + e[:, None] if e is not None else mx.broadcast_to(ctx, (B, *ctx.shape[1:]))
                h = mx.concatenate([ctx, h], axis=1)
                rope = lambda z: apply_rope(z, self.rope_cos_ctx, self.rope_sin_ctx)  # noqa: E731
            h = block(h, c, rope)
        h = h[:, n_ctx:]  # the in-context tokens have done their job
        return fold(self.final_layer(h, c), (H, W), cfg.patch_size, cfg.patch_stride)
