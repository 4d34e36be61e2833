"""The 3-D convolutional U-Net score network of voxel images (calorimeter showers as images):
``(x (D, H, W), t (), cond (C,)) -> (D, H, W)``, with its convolution, up-sampling, group norm and
residual block. One example per call; batch axes come from ``jax.vmap`` outside (as
:mod:`fpcd.nets`, whose time and context embeddings it uses)."""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from fpcd.nets import ContextEmbedding


class VoxelConv(eqx.Module):
    """3-D convolution (kernel ``k``, "same" zero padding, optional stride 2) on a channels-last
    ``(D, H, W, C_in)`` image, written as one matrix product of the ``k^3`` shifted copies (XLA's CPU
    3-D convolutions are several times slower)."""

    weight: jax.Array
    bias: jax.Array
    kernel: int = eqx.field(static=True)
    stride: int = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, *, stride: int = 1, key):
        fan_in = kernel**3 * in_channels
        self.weight = jax.random.uniform(key, (fan_in, out_channels), minval=-1.0, maxval=1.0) / math.sqrt(fan_in)
        self.bias = jnp.zeros((out_channels,))
        self.kernel, self.stride = kernel, stride

    def __call__(self, x):
        k, s = self.kernel, self.stride
        half = k // 2
        xp = jnp.pad(x, [(half, half)] * 3 + [(0, 0)])
        out_shape = [-(-n // s) for n in x.shape[:3]]
        shifts = [
            xp[a : a + s * (out_shape[0] - 1) + 1 : s, b : b + s * (out_shape[1] - 1) + 1 : s,
               c : c + s * (out_shape[2] - 1) + 1 : s]
            for a in range(k) for b in range(k) for c in range(k)
        ]
        return jnp.concatenate(shifts, axis=-1) @ self.weight + self.bias


class VoxelUpsample(eqx.Module):
    """Stride-2 transposed convolution of kernel 2: each voxel becomes a 2x2x2 block, ``(D, H, W, C_in)
    -> (2D, 2H, 2W, C_out)``."""

    linear: eqx.nn.Linear
    out_channels: int = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, *, key):
        self.linear = eqx.nn.Linear(in_channels, 8 * out_channels, key=key)
        self.out_channels = out_channels

    def __call__(self, x):
        d, h, w, _ = x.shape
        y = (x @ self.linear.weight.T + self.linear.bias).reshape(d, h, w, 2, 2, 2, self.out_channels)
        return y.transpose(0, 3, 1, 4, 2, 5, 6).reshape(2 * d, 2 * h, 2 * w, self.out_channels)


class VoxelGroupNorm(eqx.Module):
    """Group normalisation of a channels-last image over space and the channels of each group."""

    scale: jax.Array
    offset: jax.Array
    groups: int = eqx.field(static=True)

    def __init__(self, channels: int):
        self.groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        self.scale = jnp.ones((channels,))
        self.offset = jnp.zeros((channels,))

    def __call__(self, x):
        shape = x.shape
        y = x.reshape(shape[:-1] + (self.groups, shape[-1] // self.groups))
        mean = jnp.mean(y, axis=(0, 1, 2, 4), keepdims=True)
        var = jnp.var(y, axis=(0, 1, 2, 4), keepdims=True)
        y = ((y - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(shape)
        return y * self.scale + self.offset


class ConvResBlock(eqx.Module):
    """``h + conv(SiLU(GN(conv(SiLU(GN(h))) + W c))))`` on ``(D, H, W, C)``; a linear map matches channels."""

    norm_in: VoxelGroupNorm
    conv_in: VoxelConv
    context_proj: eqx.nn.Linear
    norm_out: VoxelGroupNorm
    conv_out: VoxelConv
    skip: eqx.nn.Linear | None

    def __init__(self, in_channels: int, out_channels: int, context_width: int, *, key):
        k_in, k_ctx, k_out, k_skip = jax.random.split(key, 4)
        self.norm_in = VoxelGroupNorm(in_channels)
        self.conv_in = VoxelConv(in_channels, out_channels, key=k_in)
        self.context_proj = eqx.nn.Linear(context_width, out_channels, key=k_ctx)
        self.norm_out = VoxelGroupNorm(out_channels)
        self.conv_out = VoxelConv(out_channels, out_channels, key=k_out)
        self.skip = None if in_channels == out_channels else eqx.nn.Linear(in_channels, out_channels, key=k_skip)

    def __call__(self, h, context):
        y = self.conv_in(jax.nn.silu(self.norm_in(h)))
        y = y + self.context_proj(context)
        y = self.conv_out(jax.nn.silu(self.norm_out(y)))
        skip = h if self.skip is None else h @ self.skip.weight.T + self.skip.bias
        return y + skip


class UNet3D(eqx.Module):
    """3-D convolutional U-Net score network for one voxel image: ``(x (D, H, W), t (), cond (C,) | None)
    -> (D, H, W)``.

    The image is zero-padded to a multiple of ``2^(levels - 1)`` per axis, encoded by one
    :class:`ConvResBlock` per level with stride-2 convolutions between levels, decoded with
    stride-2 transposed convolutions (:class:`VoxelUpsample`) and skip connections, and cropped
    back. Time and condition enter every block through a shared :class:`ContextEmbedding`.
    """

    takes_mask: ClassVar[bool] = False

    context: ContextEmbedding
    stem: VoxelConv
    encoder: tuple[ConvResBlock, ...]
    downs: tuple[VoxelConv, ...]
    middle: ConvResBlock
    ups: tuple[VoxelUpsample, ...]
    decoder: tuple[ConvResBlock, ...]
    norm_out: VoxelGroupNorm
    readout: VoxelConv
    spatial_shape: tuple[int, ...] = eqx.field(static=True)
    padded_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, spatial_shape, *, channels=(16, 32, 64), cond_dim: int = 0, context_width: int = 64,
                 fourier_scale: float = 16.0, key):
        channels = tuple(int(c) for c in channels)
        factor = 2 ** (len(channels) - 1)
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.padded_shape = tuple(-(-s // factor) * factor for s in self.spatial_shape)
        keys = iter(jax.random.split(key, 4 * len(channels) + 4))
        self.context = ContextEmbedding(context_width, cond_dim, fourier_scale=fourier_scale, key=next(keys))
        self.stem = VoxelConv(1, channels[0], key=next(keys))
        self.encoder = tuple(ConvResBlock(channels[max(i - 1, 0)], c, context_width, key=next(keys))
                             for i, c in enumerate(channels))
        self.downs = tuple(VoxelConv(c, c, stride=2, key=next(keys)) for c in channels[:-1])
        self.middle = ConvResBlock(channels[-1], channels[-1], context_width, key=next(keys))
        self.ups = tuple(VoxelUpsample(channels[i + 1], channels[i], key=next(keys)) for i in range(len(channels) - 1))
        self.decoder = tuple(ConvResBlock(2 * channels[i], channels[i], context_width, key=next(keys))
                             for i in range(len(channels) - 1))
        self.norm_out = VoxelGroupNorm(channels[0])
        self.readout = VoxelConv(channels[0], 1, key=next(keys))

    def __call__(self, x, t, cond=None):
        context = self.context(t, cond)
        pad = [(0, p - s) for s, p in zip(self.spatial_shape, self.padded_shape)]
        h = self.stem(jnp.pad(x, pad)[..., None])
        skips = []
        for level, block in enumerate(self.encoder):
            h = block(h, context)
            if level < len(self.downs):
                skips.append(h)
                h = self.downs[level](h)
        h = self.middle(h, context)
        for level in reversed(range(len(self.ups))):
            h = self.ups[level](h)
            h = self.decoder[level](jnp.concatenate([h, skips[level]], axis=-1), context)
        out = self.readout(jax.nn.silu(self.norm_out(h)))[..., 0]
        return out[tuple(slice(0, s) for s in self.spatial_shape)]
