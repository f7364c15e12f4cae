"""DiT: the latent text-to-image transformer of seed 002.

SD-VAE latents (B, h, w, C) are cut into patches (patch 1: one token per latent pixel),
embedded with learned positions; frozen T5 token states (B, L, text_dim) are projected to
the same width. Every block runs ONE self-attention over the joint sequence [image | text]
(padded text keys masked), then image tokens take `mlp_image` and text tokens `mlp_text`,
so both streams are updated (MMDiT-like). adaLN shift/scale (and, with `gates`, the
adaLN-Zero gates) come from the time embedding. The final layer maps image tokens back to
a (B, h, w, C) latent. Input and output are channels-last.

The network only maps (x_t, t, cond) -> output; the family entry says what that is (velocity).
The torch twin (mlxflow/torch_ref/dit.py) has the same classes and attribute names.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..configs.dit import DiTConfig
from ..errors import MlxflowError
from ..layers import Attention, TimestepEmbedding, modulate

# Additive score for padded text keys: finite (no inf - inf = NaN anywhere), and since
# scores and softmax run in fp32, exp(-1e4 + O(100)) is exactly 0: a padded key gets no
# weight at all. Image keys are never masked, so no softmax row is ever fully masked.
MASK_VALUE = -1e4


# --- patches -------------------------------------------------------------------------
# A patch vector is the (p, p, C) block in row-major order; patches are numbered row-major.
# torch_ref/dit.py uses the same order, so patch-embedding and output weights map 1:1.


def patchify(x: mx.array, patch: int) -> mx.array:
    """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C)."""
    B, H, W, C = x.shape
    gh, gw = H // patch, W // patch
    x = x.reshape(B, gh, patch, gw, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, gh * gw, patch * patch * C)


def unpatchify(tokens: mx.array, grid: int, patch: int) -> mx.array:
    """(B, grid*grid, p*p*C) -> (B, grid*p, grid*p, C), the inverse of `patchify`."""
    B, _, D = tokens.shape
    C = D // (patch * patch)
    x = tokens.reshape(B, grid, grid, patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, grid * patch, grid * patch, C)


def text_mask(cond: mx.array) -> mx.array:
    """(B, L, D) text states -> (B, L) bool, True for real tokens.

    Padding rows and dropped (unconditional) conditions are exactly zero by contract, so
    the mask needs no side channel and survives condition dropout and CFG batching.
    """
    return mx.any(cond != 0, axis=-1)


# --- network ---------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, T, p*p*C) patches -> (B, T, dim) tokens plus learned positions (T = num_patches)."""

    def __init__(self, patch_dim: int, dim: int, num_patches: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.pos_embed = mx.zeros((num_patches, dim))

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x) + self.pos_embed.astype(x.dtype)


