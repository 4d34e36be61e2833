"""Issue 14 (reliability), library and data-loading faults: one test (or parametrised case) each.

Every case fails on the code before the fix. Tiny arrays, hdf5 files written to ``tmp_path`` and
the exact Gaussian-mixture score of ``conftest`` keep the file fast.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CountingScore
from fpcd.likelihood import log_likelihood
from fpcd.metrics import jets as jet_metrics
from fpcd.ode import NonFiniteStateError
from fpcd.sampling import nfe_of, sample


class NaNScore(eqx.Module):
    """The exact score, but NaN wherever ``t`` lies in ``[t_lo, t_hi]`` (a network that breaks down
    at some noise levels); tallies its executed calls on the host."""

    inner: eqx.Module
    t_lo: jax.Array
    t_hi: jax.Array
    tally: list = eqx.field(static=True)

    def __call__(self, x, t):
        jax.debug.callback(lambda: self.tally.append(1))
        bad = ((t >= self.t_lo) & (t <= self.t_hi)).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(bad, jnp.nan, self.inner(x, t))


def nan_score(exact_score, t_lo, t_hi):
    return NaNScore(exact_score, jnp.asarray(t_lo, jnp.float32), jnp.asarray(t_hi, jnp.float32), [])


# --- 1. NaN must not burn the ODE budget ----------------------------------------------------------


def test_ode_sampler_stops_at_once_when_the_score_turns_nan(exact_score, sde):
    score = nan_score(exact_score, 0.0, 0.5)
    with pytest.raises(NonFiniteStateError, match=r"non-finite .* from t=[0-9.]+ to t=[0-9.]+.*score") as info:
        sample(score, sde, jax.random.key(0), (8, 2), method="ode", max_steps=2000)
    jax.effects_barrier()
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FloatingPointError)
    assert "did not reach" not in str(info.value)
    assert len(score.tally) < 600, len(score.tally)  # measured 271 (rejections shrink the step to a few ulps), not 2000 x 6


def test_ode_sampler_under_jit_stops_at_once_and_returns_nan(exact_score, sde):
    score = nan_score(exact_score, 0.0, 0.5)
    x, nfe = jax.jit(lambda key: sample(score, sde, key, (8, 2), method="ode", max_steps=2000))(jax.random.key(0))
    jax.effects_barrier()
    assert np.all(np.isnan(np.asarray(x)))
    assert int(nfe) == len(score.tally) < 600


def test_likelihood_stops_at_once_when_the_score_turns_nan(exact_score, sde, mixture):
    score = nan_score(exact_score, 0.3, 1.0)  # the likelihood integrates from t_min up to 1
    x = mixture.sample(jax.random.key(1), 8)
    with pytest.raises(NonFiniteStateError, match=r"non-finite .* from t=0\.[0-9]+ to t=[0-9.]+") as info:
        log_likelihood(score, sde, x, rtol=1e-3, atol=1e-3, max_steps=2000, divergence="hutchinson",
                       key=jax.random.key(0))
    jax.effects_barrier()
    assert float(str(info.value).split("to t=")[1].split(":")[0]) > 0.3 - 1e-6  # the step that crossed t = 0.3
    assert len(score.tally) < 600, len(score.tally)


@pytest.mark.parametrize("where", ["x", "mask"])
def test_likelihood_refuses_non_finite_input_eagerly(exact_score, sde, mixture, where):
    x = np.array(mixture.sample(jax.random.key(2), 4))
    mask = np.ones_like(x)
    (x if where == "x" else mask)[1, 0] = np.nan
    score = CountingScore(exact_score, [])
    with pytest.raises(ValueError, match=f"^{where} holds NaN/inf"):
        log_likelihood(score, sde, x, mask=mask, max_steps=2000)
    jax.effects_barrier()
    assert score.tally == []


def test_likelihood_of_non_finite_input_under_jit_is_nan_after_one_step(exact_score, sde, mixture):
    x = mixture.sample(jax.random.key(3), 4).at[2, 1].set(jnp.inf)
    logp, nfe = jax.jit(lambda x: log_likelihood(exact_score, sde, x, max_steps=2000, divergence="hutchinson",
                                                 key=jax.random.key(0)))(x)
    assert np.all(np.isnan(np.asarray(logp)))
    assert int(nfe) == 7  # one rejected Dopri5 trial step of 7 stages


def test_a_trial_step_that_overflows_is_retried_not_fatal():
    """dy/dt = -y^3 from y(0) = 10 with a first trial step of 1 overflows (NaN trial state); the
    solve must shrink the step and reach the exact y(1) = (2 + 1/y0^2)^(-1/2), as diffrax does."""
    from fpcd.ode import solve_dopri5

    y1, stats = solve_dopri5(lambda t, y, args: -y**3, jnp.array([10.0]), t0=0.0, t1=1.0, rtol=1e-5, atol=1e-5,
                             dt0=1.0)
    assert bool(stats.succeeded) and int(stats.num_rejected) >= 1
    np.testing.assert_allclose(float(y1[0]), (2.0 + 1.0 / 100.0) ** -0.5, rtol=1e-4)  # measured 3.5e-5


class ErraticScore(eqx.Module):
    """Finite but discontinuous in ``x`` with a huge jump: no step can meet the tolerances."""

    def __call__(self, x, t):
        return 1e8 * jnp.sign(jnp.sin(1e6 * x))


def test_ode_sampler_stops_when_the_step_size_collapses(sde):
    with pytest.raises(RuntimeError, match="step size collapsed at t=") as info:
        sample(ErraticScore(), sde, jax.random.key(0), (4, 2), method="ode", max_steps=2000)
    assert not isinstance(info.value, NonFiniteStateError)
    assert int(re.search(r"; (\d+) steps", str(info.value)).group(1)) < 50, str(info.value)


# --- 3. library edges -------------------------------------------------------------------------------


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


@pytest.mark.parametrize("max_steps", [True, 2.5, np.float32(10)])
def test_likelihood_refuses_non_integer_max_steps(exact_score, sde, mixture, max_steps):
    x = mixture.sample(jax.random.key(4), 4)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        log_likelihood(exact_score, sde, x, max_steps=max_steps)


@pytest.mark.parametrize("shape", [(5,), (0, 2), (3, 0)])
def test_likelihood_refuses_input_without_batch_or_empty(exact_score, sde, shape):
    with pytest.raises(ValueError, match=rf"x must have shape \(B, \.\.\.\).*got shape {re_shape(shape)}"):
        log_likelihood(exact_score, sde, jnp.zeros(shape))


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


JETS = np.concatenate([np.random.default_rng(0).normal(0, 0.1, (6, 5, 2)), np.full((6, 5, 1), 0.2),
                       np.ones((6, 5, 1))], axis=2)
W1_KW = {"num_eval_samples": 6, "num_batches": 1}
JET_METRICS = {
    "w1m": lambda a, b: jet_metrics.w1m(a, b, **W1_KW),
    "w1p": lambda a, b: jet_metrics.w1p(a, b, **W1_KW),
    "w1efp": lambda a, b: jet_metrics.w1efp(a, b, **W1_KW),
}


@pytest.mark.parametrize("metric", sorted(JET_METRICS))
@pytest.mark.parametrize("bad", [JETS[0], JETS[:0]], ids=["one jet 2-d", "empty"])
def test_jet_w1_metrics_name_the_expected_shape(metric, bad):
    with pytest.raises(ValueError, match=rf"jets2 must have shape \(N, P, 3 or 4\).*got shape {re_shape(bad.shape)}"):
        JET_METRICS[metric](JETS, bad)


@pytest.mark.parametrize("bad", [JETS[0], JETS[:0]], ids=["one jet 2-d", "empty"])
def test_fpd_kpd_features_name_the_expected_shape(bad):
    with pytest.raises(ValueError, match=rf"jets must have shape \(N, P, 3 or 4\).*got shape {re_shape(bad.shape)}"):
        jet_metrics.get_fpd_kpd_jet_features(bad)


FEATURES = np.random.default_rng(1).normal(size=(8, 3))


@pytest.mark.parametrize("metric", ["fpd", "kpd"])
@pytest.mark.parametrize("bad", [FEATURES[:0], FEATURES[0], FEATURES[:, :, None]], ids=["empty", "1-d", "3-d"])
def test_fpd_kpd_name_the_expected_shape(metric, bad):
    call = {"fpd": lambda a, b: jet_metrics.fpd(a, b, min_samples=4, max_samples=8, num_batches=1, num_points=2),
            "kpd": lambda a, b: jet_metrics.kpd(a, b, num_batches=1, batch_size=4)}[metric]
    with pytest.raises(ValueError, match=rf"gen_features must have shape \(N, F\).*got shape {re_shape(bad.shape)}"):
        call(FEATURES, bad)


@pytest.mark.parametrize("metric", ["w1m", "w1p", "w1efp", "get_fpd_kpd_jet_features", "fpd", "kpd"])
def test_jet_metrics_refuse_non_finite_input(metric):
    jets = JETS.copy()
    jets[2, 1, 0] = np.nan
    features = FEATURES.copy()
    features[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        if metric in JET_METRICS:
            JET_METRICS[metric](JETS, jets)
        elif metric == "get_fpd_kpd_jet_features":
            jet_metrics.get_fpd_kpd_jet_features(jets)
        elif metric == "fpd":
            jet_metrics.fpd(FEATURES, features, min_samples=4, max_samples=8, num_batches=1, num_points=2)
        else:
            jet_metrics.kpd(FEATURES, features, num_batches=1, batch_size=4)
