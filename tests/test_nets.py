import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OracleNet
from fpcd.nets import (ResMLP, SetTransformer, UNet3D, VoxelConv, VoxelUpsample, apply_batched, count_parameters,
                       score_fn_from)


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


@pytest.mark.parametrize("stride", [1, 2])
def test_voxel_conv_matches_lax_convolution(stride):
    conv = VoxelConv(3, 5, stride=stride, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (7, 6, 5, 3))
    kernel = conv.weight.reshape(3, 3, 3, 3, 5)  # (kd, kh, kw, in, out), the order of the shifts
    expected = jax.lax.conv_general_dilated(x[None], kernel, (stride,) * 3, [(1, 1)] * 3,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))[0] + conv.bias
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_voxel_upsample_places_each_voxel_in_a_2x2x2_block():
    up = VoxelUpsample(3, 2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
    y = up(x)
    assert y.shape == (4, 6, 8, 2)
    w = up.linear.weight.reshape(2, 2, 2, 2, 3)  # (a, b, c, out, in)
    for i, j, k, a, b, c in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 0, 1), (0, 1, 2, 1, 1, 0)]:
        expected = w[a, b, c] @ x[i, j, k] + up.linear.bias.reshape(2, 2, 2, 2)[a, b, c]
        np.testing.assert_allclose(y[2 * i + a, 2 * j + b, 2 * k + c], expected, rtol=1e-5, atol=1e-6)


def test_unet3d_shapes_condition_and_locality():  # trained end to end in test_calo_experiment
    model = UNet3D((11, 11, 11), channels=(4, 8), cond_dim=3, context_width=16, key=jax.random.key(0))
    assert model.padded_shape == (12, 12, 12) and count_parameters(model) > 1000
    x = jax.random.normal(jax.random.key(1), (2, 11, 11, 11))
    cond = jnp.ones((2, 3))
    apply = eqx.filter_jit(lambda m, x, t, c: apply_batched(m, x, t, cond=c))
    t = jnp.array([0.3, 0.7])
    out = apply(model, x, t, cond)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out, apply(model, x, t, -cond))
    # Locality: a change of one input voxel changes the output near it more than far away.
    bump = x.at[0, 2, 2, 2].add(5.0)
    delta = jnp.abs(apply(model, bump, t, cond) - out)[0]
    assert float(delta[1:4, 1:4, 1:4].mean()) > float(delta[8:, 8:, 8:].mean())
