"""DiT, the latent text-to-image transformer of seed 002: PyTorch twin of mlxflow/models/dit.py.

Same classes, attribute names and structure as the MLX model; only framework idiom
differs (forward vs __call__, nn.ModuleList vs lists, NCHW vs NHWC at the boundary).
Input and output latents are channels-first (B, C, h, w); text states are (B, L, text_dim).
The network only maps (x_t, t, cond) -> output; the family entry says what that is (velocity).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.dit import DiTConfig
from ..errors import MlxflowError
from .layers import Attention, TimestepEmbedding, modulate

# Additive score for padded text keys: finite (no inf - inf = NaN anywhere), and since
# scores and softmax run in fp32, exp(-1e4 + O(100)) is exactly 0: a padded key gets no
# weight at all. Image keys are never masked, so no softmax row is ever fully masked.
MASK_VALUE = -1e4


# --- patches -------------------------------------------------------------------------
# A patch vector is the (p, p, C) block in row-major order (the MLX twin's order), so
# patch-embedding and output weights map 1:1.


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C)."""
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, gh * gw, patch * patch * C)


def unpatchify(tokens: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """(B, grid*grid, p*p*C) -> (B, C, grid*p, grid*p), the inverse of `patchify`."""
    B, _, D = tokens.shape
    C = D // (patch * patch)
    x = tokens.reshape(B, grid, grid, patch, patch, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, grid * patch, grid * patch)


def text_mask(cond: torch.Tensor) -> torch.Tensor:
    """(B, L, D) text states -> (B, L) bool, True for real tokens.

    Padding rows and dropped (unconditional) conditions are exactly zero by contract, so
    the mask needs no side channel and survives condition dropout and CFG batching.
    """
    return (cond != 0).any(dim=-1)


# --- network ---------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, T, p*p*C) patches -> (B, T, dim) tokens plus learned positions (T = num_patches)."""

    def __init__(self, patch_dim: int, dim: int, num_patches: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos_embed.to(x.dtype)


class MLP(nn.Module):
    """Linear -> GELU (exact, erf) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DiTAttention(Attention):
    """Self-attention over the joint sequence with an additive key mask; scores and softmax in fp32.

    x: (B, S, dim); mask: (B, 1, 1, S) additive fp32 (0 or MASK_VALUE) or None. Reuses the
    shared Attention's q/k/v/out projections (and q/k RMSNorms with qk_norm), so parameter
    names match the MLX twin.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__(dim, heads, qk_norm=qk_norm)
        self.fused = False  # a runtime switch, not a weight: see layers.set_fused_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(B, S, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(B, S, self.heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused and torch.is_autocast_enabled(x.device.type):
            # The fast path (trainers turn it on with CUDA + bf16): q, k, v in the autocast
            # dtype so SDPA picks a fused kernel (softmax statistics still in fp32); the mask
            # goes in at that dtype too (-1e4 is representable in bf16).
            dt = torch.get_autocast_dtype(x.device.type)
            o = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), scale=self.head_dim ** -0.5,
                                               attn_mask=None if mask is None else mask.to(dt))
        else:
            # fp32 scores: with bf16 weights the logits over ~200 keys would lose the small
            # differences the softmax amplifies, and the mask must dominate every score.
            with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would recast SDPA
                o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=self.head_dim ** -0.5,
                                                   attn_mask=mask)
        return self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, S, -1))


