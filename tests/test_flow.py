"""Flow path, targets and time samplers against closed-form answers."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlxflow import flow
from mlxflow.errors import MlxflowError


def test_path_endpoints_and_velocity():
    rng = np.random.default_rng(0)
    x0, x1 = rng.normal(size=(3, 4, 4, 3)), rng.normal(size=(3, 4, 4, 3))
    assert np.allclose(flow.interpolate(x0, x1, np.zeros(3)), x0)
    assert np.allclose(flow.interpolate(x0, x1, np.ones(3)), x1)
    t = np.array([0.2, 0.5, 0.9])
    xt = flow.interpolate(x0, x1, t)
    # finite difference along the path equals the velocity target
    h = 1e-6
    assert np.allclose((flow.interpolate(x0, x1, t + h) - xt) / h, flow.velocity_target(x0, x1), atol=1e-4)


@pytest.mark.parametrize("backend", ["numpy", "mlx", "torch"])
def test_target_round_trips(backend):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(4, 2, 2, 3)).astype(np.float32) for _ in range(2)]
    t_np = np.array([0.1, 0.3, 0.6, 0.85], np.float32)
    conv = {"numpy": np.asarray, "mlx": mx.array, "torch": torch.from_numpy}[backend]
    x0, x1, t = conv(arrays[0]), conv(arrays[1]), conv(t_np)
    xt = flow.interpolate(x0, x1, t)
    v = flow.velocity_target(x0, x1)
    # x-prediction of the true clean image maps to the true velocity (t below the clamp)
    assert np.allclose(np.asarray(flow.x_to_velocity(x1, xt, t)), np.asarray(v), atol=1e-4)
    assert np.allclose(np.asarray(flow.velocity_to_x(v, xt, t)), np.asarray(x1), atol=1e-5)
    assert np.allclose(np.asarray(flow.velocity_to_noise(v, xt, t)), np.asarray(x0), atol=1e-5)


def test_x_to_velocity_clamps_near_data():
    xt, x = np.zeros((1, 2)), np.ones((1, 2))
    v = flow.x_to_velocity(x, xt, np.array([1.0]), t_eps=0.05)
    assert np.all(np.isfinite(v)) and np.allclose(v, 20.0)


def test_shift_time():
    t = np.linspace(0, 1, 11)
    assert np.allclose(flow.shift_time(t, 1.0), t)
    s = flow.shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and np.all(np.diff(s) > 0)
    assert np.all(s[1:-1] < t[1:-1])  # shift > 1 moves time towards noise
    # sigma form: sigma' = s sigma / (1 + (s-1) sigma)
    sigma = 1 - t
    assert np.allclose(1 - s, 3 * sigma / (1 + 2 * sigma))
    assert flow.resolution_shift(128, 64) == pytest.approx(2.0)


def test_time_samplers():
    rng = np.random.default_rng(2)
    u = rng.random(1000)
    strat = flow.stratified_time(u)
    # exactly one sample per stratum
    assert np.array_equal(np.floor(strat * 1000).astype(int), np.arange(1000))
    z = rng.normal(size=200_000)
    ln = flow.logit_normal_time(z, mean=-0.8, std=0.8)
    assert 0 < ln.min() and ln.max() < 1
    assert np.median(ln) == pytest.approx(1 / (1 + math.exp(0.8)), abs=5e-3)
    mx_t = flow.sample_time("logit_normal", None, lambda n: mx.array(z[:n].astype(np.float32)), 5, -0.8, 0.8)
    assert np.allclose(np.asarray(mx_t), ln[:5], atol=1e-6)
    with pytest.raises(MlxflowError, match="unknown time sampler"):
        flow.sample_time("bogus", None, None, 3)


@pytest.mark.parametrize("n,fraction,count", [(32, 0.25, 8), (32, 0.0, 0), (32, 1.0, 32), (10, 0.3, 3), (7, 0.5, 3),
                                                 (100, 0.29, 29), (100, 0.57, 57)])
def test_unshifted_rows_are_counted_and_spread(n, fraction, count):
    mask = flow.unshifted_rows(n, fraction, np.zeros(n, np.float32))
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() == count
    if 0 < count < n:  # spread: no two marked rows are closer than the even spacing allows
        gaps = np.diff(np.flatnonzero(mask))
        assert gaps.min() >= int(1 / fraction)


def test_mixed_shift_keeps_a_share_of_t_as_drawn():
    rng = np.random.default_rng(3)
    t = rng.random(64).astype(np.float32)
    mixed = flow.mixed_shift_time(t, 20.0, 0.25)
    kept = flow.unshifted_rows(64, 0.25, t).astype(bool)
    assert np.array_equal(mixed[kept], t[kept])
    assert np.allclose(mixed[~kept], flow.shift_time(t[~kept], 20.0))
    assert np.array_equal(flow.mixed_shift_time(t, 20.0, 0.0), flow.shift_time(t, 20.0))


def test_stratified_mixture_stratifies_each_share_over_all_of_0_1():
    """Each group (kept rows, shifted rows) has one draw per stratum of its own size, so the
    unshifted times reach every part of [0, 1], not a fixed comb of the batch's strata."""
    n, share, shift = 32, 0.25, 20.0
    rng = np.random.default_rng(4)
    u = rng.random(n).astype(np.float32)
    t = flow.stratified_mixed_time(u, shift, share)
    kept = flow.unshifted_rows(n, share, u).astype(bool)
    k = int(kept.sum())
    assert k == 8
    assert np.allclose(t[kept] * k, np.arange(k) + u[kept], atol=1e-5)  # the j-th kept row in [j/k, (j+1)/k)
    unshift = lambda s: shift * s / (1 + (shift - 1) * s)  # inverse of t / (t + shift (1 - t))  # noqa: E731
    assert np.allclose(unshift(t[~kept]) * (n - k), np.arange(n - k) + u[~kept], atol=1e-3)
    # over many batches every one of 32 bins above t = 0.5 is reached, and the share of
    # t > 0.5 is 0.75 P_shifted + 0.25 * 0.5
    ts = np.concatenate([flow.stratified_mixed_time(rng.random(n).astype(np.float32), shift, share)
                         for _ in range(2000)])
    hist, _ = np.histogram(ts, bins=64, range=(0, 1))
    assert hist[32:].min() > 0
    assert (ts > 0.5).mean() == pytest.approx(0.75 * (1 / (1 + shift)) + 0.125, abs=0.01)
    assert np.array_equal(flow.stratified_mixed_time(u, shift, 0.0), flow.stratified_time(u, shift))
    # the trainers' frameworks agree row for row
    args = (None, n, 0.0, 1.0, shift, share)
    via_torch = flow.sample_time("stratified", lambda m: torch.from_numpy(u[:m]), *args)
    via_mlx = flow.sample_time("stratified", lambda m: mx.array(u[:m]), *args)
    assert np.allclose(via_torch.numpy(), t, atol=1e-6) and np.allclose(np.asarray(via_mlx), t, atol=1e-6)


def test_time_grid_and_cfg():
    assert flow.time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(MlxflowError):
        flow.time_grid(0)
    vc, vu = np.array([2.0]), np.array([1.0])
    assert flow.cfg_combine(vc, vu, 1.0) == 2.0
    assert flow.cfg_combine(vc, vu, 3.0) == 4.0
    assert flow.guidance_active(0.5, (0.1, 0.7)) and not flow.guidance_active(0.9, (0.1, 0.7))