class MLP(nn.Module):
    """Linear -> GELU (exact, erf) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))


class DiTAttention(Attention):
    """Self-attention over the joint sequence with an additive key mask; scores and softmax in fp32.

    x: (B, S, dim); mask: (B, 1, 1, S) additive fp32 (0 or MASK_VALUE) or None. Reuses the
    shared Attention's q/k/v/out projections (and q/k RMSNorms with qk_norm), so parameter
    names match the torch twin.
    """

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # fp32 scores: with bf16 weights the logits over ~200 keys would lose the small
        # differences the softmax amplifies, and the mask must dominate every score.
        o = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32),
                                                 scale=self.head_dim ** -0.5, mask=mask)
        return self.out_proj(o.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, S, -1))


class DiTBlock(nn.Module):
    """Joint attention over [image | text] tokens, then one MLP per stream, adaLN from c.

    h: (B, N + L, dim) with the N image tokens first; c: (B, time_dim); mask: (B, 1, 1, N + L).
    Returns the updated joint sequence (one array, so a crosscheck can tap it).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.gates = cfg.gates
        self.prenorm = cfg.prenorm
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.attn = DiTAttention(cfg.dim, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.mlp_image = MLP(cfg.dim, cfg.mlp_hidden)
        self.mlp_text = MLP(cfg.dim, cfg.mlp_hidden)
        self.modulation = nn.Linear(cfg.time_dim, cfg.modulation_chunks * cfg.dim)

    def mlps(self, h: mx.array, n_image: int) -> mx.array:
        return mx.concatenate([self.mlp_image(h[:, :n_image]), self.mlp_text(h[:, n_image:])], axis=1)

    def __call__(self, h: mx.array, c: mx.array, mask: mx.array | None, n_image: int) -> mx.array:
        mod = self.modulation(nn.silu(c)).astype(h.dtype)
        if self.gates:
            shift1, scale1, gate1, shift2, scale2, gate2 = mx.split(mod, 6, axis=-1)
        else:
            # The seed's block: one (shift, scale) pair serves both norms; branches ungated.
            shift1, scale1 = mx.split(mod, 2, axis=-1)
            shift2, scale2, gate1, gate2 = shift1, scale1, None, None

        def gated(y, gate):
            return y if gate is None else gate[:, None] * y

        if self.prenorm:
            h = h + gated(self.attn(modulate(self.norm1(h), shift1, scale1), mask), gate1)
            return h + gated(self.mlps(modulate(self.norm2(h), shift2, scale2), n_image), gate2)
        # The seed's order: the modulated norm replaces the residual stream itself.
        h = modulate(self.norm1(h), shift1, scale1)
        h = h + gated(self.attn(h, mask), gate1)
        h = modulate(self.norm2(h), shift2, scale2)
        return h + gated(self.mlps(h, n_image), gate2)


class FinalLayer(nn.Module):
    """(B, N, dim), c (B, time_dim) -> (B, N, p*p*C): [adaLN-modulated LayerNorm,] linear."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.final_norm:
            self.norm = nn.LayerNorm(cfg.dim, eps=1e-6, affine=False)
            self.modulation = nn.Linear(cfg.time_dim, 2 * cfg.dim)
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        if "modulation" in self:
            shift, scale = mx.split(self.modulation(nn.silu(c)).astype(x.dtype), 2, axis=-1)
            x = modulate(self.norm(x), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """(x_t (B,h,w,C) latents, t (B,) in [0,1], cond (B,L,text_dim) or None) -> (B,h,w,C).

    cond: frozen text states, L <= text_tokens (no text positions are added: the encoder's
    states already carry them). Rows that are all zero are padding and masked out of the
    attention keys; an all-zero cond, or None, is the unconditional input.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.time_embed = TimestepEmbedding(cfg.time_dim, freq_dim=cfg.time_dim)
        self.patch_embed = PatchEmbed(cfg.patch_dim, cfg.dim, cfg.num_patches)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.blocks = [DiTBlock(cfg) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(cfg)
        self.initialize()

    def initialize(self):
        """DiT init: xavier linears with zero bias, N(0, 0.02) positions and time MLP.

        gates: adaLN-Zero, i.e. every modulation and the output projection start at zero, so
        each block starts as the identity on its stream and a fresh model predicts exactly 0.
        Without gates (the seed): the output projection is xavier with gain 0.02 (small, not zero).
        """
        cfg = self.config
        xavier = nn.init.glorot_uniform()
        for _, m in self.named_modules():
            if isinstance(m, nn.Linear):
                m.weight = xavier(m.weight)
                if "bias" in m:
                    m.bias = mx.zeros_like(m.bias)
        normal = nn.init.normal(std=0.02)
        self.patch_embed.pos_embed = normal(self.patch_embed.pos_embed)
        self.time_embed.linear1.weight = normal(self.time_embed.linear1.weight)
        self.time_embed.linear2.weight = normal(self.time_embed.linear2.weight)
        final = self.final_layer
        if cfg.gates:
            zeroed = [b.modulation for b in self.blocks] + [final.linear]
            if "modulation" in final:
                zeroed.append(final.modulation)
            for m in zeroed:
                m.weight = mx.zeros_like(m.weight)
                m.bias = mx.zeros_like(m.bias)
        else:
            final.linear.weight = xavier(final.linear.weight, gain=0.02)

    def joint_mask(self, cond: mx.array, n_image: int) -> mx.array:
        """(B, L, D) text -> (B, 1, 1, N + L) additive fp32 mask: 0 for image tokens and real text."""
        B = cond.shape[0]
        text = mx.where(text_mask(cond), 0.0, MASK_VALUE).astype(mx.float32)
        return mx.concatenate([mx.zeros((B, n_image), dtype=mx.float32), text], axis=1)[:, None, None, :]

    def __call__(self, x: mx.array, t: mx.array, cond: mx.array | None = None) -> mx.array:
        cfg = self.config
        B, H, W, C = x.shape
        if H != cfg.latent_size or W != cfg.latent_size or C != cfg.in_channels:
            raise MlxflowError(f"DiT built for {cfg.latent_size}x{cfg.latent_size}x{cfg.in_channels} latents "
                               f"got {H}x{W}x{C}")
        if cond is None:
            # One all-zero (hence fully masked) text token: the same image output as any
            # all-zero condition, at a fraction of the cost.
            cond = mx.zeros((B, 1, cfg.text_dim), dtype=x.dtype)
        if cond.ndim != 3 or cond.shape[-1] != cfg.text_dim or not 1 <= cond.shape[1] <= cfg.text_tokens:
            raise MlxflowError(f"text states of shape {tuple(cond.shape)} do not fit the model's "
                               f"(B, L <= {cfg.text_tokens}, {cfg.text_dim})")
        n = cfg.num_patches
        mask = self.joint_mask(cond, n)
        c = self.time_embed(t).astype(x.dtype)
        h = mx.concatenate([self.patch_embed(patchify(x, cfg.patch_size)),
                            self.text_proj(cond.astype(x.dtype))], axis=1)
        for block in self.blocks:
            h = block(h, c, mask, n)
        return unpatchify(self.final_layer(h[:, :n], c), cfg.grid, cfg.patch_size)
