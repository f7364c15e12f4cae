"""The dit family (seed 002): latent text-to-image transformer config, presets, FLOPs, registry entry.

The network (mlxflow/models/dit.py, twin in mlxflow/torch_ref/dit.py) works on SD-VAE
latents and attends jointly to frozen T5 token states.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PatchTokens
from ..errors import MlxflowError
from ..families import Family, register


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


def probe_points(cfg: DiTConfig) -> list[str]:
    """Submodules whose outputs `mlxflow crosscheck` compares, in execution order."""
    return ["time_embed", "patch_embed", "text_proj", *[f"blocks.{i}" for i in range(cfg.depth)], "final_layer"]


register(Family(
    name="dit", config_class=DiTConfig, model_presets=DIT_PRESETS, train_presets=DIT_TRAIN_PRESETS,
    mlx_model="mlxflow.models.dit:DiT", torch_model="mlxflow.torch_ref.dit:DiT",
    prediction="velocity", codec="sd-vae", conditioning="text", probe_points=probe_points,
    coreml=False, default_preset="tiny", flops_per_image=dit_flops_per_image,
    # The seed samples with 50 Euler steps; CFG needs the text dropout of its train presets.
    sample_defaults=dict(steps=50, solver="euler", cfg=4.0, cfg_interval=None),
    description="latent text-to-image transformer on SD-VAE latents and frozen T5 states (seed 002)"))
