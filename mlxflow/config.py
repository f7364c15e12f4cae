"""Configuration dataclasses and named presets.

One dataclass per model family plus TrainConfig. The same model config drives the
MLX model and its PyTorch twin, and is stored verbatim in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import MlxflowError


@dataclass
class EmojiConfig:
    """Pixel-space U-Net denoiser for small RGB images (seeds 000/001).

    Residual conv blocks FiLM-conditioned on (time embedding + projected pooled text
    embedding), self-attention at the coarse resolutions, cross-attention from image
    tokens to the text tokens. The network predicts velocity.
    """

    image_size: int = 64
    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 96, 112)  # feature width per resolution level
    blocks_per_level: int = 2
    self_attn_levels: tuple[int, ...] = (2, 3)  # levels (0 = full res) with self-attention
    cross_attn_levels: tuple[int, ...] = (3,)  # levels with cross-attention to the text
    heads: int = 4
    groups: int = 8  # GroupNorm groups
    cond_dim: int = 192  # width of the time + text conditioning vector
    text_dim: int = 384  # D of the frozen text embedding (set from the encoder)
    text_tokens: int = 1  # L of the frozen text embedding
    # Token-level text: padding rows of the (B, L, D) text are exactly 0 and are masked out
    # of cross-attention; FiLM takes the L2-normalised masked mean of the rows; an all-zero
    # text (dropped condition) makes cross-attention add exactly nothing. False: the
    # original behaviour (plain mean over L, unmasked attention), which old checkpoints
    # (config.json without this key) keep.
    text_mask: bool = False

    @property
    def levels(self) -> int:
        return len(self.channels)

    def validate(self) -> "EmojiConfig":
        down = 2 ** (self.levels - 1)
        if self.image_size % down:
            raise MlxflowError(f"image_size {self.image_size} must be divisible by {down} for {self.levels} levels")
        for c in self.channels:
            if c % self.groups or c % self.heads:
                raise MlxflowError(f"channel width {c} must be divisible by groups={self.groups} and heads={self.heads}")
        return self


@dataclass
class TrainConfig:
    preset: str = ""  # the named preset the run started from (recorded for exports)
    steps: int = 2000
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    warmup_start: float = 0.0  # lr at step 0 as a fraction of lr (the DiT seed warms up from 10%)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_decay2: float = 0.0  # a second EMA kept beside the first (0 = none); JiT keeps 0.9996
    cond_dropout: float = 0.15  # probability of zeroing the text embedding (enables CFG)
    time_sampler: str = "stratified"  # uniform | stratified | logit_normal
    t_mean: float = 0.0  # logit-normal parameters
    t_std: float = 1.0
    t_shift: float = 1.0  # resolution shift (>1 spends more steps near noise)
    noise_scale: float = 1.0  # x0 ~ N(0, noise_scale^2): JiT uses 2 at 512px so noise still dominates
    bf16: bool = False
    # torch only; None = on for CUDA, off elsewhere (measure before changing either default).
    compile: bool | None = None  # torch.compile the training forward/backward
    fused_adamw: bool | None = None  # torch.optim.AdamW(fused=True): one kernel for all parameters
    # torch only: attention in the bf16 autocast dtype through one fused SDPA (flash) kernel
    # instead of fp32 scores; None = on with CUDA when bf16 is on. Families whose attention
    # always uses fused SDPA ignore it.
    fused_attention: bool | None = None
    # Hold the whole image set and its conditions on the training device and gather batches
    # there (same batches as the host stream); None = whenever it fits (trainer.DEVICE_DATA_LIMIT).
    device_data: bool | None = None
    flip: bool = False  # horizontal flips; off for emoji, many of which are directional
    max_samples: int = 0  # train on the first N samples only (0 = all); the DiT overfit check uses 4,096
    seed: int = 0
    log_every: int = 10  # steps between run-log records, and between read-backs of the loss from the device
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    keep_every: int = 0  # also keep every checkpoint at a multiple of this step (0 = only the recent ones)
    eval_every: int = 0  # held-out evaluation (loss, FID when its weights are present) every N steps; 0 = never
    eval_samples: int = 1024  # images generated per FID evaluation
    sample_every: int = 0  # 0 = only at the end
    sample_steps: int = 20
    sample_cfg: float = 3.0


# Named presets. `tiny` trains in minutes on a 2-core CPU; `default` is the ~4.7M
# parameter model of the Reddit post; `seed` mirrors the seed author's public U-Net.
EMOJI_PRESETS: dict[str, dict] = {
    # ~0.85M parameters at 32x32 (text_dim 384); cross-attention at 16x16 and 8x8.
    "tiny": dict(image_size=32, channels=(16, 32, 64), blocks_per_level=1, self_attn_levels=(2,),
                 cross_attn_levels=(1, 2), heads=4, groups=8, cond_dim=64, text_mask=True),
    # ~4.82M parameters at 64x64 (text_dim 384): cross-attention to the text tokens at 16x16
    # and the 8x8 bottleneck. The 16x16 level's four cross-attentions cost ~0.37M (their k/v
    # read 384-wide tokens), paid for by narrowing the bottleneck from 112 to 104 channels
    # (the 8x8-only layout with 112 had 4.77M).
    "default": dict(image_size=64, channels=(32, 64, 96, 104), blocks_per_level=2,
                    self_attn_levels=(2, 3), cross_attn_levels=(2, 3), heads=4, groups=8, cond_dim=192,
                    text_mask=True),
    # ~46M parameters: self-attention at 16x16 and 8x8, cross-attention at the 8x8 bottleneck.
    "seed": dict(image_size=64, channels=(128, 256, 256, 384), blocks_per_level=2,
                 self_attn_levels=(2, 3), cross_attn_levels=(3,), heads=8, groups=32, cond_dim=512,
                 text_mask=True),
}

EMOJI_TRAIN_PRESETS: dict[str, dict] = {
    # lr 2e-3: on 128 emoji (800 steps at batch 16) prompt fidelity 0.879 / 0.891 (two seeds)
    # against 0.730 / 0.629 at 5e-3 and 0.875 at 1e-3.
    "tiny": dict(steps=400, batch_size=16, lr=2e-3, warmup_steps=50, ema_decay=0.99, ckpt_every=200,
                 sample_steps=20),
    "default": dict(steps=20000, batch_size=32, lr=3e-4, warmup_steps=500, ema_decay=0.999),
    "seed": dict(steps=60000, batch_size=32, lr=1e-4, warmup_steps=500, ema_decay=0.999),
}


# --- JiT ("Just image Transformer", Li & He 2025, "Back to Basics"; seed 003) -----------------

JIT_CONDITIONINGS = ("class", "text", "none")


class PatchTokens:
    """Token geometry shared by the patch transformers' configs (JiT, DiT): a `grid` of
    patches per side, each of `patch_size`^2 x `in_channels` values, `heads` over `dim`."""

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector, ordered (p, p, C) row-major."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


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


# --- DiT (latent text-to-image transformer; seed 002) ------------------------------------


@dataclass
class DiTConfig(PatchTokens):
    """Latent-space transformer conditioned on frozen T5 token states. Defaults are `base`.

    The network works on SD-VAE latents: an image_size x image_size RGB image is a
    (image_size/latent_downsample)^2 x in_channels latent, cut into patch_size^2 patches.
    Image tokens and projected text tokens share ONE self-attention per block (padded
    text keys masked); image tokens then take `mlp_image`, text tokens `mlp_text`.
    """

    image_size: int = 64  # pixels; the network sees image_size // latent_downsample per side
    latent_downsample: int = 8  # the VAE's spatial factor
    in_channels: int = 4  # latent channels
    patch_size: int = 1
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0  # GELU MLP hidden = dim * mlp_ratio (both streams)
    time_dim: int = 256  # width of the time embedding that feeds every adaLN modulation
    text_dim: int = 512  # D of the frozen text states (T5-small: 512)
    text_tokens: int = 128  # the most text tokens a condition may have (T5 max_length)
    gates: bool = True  # adaLN-Zero: gated residual branches, zero-initialised modulation and output
    final_norm: bool = True  # adaLN-modulated norm before the output projection
    qk_norm: bool = False  # RMSNorm on queries and keys per head
    # True: pre-norm residual blocks (x + f(norm(x))). False: the seed's block, whose
    # modulated norms sit ON the residual stream (x = norm(x); x = x + f(x)).
    prenorm: bool = True
    text_encoder: str = "t5"  # spec string of mlxflow.models.text (what made the text states)
    vae: str = "sd-vae"  # spec of the frozen autoencoder (what made the latents)

    @property
    def latent_size(self) -> int:
        """Latent pixels per side."""
        return self.image_size // self.latent_downsample

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.latent_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def modulation_chunks(self) -> int:
        # gates: (shift, scale, gate) for attention and MLP. Without: the seed's single
        # (shift, scale) pair, applied before attention and again before the MLPs.
        return 6 if self.gates else 2

    def validate(self) -> "DiTConfig":
        for name in ("image_size", "latent_downsample", "in_channels", "patch_size", "dim", "depth", "heads",
                     "time_dim", "text_dim", "text_tokens"):
            if int(getattr(self, name)) < 1:
                raise MlxflowError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.latent_downsample:
            raise MlxflowError(f"image_size {self.image_size} must be divisible by latent_downsample "
                               f"{self.latent_downsample}")
        if self.latent_size % self.patch_size:
            raise MlxflowError(f"latent grid {self.latent_size} (image_size / latent_downsample) must be divisible "
                               f"by patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise MlxflowError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.mlp_hidden < 1:
            raise MlxflowError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP at dim {self.dim}")
        if self.time_dim % 2:
            raise MlxflowError(f"time_dim {self.time_dim} must be even (sin-cos time features)")
        return self


# The seed's network (seed 002, read from its code): latents 8x8x4 -> 64 tokens of width
# 768 with learned positions, T5-small states (128 x 512) projected to 768, 12 blocks of
# joint image+text attention (12 heads) with a separate 4x GELU MLP per stream, adaLN
# shift/scale from a 256-wide time embedding (one pair per block, used before attention
# and again before the MLPs), no gates, no final norm.
_DIT_SEED = dict(image_size=64, latent_downsample=8, in_channels=4, patch_size=1, dim=768, depth=12, heads=12,
                 mlp_ratio=4.0, time_dim=256, text_dim=512, text_tokens=128, gates=False, final_norm=False,
                 prenorm=False)
DIT_PRESETS: dict[str, dict] = {
    # 147.0M trainable parameters: per block 2.36M attention + 2 x 4.72M MLPs + 0.39M
    # modulation = 12.20M, x12 = 146.4M, plus text projection 0.39M, time MLP 0.13M,
    # positions 0.05M. The seed's README says ~120M; its code (two full MLPs per block,
    # a 256-wide time embedding) counts ~147M as here. ~17 GMACs per image (192 tokens).
    "seed": dict(_DIT_SEED),
    # The seed's size with adaLN-Zero (gates, zero-init modulation and output layer), a
    # modulated final norm and pre-norm blocks: 156.9M (6 modulation chunks per block).
    "base": dict(_DIT_SEED, gates=True, final_norm=True, prenorm=True),
    # A MacBook afternoon: width 384, 8 blocks, 6 heads, 28.9M parameters, ~3 GMACs per
    # image, same T5-small input.
    "small": dict(_DIT_SEED, dim=384, depth=8, heads=6, gates=True, final_norm=True, prenorm=True),
    # Tests and 2-core CPUs: 0.24M parameters; text_dim/text_tokens match a tiny random T5
    # (d_model 32, max_length 16).
    "tiny": dict(_DIT_SEED, dim=64, depth=2, heads=4, time_dim=64, text_dim=32, text_tokens=16, gates=True,
                 final_norm=True, prenorm=True),
}
# The seed's run configs are train presets; each name is also a model preset (the seed's
# network), so `--preset stability` picks both.
DIT_PRESETS.update({name: dict(_DIT_SEED)
                    for name in ("debug", "overfit", "hparam_tuning", "stability", "full_scale")})

# The seed's recipe: AdamW (0.9, 0.999), weight decay 1e-2, clip 5, lr 5e-4 warmed up from
# 10% over the first 5% of steps, cosine to 10%; uniform t; 10% text dropout for CFG;
# eval every 1,000 steps on 1,024 samples. Batches are per process: the seed ran 96 per GPU
# x 3 accumulation x 2 GPUs = 576 per step.
_DIT_RECIPE = dict(lr=5e-4, weight_decay=1e-2, grad_clip=5.0, warmup_start=0.1, min_lr_ratio=0.1, betas=(0.9, 0.999),
                   ema_decay=0.9999, cond_dropout=0.1, time_sampler="uniform", eval_every=1000, eval_samples=1024,
                   sample_steps=50, sample_cfg=4.0, keep_checkpoints=5)
_DIT_STABILITY = dict(_DIT_RECIPE, steps=30_000, batch_size=96, grad_accum=3, warmup_steps=1_500, ckpt_every=10_000,
                      keep_every=10_000)
DIT_TRAIN_PRESETS: dict[str, dict] = {
    # ~8.5 epochs of the 2M set at 576 images per step (the README's recommended first run).
    "stability": dict(_DIT_STABILITY),
    # ~85 epochs.
    "full_scale": dict(_DIT_STABILITY, steps=300_000, warmup_steps=15_000, keep_every=50_000),
    # The seed overfits its first 4,096 images here: a memorisation check at lr 1e-3, no
    # checkpoints kept.
    "overfit": dict(_DIT_RECIPE, steps=5_000, batch_size=96, grad_accum=3, lr=1e-3, warmup_steps=250,
                    ckpt_every=0, max_samples=4_096),
    # 5k steps to dial in the lr (the seed settled on 5e-4).
    "hparam_tuning": dict(_DIT_RECIPE, steps=5_000, batch_size=96, grad_accum=3, warmup_steps=250, ckpt_every=0),
    # One-off debugging: short, frequent small evaluations, no checkpoints.
    "debug": dict(_DIT_RECIPE, steps=500, batch_size=32, warmup_steps=25, eval_every=100, eval_samples=128,
                  ckpt_every=0),
    "seed": dict(_DIT_STABILITY),
    "base": dict(_DIT_STABILITY),
    "small": dict(_DIT_RECIPE, steps=20_000, batch_size=64, warmup_steps=1_000, ema_decay=0.999, eval_every=2_000,
                  ckpt_every=2_000, keep_every=10_000),
    # A couple of minutes on a 2-core CPU.
    "tiny": dict(_DIT_RECIPE, steps=300, batch_size=32, lr=1e-3, warmup_steps=30, ema_decay=0.99, eval_every=0,
                 eval_samples=64, ckpt_every=150, keep_checkpoints=3, sample_steps=20),
}


def dit_macs_per_image(cfg: DiTConfig) -> float:
    """Multiply-accumulates of one forward pass of one image with a full-length text condition.

    Every matmul: patch and text projections, time MLP (time_dim sin-cos features),
    q/k/v/out over the joint sequence of image + text_tokens tokens, the scores and values
    of that joint attention, one MLP per token (image tokens mlp_image, text tokens
    mlp_text), adaLN modulations (once per image) and the output projection. Elementwise
    work is left out.
    """
    d, n, L, h = cfg.dim, cfg.num_patches, cfg.text_tokens, cfg.mlp_hidden
    s = n + L  # joint sequence
    macs = n * cfg.patch_dim * d + L * cfg.text_dim * d
    macs += 2 * cfg.time_dim * cfg.time_dim
    per_block = s * 4 * d * d + 2 * s * s * d + s * 2 * d * h + cfg.time_dim * cfg.modulation_chunks * d
    macs += cfg.depth * per_block
    if cfg.final_norm:
        macs += cfg.time_dim * 2 * d
    macs += n * d * cfg.patch_dim
    return float(macs)


def dit_flops_per_image(cfg: DiTConfig) -> float:
    """Forward matmul FLOPs of one image (2 * MACs)."""
    return 2.0 * dit_macs_per_image(cfg)


def model_config(family: str, preset: str | None = None, **overrides):
    """The model config of a named preset of a registered family, with field overrides."""
    from .families import get_family

    return get_family(family).model_config(preset, **overrides)


def train_config(family: str, preset: str | None = None, **overrides) -> TrainConfig:
    from .families import get_family

    return get_family(family).train_config(preset, **overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Rebuild a dataclass from JSON, turning lists back into tuples and ignoring unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in names:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)
