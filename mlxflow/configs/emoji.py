"""The emoji family (seeds 000/001): its config, presets and registry entry.

A ~4.7M-parameter pixel-space U-Net (mlxflow/models/emoji.py, twin in
mlxflow/torch_ref/emoji.py) that predicts velocity from frozen text embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MlxflowError
from ..families import Family, register


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


# Named presets. `tiny` trains in minutes on a 2-core CPU; `default` is the ~4.7M
# parameter model of the Reddit post; `seed` mirrors the seed author's public U-Net.
EMOJI_PRESETS: dict[str, dict] = {
    # ~0.85M parameters at 32x32 (text_dim 384); cross-attention at 16x16 and 8x8.
    "tiny": dict(image_size=32, channels=(16, 32, 64), blocks_per_level=1, self_attn_levels=(2,),
                 cross_attn_levels=(1, 2), heads=4, groups=8, cond_dim=64, text_mask=True),
    # All 1,898 emoji on a laptop: `tiny` with a 256-wide conditioning vector (1.15M). On the
    # full set at 50k images it scored 0.051 fidelity@1 against tiny's 0.036 (both with uniform
    # t); widening to (32, 64, 128) scored 0.025 at 50k for about 3x the CPU time per image
    # (475 spread prompts; README, "The full emoji set").
    "laptop": dict(image_size=32, channels=(16, 32, 64), blocks_per_level=1, self_attn_levels=(2,),
                   cross_attn_levels=(1, 2), heads=4, groups=8, cond_dim=256, text_mask=True),
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
    # 200k images (105 epochs of the 1,898-emoji set) at batch 32 (on a CPU, batch 32 steps
    # at ~1.8x the images per second of batch 16); a grid and a fidelity estimate every 4k images.
    # t_shift 10 trains mostly at high noise (median t 0.09), where an emoji's layout and
    # colours are decided, and cond_dropout 0.05 (not the usual 0.15) spends the images on
    # the conditional model; CFG still pays (t_shift 6 with dropout 0.02: CFG 1 scored 0.244 against 0.349).
    # Fidelity@1 (README, "The full emoji set"): at 200k images 0.523 (uniform t, dropout
    # 0.15) -> 0.944 (t_shift 3) -> 0.969 (t_shift 6, dropout 0.05) -> 0.988 (this) over all 1,898
    # prompts; at 50k 0.051 -> 0.171 -> 0.305 -> 0.429 (475 spread prompts). This recipe's curve
    # over all 1,898 prompts: 0.105 / 0.459 / 0.885 / 0.988 at 25k / 50k / 100k / 200k images.
    # t_shift 20 with dropout 0.02 scored 0.493 at 50k (475) with visibly speckled samples.
    "laptop": dict(steps=6250, batch_size=32, lr=3e-3, warmup_steps=50, ema_decay=0.99, ckpt_every=781,
                   keep_every=1562, sample_every=125, sample_steps=20, t_shift=10.0, cond_dropout=0.05),
    "default": dict(steps=20000, batch_size=32, lr=3e-4, warmup_steps=500, ema_decay=0.999),
    "seed": dict(steps=60000, batch_size=32, lr=1e-4, warmup_steps=500, ema_decay=0.999),
}


def probe_points(cfg: EmojiConfig) -> list[str]:
    """Submodules whose outputs `mlxflow crosscheck` compares, in execution order."""
    n = cfg.levels
    return ["time_embed", "stem", *[f"down.{i}" for i in range(n)], "mid", *[f"up.{i}" for i in range(n)]]


register(Family(
    name="emoji", config_class=EmojiConfig, model_presets=EMOJI_PRESETS, train_presets=EMOJI_TRAIN_PRESETS,
    mlx_model="mlxflow.models.emoji:EmojiFlow", torch_model="mlxflow.torch_ref.emoji:EmojiFlow",
    prediction="velocity", codec="pixels", conditioning="text", probe_points=probe_points,
    coreml=True, default_preset="default", text_encoder="minilm-tokens",
    # Second-order Adams-Bashforth, 20 evaluations: as close to a 200-evaluation RK4 solve
    # as Heun 20 (40 evaluations) on one trained model and closer than Euler 50 on another
    # (`mlxflow solvers`, RMSE in [0, 1]: 0.0055 vs 0.0055 and 0.0094 vs 0.0069 / 0.0142).
    sample_defaults=dict(steps=20, solver="ab2", cfg=3.0, cfg_interval=None),
    description="pixel-space U-Net for 64x64 emoji, conditioned on frozen text embeddings"))
