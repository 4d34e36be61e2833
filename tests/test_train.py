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

from conftest import OracleNet, xla_flags
from fpcd.checkpoint import Checkpointer
from fpcd.data.gmm import ExactScore
from fpcd.nets import ResMLP, score_fn_from
from fpcd.train import (
    NonFiniteLossError, TrainSettings, apply_gradients, batch_indices, copy_arrays, dsm_loss, ema_decay_at, fit,
    init_train_state, make_optimizer, make_train_step,
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_four_devices_train_like_one(tmp_path):
    env = {"XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"}
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


# --- EMA warm-up and the training settings -------------------------------------------------------


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


def test_train_settings_read_and_write_a_config_section():
    """A training section and its TrainSettings are the same data: the round trip keeps every field
    and its type, the loss's settings carry the section's levers, and a section with an unknown or
    a missing field is refused naming it."""
    import ml_collections

    from fpcd.config import train_section, validate_train
    from fpcd.errors import ConfigError

    section = train_section(num_steps=40, batch_size=8, learning_rate=2e-3, warmup_steps=4, checkpoint_every=20,
                            loss_weighting="min_snr", min_snr_gamma=2.0, time_sampling="lognormal", ema_warmup=True)
    settings = TrainSettings.from_config(section)
    assert settings.to_config().to_dict() == section.to_dict()
    assert list(settings.to_config().keys()) == list(section.keys())
    assert (settings.loss.weighting, settings.loss.min_snr_gamma, settings.loss.time_sampling,
            settings.loss.prediction) == ("min_snr", 2.0, "lognormal", "v")
    cfg = ml_collections.ConfigDict({"train": section})
    assert validate_train(cfg) == settings
    with cfg.unlocked():
        cfg.train.loss_weight = 1.0
    with pytest.raises(ConfigError, match=r"config.train has unknown field\(s\) \['loss_weight'\]"):
        validate_train(cfg)
    with pytest.raises(KeyError, match=r"missing field\(s\) \['keep_checkpoints'\]"):
        TrainSettings.from_config({k: v for k, v in section.items() if k != "keep_checkpoints"})
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        TrainSettings(num_steps=1, batch_size=1, learning_rate=1e-3, schedule="linear")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        TrainSettings(num_steps=1, batch_size=1, learning_rate=1e-3, loss_weighting="snr")


def test_train_settings_step_is_the_step_of_its_fields(sde):
    """TrainSettings.train_step trains as make_train_step with make_optimizer of the same fields:
    two steps (the second after the scheduled learning rate and the EMA warm-up acted) give the
    same losses and the same parameters."""
    settings = TrainSettings(num_steps=20, batch_size=16, learning_rate=5e-3, warmup_steps=1, grad_clip=0.5,
                             weight_decay=1e-2, ema_decay=0.99, ema_warmup=True, prediction="eps", t_min=1e-3,
                             time_sampling="lognormal", noise_mean=-0.4, noise_std=0.8, loss_weighting="min_snr",
                             min_snr_gamma=2.0)
    model = ResMLP(2, width=16, depth=1, key=jax.random.key(0))
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 2))}
    optimizer = make_optimizer(learning_rate=5e-3, num_steps=20, warmup_steps=1, grad_clip=0.5, weight_decay=1e-2)
    by_hand = make_train_step(sde, optimizer, prediction="eps", ema_decay=0.99, t_min=1e-3, ema_warmup=True,
                              time_sampling="lognormal", noise_mean=-0.4, noise_std=0.8, weighting="min_snr",
                              min_snr_gamma=2.0)
    states, losses = [], []
    for step_fn, opt in ((settings.train_step(sde), settings.optimizer()), (by_hand, optimizer)):
        state = init_train_state(copy_arrays(model), opt, jax.random.key(2))  # (the step donates it)
        run = []
        for _ in range(2):
            state, metrics = step_fn(state, batch)
            run.append(float(metrics["loss"]))
        states.append(state)
        losses.append(run)
    assert losses[0] == losses[1]
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(states[0].ema_model, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(states[1].ema_model, eqx.is_array))):
        np.testing.assert_array_equal(a, b)
    plain = make_train_step(sde, optimizer, prediction="eps", ema_decay=0.99, t_min=1e-3)
    _, metrics = plain(init_train_state(copy_arrays(model), optimizer, jax.random.key(2)), batch)
    assert float(metrics["loss"]) != pytest.approx(losses[0][0], rel=1e-3)
