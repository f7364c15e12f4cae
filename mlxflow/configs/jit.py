"""The JiT family ("Back to Basics", Li & He 2025; seed 003): config, presets, FLOPs, registry entry.

A pixel-space ViT (mlxflow/models/jit.py, twin in mlxflow/torch_ref/jit.py) that predicts
the clean image; flow.to_velocity turns that into a velocity for the loss and the solvers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PatchTokens
from ..errors import MlxflowError
from ..families import Family, register

JIT_CONDITIONINGS = ("class", "text", "none")


@dataclass
class JiTConfig(PatchTokens):
    """Pixel-space ViT denoiser. Defaults are the paper's JiT-B/16 at 256x256 (~131M params).

    Images are cut into patch_size x patch_size patches every patch_stride pixels
    (stride < patch: overlapping patches, averaged back when folding).
    """

    image_size: int = 256
    in_channels: int = 3
    patch_size: int = 16
    patch_stride: int = 16
    bottleneck: int = 128  # width of the low-rank patch embedding (p*p*C -> bottleneck -> dim)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0  # SwiGLU hidden is 2/3 of dim * mlp_ratio (same params as a GELU MLP)
    in_context_tokens: int = 32  # copies of the condition embedding prepended as tokens (0: off)
    in_context_start: int = 4  # block index at which they join the sequence
    conditioning: str = "class"  # class | text | none
    num_classes: int = 1000  # class labels 0..num_classes-1; num_classes itself is the null class
    text_dim: int = 384  # D of the frozen text embedding
    text_tokens: int = 1  # L of the frozen text embedding (the text path flattens L*D)
    qkv_bias: bool = True

    @property
    def grid(self) -> int:
        """Patches per side."""
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    @property
    def mlp_hidden(self) -> int:
        # int(dim * ratio) first, then 2/3: avoids 2047.99.. -> 2047 float truncation (B/16: 2048).
        return int(int(self.dim * self.mlp_ratio) * 2 / 3)

    def validate(self) -> "JiTConfig":
        p, s = self.patch_size, self.patch_stride
        if not 1 <= s <= p <= self.image_size:
            raise MlxflowError(f"need 1 <= patch_stride ({s}) <= patch_size ({p}) <= image_size ({self.image_size})")
        if (self.image_size - p) % s:
            raise MlxflowError(f"image_size - patch_size ({self.image_size} - {p}) must be divisible by patch_stride {s}")
        if self.dim % self.heads:
            raise MlxflowError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise MlxflowError(f"head dim {self.head_dim} (dim/heads) must be divisible by 4 for 2-D axial RoPE")
        if self.dim % 4:
            raise MlxflowError(f"dim {self.dim} must be divisible by 4 for the 2-D sin-cos position embedding")
        if self.conditioning not in JIT_CONDITIONINGS:
            raise MlxflowError(f"unknown conditioning '{self.conditioning}' (known: {', '.join(JIT_CONDITIONINGS)})")
        if self.conditioning == "class" and self.num_classes < 2:
            raise MlxflowError(f"class conditioning needs num_classes >= 2, got {self.num_classes}")
        if self.in_context_tokens < 0:
            raise MlxflowError(f"in_context_tokens must be >= 0, got {self.in_context_tokens}")
        if self.in_context_tokens and not 0 <= self.in_context_start < self.depth:
            raise MlxflowError(f"in_context_start {self.in_context_start} must be a block index in [0, {self.depth})")
        return self


# Field overrides per named preset.
JIT_PRESETS: dict[str, dict] = {
    # The paper's JiT-B/16 at 256x256, ImageNet classes: ~131M params, ~25 GMACs per forward.
    "B/16": dict(),
    # The blog (seed 003): 12 layers, dim 768, patch 16 every 12 px (21x21 = 441 tokens),
    # unconditional faces. ~130M here (adaLN-Zero and SwiGLU as in the paper; the blog's
    # own network was ~114M). No in-context tokens: there is no condition to repeat.
    "seed": dict(image_size=256, patch_size=16, patch_stride=12, dim=768, depth=12, heads=12,
                 conditioning="none", in_context_tokens=0),
    # ~1.9k emoji at 64x64, text-conditioned (MiniLM sentence embedding, 384-d):
    # patch 8 every 4 px = 15x15 tokens, ~17M params.
    "emoji64": dict(image_size=64, patch_size=8, patch_stride=4, bottleneck=96, dim=384, depth=6,
                    heads=6, in_context_tokens=8, in_context_start=2, conditioning="text",
                    text_dim=384, text_tokens=1),
    # 2-core CPU runs: 32x32, patch 4 (8x8 tokens), 4 blocks of width 128, ~1.3M params.
    # Measured on the emoji set (1,000 steps, batch 32, unshifted t): this drew yellow faces
    # with eyes and mouths and pink hearts, where patch 8 every 4 px at width 64 (0.37M)
    # drew softer blobs.
    "tiny": dict(image_size=32, patch_size=4, patch_stride=4, bottleneck=32, dim=128, depth=4, heads=4,
                 in_context_tokens=4, in_context_start=1, conditioning="text", text_dim=384, text_tokens=1),
}


# The paper's recipe: AdamW (0.9, 0.95), no weight decay, no clipping, lr 5e-5 x batch/256
# after a linear warmup, then constant (min_lr_ratio 1); logit-normal t (mean -0.8, std 0.8)
# whose mean moves by -log(res/256) with the resolution, which is exactly t_shift = res/256
# (shift_time(sigmoid(z), s) = sigmoid(z - log s)); label/text dropout 0.1 for CFG; bf16.
_JIT_RECIPE = dict(betas=(0.9, 0.95), weight_decay=0.0, grad_clip=0.0, min_lr_ratio=1.0, cond_dropout=0.1,
                   time_sampler="logit_normal", t_mean=-0.8, t_std=0.8, ema_decay=0.9999, ema_decay2=0.9996)
JIT_TRAIN_PRESETS: dict[str, dict] = {
    "B/16": dict(_JIT_RECIPE, steps=750_000, batch_size=256, lr=5e-5, warmup_steps=6_250, bf16=True, flip=True,
                 t_shift=1.0),
    # 100 epochs of CelebA's 202,599 faces at batch 128; flips on for faces.
    "seed": dict(_JIT_RECIPE, steps=160_000, batch_size=128, lr=2.5e-5, warmup_steps=2_000, bf16=True, flip=True,
                 cond_dropout=0.0, t_shift=1.0),
    # Small data and a small model: a larger lr than the paper's rule (which is set for
    # ImageNet at batch 1024) trains the emoji set in reasonable time. No resolution shift:
    # at 32 px, t_shift = 32/256 (the seed's formula) put the median t at 0.78, the model
    # rarely saw strong noise and after 3,000 steps drew only colour blobs; unshifted
    # (median t 0.31) it drew recognisable faces and hearts after 1,000 (emoji set, batch 32).
    "emoji64": dict(_JIT_RECIPE, steps=20_000, batch_size=64, lr=2e-4, warmup_steps=500, ema_decay=0.999,
                    ema_decay2=0.996, t_shift=1.0),
    "tiny": dict(_JIT_RECIPE, steps=400, batch_size=16, lr=2e-3, warmup_steps=50, ema_decay=0.99,
                 ema_decay2=0.95, ckpt_every=200, t_shift=1.0),
}


def jit_macs_per_image(cfg: JiTConfig) -> float:
    """Multiply-accumulates of one forward pass of one image: every matmul, analytic.

    Elementwise work (norms, RoPE, softmax, fold) is left out. The JiT/DiT papers'
    "Gflops" are this number (fvcore counts one fused multiply-add as one flop).
    """
    d, n, n_ctx = cfg.dim, cfg.num_patches, cfg.in_context_tokens
    macs = n * (cfg.patch_dim * cfg.bottleneck + cfg.bottleneck * d)  # bottleneck patch embedding
    macs += 256 * d + d * d  # timestep MLP (256 sinusoidal features)
    if cfg.conditioning == "text":
        macs += cfg.text_tokens * cfg.text_dim * d
    per_token = 4 * d * d + 3 * d * cfg.mlp_hidden  # q, k, v, out + SwiGLU (w1, w3, w2)
    for i in range(cfg.depth):
        tokens = n + (n_ctx if n_ctx and i >= cfg.in_context_start else 0)
        macs += tokens * per_token + 2 * tokens * tokens * d  # projections + QK^T and AV
        macs += 6 * d * d  # adaLN modulation (once per image, not per token)
    macs += 2 * d * d + n * d * cfg.patch_dim  # final adaLN + projection to patches
    return float(macs)


def jit_flops_per_image(cfg: JiTConfig) -> float:
    """Forward matmul FLOPs of one image (2 * MACs). Note: the paper's "25 Gflops" for B/16 are MACs."""
    return 2.0 * jit_macs_per_image(cfg)


def probe_points(cfg: JiTConfig) -> list[str]:
    """Submodules whose outputs `mlxflow crosscheck` compares, in execution order."""
    return ["time_embed", "patch_embed", *[f"blocks.{i}" for i in range(cfg.depth)], "final_layer"]


register(Family(
    name="jit", config_class=JiTConfig, model_presets=JIT_PRESETS, train_presets=JIT_TRAIN_PRESETS,
    mlx_model="mlxflow.models.jit:JiT", torch_model="mlxflow.torch_ref.jit:JiT",
    prediction="x", codec="pixels", conditioning="text", probe_points=probe_points,
    coreml=False, default_preset="tiny", flops_per_image=jit_flops_per_image,
    # The paper's sampler: Heun with an Euler last step (t = 1 is never evaluated),
    # CFG only for 0.1 < t < 1.
    sample_defaults=dict(steps=50, solver="heun_euler_last", cfg=2.5, cfg_interval=(0.1, 1.0)),
    description="pixel-space ViT predicting the clean image (Back to Basics, seed 003)"))
