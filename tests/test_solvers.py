"""Solvers on ODEs with known solutions."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxflow import solvers
from mlxflow.errors import MlxflowError


@pytest.mark.parametrize("name", list(solvers.SOLVERS))
def test_constant_field_is_exact(name):
    x0 = np.array([0.5, -1.0])
    *_, (i, t, x) = solvers.integrate(lambda x, t: np.array([2.0, -3.0]), x0, 3, name)
    assert i == 2 and t == 1.0
    assert np.allclose(x, x0 + [2.0, -3.0])


@pytest.mark.parametrize("name", ["heun", "midpoint", "rk4"])
def test_linear_in_time_field_is_exact_for_second_order(name):
    # dx/dt = t  ->  x(1) = x(0) + 1/2; second-order methods integrate linear-in-t fields exactly
    *_, (_, _, x) = solvers.integrate(lambda x, t: np.full_like(x, t), np.zeros(1), 4, name)
    assert np.allclose(x, 0.5)


def test_straight_path_recovered_exactly():
    # the optimal field of a single pair (x0 -> x1) is constant: every solver lands on x1
    x0, x1 = np.array([1.0, 2.0]), np.array([-3.0, 0.5])
    v = lambda x, t: (x1 - x) / (1 - t)  # noqa: E731  (the conditional field of the straight path)
    *_, (_, _, x) = solvers.integrate(v, x0, 5, "euler")
    assert np.allclose(x, x1)


def _error(name, steps):
    # dx/dt = x on [0, 1], x(0) = 1 -> e
    *_, (_, _, x) = solvers.integrate(lambda x, t: x, np.ones(1), steps, name)
    return abs(x[0] - math.e)


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4), ("ab2", 2)])
def test_convergence_order(name, order):
    ratio = _error(name, 16) / _error(name, 32)
    assert ratio == pytest.approx(2 ** order, rel=0.15)


def test_generator_yields_every_step_and_works_with_mlx():
    steps = list(solvers.integrate(lambda x, t: -x, mx.ones((2,)), 5, "heun"))
    assert [s[0] for s in steps] == list(range(5))
    assert np.allclose(np.asarray(steps[-1][2]), math.exp(-1), atol=5e-3)  # Heun, 5 steps: error ~3e-3


def test_guided_batches_cond_and_uncond_and_respects_interval():
    calls = []

    def model_fn(x, t, c):
        calls.append(x.shape[0])
        return c * np.ones_like(x)  # velocity = conditioning value

    cond, uncond = np.full((2, 1), 2.0), np.zeros((2, 1))
    v = solvers.guided(model_fn, cond, uncond, scale=3.0, interval=(0.0, 0.5))
    assert np.allclose(v(np.zeros((2, 1)), 0.2), 6.0) and calls[-1] == 4  # 0 + 3 * (2 - 0)
    assert np.allclose(v(np.zeros((2, 1)), 0.8), 2.0) and calls[-1] == 2  # outside: conditional only


def test_unknown_solver():
    with pytest.raises(MlxflowError, match="unknown solver"):
        solvers.get_solver("dopri")


def test_dpm2m_is_at_least_second_order_and_exact_on_a_straight_path():
    assert _error("dpm2m", 16) / _error("dpm2m", 32) > 3.5
    # The straight path's field points at one clean image (D constant): the
    # clean-image-space multistep lands on it exactly, whatever its grid.
    x0, x1 = np.array([1.0, 2.0]), np.array([-3.0, 0.5])
    *_, (_, _, x) = solvers.integrate(lambda x, t: (x1 - x) / (1 - t), x0, 7, "dpm2m", shift=3.0)
    assert np.allclose(x, x1)


@pytest.mark.parametrize("name", ["ab2", "dpm2m"])
def test_multistep_uses_one_evaluation_per_step_and_never_t1(name):
    seen = []
    *_, (_, _, x) = solvers.integrate(lambda x, t: seen.append(t) or x, np.ones(1), 10, name, shift=2.0)
    assert len(seen) == 10 and max(seen) < 1.0
    # on a shifted (non-uniform) grid it is still far closer than Euler at the same cost
    *_, (_, _, xe) = solvers.integrate(lambda x, t: x, np.ones(1), 10, "euler", shift=2.0)
    assert abs(x[0] - math.e) < (0.2 if name == "ab2" else 0.4) * abs(xe[0] - math.e)


def test_adams_weights_integrate_polynomials_exactly():
    # through 3 points the interpolant of t^2 is t^2 itself: its integral over [1, 1.5] is exact
    w = solvers._adams_weights([0.0, 0.4, 1.0], 1.0, 1.5)
    assert sum(wi * t * t for wi, t in zip(w, [0.0, 0.4, 1.0])) == pytest.approx((1.5**3 - 1) / 3)
