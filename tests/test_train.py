"""Training: the loss, learning the exact score, NaN handling, resume and data parallelism."""

import os
import signal
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtri

from conftest import OracleNet
from fpcd.checkpoint import Checkpointer
from fpcd.data.gmm import ExactScore
from fpcd.nets import ResMLP, SetTransformer, score_fn_from
from fpcd.sde import VPSDE
from fpcd.train import (
    NonFiniteLossError, antithetic_times, apply_gradients, batch_indices, dsm_loss, ema_decay_at, fit,
    init_train_state, lognormal_times, loss_weights, make_optimizer, make_train_step, training_times,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "workers", "train_worker.py")


def _score_error(score_fn, exact, sde, x0, t):
    """Relative mean squared error of sigma_t * score on noised data at time t."""
    alpha, sigma = sde.marginal(t)
    xt = alpha * x0 + sigma * jax.random.normal(jax.random.key(11), x0.shape)
    tb = jnp.full((x0.shape[0],), t)
    diff = jnp.sum((score_fn(xt, tb) - exact(xt, tb)) ** 2, -1) * sigma**2
    return float(diff.mean() / (jnp.sum(exact(xt, tb) ** 2, -1) * sigma**2).mean())


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_lowers_loss_and_learns_the_exact_score(mixture, sde, prediction):
    data = np.asarray(mixture.sample(jax.random.key(0), 8192), np.float32)
    model = ResMLP(2, width=64, depth=2, key=jax.random.key(1))
    steps = 800
    optimizer = make_optimizer(learning_rate=3e-3, num_steps=steps, warmup_steps=50)
    state = init_train_state(model, optimizer, jax.random.key(2))
    step_fn = make_train_step(sde, optimizer, prediction=prediction, ema_decay=0.99)
    exact = ExactScore(mixture, sde)
    x0 = jnp.asarray(data[:2000])
    before = {t: _score_error(score_fn_from(model, sde, prediction=prediction), exact, sde, x0, t) for t in (0.1, 0.5)}

    def mean_loss(m):
        return np.mean([float(dsm_loss(m, sde, x0, jax.random.key(100 + i), prediction=prediction)) for i in range(4)])

    loss_before = mean_loss(model)
    state, history = fit(state, step_fn=step_fn, batch_fn=lambda s: {"x": data[batch_indices(0, s, 8192, 256)]},
                         num_steps=steps, log_every=100, progress=False)
    assert len(history) == steps // 100 and all(np.isfinite(row["loss"]) for row in history)
    # The DSM loss has an irreducible part (the exact network's loss); most of the rest must go.
    floor = mean_loss(OracleNet(mixture, sde, prediction))
    loss_after = mean_loss(state.ema_model)
    assert loss_after - floor < 0.2 * (loss_before - floor), (loss_before, loss_after, floor)
    learned = score_fn_from(state.ema_model, sde, prediction=prediction)
    for t in (0.1, 0.5):
        after = _score_error(learned, exact, sde, x0, t)
        assert after < 0.1 and after < 0.2 * before[t], (t, before[t], after)


def test_masked_loss_ignores_padding(sde):
    model = SetTransformer(2, width=16, depth=1, num_heads=2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 5, 2))
    mask = jnp.asarray(np.arange(5)[None, :] < np.array([[5], [3], [1], [4]]), jnp.float32)
    loss = dsm_loss(model, sde, x, jax.random.key(2), mask=mask)
    garbage = x + (1.0 - mask[..., None]) * 100.0
    assert float(dsm_loss(model, sde, garbage, jax.random.key(2), mask=mask)) == pytest.approx(float(loss), rel=1e-6)
    assert float(dsm_loss(model, sde, x, jax.random.key(2))) != pytest.approx(float(loss), rel=1e-3)


