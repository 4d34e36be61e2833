"""ODE log-likelihoods against the closed-form density of a Gaussian mixture."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CountingScore, nan_score, re_shape
from fpcd.data.gmm import ExactScore
from fpcd.likelihood import LIKELIHOOD_DEFAULTS, check_likelihood_options, exact_divergence, log_likelihood
from fpcd.ode import NonFiniteStateError

T_MIN = 1e-5


def jvp_counter(tally):
    """The identity, whose every executed JVP (the tangent is an input of the callback, so the
    call stays in the linear part under ``jax.linearize``) appends 1 to ``tally``."""

    @jax.custom_jvp
    def tap(x):
        return x

    @tap.defjvp
    def tap_jvp(primals, tangents):
        jax.debug.callback(lambda _: tally.append(1), tangents[0])
        return primals[0], tangents[0]

    return tap


def test_exact_divergence_matches_jacobian_trace():
    w = jax.random.normal(jax.random.key(0), (3, 2, 3, 2))
    f = lambda x: jnp.tanh(jnp.einsum("bij,ijkl->bkl", x, w))  # noqa: E731 - per-sample map
    x = jax.random.normal(jax.random.key(1), (4, 3, 2))
    _, div = exact_divergence(f, x)
    for b in range(4):
        jac = jax.jacfwd(lambda xi: f(xi[None])[0])(x[b]).reshape(6, 6)
        assert float(div[b]) == pytest.approx(float(jnp.trace(jac)), rel=1e-5, abs=1e-5)


def masked_map(x, mask, w):
    """A per-sample map of clouds ``x (B, N, D)`` whose real outputs depend on real inputs only
    (through a masked mean) and whose padded outputs still depend on their own inputs."""
    m = mask[..., None]
    mean = jnp.sum(x * m, axis=1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
    return jnp.tanh(x @ w + mean)


def test_masked_exact_divergence_is_the_trace_over_real_entries_with_max_count_jvps():
    batch, points, dim = 4, 5, 2
    counts = np.array([4, 1, 3, 0])  # the largest real count (8 scalars) is below points * dim = 10
    mask = jnp.asarray(np.arange(points)[None, :] < counts[:, None], jnp.float32)
    w = jax.random.normal(jax.random.key(0), (dim, dim))
    x = jax.random.normal(jax.random.key(1), (batch, points, dim))
    tally = []
    tap = jvp_counter(tally)
    f = lambda y: masked_map(tap(y), mask, w)  # noqa: E731

    velocity, div = exact_divergence(f, x, mask)
    jax.effects_barrier()
    assert len(tally) == dim * counts.max()
    np.testing.assert_array_equal(velocity, masked_map(x, mask, w))
    jac = jax.jacfwd(lambda y: masked_map(y, mask, w))(x).reshape(batch * points * dim, batch * points * dim)
    diagonal = np.asarray(jnp.diagonal(jac)).reshape(batch, points, dim)
    real = np.asarray(mask, bool)
    expected = np.array([diagonal[b][real[b]].sum() for b in range(batch)])
    np.testing.assert_allclose(div, expected, rtol=1e-6, atol=1e-6)
    assert div[3] == 0.0
    # Each sample's padded diagonal entries add up to far from zero, so counting them would show.
    padded_sums = np.array([diagonal[b][~real[b]].sum() for b in range(batch)])
    assert np.min(np.abs(padded_sums)) > 0.1, padded_sums

    # Garbage in padded slots changes nothing real.
    garbage = x + (1.0 - mask[..., None]) * 7.0
    _, div_garbage = exact_divergence(f, garbage, mask)
    np.testing.assert_array_equal(div_garbage, div)

    # The unmasked fast path: all points * dim diagonal entries, one JVP each.
    tally.clear()
    _, div_all = exact_divergence(f, x)
    jax.effects_barrier()
    assert len(tally) == points * dim
    np.testing.assert_allclose(div_all, diagonal.reshape(batch, -1).sum(-1), rtol=1e-6, atol=1e-6)


def test_exact_likelihood_matches_analytic_density(exact_score, sde, mixture):
    x = mixture.sample(jax.random.key(2), 200)
    logp, nfe = log_likelihood(exact_score, sde, x, divergence="exact", t_min=T_MIN)
    analytic = mixture.log_prob(x, T_MIN, sde)
    assert float(jnp.max(jnp.abs(logp - analytic))) < 0.01
    assert nfe > 6


def test_exact_likelihood_of_masked_clouds(mixture, sde):
    counts = np.array([3, 1, 4, 2])
    mask = jnp.asarray(np.arange(4)[None, :] < counts[:, None], jnp.float32)
    x = mixture.sample(jax.random.key(3), 16).reshape(4, 4, 2) * mask[..., None]
    score = ExactScore(mixture, sde, mask)
    logp, _ = log_likelihood(score, sde, x, mask=mask, divergence="exact", t_min=T_MIN)
    analytic = score.log_prob(x, T_MIN)
    np.testing.assert_allclose(logp, analytic, atol=0.02)
    # Garbage in padded slots changes nothing.
    garbage = x + (1.0 - mask[..., None]) * 7.0
    logp_garbage, _ = log_likelihood(score, sde, garbage, mask=mask, divergence="exact", t_min=T_MIN)
    np.testing.assert_allclose(logp_garbage, logp, atol=1e-6)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(exact_score, sde, mixture, probe):
    """Many probes on copies of a few points: the mean matches the exact value within 4 s.e."""
    points = mixture.sample(jax.random.key(4), 3)
    copies = 400
    x = jnp.repeat(points, copies, axis=0)
    exact, _ = log_likelihood(exact_score, sde, points, divergence="exact", t_min=T_MIN)
    est, _ = log_likelihood(exact_score, sde, x, key=jax.random.key(5), divergence="hutchinson", probe=probe,
                            t_min=T_MIN)
    est = np.asarray(est).reshape(3, copies)
    mean, stderr = est.mean(1), est.std(1) / np.sqrt(copies)
    assert np.all(est.std(1) > 0.01)  # it is an estimator, not the exact trace
    assert np.all(np.abs(mean - np.asarray(exact)) < 4 * stderr + 0.01), (mean, exact, stderr)


def test_tighter_tolerance_costs_more_evaluations(exact_score, sde, mixture):
    x = mixture.sample(jax.random.key(6), 32)
    _, loose = log_likelihood(exact_score, sde, x, rtol=1e-3, atol=1e-3)
    _, tight = log_likelihood(exact_score, sde, x, rtol=1e-6, atol=1e-6)
    assert loose < tight


# (rtol = atol, dt0, whether the first trial steps are rejected): dt0 = 0.9 is rejected before
# the first accepted step (measured: NFE 106 = 6 * num_steps + 4, three early rejections).
LIKELIHOOD_NFE_CASES = [(1e-2, 0.01, False), (1e-3, 0.01, False), (1e-5, 0.01, False), (1e-5, 0.9, True)]


@pytest.mark.parametrize("tol,dt0,early_rejections", LIKELIHOOD_NFE_CASES)
def test_likelihood_nfe_from_solver_statistics_equals_counted_score_calls(exact_score, sde, mixture, tol, dt0,
                                                                          early_rejections):
    x = mixture.sample(jax.random.key(2), 64)
    tally = []
    _, nfe = log_likelihood(CountingScore(exact_score, tally), sde, x, rtol=tol, atol=tol, dt0=dt0)
    jax.effects_barrier()
    assert isinstance(nfe, int)
    assert nfe == len(tally), (tol, dt0, nfe, len(tally))
    assert ((nfe - 1) % 6 != 0) == early_rejections, nfe


def test_masked_likelihood_nfe_equals_counted_score_calls(mixture, sde):
    counts = np.array([3, 1, 4, 2])
    mask = jnp.asarray(np.arange(4)[None, :] < counts[:, None], jnp.float32)
    x = mixture.sample(jax.random.key(3), 16).reshape(4, 4, 2) * mask[..., None]
    tally = []
    _, nfe = log_likelihood(CountingScore(ExactScore(mixture, sde, mask), tally), sde, x, mask=mask, rtol=1e-4,
                            atol=1e-4)
    jax.effects_barrier()
    assert nfe == len(tally)


# Traced and eager solves agree well below the solve's own error. At rtol = atol = 1e-4 the
# eager log-densities of a 32-point batch are 2e-3 to 4e-2 from the closed form (measured over
# 12 batches), while jit and vmap (different XLA programs, so different float32 rounding and
# slightly different step sizes) differ from eager by at most 5e-7 (jit) and 5.1e-4 (vmap;
# typically 1e-5) over 15 batches, with identical NFE. rtol = atol = 1e-3 instead changes logp
# by 0.04 to 0.08 (measured on the 3 test batches), another batch by O(1).
TRACED_TOL = 1e-4
TRACED_MAX_DIFF = 2e-3


def test_likelihood_under_jit_and_vmap_matches_eager(exact_score, sde, mixture):
    x = mixture.sample(jax.random.key(12), 3 * 32).reshape(3, 32, 2)
    keys = jax.random.split(jax.random.key(13), 3)

    def exact(xi):
        return log_likelihood(exact_score, sde, xi, rtol=TRACED_TOL, atol=TRACED_TOL, t_min=T_MIN)

    def hutchinson(xi, key):
        return log_likelihood(exact_score, sde, xi, key=key, divergence="hutchinson", rtol=TRACED_TOL,
                              atol=TRACED_TOL, t_min=T_MIN)

    for fn, inputs in ((exact, (x,)), (hutchinson, (x, keys))):
        eager = [fn(*(a[i] for a in inputs)) for i in range(3)]
        assert all(isinstance(nfe, int) for _, nfe in eager)
        logp_jit, nfe_jit = jax.jit(fn)(*(a[0] for a in inputs))
        logp_vmap, nfe_vmap = jax.vmap(fn)(*inputs)
        assert nfe_jit.dtype == nfe_vmap.dtype == jnp.int32
        assert int(nfe_jit) == eager[0][1]
        assert nfe_vmap.tolist() == [nfe for _, nfe in eager]
        np.testing.assert_allclose(logp_jit, eager[0][0], rtol=0, atol=TRACED_MAX_DIFF)
        np.testing.assert_allclose(logp_vmap, np.stack([logp for logp, _ in eager]), rtol=0, atol=TRACED_MAX_DIFF)
    assert np.max(np.abs(np.asarray(eager[0][0]) - np.asarray(eager[1][0]))) > 100 * TRACED_MAX_DIFF


def test_likelihood_out_of_steps_raises_eagerly_and_gives_nan_under_jit(exact_score, sde, mixture):
    x = mixture.sample(jax.random.key(14), 8)
    with pytest.raises(RuntimeError, match="max_steps"):
        log_likelihood(exact_score, sde, x, rtol=1e-8, atol=1e-8, max_steps=3)
    logp, nfe = jax.jit(lambda x: log_likelihood(exact_score, sde, x, rtol=1e-8, atol=1e-8, max_steps=3))(x)
    assert nfe.dtype == jnp.int32 and 6 * 3 + 1 <= int(nfe) <= 6 * 3 + 4
    assert np.all(np.isnan(np.asarray(logp)))


def test_one_compiled_likelihood_solve_serves_every_tolerance(exact_score, sde, mixture):
    score = eqx.debug.assert_max_traces(exact_score, max_traces=None)
    x = mixture.sample(jax.random.key(15), 16)
    log_likelihood(score, sde, x, rtol=1e-3, atol=1e-3)
    traces = eqx.debug.get_num_traces(score)
    assert traces > 0
    for opts in ({"rtol": 1e-4, "atol": 1e-5}, {"t_min": 1e-3}, {"dt0": 0.05}):
        log_likelihood(score, sde, x, **opts)
    assert eqx.debug.get_num_traces(score) == traces


def test_likelihood_errors(exact_score, sde):
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        log_likelihood(exact_score, sde, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(exact_score, sde, x, divergence="skilling")
    with pytest.raises(ValueError, match="unknown probe"):
        log_likelihood(exact_score, sde, x, key=jax.random.key(0), divergence="hutchinson", probe="uniform")


@pytest.mark.parametrize("options, match", [
    ({"divergence": "skilling"}, "unknown divergence 'skilling'"),
    ({"probe": "uniform"}, "unknown probe 'uniform'"),
    ({"rtol": 0.0}, "rtol must be a positive number"),
    ({"atol": float("nan")}, "atol must be a positive number"),
    ({"dt0": -0.1}, "dt0 must be a positive number"),
    ({"t_min": 1.0}, r"t_min must lie in \(0, 1\)"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
    ({"tolerance": 1e-3}, r"unknown likelihood option\(s\) \['tolerance'\]"),
])
def test_likelihood_options_have_one_check(exact_score, sde, options, match):
    """check_likelihood_options refuses each bad option naming it, and log_likelihood refuses the
    same options with the same message (it calls the check)."""
    with pytest.raises(ValueError, match=match):
        check_likelihood_options(**options)
    if "tolerance" not in options:
        with pytest.raises(ValueError, match=match):
            log_likelihood(exact_score, sde, jnp.zeros((2, 2)), key=jax.random.key(0), **options)


def test_likelihood_options_come_back_with_defaults_as_python_numbers():
    checked = check_likelihood_options(rtol=np.float32(1e-3), max_steps=np.int64(50), t_min=jnp.asarray(1e-4))
    assert checked == {**LIKELIHOOD_DEFAULTS, "rtol": pytest.approx(1e-3), "max_steps": 50, "t_min": pytest.approx(1e-4)}
    assert type(checked["rtol"]) is float and type(checked["max_steps"]) is int and type(checked["t_min"]) is float


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


@pytest.mark.parametrize("max_steps", [True, 2.5, np.float32(10)])
def test_likelihood_refuses_non_integer_max_steps(exact_score, sde, mixture, max_steps):
    x = mixture.sample(jax.random.key(4), 4)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        log_likelihood(exact_score, sde, x, max_steps=max_steps)


@pytest.mark.parametrize("shape", [(5,), (0, 2), (3, 0)])
def test_likelihood_refuses_input_without_batch_or_empty(exact_score, sde, shape):
    with pytest.raises(ValueError, match=rf"x must have shape \(B, \.\.\.\).*got shape {re_shape(shape)}"):
        log_likelihood(exact_score, sde, jnp.zeros(shape))
