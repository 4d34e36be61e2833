import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OracleNet
from fpcd.sde import VPSDE
from fpcd.nets import ResMLP, SetTransformer, apply_batched, score_fn_from


@pytest.fixture(scope="module")
def set_model():
    return SetTransformer(3, width=32, depth=2, num_heads=4, cond_dim=5, key=jax.random.key(0))


def _inputs(n=7, real=5):
    x = jax.random.normal(jax.random.key(1), (n, 3))
    mask = (jnp.arange(n) < real).astype(jnp.float32)
    return x, mask, jnp.asarray(0.37), jax.random.normal(jax.random.key(2), (5,))


def test_set_transformer_is_permutation_equivariant(set_model):
    x, mask, t, cond = _inputs()
    out = set_model(x, mask, t, cond)
    perm = jax.random.permutation(jax.random.key(3), x.shape[0])
    out_perm = set_model(x[perm], mask[perm], t, cond)
    np.testing.assert_allclose(out_perm, out[perm], atol=1e-5)


def test_padding_values_do_not_change_real_outputs(set_model):
    x, mask, t, cond = _inputs()
    out = set_model(x, mask, t, cond)
    garbage = x.at[5:].set(1e4)
    out_garbage = set_model(garbage, mask, t, cond)
    np.testing.assert_array_equal(out_garbage[:5], out[:5])
    assert np.all(np.asarray(out)[5:] == 0.0)
    # Removing the padded slots altogether gives the same real outputs.
    np.testing.assert_allclose(set_model(x[:5], mask[:5], t, cond), out[:5], atol=1e-5)


def test_real_points_interact_and_condition_matters(set_model):
    x, mask, t, cond = _inputs()
    out = set_model(x, mask, t, cond)
    moved = set_model(x.at[0].add(1.0), mask, t, cond)
    assert float(jnp.abs(moved[1:5] - out[1:5]).max()) > 1e-4  # attention couples real points
    assert float(jnp.abs(set_model(x, mask, t, cond + 1.0) - out).max()) > 1e-4
    assert float(jnp.abs(set_model(x, mask, jnp.asarray(0.9), cond) - out).max()) > 1e-4


def test_missing_or_wrong_condition_raises(set_model):
    x, mask, t, _ = _inputs()
    with pytest.raises(ValueError, match="conditioning vector"):
        set_model(x, mask, t, None)
    with pytest.raises(ValueError, match="divisible"):
        SetTransformer(3, width=30, num_heads=4, key=jax.random.key(0))


