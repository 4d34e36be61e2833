"""Samplers against the exact VP-SDE score of a Gaussian mixture."""

import importlib.util
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CountingScore, REPO, truth_floor, xla_flags
from fpcd.config import ConfigError, check_run_name
from fpcd.data.gmm import ExactScore, GaussianMixture
from fpcd.metrics import w1_per_dimension
from fpcd.sampling import check_sampler_options, nfe_of, sample
from fpcd.sde import VPSDE

NUM = 10_000
# Two independent truth samples of this size reach up to ~1.8x the mean floor (30 trials), so a
# sampler passes when its mean W1 over dimensions is below 2x the floor; a score off by 20% gives ~4x.
FLOOR_FACTOR = 2.0


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
    # Mean W1 / floor measured (linear / cosine schedule): dpmpp_2m 1.63 / 1.27 at 20 NFE (2.11 / 1.84
    # at 15, 3.65 / 3.63 at 10); heun 1.58 / 1.19 at 28 steps = 55 NFE (2.09 / 1.71 at 39 NFE, 6.8 at 19).
    ("dpmpp_2m", {"steps": 20}),
    ("heun", {"steps": 28}),
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
     ("ddim", {"steps": 21, "eta": 0.5}), ("dpmpp_2m", {"steps": 1}), ("dpmpp_2m", {"steps": 14}),
     ("dpmpp_2m", {"steps": 20}), ("heun", {"steps": 1}), ("heun", {"steps": 2}), ("heun", {"steps": 10})],
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
    assert nfe_of("dpmpp_2m", steps=12) == 12
    assert nfe_of("dpmpp_2m") == 20
    assert nfe_of("heun", steps=10) == 19
    assert nfe_of("heun") == 35


def test_run_names_of_the_new_solvers_state_their_nfe():
    check_run_name("heun_19", "heun", {"steps": 10})
    check_run_name("dpmpp_2m_20", "dpmpp_2m", {"steps": 20})
    with pytest.raises(ConfigError, match="heun_20.*must take 20 score evaluations.*takes 19"):
        check_run_name("heun_20", "heun", {"steps": 10})
    with pytest.raises(ConfigError, match="dpmpp_2m_10.*takes 20"):
        check_run_name("dpmpp_2m_10", "dpmpp_2m", {})


def test_ode_nfe_grows_as_tolerance_tightens(exact_score, sde):
    nfes = [
        sample(exact_score, sde, jax.random.key(2), (256, 2), method="ode", rtol=tol, atol=tol)[1]
        for tol in (1e-2, 1e-4, 1e-6)
    ]
    assert nfes[0] < nfes[1] < nfes[2], nfes


@pytest.mark.parametrize("method", ["em", "pc", "ddim", "dpmpp_2m", "heun", "ode"])
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


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "heun"])
def test_padded_run_matches_the_unpadded_run_on_real_points(mixture, sde, method):
    """Points of a cloud are i.i.d. under the mixture's score, so a real point follows the same path
    whether its neighbours are padding (with garbage scores) or real: same key, same prior draw."""
    counts = np.array([5, 2, 0, 4])
    mask = jnp.asarray(np.arange(5)[None, :] < counts[:, None], jnp.float32)
    padded, _ = sample(LeakyScore(ExactScore(mixture, sde, mask), mask), sde, jax.random.key(13), (4, 5, 2),
                       method=method, steps=9, mask=mask)
    unpadded, _ = sample(ExactScore(mixture, sde), sde, jax.random.key(13), (4, 5, 2), method=method, steps=9)
    real = np.asarray(mask) == 1
    assert np.all(np.asarray(padded)[~real] == 0.0)
    np.testing.assert_allclose(np.asarray(padded)[real], np.asarray(unpadded)[real], rtol=0, atol=1e-6)


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
        ({"method": "rk4"}, "unknown sampling method"),
        ({"method": "heun", "eta": 0.0}, "unknown option"),
        ({"method": "dpmpp_2m", "rho": 7.0}, "unknown option"),
        ({"method": "heun", "rho": 0.0}, "rho must be a positive number"),
        ({"method": "dpmpp_2m", "steps": 0}, "steps must be a positive integer"),
        ({"method": "heun", "t_min": 0.0}, "t_min must lie in"),
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


