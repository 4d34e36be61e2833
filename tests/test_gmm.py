import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fpcd.data.gmm import ExactScore, GaussianMixture


def _scipy_logpdf(mixture, x, alpha, sigma):
    w = np.asarray(mixture.weights) / np.asarray(mixture.weights).sum()
    dens = sum(
        w[k] * stats.multivariate_normal(alpha * np.asarray(mixture.means[k]),
                                         np.diag(alpha**2 * np.asarray(mixture.scales[k]) ** 2 + sigma**2)).pdf(x)
        for k in range(len(w))
    )
    return np.log(dens)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.6])
def test_marginal_density_matches_scipy(mixture, sde, t):
    x = np.asarray(jax.random.normal(jax.random.key(0), (50, 2))) * 1.5
    alpha, sigma = (1.0, 0.0) if t == 0.0 else map(float, sde.marginal(t))
    ours = mixture.log_prob(jnp.asarray(x), t, sde) if t > 0 else mixture.log_prob(jnp.asarray(x))
    np.testing.assert_allclose(ours, _scipy_logpdf(mixture, x, alpha, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_closed_form_score_is_gradient_of_log_density(mixture, sde, t):
    x = jax.random.normal(jax.random.key(1), (40, 2))
    tb = jnp.full((40,), t)
    autodiff = jax.vmap(jax.grad(lambda xi, ti: mixture.log_prob(xi[None], ti[None], sde)[0]))(x, tb)
    np.testing.assert_allclose(mixture.score(x, tb, sde), autodiff, rtol=1e-4, atol=1e-4)


def test_samples_have_mixture_moments(mixture):
    x = np.asarray(mixture.sample(jax.random.key(2), 200_000))
    w = np.asarray(mixture.weights) / np.asarray(mixture.weights).sum()
    mean = (w[:, None] * np.asarray(mixture.means)).sum(0)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.01)


def test_exact_score_masks_padded_points(mixture, sde):
    x = jax.random.normal(jax.random.key(3), (2, 4, 2))
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    score = ExactScore(mixture, sde, mask)(x, jnp.array([0.3, 0.3]))
    assert np.all(np.asarray(score)[0, 2:] == 0.0)
    logp = ExactScore(mixture, sde, mask).log_prob(x, 0.3)
    per_point = mixture.log_prob(x, jnp.array([0.3, 0.3]), sde)
    np.testing.assert_allclose(logp, [per_point[0, :2].sum(), per_point[1].sum()], rtol=1e-6)


def test_inconsistent_shapes_raise():
    with pytest.raises(ValueError, match="GaussianMixture"):
        GaussianMixture(weights=jnp.ones(2), means=jnp.zeros((3, 2)), scales=jnp.ones((3, 2)))
