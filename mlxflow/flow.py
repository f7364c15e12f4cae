"""The probability path, training targets, time samplers and guidance.

Convention, used everywhere in mlxflow:

    t = 0 is noise, t = 1 is data
    x_t = (1 - t) * x0 + t * x1          x0 ~ N(0, I), x1 = data
    v   = dx_t/dt = x1 - x0              (the velocity a network is trained to predict)

Every function here uses only arithmetic and a handful of elementwise ops picked
from the array's own framework, so the same math serves mx.array, torch.Tensor and
numpy arrays (the torch twin and the Core ML sampling loop share it; nothing is forked).
"""

from __future__ import annotations

import math

from .errors import MlxflowError


def _xp(a):
    """The array namespace of `a`: mlx.core, torch or numpy."""
    mod = type(a).__module__
    if mod.startswith("mlx"):
        import mlx.core as mx

        return mx
    if mod.startswith("torch"):
        import torch

        return torch
    import numpy as np

    return np


def _expand(t, x):
    """Reshape per-sample t (B,) so it broadcasts against x (B, ...)."""
    if getattr(t, "ndim", 0) == 0:
        return t
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


# --- the path --------------------------------------------------------------------

def interpolate(x0, x1, t):
    """x_t on the straight path; t has shape (B,) or is a scalar."""
    t = _expand(t, x1)
    return (1 - t) * x0 + t * x1


def velocity_target(x0, x1):
    return x1 - x0


def x_to_velocity(x_pred, x_t, t, t_eps: float = 0.05):
    """Clean-image prediction -> velocity: v = (x1_hat - x_t) / (1 - t).

    1 - t is clamped at t_eps because the division blows up as t -> 1 (JiT does the same).
    """
    xp = _xp(x_t)
    one_minus_t = _expand(1 - t, x_t)
    one_minus_t = xp.maximum(one_minus_t, t_eps) if xp.__name__ != "torch" else one_minus_t.clamp(min=t_eps)
    return (x_pred - x_t) / one_minus_t


def to_velocity(prediction: str, output, x_t, t, t_eps: float = 0.05):
    """A network's output as a velocity, whatever the family predicts.

    The one conversion everyone uses (losses, samplers, crosscheck, Core ML wrapper):
    "velocity" passes through, "x" (a clean-image prediction, JiT) goes through
    x_to_velocity. t is (B,) or a scalar.
    """
    if prediction == "velocity":
        return output
    if prediction == "x":
        return x_to_velocity(output, x_t, t, t_eps)
    raise MlxflowError(f"unknown prediction '{prediction}' (known: velocity, x)")


def velocity_to_x(v, x_t, t):
    """Velocity -> clean image: x1 = x_t + (1 - t) v."""
    return x_t + _expand(1 - t, x_t) * v


def velocity_to_noise(v, x_t, t):
    """Velocity -> noise: x0 = x_t - t v."""
    return x_t - _expand(t, x_t) * v


# --- time samplers -----------------------------------------------------------------
# Samplers are deterministic transforms of base draws (uniform u or standard normal z)
# that the caller makes with its own framework's RNG, so MLX and torch share them.

