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
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.15  # probability of zeroing the text embedding (enables CFG)
    time_sampler: str = "stratified"  # uniform | stratified | logit_normal
    t_mean: float = 0.0  # logit-normal parameters
    t_std: float = 1.0
    t_shift: float = 1.0  # resolution shift (>1 spends more steps near noise)
    bf16: bool = False
    flip: bool = False  # horizontal flips; off for emoji, many of which are directional
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0 = only at the end
    sample_steps: int = 20
    sample_cfg: float = 3.0


# Named presets. `tiny` trains in minutes on a 2-core CPU; `default` is the ~4.7M
# parameter model of the Reddit post; `seed` mirrors the seed author's public U-Net.
EMOJI_PRESETS: dict[str, dict] = {
    # ~0.85M parameters at 32x32.
    "tiny": dict(image_size=32, channels=(16, 32, 64), blocks_per_level=1, self_attn_levels=(2,),
                 cross_attn_levels=(1, 2), heads=4, groups=8, cond_dim=64),
    # ~4.77M parameters at 64x64.
    "default": dict(image_size=64, channels=(32, 64, 96, 112), blocks_per_level=2,
                    self_attn_levels=(2, 3), cross_attn_levels=(3,), heads=4, groups=8, cond_dim=192),
    # ~46M parameters: self-attention at 16x16 and 8x8, cross-attention at the 8x8 bottleneck.
    "seed": dict(image_size=64, channels=(128, 256, 256, 384), blocks_per_level=2,
                 self_attn_levels=(2, 3), cross_attn_levels=(3,), heads=8, groups=32, cond_dim=512),
}

EMOJI_TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(steps=400, batch_size=16, lr=5e-3, warmup_steps=50, ema_decay=0.99, ckpt_every=200,
                 sample_steps=20),
    "default": dict(steps=20000, batch_size=32, lr=3e-4, warmup_steps=500, ema_decay=0.999),
    "seed": dict(steps=60000, batch_size=32, lr=1e-4, warmup_steps=500, ema_decay=0.999),
}


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
