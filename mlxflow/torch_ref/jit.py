"""JiT, "Just image Transformer", PyTorch twin of mlxflow/models/jit.py.

Same classes, attribute names and structure as the MLX model; only framework idiom
differs (forward vs __call__, nn.ModuleList vs lists, F.unfold/F.fold vs index
gather/scatter, buffers vs attributes kept out of the parameter tree, NCHW vs NHWC).
Input and output are channels-first (B, C, H, W). The network only maps
(x_t, t, cond) -> output; the family entry says what that is (clean x).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MlxflowError
from ..configs.jit import JiTConfig
from .layers import (Attention, RMSNorm, SwiGLU, TimestepEmbedding, apply_rope, axial_rope_2d, modulate,
                     sincos_position_embedding_2d)

# --- patches -------------------------------------------------------------------------
# A patch vector is the (p, p, C) block in row-major order; patches are numbered row-major
# over the grid of top-left corners. F.unfold orders a patch (C, p, p): we permute to match
# the MLX twin, so patch-embedding and output weights map 1:1.


def unfold(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, p*p*C) patches, T = gh*gw, gh = (H - p) // stride + 1."""
    B, C = x.shape[:2]
    cols = F.unfold(x, kernel_size=patch, stride=stride)  # (B, C*p*p, T)
    T = cols.shape[-1]
    return cols.reshape(B, C, patch * patch, T).permute(0, 3, 2, 1).reshape(B, T, patch * patch * C)


def fold(patches: torch.Tensor, size: tuple[int, int], patch: int, stride: int, normalize: bool = True) -> torch.Tensor:
    """(B, T, p*p*C) patches -> (B, C, H, W) image, the inverse of `unfold`.

    Overlapping patches are summed and, with normalize, divided by the number of
    patches covering each pixel (the fold of ones), so overlaps average.
    """
    B, T, D = patches.shape
    C = D // (patch * patch)
    cols = patches.reshape(B, T, patch * patch, C).permute(0, 3, 2, 1).reshape(B, C * patch * patch, T)
    out = F.fold(cols, output_size=size, kernel_size=patch, stride=stride)
    if normalize:
        ones = torch.ones_like(cols[:1, :patch * patch])  # one channel is enough: counts are per pixel
        out = out / F.fold(ones, output_size=size, kernel_size=patch, stride=stride)
    return out


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x))


