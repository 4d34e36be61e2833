"""Samplers against the exact VP-SDE score of a Gaussian mixture."""

import importlib.util
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import truth_floor
from fpcd.data.gmm import ExactScore
from fpcd.metrics import w1_per_dimension
from fpcd.sampling import nfe_of, sample

NUM = 10_000
# Two independent truth samples of this size reach up to ~1.8x the mean floor (30 trials), so a
# sampler passes when its mean W1 over dimensions is below 2x the floor; a score off by 20% gives ~4x.
FLOOR_FACTOR = 2.0


class CountingScore(eqx.Module):
    """Wraps a score function and tallies executed (batched) calls on the host, independently of
    the samplers' own accounting."""

    inner: eqx.Module
    tally: list = eqx.field(static=True)

    def __call__(self, x, t):
        jax.debug.callback(lambda: self.tally.append(1))
        return self.inner(x, t)


class ScaledScore(eqx.Module):
    """A deliberately wrong score (negative control)."""

    inner: eqx.Module
    factor: float

    def __call__(self, x, t):
        return self.factor * self.inner(x, t)


class LeakyScore(eqx.Module):
    """The exact score plus garbage on padded entries: samplers must not let it through."""

    inner: eqx.Module
    mask: jax.Array

    def __call__(self, x, t):
        m = self.mask[..., None]
        return self.inner(x, t) + (1.0 - m) * 1e3 * jnp.sign(x + 0.5)


SETTINGS = [
    ("em", {"steps": 500}),
    ("pc", {"steps": 100, "snr": 0.16}),
    ("pc", {"steps": 60, "snr": 0.1, "corrector_steps": 2}),
    ("ddim", {"steps": 100}),
    ("ddim", {"steps": 300, "eta": 1.0}),
    ("ode", {"rtol": 1e-5, "atol": 1e-5}),
]


@pytest.fixture(scope="module")
def floor(mixture):
    return truth_floor(mixture, NUM)


@pytest.fixture(scope="module")
def truth(mixture):
    return np.asarray(mixture.sample(jax.random.key(77), NUM))


@pytest.mark.parametrize("method,opts", SETTINGS)
def test_sampler_reaches_the_truth_floor(exact_score, sde, floor, truth, method, opts):
    x, _ = sample(exact_score, sde, jax.random.key(0), (NUM, 2), method=method, **opts)
    w1 = w1_per_dimension(np.asarray(x), truth)
    assert np.mean(w1) < FLOOR_FACTOR * np.mean(floor), (method, opts, w1, floor)


def test_a_wrong_score_fails_the_floor_criterion(exact_score, sde, floor, truth):
    x, _ = sample(ScaledScore(exact_score, 0.8), sde, jax.random.key(0), (NUM, 2), method="em", steps=500)
    w1 = w1_per_dimension(np.asarray(x), truth)
    assert np.mean(w1) > FLOOR_FACTOR * np.mean(floor), (w1, floor)


def test_too_few_ddim_steps_are_measurably_worse(exact_score, sde, floor, truth):
    x, _ = sample(exact_score, sde, jax.random.key(0), (NUM, 2), method="ddim", steps=3)
    assert np.mean(w1_per_dimension(np.asarray(x), truth)) > 2.0 * np.mean(floor)


def load_benchmark_module(name):
    """Import ``benchmarks/<name>.py`` (benchmarks/ is not a package) from its path."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "method,opts",
    [("em", {"steps": 37}), ("pc", {"steps": 13, "corrector_steps": 1}), ("pc", {"steps": 9, "corrector_steps": 3}),
     ("ddim", {"steps": 21, "eta": 0.5})],
)
def test_reported_nfe_equals_counted_score_calls(exact_score, sde, method, opts):
    tally = []
    _, nfe = sample(CountingScore(exact_score, tally), sde, jax.random.key(1), (64, 2), method=method, **opts)
    jax.effects_barrier()
    assert nfe == len(tally) == nfe_of(method, **opts)


# (rtol = atol, dt0, whether the first trial steps are rejected). With dt0 = 0.9 the first trial
# step is rejected at both tolerances (measured: NFE 32 and 104 = 6 * num_steps + 2).
ODE_NFE_CASES = [(1e-2, 0.01, False), (1e-3, 0.01, False), (1e-5, 0.01, False), (1e-2, 0.9, True), (1e-5, 0.9, True)]


@pytest.mark.parametrize("tol,dt0,early_rejections", ODE_NFE_CASES)
def test_ode_nfe_from_solver_statistics_equals_counted_score_calls(exact_score, sde, tol, dt0, early_rejections):
    """The NFE computed from the solver's statistics against an independent host-side count."""
    tally = []
    _, nfe = sample(CountingScore(exact_score, tally), sde, jax.random.key(1), (64, 2), method="ode", rtol=tol,
                    atol=tol, dt0=dt0)
    jax.effects_barrier()
    assert isinstance(nfe, int)
    assert nfe == len(tally), (tol, dt0, nfe, len(tally))
    # 6 * num_steps + 1 alone would be wrong exactly when steps were rejected before the first
    # accepted one (fewer than 6 here).
    assert ((nfe - 1) % 6 != 0) == early_rejections, nfe


