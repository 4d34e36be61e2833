"""Progressive distillation: the target, the loss, padding, the weight and the step (fpcd.distill)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OracleNet
from fpcd.data.gmm import ExactScore
from fpcd.distill import (
    distillation_loss,
    distillation_target,
    grid_times,
    init_student_state,
    make_distill_step,
    student_grid,
    truncated_snr_weight,
)
from fpcd.nets import ResMLP, score_fn_from
from fpcd.sampling import _grid_times, ddim_step
from fpcd.train import make_optimizer

T_MIN = 1e-3
_loss = eqx.filter_jit(distillation_loss)
_target = eqx.filter_jit(distillation_target)


def _noised(mixture, sde, key, t, shape_prefix=(256,)):
    k_x, k_eps = jax.random.split(key)
    x = mixture.sample(k_x, int(np.prod(shape_prefix))).reshape(shape_prefix + (-1,))
    alpha, sigma = sde.marginal(t)
    return alpha * x + sigma * jax.random.normal(k_eps, x.shape)


def test_student_grid_is_the_ddim_samplers_grid():
    for steps in (1, 2, 8):
        grid = student_grid(steps, T_MIN)
        np.testing.assert_allclose(grid, np.linspace(1.0, T_MIN, steps + 1), atol=1e-6)
        for i in range(steps):
            t, t_mid, t_next = grid_times(i, steps, T_MIN)
            # The sampler's times (it traces i, steps and t_min: float32 arithmetic).
            np.testing.assert_allclose((t, t_next), jax.jit(_grid_times)(i, steps, T_MIN), rtol=0, atol=1e-7)
            # The teacher's grid of 2 * steps: the midpoint is its odd time.
            np.testing.assert_allclose(t_mid, student_grid(2 * steps, T_MIN)[2 * i + 1], atol=1e-6)


@jax.jit
def _one_vs_two_steps(exact_score, sde, z, t, t_mid, t_next):
    """(one DDIM step t -> t_next with the score of x~, two teacher DDIM steps through t_mid, one teacher
    DDIM step t -> t_next)."""
    m = jnp.ones_like(z)
    tb = jnp.full((z.shape[0],), t)
    target = distillation_target(exact_score, sde, z, tb, jnp.full_like(tb, t_mid), jnp.full_like(tb, t_next))
    alpha, sigma = sde.marginal(t)

    def target_score(x, _):
        return -(x - alpha * target) / sigma**2

    key = jax.random.key(0)  # unused at eta = 0
    one = ddim_step(target_score, sde, z, t, t_next, 0.0, key, m)[1]
    mid = ddim_step(exact_score, sde, z, t, t_mid, 0.0, key, m)[1]
    two = ddim_step(exact_score, sde, mid, t_mid, t_next, 0.0, key, m)[1]
    teacher_one = ddim_step(exact_score, sde, z, t, t_next, 0.0, key, m)[1]
    return one, two, teacher_one


def test_one_step_on_the_target_lands_on_two_teacher_steps(mixture, sde, exact_score):
    """Every grid step of 1, 2 and 8 student steps. Measured max |one - two|: <= 1.1e-13 in float64;
    in float32 <= 3.6e-5 at t = 1 and <= 1.3e-6 elsewhere: ddim_step's x0 = (z - sigma eps) / alpha_t
    amplifies rounding by 1 / alpha_t (alpha_1 = 6.6e-3), hence the tolerance 1e-6 / alpha_t."""
    for x64, tol in ((True, lambda alpha: 1e-11), (False, lambda alpha: 1e-6 / alpha)):
        with jax.enable_x64(x64):
            for steps in (1, 2, 8):
                teacher_gap = 0.0
                for i in range(steps):
                    t, t_mid, t_next = (float(s) for s in grid_times(i, steps, T_MIN))
                    z = _noised(mixture, sde, jax.random.key(100 * steps + i), t).astype(jnp.result_type(float))
                    one, two, teacher_one = _one_vs_two_steps(exact_score, sde, z, t, t_mid, t_next)
                    assert one.dtype == (jnp.float64 if x64 else jnp.float32)
                    np.testing.assert_allclose(one, two, rtol=0, atol=tol(float(sde.marginal(t)[0])))
                    teacher_gap = max(teacher_gap, float(jnp.max(jnp.abs(teacher_one - two))))
                # One step of the teacher itself does not land there (measured gap >= 0.35 per grid).
                assert teacher_gap > 0.1, (steps, teacher_gap)


class TargetStudent(eqx.Module):
    """A v-prediction student that outputs exactly the distillation target of ``teacher`` (per example)."""

    takes_mask = False
    teacher: eqx.Module
    sde: eqx.Module
    steps: int = eqx.field(static=True)

    def __call__(self, z, t, cond=None):
        i = jnp.round((1.0 - t) * self.steps / (1.0 - T_MIN))
        t_, t_mid, t_next = grid_times(i, self.steps, T_MIN)
        target = distillation_target(self.teacher, self.sde, z[None], t_[None], t_mid[None], t_next[None])[0]
        alpha, sigma = self.sde.marginal(t)
        return (alpha * z - target) / sigma  # v such that alpha z - sigma v = x~


@pytest.mark.parametrize("steps", [1, 4])
def test_loss_vanishes_for_the_target_and_not_for_the_teacher(mixture, sde, exact_score, steps):
    x = mixture.sample(jax.random.key(0), 512)
    losses = {
        name: float(_loss(student, exact_score, sde, x, jax.random.key(1), steps=steps, t_min=T_MIN))
        for name, student in [("target", TargetStudent(exact_score, sde, steps)),
                              ("teacher", OracleNet(mixture, sde, "v"))]
    }
    # Measured: target 4e-13 (1 step), 5e-16 (4 steps); teacher 0.096 (1 step), 0.021 (4 steps).
    assert losses["target"] < 1e-9, losses
    assert losses["teacher"] > 5e-3, losses


def test_the_teacher_is_not_differentiated(mixture, sde):
    """The gradient reaches the student's parameters and none of the teacher's (stop_gradient)."""
    x = mixture.sample(jax.random.key(0), 64)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(mixtures):
        teacher_mixture, student_mixture = mixtures
        return distillation_loss(OracleNet(student_mixture, sde, "v"), ExactScore(teacher_mixture, sde), sde, x,
                                 jax.random.key(1), steps=2, t_min=T_MIN)

    g_teacher, g_student = grads((mixture, mixture))
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(g_teacher))
    assert any(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree_util.tree_leaves(g_student))


def test_padding(mixture, sde):
    """Clouds (B, N, 2) with a (B, N) mask: padded target entries are 0 and garbage there changes nothing."""
    b, n, steps = 16, 6, 4
    mask = (jnp.arange(n)[None, :] < jnp.array([6, 5, 3, 1] * 4)[:, None]).astype(jnp.float32)
    teacher = ExactScore(mixture, sde, mask=mask)
    x = mixture.sample(jax.random.key(0), b * n).reshape(b, n, 2) * mask[..., None]
    garbage = jnp.where(mask[..., None] > 0, x, 1e3 * jax.random.normal(jax.random.key(5), x.shape))

    t, t_mid, t_next = (jnp.full((b,), s) for s in grid_times(1, steps, T_MIN))
    z = _noised(mixture, sde, jax.random.key(2), t[:, None, None], (b, n)) * mask[..., None]
    z_garbage = jnp.where(mask[..., None] > 0, z, garbage)
    clean = _target(teacher, sde, z, t, t_mid, t_next, mask=mask)
    dirty = _target(teacher, sde, z_garbage, t, t_mid, t_next, mask=mask)
    assert np.all(np.asarray(clean)[np.asarray(mask) == 0] == 0.0)
    np.testing.assert_array_equal(clean, dirty)

    student = OracleNet(mixture, sde, "v")
    kwargs = {"steps": steps, "t_min": T_MIN, "mask": mask}
    loss = _loss(student, teacher, sde, x, jax.random.key(3), **kwargs)
    loss_garbage = _loss(student, teacher, sde, garbage, jax.random.key(3), **kwargs)
    assert float(loss) > 0 and float(loss) == float(loss_garbage)


def test_truncated_snr_weight(sde):
    for t in (0.02, 0.1):  # high SNR: the weight is the SNR
        alpha, sigma = sde.marginal(t)
        assert float(alpha**2 / sigma**2) > 1
        np.testing.assert_allclose(truncated_snr_weight(sde, t), alpha**2 / sigma**2, rtol=1e-5)
    for t in (0.6, 1.0):  # low SNR: truncated at 1
        alpha, sigma = sde.marginal(t)
        assert float(alpha**2 / sigma**2) < 1
        assert float(truncated_snr_weight(sde, t)) == 1.0


def test_distill_step_runs_and_lowers_the_loss(mixture, sde):
    """Ten steps of a tiny student started from (a copy of) a tiny teacher: finite, the loss falls and
    the teacher survives the donation of the state."""
    teacher = ResMLP(2, width=16, depth=1, key=jax.random.key(0))
    optimizer = make_optimizer(learning_rate=1e-2, num_steps=10, warmup_steps=1, schedule="constant")
    state = init_student_state(teacher, optimizer, jax.random.key(1))
    step_fn = make_distill_step(sde, optimizer, teacher, steps=2, t_min=T_MIN, ema_decay=0.5)
    x = mixture.sample(jax.random.key(2), 256)
    teacher_fn = score_fn_from(teacher, sde, prediction="v")

    def loss(model):
        return float(np.mean([_loss(model, teacher_fn, sde, x, jax.random.key(10 + i), steps=2,
                                                t_min=T_MIN) for i in range(2)]))

    before = loss(teacher)
    losses = []
    for _ in range(10):
        state, metrics = step_fn(state, {"x": x})
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 10 and np.all(np.isfinite(losses))
    assert loss(state.model) < before, (before, loss(state.model))
    assert np.isfinite(loss(teacher))  # the teacher's buffers were not donated


_SHARDED_DISTILL = r"""
import jax, numpy as np, optax
from fpcd.distill import init_student_state, make_distill_step
from fpcd.nets import ResMLP
from fpcd.parallel import data_mesh, replicate, shard_batch
from fpcd.sde import VPSDE

sde = VPSDE()
teacher = ResMLP(3, width=32, depth=2, cond_dim=2, key=jax.random.key(0))  # masks: test_padding
rng = np.random.default_rng(0)
batch = {"x": rng.normal(size=(8, 3)).astype(np.float32), "cond": rng.normal(size=(8, 2)).astype(np.float32)}
assert len(jax.devices()) == 2, jax.devices()
out = {}
for devices in (1, 2):
    mesh = data_mesh(jax.devices()[:devices])
    optimizer = optax.sgd(0.05)  # not Adam: it turns rounding noise in zero gradients (key biases) into +-lr
    state = replicate(init_student_state(teacher, optimizer, jax.random.key(1)), mesh)
    step = make_distill_step(sde, optimizer, replicate(teacher, mesh), steps=2, ema_decay=0.5, mesh=mesh)
    losses = []
    for _ in range(5):
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    out[devices] = (np.array(losses), jax.tree_util.tree_leaves(jax.device_get(state.ema_model)))
np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-4)  # measured 1e-5
for a, b in zip(out[1][1], out[2][1]):
    if hasattr(a, "dtype") and np.issubdtype(a.dtype, np.floating):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
print("losses", out[1][0][:, 0].tolist())
"""


@pytest.mark.e2e
def test_two_devices_distill_like_one():
    """The sharded step (per-device gradients, one all-reduce, per-row draws of the global batch)
    gives the single-device losses, gradient norms and student: a batch split over devices with
    its own draws per shard, or gradients summed instead of averaged, fails."""
    import subprocess
    import sys

    from conftest import _environment

    proc = subprocess.run([sys.executable, "-c", _SHARDED_DISTILL], capture_output=True, text=True, timeout=300,
                          env=_environment(devices=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in proc.stdout.split("losses")[1].strip(" []\n").split(",")]
    assert losses[-1] < losses[0]  # the student learns