class DiTBlock(nn.Module):
    """Joint attention over [image | text] tokens, then one MLP per stream, adaLN from c.

    h: (B, N + L, dim) with the N image tokens first; c: (B, time_dim); mask: (B, 1, 1, N + L).
    Returns the updated joint sequence (one tensor, so a forward hook can tap it).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.gates = cfg.gates
        self.prenorm = cfg.prenorm
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6, elementwise_affine=False)
        self.attn = DiTAttention(cfg.dim, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6, elementwise_affine=False)
        self.mlp_image = MLP(cfg.dim, cfg.mlp_hidden)
        self.mlp_text = MLP(cfg.dim, cfg.mlp_hidden)
        self.modulation = nn.Linear(cfg.time_dim, cfg.modulation_chunks * cfg.dim)

    def mlps(self, h: torch.Tensor, n_image: int) -> torch.Tensor:
        return torch.cat([self.mlp_image(h[:, :n_image]), self.mlp_text(h[:, n_image:])], dim=1)

    def forward(self, h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None, n_image: int) -> torch.Tensor:
        mod = self.modulation(F.silu(c)).to(h.dtype)
        if self.gates:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        else:
            # The seed's block: one (shift, scale) pair serves both norms; branches ungated.
            shift1, scale1 = mod.chunk(2, dim=-1)
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
            self.norm = nn.LayerNorm(cfg.dim, eps=1e-6, elementwise_affine=False)
            self.modulation = nn.Linear(cfg.time_dim, 2 * cfg.dim)
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "modulation"):
            shift, scale = self.modulation(F.silu(c)).to(x.dtype).chunk(2, dim=-1)
            x = modulate(self.norm(x), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """(x_t (B,C,h,w) latents, t (B,) in [0,1], cond (B,L,text_dim) or None) -> (B,C,h,w).

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
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.initialize()

    @torch.no_grad()
    def initialize(self):
        """DiT init: xavier linears with zero bias, N(0, 0.02) positions and time MLP.

        gates: adaLN-Zero, i.e. every modulation and the output projection start at zero, so
        each block starts as the identity on its stream and a fresh model predicts exactly 0.
        Without gates (the seed): the output projection is xavier with gain 0.02 (small, not zero).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.patch_embed.pos_embed, std=0.02)
        nn.init.normal_(self.time_embed.linear1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear2.weight, std=0.02)
        final = self.final_layer
        if self.config.gates:
            zeroed = [b.modulation for b in self.blocks] + [final.linear]
            if hasattr(final, "modulation"):
                zeroed.append(final.modulation)
            for m in zeroed:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        else:
            nn.init.xavier_uniform_(final.linear.weight, gain=0.02)

    def joint_mask(self, cond: torch.Tensor, n_image: int) -> torch.Tensor:
        """(B, L, D) text -> (B, 1, 1, N + L) additive fp32 mask: 0 for image tokens and real text."""
        B = cond.shape[0]
        zero = torch.zeros((), dtype=torch.float32, device=cond.device)
        text = torch.where(text_mask(cond), zero, zero + MASK_VALUE)
        image = torch.zeros(B, n_image, dtype=torch.float32, device=cond.device)
        return torch.cat([image, text], dim=1)[:, None, None, :]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        B, C, H, W = x.shape
        # Shape checks are skipped under tracing (shapes are tensors there; the trace fixes them anyway).
        tracing = torch.jit.is_tracing()
        if not tracing and (H != cfg.latent_size or W != cfg.latent_size or C != cfg.in_channels):
            raise MlxflowError(f"DiT built for {cfg.latent_size}x{cfg.latent_size}x{cfg.in_channels} latents "
                               f"got {H}x{W}x{C}")
        if cond is None:
            # One all-zero (hence fully masked) text token: the same image output as any
            # all-zero condition, at a fraction of the cost.
            cond = torch.zeros(B, 1, cfg.text_dim, dtype=x.dtype, device=x.device)
        if not tracing and (cond.ndim != 3 or cond.shape[-1] != cfg.text_dim
                            or not 1 <= cond.shape[1] <= cfg.text_tokens):
            raise MlxflowError(f"text states of shape {tuple(cond.shape)} do not fit the model's "
                               f"(B, L <= {cfg.text_tokens}, {cfg.text_dim})")
        n = cfg.num_patches
        mask = self.joint_mask(cond, n)
        c = self.time_embed(t).to(x.dtype)
        h = torch.cat([self.patch_embed(patchify(x, cfg.patch_size)), self.text_proj(cond.to(x.dtype))], dim=1)
        for block in self.blocks:
            h = block(h, c, mask, n)
        return unpatchify(self.final_layer(h[:, :n], c), cfg.grid, cfg.patch_size)
