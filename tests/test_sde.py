import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from fpcd.sde import VPSDE, count_dimensions, expand_mask


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_int_beta_is_the_integral_of_beta(schedule):
    sde = VPSDE(schedule=schedule)
    for t in [0.01, 0.3, 0.77, 1.0]:
        quad, _ = integrate.quad(lambda s: float(sde.beta(s)), 0.0, t, epsabs=1e-6, epsrel=1e-6)
        assert float(sde.int_beta(t)) == pytest.approx(quad, rel=1e-5, abs=1e-7)
    grad = jax.vmap(jax.grad(lambda t: sde.int_beta(t)))(jnp.linspace(0.0, 1.0, 11))
    np.testing.assert_allclose(grad, sde.beta(jnp.linspace(0.0, 1.0, 11)), rtol=2e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_marginal_is_variance_preserving_and_monotone(schedule):
    sde = VPSDE(schedule=schedule)
    t = jnp.linspace(1e-4, 1.0, 200)
    alpha, sigma = sde.marginal(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    assert np.all(np.diff(np.asarray(alpha)) < 0)
    assert float(alpha[-1]) < 0.01
    np.testing.assert_allclose(sde.log_snr(t), np.log(alpha**2 / sigma**2), rtol=1e-4, atol=1e-4)


def test_linear_marginal_closed_form():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = 0.4
    b = 0.1 * t + 0.5 * 19.9 * t**2
    alpha, sigma = sde.marginal(t)
    assert float(alpha) == pytest.approx(math.exp(-0.5 * b), rel=1e-6)
    assert float(sigma) == pytest.approx(math.sqrt(1 - math.exp(-b)), rel=1e-6)


def test_cosine_ends_where_linear_ends():
    lin, cos = VPSDE(schedule="linear"), VPSDE(schedule="cosine")
    assert float(cos.marginal(1.0)[0]) == pytest.approx(float(lin.marginal(1.0)[0]), rel=1e-4)
    assert np.isfinite(float(cos.beta(1.0)))


def test_forward_sde_simulation_matches_marginal():
    """Simulate dx = f dt + g dW with fine Euler-Maruyama from x0 = 2 and compare moments."""
    sde = VPSDE()
    n, steps, t_end = 20000, 2000, 0.5
    x = jnp.full((n, 1), 2.0)
    dt = t_end / steps

    def body(i, x):
        t = jnp.full((n,), i * dt)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), x.shape)
        return x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * jnp.sqrt(dt) * noise

    x = jax.lax.fori_loop(0, steps, body, x)
    alpha, sigma = sde.marginal(t_end)
    assert float(x.mean()) == pytest.approx(2.0 * float(alpha), abs=0.02)
    assert float(x.std()) == pytest.approx(float(sigma), abs=0.02)


def test_drift_diffusion_shapes_and_values():
    sde = VPSDE()
    x = jnp.ones((3, 5, 2))
    t = jnp.array([0.0, 0.5, 1.0])
    drift = sde.drift(x, t)
    assert drift.shape == x.shape
    np.testing.assert_allclose(drift[:, 0, 0], -0.5 * sde.beta(t))
    np.testing.assert_allclose(sde.diffusion(t), np.sqrt(sde.beta(t)))


def test_prior_logp_matches_scipy_and_counts_only_real_dimensions():
    sde = VPSDE()
    z = jax.random.normal(jax.random.key(1), (4, 3, 2))
    expected = stats.norm.logpdf(np.asarray(z)).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(sde.prior_logp(z), expected, rtol=1e-5)
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], jnp.float32)
    m = np.asarray(expand_mask(mask, z))
    expected_masked = (stats.norm.logpdf(np.asarray(z)) * m).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(sde.prior_logp(z, mask), expected_masked, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(count_dimensions(z, mask), [4, 2, 6, 0])
    assert sde.prior_sample(jax.random.key(0), (7, 2)).shape == (7, 2)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="schedule"):
        VPSDE(schedule="quadratic")
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=5.0, beta_max=1.0)


def test_sde_is_a_pytree_usable_under_jit():
    sde = VPSDE()
    f = jax.jit(lambda s, t: s.marginal(t)[0])
    assert float(f(sde, 0.5)) == pytest.approx(float(sde.marginal(0.5)[0]))