def test_sampler_options_have_one_check():
    """The check that sample() runs is the public one, and the configs' sampling.runs check reports
    its message under the run's name."""
    import ml_collections

    from fpcd.config import validate_sampling

    assert check_sampler_options("ode", {"rtol": np.float32(1e-3), "max_steps": np.int64(7)}) == {
        "rtol": pytest.approx(1e-3), "atol": 1e-5, "dt0": 0.01, "max_steps": 7, "t_min": 1e-3}
    assert check_sampler_options("pc", {"steps": np.int32(4)})["steps"] == 4
    with pytest.raises(ValueError, match="sampling option dt0 must be a positive number, got 0.0"):
        check_sampler_options("ode", {"dt0": 0.0})
    cfg = ml_collections.ConfigDict({"sampling": {"num_samples": 8, "batch_size": 8,
                                                  "runs": {"fast": {"method": "ode", "dt0": 0.0}}}})
    with pytest.raises(ConfigError, match="config.sampling.runs.fast: sampling option dt0 must be a positive number"):
        validate_sampling(cfg)


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


@pytest.mark.parametrize("method,other", [("em", {"t_min": 1e-2}), ("dpmpp_2m", {"t_min": 1e-2}),
                                          ("heun", {"rho": 3.0, "t_min": 1e-2})])
def test_one_compilation_serves_every_step_count(exact_score, sde, method, other):
    # The score is traced once per compilation of a fixed-step sampler (one call in its loop body;
    # heun's predictor and corrector evaluations alternate in one loop).
    score = eqx.debug.assert_max_traces(exact_score, max_traces=1)
    for steps in (3, 5, 14, 15, 40):  # 14 -> 15 switches dpmpp_2m's lower-order final step off
        sample(score, sde, jax.random.key(0), (32, 2), method=method, steps=steps)
    sample(score, sde, jax.random.key(0), (32, 2), method=method, steps=4, **other)
    assert eqx.debug.get_num_traces(score) == 1
    with pytest.raises(RuntimeError, match="can only be traced 1 times"):
        sample(score, sde, jax.random.key(0), (33, 2), method=method, steps=3)  # a new shape must retrace


@pytest.mark.parametrize("method", ["dpmpp_2m", "heun"])
def test_solvers_under_jit_and_vmap_match_eager(exact_score, sde, method):
    def run(key):
        return sample(exact_score, sde, key, (16, 2), method=method, steps=6)

    keys = jax.random.split(jax.random.key(12), 3)
    eager = [run(k) for k in keys]
    x_jit, nfe_jit = jax.jit(run)(keys[0])
    x_vmap, nfe_vmap = jax.vmap(run)(keys)
    assert int(nfe_jit) == eager[0][1] == nfe_of(method, steps=6)
    assert np.asarray(nfe_vmap).tolist() == [eager[0][1]] * 3
    np.testing.assert_allclose(x_jit, eager[0][0], rtol=0, atol=1e-5)
    for i, (x, _) in enumerate(eager):
        np.testing.assert_allclose(x_vmap[i], x, rtol=0, atol=1e-5)


def test_one_compiled_ode_solve_serves_every_tolerance_and_end_time(exact_score, sde):
    score = eqx.debug.assert_max_traces(exact_score, max_traces=None)
    sample(score, sde, jax.random.key(0), (32, 2), method="ode", rtol=1e-3, atol=1e-3)
    traces = eqx.debug.get_num_traces(score)
    assert traces > 0
    for opts in ({"rtol": 1e-4, "atol": 1e-5}, {"t_min": 1e-2}, {"dt0": 0.05}, {"rtol": 1e-2, "atol": 1e-2}):
        sample(score, sde, jax.random.key(1), (32, 2), method="ode", **opts)
    assert eqx.debug.get_num_traces(score) == traces


@pytest.mark.parametrize("method,opts", [("em", {"steps": 500}), ("ddim", {"steps": 100}), ("dpmpp_2m", {"steps": 20}),
                                         ("heun", {"steps": 28}), ("ode", {})])
def test_cosine_schedule_samplers_reach_the_floor(mixture, floor, truth, method, opts):
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