def test_batch_indices_depend_only_on_seed_and_step():
    a = batch_indices(3, 17, 100, 32)
    np.testing.assert_array_equal(a, batch_indices(3, 17, 100, 32))
    assert not np.array_equal(a, batch_indices(4, 17, 100, 32))
    epoch = np.concatenate([batch_indices(3, s, 100, 32) for s in range(3)])
    assert len(set(epoch.tolist())) == 96
    with pytest.raises(ValueError, match="exceeds"):
        batch_indices(0, 0, 10, 32)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, mixture, sde):
    data = np.asarray(mixture.sample(jax.random.key(0), 512), np.float32)
    model = ResMLP(2, width=16, depth=1, key=jax.random.key(1))
    optimizer = make_optimizer(learning_rate=1e-3, num_steps=50)
    state = init_train_state(model, optimizer, jax.random.key(2))
    step_fn = make_train_step(sde, optimizer)

    def batch_fn(step):
        batch = data[batch_indices(0, step, 512, 64)].copy()
        if step >= 12:
            batch[3, 0] = np.nan
        return {"x": batch}

    with Checkpointer(str(tmp_path / "ckpt"), save_every=5, max_to_keep=5) as checkpointer:
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* step 13.*checkpoint: step 10"):
            fit(state, step_fn=step_fn, batch_fn=batch_fn, num_steps=50, checkpointer=checkpointer, log_every=1,
                progress=False)
        assert checkpointer.latest_step() == 10
        restored = checkpointer.restore(state)
    assert int(restored.step) == 10
    leaves = jax.tree_util.tree_leaves(restored.model)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves if isinstance(leaf, jax.Array))


def _run_worker(args, env_extra=None, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def _final(workdir):
    with np.load(os.path.join(workdir, "final.npz")) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_killed_run_resumes_bit_identically(tmp_path):
    uninterrupted, killed = tmp_path / "a", tmp_path / "b"
    _run_worker([uninterrupted, 40])
    proc = _run_worker([killed, 40, "--kill-at", 23], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "final.npz").exists()
    resumed = _run_worker([killed, 40])
    assert "resumed at step 20" in resumed.stdout or "resumed at step 15" in resumed.stdout, resumed.stdout
    a, b = _final(uninterrupted), _final(killed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_four_devices_train_like_one(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    one = _run_worker([tmp_path / "one", 30, "--devices", 1, "--no-checkpoints"], env)
    four = _run_worker([tmp_path / "four", 30, "--devices", 4, "--no-checkpoints"], env)
    assert "batch on 1 devices; params on 1 devices" in one.stdout, one.stdout
    assert "batch on 4 devices; params on 4 devices" in four.stdout, four.stdout
    # Same losses and gradient norms (catches gradients summed rather than averaged over devices,
    # which Adam's scale invariance would otherwise hide), then the same parameters.
    for name in ("losses", "grad_norms"):
        with np.load(tmp_path / "one" / "history.npz") as h1, np.load(tmp_path / "four" / "history.npz") as h4:
            np.testing.assert_allclose(h4[name], h1[name], rtol=1e-4)
    a, b = _final(tmp_path / "one"), _final(tmp_path / "four")
    for x, y in zip(a, b):
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(x, y)


# --- the loss's levers: noise-level sampling, loss weighting, EMA warm-up ---------------------------


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


def test_ema_warmup_ramps_the_decay():
    assert ema_decay_at(0, 0.999) == 0.999
    np.testing.assert_allclose([float(ema_decay_at(s, 0.999, True)) for s in (0, 10, 90, 10_000)],
                               [0.1, 11 / 20, 91 / 100, 0.999], rtol=1e-6)
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    optimizer = make_optimizer(learning_rate=1e-2, num_steps=10)
    state = init_train_state(model, optimizer, jax.random.key(1))
    grads = jax.tree_util.tree_map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
    stepped = apply_gradients(state, grads, optimizer, 0.999, ema_warmup=True)
    # First step: decay 0.1, so the EMA is 0.1 old + 0.9 new parameters.
    old, new, ema = (np.asarray(jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))[0])
                     for m in (state.model, stepped.model, stepped.ema_model))
    np.testing.assert_allclose(ema, 0.1 * old + 0.9 * new, rtol=1e-5, atol=1e-7)
