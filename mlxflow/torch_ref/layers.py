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