@pytest.mark.e2e
def test_sharded_sampling_on_four_devices_counts_and_matches():
    import json
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "sharded_sampling_worker.py")
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, worker], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for method in ("em", "pc", "ddim", "ode"):
        row = out[method]
        assert row["nfe"][0] == row["nfe"][1] == row["calls"], (method, row)
        assert row["num_shards"] == 4
        assert row["max_diff"] < (5e-3 if method == "ode" else 1e-4), (method, row)


# --- Training-free solvers on Gaussian data, whose probability flow is known in closed form ------

MU, S = 1.5, 0.5  # data N(MU, S^2 I); S != 1 keeps the flow from being trivial


def gaussian_score(sde, dim=2):
    return ExactScore(GaussianMixture(jnp.ones(1), jnp.full((1, dim), MU), jnp.full((1, dim), S)), sde)


def marginal64(sde, t):
    """``(alpha_t, sigma_t)`` of ``sde`` in float64 numpy."""
    with jax.enable_x64(True):
        alpha, sigma = sde.marginal(jnp.asarray(t, jnp.float64))
        return np.asarray(alpha), np.asarray(sigma)


def deterministic_prior(key, shape):
    """x(1) of ddim, dpmpp_2m and heun called with ``key`` (each draws it from ``split(key)[0]`` in the
    default float dtype, float64 under ``jax.enable_x64``)."""
    return np.asarray(jax.random.normal(jax.random.split(key)[0], shape, jnp.result_type(float)), np.float64)


def exact_flow(sde, x1, t):
    """The probability-flow ODE's map from ``x(1) = x1`` to ``x(t)`` for N(MU, S^2 I) data: the
    marginal at t is N(alpha_t MU, (alpha_t^2 S^2 + sigma_t^2) I) and the flow is the affine map
    ``x(t) = alpha_t MU + sqrt(alpha_t^2 S^2 + sigma_t^2) (x1 - alpha_1 MU) / sqrt(alpha_1^2 S^2 + sigma_1^2)``."""
    (a1, s1), (a, s) = marginal64(sde, 1.0), marginal64(sde, t)
    return a * MU + np.sqrt(a**2 * S**2 + s**2) * (x1 - a1 * MU) / np.sqrt(a1**2 * S**2 + s1**2)


# Fitted slope of log(RMS error) against log(steps) over 16..128 steps, from the same prior draws
# (float32 is enough: the errors at 128 steps, 2e-4 (second order) to 1e-2 (ddim), stay far above
# rounding). Measured (linear / cosine schedule): ddim -0.967 / -0.980, dpmpp_2m -1.928 / -1.923,
# heun -2.053 / -2.057. Below 16 steps dpmpp_2m's lower-order final step (steps < 15) changes the
# error constant (its error even changes sign near 8 steps), so the fit starts at 16.
ORDER_STEPS = (16, 32, 64, 128)
ORDERS = {"ddim": 1, "dpmpp_2m": 2, "heun": 2}
SLOPE_TOL = 0.1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "heun"])
def test_solver_error_falls_at_its_order(schedule, method):
    sde = VPSDE(schedule=schedule)
    key, shape = jax.random.key(21), (256, 2)
    target = exact_flow(sde, deterministic_prior(key, shape), 1e-3)
    errors = []
    for steps in ORDER_STEPS:
        x, _ = sample(gaussian_score(sde), sde, key, shape, method=method, steps=steps)
        errors.append(float(np.sqrt(np.mean((np.asarray(x, np.float64) - target) ** 2))))
    slope = np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
    print(f"{schedule} {method}: slope {slope:.3f}, errors {errors}")
    assert abs(slope + ORDERS[method]) < SLOPE_TOL, (slope, errors)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def reference_times(sde, log_snrs):
    """VP times of ``log_snrs`` by root finding on ``sde.log_snr`` in float64, independent of the
    closed-form inverse the samplers use."""
    from scipy import optimize

    def gap(t, target):
        with jax.enable_x64(True):
            return float(sde.log_snr(jnp.float64(t))) - target

    return np.array([optimize.brentq(gap, 1e-9, 1.0 + 1e-3, args=(float(v),), xtol=1e-15, rtol=1e-14)
                     for v in log_snrs])