class JiTAttention(Attention):
    """Self-attention with QK-norm, RoPE on q and k, and scores/softmax in fp32.

    x: (B, N, dim); rope: callable on (B, heads, N, head_dim). Reuses the shared
    Attention's q/k/v/out projections and q/k RMSNorms (qkv_bias sets their bias; the
    output projection always has one), so parameter names match the MLX twin.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__(dim, heads, qk_norm=True, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.fused = False  # a runtime switch, not a weight: see set_fused_attention

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        q = rope(self.q_norm(q).float())
        k = rope(self.k_norm(k).float())
        if self.fused and torch.is_autocast_enabled(x.device.type):
            # The fast path (trainers turn it on with CUDA + bf16, see set_fused_attention):
            # q, k, v in the autocast dtype so SDPA dispatches to the flash kernel, which keeps
            # its softmax statistics in fp32 and never builds the (N, N) score matrix.
            dt = torch.get_autocast_dtype(x.device.type)
            o = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), scale=self.head_dim ** -0.5)
        else:
            # fp32 scores and softmax, as the reference computes them: bf16 logits over hundreds
            # of tokens lose the small differences that the softmax amplifies.
            with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would recast SDPA
                o = F.scaled_dot_product_attention(q, k, v.float(), scale=self.head_dim ** -0.5)
        return self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, N, -1))


class JiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each shifted/scaled/gated by adaLN-Zero from c (B, dim)."""

    def __init__(self, cfg: JiTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = JiTAttention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)
        self.modulation = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """(B, T, dim), c (B, dim) -> (B, T, p*p*C): RMSNorm, adaLN shift/scale, linear."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class JiT(nn.Module):
    """(x_t (B,C,H,W), t (B,), cond) -> predicted clean image (B,C,H,W).

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
            self.in_context_pos = nn.Parameter(torch.zeros(cfg.in_context_tokens, cfg.dim))
        self.blocks = nn.ModuleList([JiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.dim, cfg.patch_dim)

        # Fixed tables, not parameters: non-persistent buffers follow .to(device) but stay
        # out of the state_dict (the MLX twin keeps them out of its parameter tree).
        g = cfg.grid
        self.register_buffer("pos_embed", sincos_position_embedding_2d(cfg.dim, g, g), persistent=False)
        cos, sin = axial_rope_2d(cfg.head_dim, g, g)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        cos, sin = axial_rope_2d(cfg.head_dim, g, g, prefix=cfg.in_context_tokens)
        self.register_buffer("rope_cos_ctx", cos, persistent=False)
        self.register_buffer("rope_sin_ctx", sin, persistent=False)
        self.initialize()

    @torch.no_grad()
    def initialize(self):
        """The JiT/DiT init: xavier linears with zero bias, N(0, 0.02) embeddings, adaLN-Zero.

        Zeroed modulations make every block start as the identity, and the zeroed output
        layer makes a fresh model predict exactly 0.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.linear1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear2.weight, std=0.02)
        if hasattr(self, "class_embed"):
            nn.init.normal_(self.class_embed.weight, std=0.02)
        if hasattr(self, "in_context_pos"):
            nn.init.normal_(self.in_context_pos, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final_layer.modulation, self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed_condition(self, cond, batch: int) -> torch.Tensor | None:
        """cond -> (B, dim) condition embedding, or None for conditioning "none"."""
        cfg = self.config
        if cfg.conditioning == "class":
            if cond is None:
                cond = torch.full((batch,), cfg.num_classes, dtype=torch.long, device=self.pos_embed.device)
            return self.class_embed(cond.long())
        if cfg.conditioning == "text":
            if cond is None:
                cond = torch.zeros(batch, cfg.text_tokens, cfg.text_dim, dtype=self.text_proj.weight.dtype,
                                   device=self.pos_embed.device)
            if not torch.jit.is_tracing() and tuple(cond.shape[1:]) != (cfg.text_tokens, cfg.text_dim):
                raise MlxflowError(f"text embedding of shape {tuple(cond.shape)} does not match the model's "
                                   f"(B, {cfg.text_tokens}, {cfg.text_dim})")
            return self.text_proj(cond.reshape(batch, -1))
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        cfg = self.config
        B, _, H, W = x.shape
        # Shape checks are skipped under tracing (shapes are tensors there; the trace fixes them anyway).
        if not torch.jit.is_tracing() and (H != cfg.image_size or W != cfg.image_size):
            raise MlxflowError(f"JiT built for {cfg.image_size}x{cfg.image_size} images got {H}x{W}")
        e = self.embed_condition(cond, B)
        c = self.time_embed(t).to(x.dtype)
        if e is not None:
            c = c + e

        h = self.patch_embed(unfold(x, cfg.patch_size, cfg.patch_stride))
        h = h + self.pos_embed.to(h.dtype)
        rope = lambda z: apply_rope(z, self.rope_cos, self.rope_sin)  # noqa: E731
        n_ctx = cfg.in_context_tokens
        for i, block in enumerate(self.blocks):
            if n_ctx and i == cfg.in_context_start:
                ctx = self.in_context_pos.to(h.dtype)[None]
                ctx = ctx + e[:, None] if e is not None else ctx.expand(B, -1, -1)
                h = torch.cat([ctx, h], dim=1)
                rope = lambda z: apply_rope(z, self.rope_cos_ctx, self.rope_sin_ctx)  # noqa: E731
            h = block(h, c, rope)
        h = h[:, n_ctx:]  # the in-context tokens have done their job
        return fold(self.final_layer(h, c), (H, W), cfg.patch_size, cfg.patch_stride)
