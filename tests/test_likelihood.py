"""ODE log-likelihoods against the closed-form density of a Gaussian mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpcd.data.gmm import ExactScore
from fpcd.likelihood import exact_divergence, log_likelihood

T_MIN = 1e-5


def test_exact_divergence_matches_jacobian_trace():
    w = jax.random.normal(jax.random.key(0), (3, 2, 3, 2))
    f = lambda x: jnp.tanh(jnp.einsum("bij,ijkl->bkl", x, w))  # noqa: E731 - per-sample map
    x = jax.random.normal(jax.random.key(1), (4, 3, 2))
    _, div = exact_divergence(f, x)
    for b in range(4):
        jac = jax.jacfwd(lambda xi: f(xi[None])[0])(x[b]).reshape(6, 6)
        assert float(div[b]) == pytest.approx(float(jnp.trace(jac)), rel=1e-5, abs=1e-5)


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


def test_likelihood_errors(exact_score, sde):
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        log_likelihood(exact_score, sde, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(exact_score, sde, x, divergence="skilling")
    with pytest.raises(ValueError, match="unknown probe"):
        log_likelihood(exact_score, sde, x, key=jax.random.key(0), divergence="hutchinson", probe="uniform")
