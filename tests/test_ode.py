"""The adaptive Dopri5 solver (fpcd.ode): a non-finite score stops the solve at once, an
overflowing trial step is retried, a step size that collapses stops the solve with a clear error."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nan_score
from fpcd.ode import NonFiniteStateError, check_solver_options, solve_dopri5
from fpcd.sampling import sample


def test_ode_sampler_stops_at_once_when_the_score_turns_nan(exact_score, sde):
    score = nan_score(exact_score, 0.0, 0.5)
    with pytest.raises(NonFiniteStateError, match=r"non-finite .* from t=[0-9.]+ to t=[0-9.]+.*score") as info:
        sample(score, sde, jax.random.key(0), (8, 2), method="ode", max_steps=2000)
    jax.effects_barrier()
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FloatingPointError)
    assert "did not reach" not in str(info.value)
    assert len(score.tally) < 600, len(score.tally)  # a few hundred (rejections shrink the step to a few ulps), not 2000 x 6


def test_ode_sampler_under_jit_stops_at_once_and_returns_nan(exact_score, sde):
    score = nan_score(exact_score, 0.0, 0.5)
    x, nfe = jax.jit(lambda key: sample(score, sde, key, (8, 2), method="ode", max_steps=2000))(jax.random.key(0))
    jax.effects_barrier()
    assert np.all(np.isnan(np.asarray(x)))
    assert int(nfe) == len(score.tally) < 600


def test_a_trial_step_that_overflows_is_retried_not_fatal():
    """dy/dt = -y^3 from y(0) = 10 with a first trial step of 1 overflows (NaN trial state); the
    solve must shrink the step and reach the exact y(1) = (2 + 1/y0^2)^(-1/2), as diffrax does."""
    y1, stats = solve_dopri5(lambda t, y, args: -y**3, jnp.array([10.0]), t0=0.0, t1=1.0, rtol=1e-5, atol=1e-5,
                             dt0=1.0)
    assert bool(stats.succeeded) and int(stats.num_rejected) >= 1
    np.testing.assert_allclose(float(y1[0]), (2.0 + 1.0 / 100.0) ** -0.5, rtol=1e-4)  # the solve's error is about 3.5e-5


class ErraticScore(eqx.Module):
    """Finite but discontinuous in ``x`` with a huge jump: no step can meet the tolerances."""

    def __call__(self, x, t):
        return 1e8 * jnp.sign(jnp.sin(1e6 * x))


def test_ode_sampler_stops_when_the_step_size_collapses(sde):
    with pytest.raises(RuntimeError, match="step size collapsed at t=") as info:
        sample(ErraticScore(), sde, jax.random.key(0), (4, 2), method="ode", max_steps=2000)
    assert not isinstance(info.value, NonFiniteStateError)
    assert int(re.search(r"; (\d+) steps", str(info.value)).group(1)) < 50, str(info.value)



@pytest.mark.parametrize("options, match", [
    ({"rtol": 0.0}, "rtol must be a positive number"),
    ({"atol": float("inf")}, "atol must be a positive number"),
    ({"dt0": -1e-2}, "dt0 must be a positive number"),
    ({"max_steps": 2.5}, "max_steps must be a positive integer"),
    ({"max_steps": True}, "max_steps must be a positive integer"),
])
def test_solver_options_are_checked_before_the_solve(options, match):
    """solve_dopri5 refuses a bad concrete option with check_solver_options' message; traced
    tolerances pass unchecked (they cannot be read)."""
    merged = {"rtol": 1e-3, "atol": 1e-3, "dt0": 0.01, "max_steps": 10, **options}
    with pytest.raises(ValueError, match=match):
        check_solver_options(**merged)
    with pytest.raises(ValueError, match=match):
        solve_dopri5(lambda t, y, args: -y, jnp.ones((2, 2)), t0=0.0, t1=1.0, **merged)
    y1, _ = jax.jit(lambda r: solve_dopri5(lambda t, y, args: -y, jnp.ones((2, 2)), t0=0.0, t1=1.0, rtol=r,
                                           atol=1e-6, max_steps=100))(1e-6)
    np.testing.assert_allclose(y1, np.exp(-1.0), rtol=1e-4)
