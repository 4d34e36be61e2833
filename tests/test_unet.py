"""The voxel-image U-Net (fpcd.unet): its convolution against lax's, the up-sampling, and the
network's shapes, conditioning and locality."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpcd.nets
from fpcd.nets import apply_batched, count_parameters
from fpcd.unet import UNet3D, VoxelConv, VoxelUpsample


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


def test_the_image_network_is_also_importable_from_fpcd_nets():
    assert fpcd.nets.UNet3D is UNet3D and fpcd.nets.VoxelConv is VoxelConv
    with pytest.raises(AttributeError, match="no attribute 'UNet4D'"):
        fpcd.nets.UNet4D