def test_resmlp_and_batched_application():
    model = ResMLP(4, width=16, depth=2, cond_dim=2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    out = apply_batched(model, x, jnp.linspace(0.1, 0.9, 6), cond=jnp.ones((6, 2)))
    assert out.shape == (6, 4)
    np.testing.assert_allclose(out[2], model(x[2], jnp.linspace(0.1, 0.9, 6)[2], jnp.ones(2)), rtol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_score_fn_from_converts_eps_and_v_predictions(mixture, sde, exact_score, prediction):
    score_fn = score_fn_from(OracleNet(mixture, sde, prediction), sde, prediction=prediction)
    x = jax.random.normal(jax.random.key(0), (32, 2))
    t = jnp.linspace(0.01, 0.99, 32)
    np.testing.assert_allclose(score_fn(x, t), exact_score(x, t), rtol=2e-3, atol=2e-3)


def test_score_fn_from_masks_padding(sde):
    model = SetTransformer(2, width=16, depth=1, num_heads=2, key=jax.random.key(0))
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
    score = score_fn_from(model, sde, mask=mask)(jnp.ones((2, 3, 2)), jnp.array([0.5, 0.5]))
    assert score.shape == (2, 3, 2)
    assert np.all(np.asarray(score)[np.asarray(mask) == 0] == 0.0)
    with pytest.raises(ValueError, match="unknown prediction"):
        score_fn_from(model, sde, prediction="x0")


class _PointwiseNet(eqx.Module):
    """A cheap masked point-cloud network: one linear map of (x, t) per point."""

    takes_mask = True
    linear: eqx.nn.Linear

    def __call__(self, x, mask, t, cond=None):
        out = jax.vmap(self.linear)(jnp.concatenate([x, jnp.broadcast_to(t, x.shape[:1] + (1,))], axis=1))
        return out * mask[:, None]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_clipped_denoised_estimate_stays_in_its_box(prediction):
    """With x0_bounds the denoised estimate implied by the returned noise estimate, (x - sigma eps) /
    alpha, lies in the box, equals the network's own estimate wherever that one is inside, and the
    score is -eps / sigma of the clipped noise estimate; without bounds nothing changes."""
    sde = VPSDE()
    model = _PointwiseNet(eqx.nn.Linear(4, 3, key=jax.random.key(0)))
    x = 3.0 * jax.random.normal(jax.random.key(1), (4, 6, 3))
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [4], [2], [5]]), jnp.float32)
    t = jnp.asarray([0.05, 0.2, 0.5, 0.9])
    low, high = np.array([-1.0, -0.5, -2.0], np.float32), np.array([1.0, 0.5, 0.0], np.float32)
    free = score_fn_from(model, sde, prediction=prediction, mask=mask)
    boxed = score_fn_from(model, sde, prediction=prediction, mask=mask, x0_bounds=(low, high))
    wide = score_fn_from(model, sde, prediction=prediction, mask=mask, x0_bounds=(np.full(3, -np.inf), np.full(3, np.inf)))
    alpha, sigma = (np.asarray(a)[:, None, None] for a in sde.marginal(t))
    x0_free = (np.asarray(x) - sigma * np.asarray(free.eps(x, t))) / alpha
    x0_boxed = (np.asarray(x) - sigma * np.asarray(boxed.eps(x, t))) / alpha
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(x0_boxed[real], np.clip(x0_free[real], low, high), atol=2e-3)
    assert np.mean((x0_free[real] < low) | (x0_free[real] > high)) > 0.2  # the box bites
    np.testing.assert_allclose(boxed(x, t), -np.asarray(boxed.eps(x, t)) / sigma * np.asarray(mask)[..., None],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(wide(x, t), free(x, t))


def test_grid_embedding_mixes_the_rows_of_nearby_grid_points():
    from fpcd.nets import GridEmbedding

    grid = GridEmbedding(5, 8, column=1, offset=2.0, scale=0.5, key=jax.random.key(0))
    table = np.asarray(grid.table, np.float64)
    for standardised in (-4.0, 0.0, 0.3, 1.0, 7.0):  # u = 0, 2, 2.15, 2.5, 5.5 (beyond the last row)
        u = standardised * 0.5 + 2.0
        weights = np.exp(-0.5 * ((u - np.arange(5)) / 0.5) ** 2)
        expected = weights @ table / weights.sum()
        got = grid(jnp.asarray([9.0, standardised, -3.0]))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Only the grid column matters, and the output is differentiable in it.
    a, b = grid(jnp.asarray([0.0, 0.3, 0.0])), grid(jnp.asarray([5.0, 0.3, -5.0]))
    np.testing.assert_array_equal(a, b)
    slope = jax.jacfwd(lambda v: grid(jnp.asarray([0.0, v, 0.0])))(0.3)
    assert np.all(np.isfinite(slope)) and np.abs(slope).max() > 0.1


def test_set_transformer_with_a_grid_embedding_stays_masked_and_equivariant():
    model = SetTransformer(4, width=16, depth=1, num_heads=2, grid={"column": 3, "size": 55, "offset": 20.0,
                                                                    "scale": 15.0}, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    mask = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
    out = model(x, mask, 0.4)
    assert np.all(np.asarray(out)[4:] == 0.0)
    perm = jnp.asarray([2, 0, 3, 1, 4, 5])
    np.testing.assert_allclose(model(x[perm], mask[perm], 0.4), out[perm], rtol=1e-5, atol=1e-6)
    plain = SetTransformer(4, width=16, depth=1, num_heads=2, key=jax.random.key(0))
    assert not np.allclose(plain(x, mask, 0.4), out)
    with pytest.raises(ValueError, match="grid column 4 outside the 4 input features"):
        SetTransformer(4, width=16, depth=1, num_heads=2, grid={"column": 4, "size": 3}, key=jax.random.key(0))