def test_nfe_formulas():
    assert nfe_of("em", steps=300) == 300
    assert nfe_of("ddim", steps=10) == 10
    assert nfe_of("pc", steps=250, corrector_steps=1) == 500
    assert nfe_of("pc", steps=100, corrector_steps=3) == 400


def test_ode_nfe_grows_as_tolerance_tightens(exact_score, sde):
    nfes = [
        sample(exact_score, sde, jax.random.key(2), (256, 2), method="ode", rtol=tol, atol=tol)[1]
        for tol in (1e-2, 1e-4, 1e-6)
    ]
    assert nfes[0] < nfes[1] < nfes[2], nfes


@pytest.mark.parametrize("method", ["em", "pc", "ddim", "ode"])
def test_mask_keeps_padding_zero_and_out_of_real_entries(mixture, sde, method):
    batch, points = 8, 6
    counts = np.array([6, 5, 3, 1, 0, 4, 2, 6])
    mask = jnp.asarray(np.arange(points)[None, :] < counts[:, None], jnp.float32)
    clean = ExactScore(mixture, sde, mask)
    opts = {"steps": 20} if method != "ode" else {"rtol": 1e-4, "atol": 1e-4}
    x_clean, _ = sample(clean, sde, jax.random.key(3), (batch, points, 2), method=method, mask=mask, **opts)
    x_leaky, _ = sample(LeakyScore(clean, mask), sde, jax.random.key(3), (batch, points, 2), method=method,
                        mask=mask, **opts)
    x_clean, x_leaky = np.asarray(x_clean), np.asarray(x_leaky)
    padded = np.asarray(mask) == 0
    assert np.all(x_clean[padded] == 0.0) and np.all(x_leaky[padded] == 0.0)
    assert np.all(np.isfinite(x_clean))
    np.testing.assert_array_equal(x_clean[~padded], x_leaky[~padded])
    assert np.abs(x_clean[~padded]).max() > 0.1


def test_point_mask_and_full_mask_agree(mixture, sde):
    mask = jnp.asarray(np.arange(4)[None, :] < np.array([[4], [2]]), jnp.float32)
    score = ExactScore(mixture, sde, mask)
    a, _ = sample(score, sde, jax.random.key(4), (2, 4, 2), method="em", steps=10, mask=mask)
    b, _ = sample(score, sde, jax.random.key(4), (2, 4, 2), method="em", steps=10,
                  mask=jnp.broadcast_to(mask[..., None], (2, 4, 2)))
    np.testing.assert_array_equal(a, b)