def reference_dpmpp_2m(sde, x1, steps, t_min, lower_order_final=True):
    """DPM-Solver++(2M) as written in Lu et al. 2022, Algorithm 2, in float64, with diffusers'
    ``lower_order_final`` (first order at the last step when ``steps < 15``)."""
    lam_ends = [0.5 * float(np.log(a**2 / s**2)) for a, s in (marginal64(sde, 1.0), marginal64(sde, t_min))]
    lam = np.linspace(*lam_ends, steps + 1)
    alpha, sigma = marginal64(sde, reference_times(sde, 2.0 * lam))
    x, x0_prev, h_prev = x1, None, None
    for i in range(steps):
        h = lam[i + 1] - lam[i]
        score = -(x - alpha[i] * MU) / (alpha[i] ** 2 * S**2 + sigma[i] ** 2)
        x0 = (x + sigma[i] ** 2 * score) / alpha[i]
        if x0_prev is None or (lower_order_final and i == steps - 1 and steps < 15):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * d
        x0_prev, h_prev = x0, h
    return x


def reference_heun(sde, x1, steps, t_min, rho):
    """EDM's Algorithm 1 (S_churn = 0) in float64 on ``y = x / alpha_t``, ``sigma = sigma_t / alpha_t``,
    ``dy/dsigma = (y - x0(y)) / sigma``, on the grid ``sigma_i = (sigma_max^(1/rho) + i/steps
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i = 0..steps, Euler on the last step."""
    (a_max, s_max), (a_min, s_min) = marginal64(sde, 1.0), marginal64(sde, t_min)
    lo, hi = (s_max / a_max) ** (1 / rho), (s_min / a_min) ** (1 / rho)
    sig = (lo + np.arange(steps + 1) / steps * (hi - lo)) ** rho
    alpha, sigma = marginal64(sde, reference_times(sde, -2.0 * np.log(sig)))

    def slope(y, i):
        x = alpha[i] * y
        x0 = (x + sigma[i] ** 2 * -(x - alpha[i] * MU) / (alpha[i] ** 2 * S**2 + sigma[i] ** 2)) / alpha[i]
        return (y - x0) / sig[i]

    y = x1 / a_max
    for i in range(steps):
        d = slope(y, i)
        y_next = y + (sig[i + 1] - sig[i]) * d
        if i < steps - 1:
            y_next = y + (sig[i + 1] - sig[i]) * 0.5 * (d + slope(y_next, i + 1))
        y = y_next
    return a_min * y


# The samplers traced in float64 (jax.enable_x64 for this test only) against the float64 loops: they
# differ only by the time inverse (closed form vs root finding) and rounding: measured max difference
# 1.7e-13 over these cases (float32 sampling instead differs by up to 1.4e-4, mostly from the cosine
# schedule's float32 int_beta at small t).
REFERENCE_ATOL = 1e-10


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("method,opts", [
    ("dpmpp_2m", {"steps": 1}), ("dpmpp_2m", {"steps": 3}), ("dpmpp_2m", {"steps": 14}),
    ("dpmpp_2m", {"steps": 15}), ("dpmpp_2m", {"steps": 20, "t_min": 1e-2}),
    ("heun", {"steps": 1}), ("heun", {"steps": 2}), ("heun", {"steps": 7, "rho": 3.0}),
    ("heun", {"steps": 18, "t_min": 1e-2}),
])
def test_solvers_match_reference_implementations_step_for_step(schedule, method, opts):
    """The grids, first/last-step orders and update rules against plain float64 loops."""
    sde = VPSDE(schedule=schedule)
    key, shape = jax.random.key(22), (64, 2)
    with jax.enable_x64(True):
        x, _ = sample(gaussian_score(sde), sde, key, shape, method=method, **opts)
        x1 = deterministic_prior(key, shape)
    assert x.dtype == jnp.float64
    t_min = opts.get("t_min", 1e-3)
    if method == "dpmpp_2m":
        expected = reference_dpmpp_2m(sde, x1, opts["steps"], t_min)
    else:
        expected = reference_heun(sde, x1, opts["steps"], t_min, opts.get("rho", 7.0))
    print(f"{schedule} {method} {opts}: max diff {np.max(np.abs(np.asarray(x) - expected)):.2e}")
    np.testing.assert_allclose(np.asarray(x), expected, rtol=0, atol=REFERENCE_ATOL)


