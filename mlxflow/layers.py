"""Shared MLX building blocks.

Every block here has a PyTorch twin in mlxflow/torch_ref/layers.py with the same class
and attribute names, so weights map key-for-key (only conv layouts are transposed, in
convert/). Layouts are channels-last.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def sinusoidal_embedding(t: mx.array, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> mx.array:
    """(B,) times -> (B, dim) features [cos | sin] at geometric frequencies.

    t lives in [0, 1]; `scale` stretches it to the ~[0, 1000] range the frequencies
    were designed for, so neighbouring steps of a 20-step sampler stay distinguishable.
    """
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = (t.astype(mx.float32) * scale)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    """(B,) t -> (B, dim): sinusoidal features through a two-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear1 = nn.Linear(freq_dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def __call__(self, t: mx.array) -> mx.array:
        return self.linear2(nn.silu(self.linear1(sinusoidal_embedding(t, self.freq_dim))))


class Attention(nn.Module):
    """Multi-head attention with explicit q/k/v/out projections.

    x: (B, N, dim); context: (B, M, kv_dim) for cross-attention (defaults to x).
    Separate projections (rather than one packed in_proj) keep the torch twin's
    state_dict a one-to-one map.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qk_norm: bool = False, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)

    def __call__(self, x: mx.array, context: mx.array | None = None, rope=None,
                 mask: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        B, N, _ = x.shape
        M = context.shape[1]
        q = self.q_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(context).reshape(B, M, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(context).reshape(B, M, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, N, -1))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """AdaLN modulation of tokens x (B, N, D) by per-sample (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    # pytorch_compatible groups channels exactly as torch.nn.GroupNorm does.
    return nn.GroupNorm(groups, channels, pytorch_compatible=True)


def upsample_nearest_2x(x: mx.array) -> mx.array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated; same op as torch's 'nearest'."""
    B, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)


# --- 2-D positions for patch transformers (JiT) ----------------------------------------
# Tables are computed in float64 numpy, so both twins start from bit-identical values.


def _sincos_1d(dim: int, pos):
    import numpy as np

    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_position_embedding_2d(dim: int, grid_h: int, grid_w: int) -> mx.array:
    """Fixed (grid_h*grid_w, dim) embedding of patch positions, tokens in row-major order.

    The first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin | cos] at dim/4 geometric frequencies (the MAE / DiT table).
    """
    import numpy as np

    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return mx.array(emb.astype(np.float32))


def axial_rope_2d(head_dim: int, grid_h: int, grid_w: int, prefix: int = 0,
                  theta: float = 10000.0) -> tuple[mx.array, mx.array]:
    """(cos, sin) tables, each (prefix + grid_h*grid_w, head_dim), for `apply_rope`.

    Channel pairs (2i, 2i+1) of the first head_dim/2 channels rotate with the token's
    row, those of the last head_dim/2 with its column, at head_dim/4 frequencies per
    axis. The first `prefix` rows are the identity rotation (cos 1, sin 0): tokens
    without an image position (JiT's in-context tokens) pass through unrotated.
    """
    import numpy as np

    if head_dim % 4:
        raise ValueError(f"2-D axial RoPE needs head_dim divisible by 4, got {head_dim}")
    freqs = 1.0 / theta ** (np.arange(head_dim // 4, dtype=np.float64) / (head_dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ang = np.concatenate([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=1)
    ang = np.repeat(ang, 2, axis=1)  # one angle per channel pair
    cos = np.concatenate([np.ones((prefix, head_dim)), np.cos(ang)]).astype(np.float32)
    sin = np.concatenate([np.zeros((prefix, head_dim)), np.sin(ang)]).astype(np.float32)
    return mx.array(cos), mx.array(sin)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate channel pairs of x (B, heads, N, head_dim) by (N, head_dim) cos/sin tables."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin
