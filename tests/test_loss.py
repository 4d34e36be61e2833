"""The denoising score-matching loss (fpcd.loss): masking, the noise-level sampling, the loss
weightings and their settings."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtri

from fpcd.loss import (
    LossSettings, antithetic_times, dsm_loss, dsm_terms, loss_settings, loss_weights, lognormal_times, training_times,
)
from fpcd.nets import SetTransformer
from fpcd.sde import VPSDE


def test_masked_loss_ignores_padding(sde):
    model = SetTransformer(2, width=16, depth=1, num_heads=2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 5, 2))
    mask = jnp.asarray(np.arange(5)[None, :] < np.array([[5], [3], [1], [4]]), jnp.float32)
    loss = dsm_loss(model, sde, x, jax.random.key(2), mask=mask)
    garbage = x + (1.0 - mask[..., None]) * 100.0
    assert float(dsm_loss(model, sde, garbage, jax.random.key(2), mask=mask)) == pytest.approx(float(loss), rel=1e-6)
    assert float(dsm_loss(model, sde, x, jax.random.key(2))) != pytest.approx(float(loss), rel=1e-3)


def test_lognormal_times_give_lognormal_noise_levels(sde):
    """The noise level sigma_t / alpha_t = exp(-log SNR / 2) of the drawn times is N(mean, std^2) in
    its log: the stratified draw of 20,000 times matches the normal quantiles (a mapping through a
    wrong log SNR, e.g. -log sigma instead of -2 log sigma, halves the spread and fails)."""
    t = np.asarray(lognormal_times(jax.random.key(0), 20_000, sde, 1e-5, mean=-0.5, std=0.8), np.float64)
    assert t.min() >= 1e-5 and t.max() <= 1.0
    log_sigma = np.sort(-0.5 * np.asarray(sde.log_snr(jnp.asarray(t)), np.float64))
    expected = -0.5 + 0.8 * ndtri((np.arange(20_000) + 0.5) / 20_000)
    inner = slice(200, -200)  # away from float32 rounding of t at the extremes
    np.testing.assert_allclose(log_sigma[inner], expected[inner], atol=0.02)
    assert abs(log_sigma.mean() + 0.5) < 0.01 and abs(log_sigma.std() - 0.8) < 0.01
    uniform = np.asarray(training_times(jax.random.key(0), 8, sde, 1e-5), np.float64)
    np.testing.assert_allclose(uniform, antithetic_times(jax.random.key(0), 8, 1e-5))
    with pytest.raises(ValueError, match="unknown time sampling 'logit'"):
        training_times(jax.random.key(0), 8, sde, 1e-5, time_sampling="logit")


def test_loss_weights_match_their_definitions(sde):
    t = jnp.asarray([0.02, 0.1, 0.3, 0.9])
    alpha, sigma = (np.asarray(a, np.float64) for a in sde.marginal(t))
    snr = alpha**2 / sigma**2
    assert snr[0] > 5.0 > snr[2]  # both branches of min(SNR, gamma)
    np.testing.assert_allclose(loss_weights(sde, t, prediction="eps", weighting="min_snr", min_snr_gamma=5.0),
                               np.minimum(snr, 5.0) / snr, rtol=1e-5)
    np.testing.assert_allclose(loss_weights(sde, t, prediction="v", weighting="min_snr", min_snr_gamma=5.0),
                               np.minimum(snr, 5.0) / (snr + 1.0), rtol=1e-5)
    beta = 0.1 + np.asarray(t) * 19.9
    np.testing.assert_allclose(loss_weights(sde, t, prediction="eps", weighting="likelihood"), beta / sigma**2,
                               rtol=1e-5)
    np.testing.assert_array_equal(loss_weights(sde, t, prediction="v", weighting="none"), np.ones(4))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weights(sde, t, prediction="v", weighting="snr")


class _LinearNet(eqx.Module):
    """A cheap per-example network of (x, t)."""

    linear: eqx.nn.Linear

    def __call__(self, x, t, cond=None):
        return self.linear(jnp.concatenate([x, jnp.reshape(t, (1,))]))


class _EpsFromV(eqx.Module):
    """A v-prediction network seen as an eps-prediction one: eps = alpha v + sigma x_t."""

    net: _LinearNet
    sde: VPSDE

    def __call__(self, x, t, cond=None):
        alpha, sigma = self.sde.marginal(t)
        return alpha * self.net(x, t) + sigma * x


@pytest.mark.parametrize("weighting, time_sampling", [("min_snr", "lognormal"), ("likelihood", "uniform")])
def test_weighted_losses_are_the_same_objective_for_eps_and_v_networks(sde, weighting, time_sampling):
    """A weighting is a weight on the score error: the weighted v-loss of a network equals the
    weighted eps-loss of the same network written as an eps-predictor (the v weight carries the
    alpha^2 of v_hat - v = (eps_hat - eps) / alpha). A v weight without that factor fails."""
    net = _LinearNet(eqx.nn.Linear(4, 3, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (64, 3))
    options = {"weighting": weighting, "time_sampling": time_sampling}
    as_v = dsm_loss(net, sde, x, jax.random.key(2), prediction="v", **options)
    as_eps = dsm_loss(_EpsFromV(net, sde), sde, x, jax.random.key(2), prediction="eps", **options)
    assert float(as_v) == pytest.approx(float(as_eps), rel=2e-4)
    plain = dsm_loss(net, sde, x, jax.random.key(2), prediction="v", time_sampling=time_sampling)
    assert float(plain) != pytest.approx(float(as_v), rel=1e-2)




def test_loss_settings_refuse_bad_values_naming_them():
    assert LossSettings() == loss_settings()
    for field, value, message in [("prediction", "x0", "unknown prediction 'x0'"),
                                  ("time_sampling", "logit", "unknown time sampling 'logit'"),
                                  ("weighting", "snr", "unknown loss weighting 'snr'"),
                                  ("t_min", 0.0, "t_min must lie in"), ("noise_std", -1.0, "noise_std must be positive"),
                                  ("min_snr_gamma", 0.0, "min_snr_gamma must be positive")]:
        with pytest.raises(ValueError, match=message):
            LossSettings(**{field: value})
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['gamma'\]"):
        loss_settings(gamma=2.0)


def test_dsm_terms_of_settings_are_the_loss_of_the_same_options(sde):
    """dsm_loss(..., **options) is dsm_terms(..., LossSettings(**options)) divided by the count of
    real entries: one set of levers, whichever way they are passed."""
    model = SetTransformer(2, width=16, depth=1, num_heads=2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 5, 2))
    mask = jnp.asarray(np.arange(5)[None, :] < np.array([[5], [3], [1], [4]]), jnp.float32)
    options = {"prediction": "v", "t_min": 1e-3, "time_sampling": "lognormal", "noise_mean": -0.3,
               "noise_std": 0.9, "weighting": "min_snr", "min_snr_gamma": 3.0}
    total, count = dsm_terms(model, sde, x, jax.random.key(2), LossSettings(**options), mask=mask)
    assert float(count) == 13 * 2
    loss = dsm_loss(model, sde, x, jax.random.key(2), mask=mask, **options)
    assert float(loss) == pytest.approx(float(total) / 26.0, rel=1e-6)
    assert float(loss) != pytest.approx(float(dsm_loss(model, sde, x, jax.random.key(2), mask=mask)), rel=1e-2)
