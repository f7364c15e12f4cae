"""Shared PyTorch building blocks: twins of mlxflow/layers.py.

Same class names, attribute names and constructor arguments as the MLX file, so a
state_dict maps key-for-key onto the MLX parameter tree. Layouts here are torch's own
(NCHW for images); the only weight layout that differs (conv kernels) is handled in
convert/torch_mlx.py. Everything stays free of data-dependent Python control flow so
torch.jit.trace and coremltools can take it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) times -> (B, dim) features [cos | sin] at geometric frequencies (same formula as MLX)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """(B,) t -> (B, dim): sinusoidal features through a two-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear1 = nn.Linear(freq_dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(sinusoidal_embedding(t, self.freq_dim))))


class Attention(nn.Module):
    """Multi-head attention with explicit q/k/v/out projections.

    x: (B, N, dim); context: (B, M, kv_dim) for cross-attention (defaults to x).
    Separate projections (not nn.MultiheadAttention's packed in_proj) keep the
    state_dict a one-to-one map of the MLX parameters.
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        M = context.shape[1]
        q = self.q_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).reshape(B, M, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).reshape(B, M, self.heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, -1))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; statistics in fp32 (as mx.fast.rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation of tokens x (B, N, D) by per-sample (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    # torch's grouping is the reference; the MLX side sets pytorch_compatible=True to match.
    return nn.GroupNorm(groups, channels)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), each pixel repeated; the op MLX's broadcast+reshape mirrors."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# --- 2-D positions for patch transformers (JiT) ----------------------------------------
# Tables are computed in float64 numpy (the same code as the MLX file), so both twins
# start from bit-identical values.


def _sincos_1d(dim: int, pos):
    import numpy as np

    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_position_embedding_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed (grid_h*grid_w, dim) embedding of patch positions, tokens in row-major order.

    The first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin | cos] at dim/4 geometric frequencies (the MAE / DiT table).
    """
    import numpy as np

    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb.astype(np.float32))


def axial_rope_2d(head_dim: int, grid_h: int, grid_w: int, prefix: int = 0,
                  theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
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
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, heads, N, head_dim) by (N, head_dim) cos/sin tables."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


def set_fused_attention(model: nn.Module, on: bool) -> int:
    """Switch every attention module that has a `fused` flag (JiT's) to the fused bf16 SDPA
    path or back to fp32 attention; returns how many modules it switched."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused", None), bool):
            m.fused = bool(on)
            n += 1
    return n
