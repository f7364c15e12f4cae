"""Configuration shared by every family: the training config, and JSON round trips.

Each family's model config, presets and registry entry live in mlxflow/configs/<family>.py;
the same model config drives the MLX model and its PyTorch twin and is stored verbatim in
every checkpoint. Nothing here knows the family registry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import MlxflowError
from .flow import unshifted_count


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
    t_unshifted: float = 0.0  # share of each batch, round-down(batch x share) rows, whose t skips t_shift
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


    def validate(self) -> "TrainConfig":
        """Every setting in its range; MlxflowError naming the first that is not (a value a user typed)."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise MlxflowError(f"{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}")

        def whole(name, lo):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, f"a whole number >= {lo}")

        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            whole(name, 1)
        for name in ("warmup_steps", "ckpt_every", "keep_checkpoints", "keep_every", "eval_every", "sample_every",
                     "max_samples", "seed", "sample_steps", "eval_samples"):
            whole(name, 0)
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        need(finite(self.lr) and self.lr > 0, "lr", "a number > 0")
        for name in ("weight_decay", "grad_clip", "sample_cfg"):
            need(finite(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0")
        for name in ("ema_decay", "ema_decay2", "cond_dropout"):
            need(finite(getattr(self, name)) and 0 <= getattr(self, name) < 1, name, "in [0, 1)")
        for name in ("min_lr_ratio", "warmup_start"):
            need(finite(getattr(self, name)) and 0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        # 1 would undo --t-shift on every row: that is --t-shift 1.
        need(finite(self.t_unshifted) and 0 <= self.t_unshifted < 1, "t_unshifted", "in [0, 1)")
        if self.t_unshifted > 0 and unshifted_count(self.batch_size, self.t_unshifted) < 1:
            raise MlxflowError(f"t-unshifted {self.t_unshifted:g} marks no row of a batch of {self.batch_size} "
                               f"(round-down of batch x share): use 0, or at least 1/{self.batch_size}")
        if self.t_unshifted > 0 and self.t_shift == 1:
            raise MlxflowError(f"t-unshifted {self.t_unshifted:g} has no effect with t-shift 1 (no shift to skip)")
        for name in ("t_std", "t_shift", "noise_scale"):
            need(finite(getattr(self, name)) and getattr(self, name) > 0, name, "a number > 0")
        need(len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        return self


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