def shift_time(t, shift: float):
    """Resolution shift: t' = t / (t + s (1 - t)).

    With s > 1 more of the schedule is spent near noise (t small), which larger images
    need because the same noise level destroys less of their signal. s = 1 is identity.
    In terms of the noise level sigma = 1 - t this is sigma' = s sigma / (1 + (s-1) sigma).
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1 - t))


def resolution_shift(image_size: int, base_size: int = 64) -> float:
    """A shift that keeps per-pixel SNR comparable across resolutions: sqrt(pixels ratio)."""
    return math.sqrt((image_size * image_size) / (base_size * base_size))


def uniform_time(u, shift: float = 1.0):
    return shift_time(u, shift)


def _arange_like(n: int, like):
    """0, 1, ..., n-1 in the framework, dtype (and torch device) of the array `like`."""
    xp = _xp(like)
    if xp.__name__ == "torch":
        return xp.arange(n, dtype=like.dtype, device=like.device)
    return xp.arange(n).astype(like.dtype)


def stratified_time(u, shift: float = 1.0):
    """One sample per stratum [i/B, (i+1)/B): lower-variance coverage of [0, 1] per batch."""
    n = u.shape[0]
    return shift_time((_arange_like(n, u) + u) / n, shift)


def logit_normal_time(z, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
    """t = sigmoid(mean + std * z), then the resolution shift."""
    xp = _xp(z)
    return shift_time(xp.sigmoid(mean + std * z) if xp.__name__ != "numpy" else 1 / (1 + xp.exp(-(mean + std * z))), shift)


def unshifted_count(n: int, fraction: float) -> int:
    """How many of n rows the share `fraction` marks: round-down(n * fraction), on the host.

    The 1e-9 keeps a decimal share whole where it should be (100 x 0.29 is 28.999... in floats).
    """
    return int(math.floor(n * fraction + 1e-9))


def unshifted_rows(n: int, fraction: float, like):
    """(n,) 0/1 mask with k = `unshifted_count(n, fraction)` ones spread evenly over the rows.

    Row i is marked when floor((i + 1) k / n) > floor(i k / n): for k / n = 1/4 rows 3, 7,
    11, ... (exact in float32: integer ratios with small n). `like` is an array of the
    framework (and device) to use.
    """
    xp = _xp(like)
    k = unshifted_count(n, fraction)
    i = _arange_like(n, like)
    return xp.floor((i + 1) * k / n) - xp.floor(i * k / n)


def mixed_shift_time(t, shift: float, unshifted: float = 0.0):
    """`shift_time` on every row but the share `unshifted` (`unshifted_rows`), which keeps t as drawn.

    The mixture spends most of a batch at high noise (the strong shift) while a share of
    it still covers the low-noise end, where a strong shift alone leaves fine detail (and
    a clean background) barely trained. For i.i.d. draws (uniform, logit-normal); the
    stratified sampler splits its strata instead (`stratified_mixed_time`).
    """
    if unshifted == 0.0 or shift == 1.0:
        return shift_time(t, shift)
    keep = unshifted_rows(t.shape[0], unshifted, t)
    return keep * t + (1 - keep) * shift_time(t, shift)


def stratified_mixed_time(u, shift: float, unshifted: float):
    """The stratified sampler with a share `unshifted` of the rows left unshifted.

    The marked rows (`unshifted_rows`, k of them) are stratified over [0, 1] among
    themselves, one draw per [j/k, (j+1)/k), and the other n - k rows likewise before the
    shift, so each group covers the whole interval. (Marking rows of one stratified batch
    instead would draw the unshifted times from a fixed comb of strata.)
    """
    if unshifted == 0.0 or shift == 1.0:
        return stratified_time(u, shift)
    xp = _xp(u)
    n = u.shape[0]
    k = unshifted_count(n, unshifted)
    keep = unshifted_rows(n, unshifted, u)
    rank_kept = xp.cumsum(keep, axis=0) - keep  # j for the j-th marked row
    rank_shifted = xp.cumsum(1 - keep, axis=0) - (1 - keep)
    t_kept = (rank_kept + u) / max(k, 1)
    t_shifted = shift_time((rank_shifted + u) / max(n - k, 1), shift)
    return keep * t_kept + (1 - keep) * t_shifted


TIME_SAMPLERS = ("uniform", "stratified", "logit_normal")


def sample_time(kind: str, draw_uniform, draw_normal, n: int, mean=0.0, std=1.0, shift=1.0, unshifted=0.0):
    """Draw n training times in [0, 1] (0 = noise). `draw_uniform(n)` / `draw_normal(n)` come
    from the caller's RNG; `shift` is applied to all rows but the share `unshifted`
    (round-down(n * unshifted) rows; see `mixed_shift_time`, `stratified_mixed_time`).
    MlxflowError for an unknown kind."""
    if kind == "uniform":
        return mixed_shift_time(uniform_time(draw_uniform(n)), shift, unshifted)
    if kind == "stratified":
        return stratified_mixed_time(draw_uniform(n), shift, unshifted)
    if kind == "logit_normal":
        return mixed_shift_time(logit_normal_time(draw_normal(n), mean, std), shift, unshifted)
    raise MlxflowError(f"unknown time sampler '{kind}' (known: {', '.join(TIME_SAMPLERS)})")


def time_grid(steps: int, shift: float = 1.0):
    """The solver's time points t_0=0 < ... < t_steps=1 as Python floats."""
    if steps < 1:
        raise MlxflowError(f"steps must be >= 1, got {steps}")
    return [float(shift_time(i / steps, shift)) for i in range(steps + 1)]


# --- guidance ----------------------------------------------------------------------

def cfg_combine(v_cond, v_uncond, scale: float):
    """Classifier-free guidance: v_u + s (v_c - v_u). s = 1 is plain conditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def guidance_active(t: float, interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at time t (JiT applies CFG only inside an interval)."""
    return interval is None or interval[0] <= t <= interval[1]