def test_the_reference_comparison_sees_the_lower_order_final_step():
    """At 14 steps the sampler's last step is first order: the reference without that rule is far
    from it, so the step-for-step test checks the rule."""
    sde = VPSDE()
    key, shape = jax.random.key(22), (64, 2)
    with jax.enable_x64(True):
        x, _ = sample(gaussian_score(sde), sde, key, shape, method="dpmpp_2m", steps=14)
        x1 = deterministic_prior(key, shape)
    second_order_final = reference_dpmpp_2m(sde, x1, 14, 1e-3, lower_order_final=False)
    assert np.max(np.abs(np.asarray(x) - second_order_final)) > 1e-4


SHARDED_SOLVERS_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {workers!r})
from sharded_sampling_worker import CountingScore
from fpcd.data.gmm import ExactScore, toy_mixture
from fpcd.parallel import batch_sharding, data_mesh
from fpcd.sampling import sample
from fpcd.sde import VPSDE

sde = VPSDE()
mask = (jnp.arange(3)[None, :] < jnp.arange(64)[:, None] % 4).astype(jnp.float32)
score = ExactScore(toy_mixture(2), sde, mask)
sharding = batch_sharding(data_mesh())
out = {{"devices": jax.device_count()}}
for method, steps in (("dpmpp_2m", 12), ("heun", 6)):
    plain, nfe_plain = sample(score, sde, jax.random.key(0), (64, 3, 2), method=method, steps=steps, mask=mask)
    tally = []
    sharded, nfe_sharded = sample(CountingScore(score, tally), sde, jax.random.key(0), (64, 3, 2), method=method,
                                  steps=steps, mask=mask, sharding=sharding)
    jax.effects_barrier()
    out[method] = {{"nfe": [nfe_plain, nfe_sharded], "calls": len(tally),
                   "max_diff": float(np.max(np.abs(np.asarray(plain) - np.asarray(sharded)))),
                   "padding_zero": bool(np.all(np.asarray(sharded)[np.asarray(mask) == 0] == 0.0)),
                   "num_shards": len(sharded.sharding.device_set)}}
print(json.dumps(out))
"""


@pytest.mark.e2e
def test_sharded_solvers_on_four_devices_count_and_match():
    script = SHARDED_SOLVERS_SCRIPT.format(workers=os.path.join(REPO, "tests", "workers"))
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for method, nfe in (("dpmpp_2m", 12), ("heun", 11)):
        row = out[method]
        assert row["nfe"] == [nfe, nfe] and row["calls"] == nfe, (method, row)
        assert row["num_shards"] == 4 and row["padding_zero"], (method, row)
        assert row["max_diff"] < 1e-4, (method, row)


@pytest.mark.parametrize("steps", [np.int64(5), np.int32(5), np.array(5), jnp.array(5)],
                         ids=["np.int64", "np.int32", "0-d numpy", "0-d jax"])
def test_samplers_take_numpy_and_jax_integers(exact_score, sde, steps):
    x, nfe = sample(exact_score, sde, jax.random.key(0), (4, 2), method="ddim", steps=steps)
    reference, _ = sample(exact_score, sde, jax.random.key(0), (4, 2), method="ddim", steps=5)
    assert nfe == 5 and type(nfe) is int
    np.testing.assert_array_equal(x, reference)


def test_samplers_take_numpy_integers_and_floats_for_every_option():
    # The options are checked by the same code as sample()'s, without compiling a sampler.
    assert nfe_of("pc", steps=np.int64(2), corrector_steps=np.int16(2), snr=np.float32(0.16)) == 6
    assert nfe_of("heun", steps=jnp.array(3, jnp.int32), rho=np.float32(7.0), t_min=np.float32(1e-3)) == 5
    assert nfe_of("ode", max_steps=np.uint8(9), rtol=np.float32(1e-4), dt0=jnp.array(0.01)) is None


@pytest.mark.parametrize("options, name", [
    ({"method": "ode", "rtol": np.inf}, "rtol"),
    ({"method": "heun", "rho": np.inf}, "rho"),
    ({"method": "pc", "snr": True}, "snr"),
    ({"method": "ddim", "eta": True}, "eta"),
])
def test_samplers_refuse_bool_and_infinite_number_options(exact_score, sde, options, name):
    with pytest.raises(ValueError, match=f"sampling option {name} must be"):
        sample(exact_score, sde, jax.random.key(0), (4, 2), **options)