def test_sampling_is_deterministic_per_key(exact_score, sde):
    a, _ = sample(exact_score, sde, jax.random.key(5), (16, 2), method="pc", steps=10)
    b, _ = sample(exact_score, sde, jax.random.key(5), (16, 2), method="pc", steps=10)
    c, _ = sample(exact_score, sde, jax.random.key(6), (16, 2), method="pc", steps=10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "heun"}, "unknown sampling method"),
        ({"method": "em", "snr": 0.1}, "unknown option"),
        ({"method": "em", "steps": 0}, "steps must be a positive integer"),
        ({"method": "em", "steps": 2.5}, "steps must be a positive integer"),
        ({"method": "pc", "snr": -1.0}, "snr must be a positive number"),
        ({"method": "ddim", "eta": 2.0}, "eta must lie in"),
        ({"method": "ode", "rtol": 0.0}, "rtol must be a positive number"),
        ({"method": "em", "t_min": 1.5}, "t_min must lie in"),
    ],
)
def test_bad_sampler_arguments_raise_clear_errors(exact_score, sde, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(exact_score, sde, jax.random.key(0), (4, 2), **kwargs)


def test_mask_of_wrong_shape_is_rejected(exact_score, sde):
    with pytest.raises(ValueError, match="does not broadcast"):
        sample(exact_score, sde, jax.random.key(0), (4, 3, 2), method="em", steps=2, mask=jnp.ones((4, 5)))


def test_ode_out_of_steps_raises(exact_score, sde):
    with pytest.raises(RuntimeError, match="max_steps"):
        sample(exact_score, sde, jax.random.key(0), (4, 2), method="ode", rtol=1e-8, atol=1e-8, max_steps=3)


def test_ode_out_of_steps_under_jit_gives_nan_and_the_nfe(exact_score, sde):
    run = jax.jit(lambda key, max_steps: sample(exact_score, sde, key, (4, 2), method="ode", rtol=1e-8, atol=1e-8,
                                                max_steps=max_steps), static_argnums=1)
    x, nfe = run(jax.random.key(0), 3)
    assert isinstance(nfe, jax.Array) and nfe.dtype == jnp.int32
    assert np.all(np.isnan(np.asarray(x)))
    assert 6 * 3 + 1 <= int(nfe) <= 6 * 3 + 4  # 3 steps, each possibly rejected before the first accept
    x, nfe = run(jax.random.key(0), 100_000)  # the same call with enough steps: finite
    assert np.all(np.isfinite(np.asarray(x))) and int(nfe) > 6 * 3 + 4


# Traced and eager ODE solves agree far below the solve's own error. At rtol = atol = 1e-3 the
# eager samples are 7e-3 to 7e-2 from a 1e-7 reference solve (measured over 12 keys), while jit
# and vmap (different XLA programs, so different float32 rounding and slightly different step
# sizes) differ from eager by at most 4.6e-5 (measured over 18 keys), with identical NFE.
# rtol = atol = 1e-4 or 1e-2 instead changes the samples by 0.014-0.034 or 0.6-0.9 (3 test
# keys), another key by O(1).
TRACED_TOL = 1e-3
TRACED_MAX_DIFF = 5e-4


def test_ode_sampler_under_jit_and_vmap_matches_eager(exact_score, sde):
    def run(key):
        return sample(exact_score, sde, key, (64, 2), method="ode", rtol=TRACED_TOL, atol=TRACED_TOL)

    keys = jax.random.split(jax.random.key(11), 3)
    eager = [run(k) for k in keys]
    assert all(isinstance(nfe, int) for _, nfe in eager)
    x_jit, nfe_jit = jax.jit(run)(keys[0])
    x_vmap, nfe_vmap = jax.vmap(run)(keys)
    assert nfe_jit.dtype == nfe_vmap.dtype == jnp.int32 and nfe_vmap.shape == (3,)
    assert int(nfe_jit) == eager[0][1]
    assert nfe_vmap.tolist() == [nfe for _, nfe in eager]
    np.testing.assert_allclose(x_jit, eager[0][0], rtol=0, atol=TRACED_MAX_DIFF)
    for i, (x, _) in enumerate(eager):
        np.testing.assert_allclose(x_vmap[i], x, rtol=0, atol=TRACED_MAX_DIFF)
    assert np.max(np.abs(np.asarray(eager[0][0]) - np.asarray(eager[1][0]))) > 100 * TRACED_MAX_DIFF


def test_one_compilation_serves_every_step_count(exact_score, sde):
    # The score is traced once per compilation of the em sampler (one call in its loop body).
    score = eqx.debug.assert_max_traces(exact_score, max_traces=1)
    for steps in (3, 5, 17, 40):
        sample(score, sde, jax.random.key(0), (32, 2), method="em", steps=steps)
    assert eqx.debug.get_num_traces(score) == 1
    with pytest.raises(RuntimeError, match="can only be traced 1 times"):
        sample(score, sde, jax.random.key(0), (33, 2), method="em", steps=3)  # a new shape must retrace


def test_one_compiled_ode_solve_serves_every_tolerance_and_end_time(exact_score, sde):
    score = eqx.debug.assert_max_traces(exact_score, max_traces=None)
    sample(score, sde, jax.random.key(0), (32, 2), method="ode", rtol=1e-3, atol=1e-3)
    traces = eqx.debug.get_num_traces(score)
    assert traces > 0
    for opts in ({"rtol": 1e-4, "atol": 1e-5}, {"t_min": 1e-2}, {"dt0": 0.05}, {"rtol": 1e-2, "atol": 1e-2}):
        sample(score, sde, jax.random.key(1), (32, 2), method="ode", **opts)
    assert eqx.debug.get_num_traces(score) == traces


@pytest.mark.parametrize("method,opts", [("em", {"steps": 500}), ("ddim", {"steps": 100}), ("ode", {})])
def test_cosine_schedule_samplers_reach_the_floor(mixture, floor, truth, method, opts):
    from fpcd.sde import VPSDE

    cosine = VPSDE(schedule="cosine")
    x, _ = sample(ExactScore(mixture, cosine), cosine, jax.random.key(8), (NUM, 2), method=method, **opts)
    w1 = w1_per_dimension(np.asarray(x), truth)
    assert np.mean(w1) < FLOOR_FACTOR * np.mean(floor), (method, w1, floor)


def test_scipy_rk45_baseline_agrees_with_diffrax(exact_score, sde):
    sample_scipy_rk45 = load_benchmark_module("scipy_rk45").sample_scipy_rk45

    x_dfx, nfe_dfx = sample(exact_score, sde, jax.random.key(9), (256, 2), method="ode", rtol=1e-5, atol=1e-5)
    x_sp, nfe_sp = sample_scipy_rk45(exact_score, sde, jax.random.key(9), (256, 2), rtol=1e-5, atol=1e-5)
    assert abs(nfe_dfx / nfe_sp - 1) < 0.15, (nfe_dfx, nfe_sp)
    np.testing.assert_allclose(x_sp, x_dfx, atol=2e-3)


def test_sharded_sampling_on_four_devices_counts_and_matches():
    import json
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "sharded_sampling_worker.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, worker], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for method in ("em", "pc", "ddim", "ode"):
        row = out[method]
        assert row["nfe"][0] == row["nfe"][1] == row["calls"], (method, row)
        assert row["num_shards"] == 4
        assert row["max_diff"] < (5e-3 if method == "ode" else 1e-4), (method, row)
