"""Score networks (Equinox) and the map from a network to a score function.

Networks see one example; batch axes come from ``jax.vmap`` outside.

* :class:`SetTransformer` -- masked, permutation-equivariant transformer on a point cloud
  ``(x (N, D), mask (N,), t (), cond (C,)) -> (N, D)``.
* :class:`ResMLP` -- residual MLP on a feature vector ``(x (D,), t (), cond (C,)) -> (D,)``.
* :class:`fpcd.unet.UNet3D` -- 3-D convolutional U-Net on a voxel image ``(x (D, H, W), t (), cond (C,))
  -> (D, H, W)`` (its own module; also importable from here).

:func:`score_fn_from` turns either into ``score_fn(x (B, ...), t (B,)) -> score (B, ...)`` given
what the network predicts (``"eps"``: the noise; ``"v"``: ``alpha eps - sigma x_0``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from fpcd.sde import VPSDE, broadcast_time, expand_mask

PREDICTIONS = ("eps", "v")
IMAGE_NETWORKS = ("UNet3D", "VoxelConv", "VoxelUpsample", "VoxelGroupNorm", "ConvResBlock")  # in fpcd.unet


def __getattr__(name):
    """The voxel-image network's names from :mod:`fpcd.unet` (which builds on this module's
    embeddings), loaded on first use."""
    if name in IMAGE_NETWORKS:
        from fpcd import unet

        return getattr(unet, name)
    raise AttributeError(f"module 'fpcd.nets' has no attribute {name!r}")


class FourierTimeEmbedding(eqx.Module):
    """Gaussian Fourier features of ``t`` followed by a two-layer SiLU MLP: ``() -> (width,)``.

    The random frequencies are fixed (not trained): gradients are stopped through them.
    """

    frequencies: jax.Array
    mlp: eqx.nn.MLP

    def __init__(self, width: int, *, scale: float = 16.0, key):
        k_freq, k_mlp = jax.random.split(key)
        self.frequencies = scale * jax.random.normal(k_freq, (width // 2,))
        self.mlp = eqx.nn.MLP(2 * (width // 2), width, width, depth=2, activation=jax.nn.silu, key=k_mlp)

    def __call__(self, t):
        angles = 2.0 * math.pi * jax.lax.stop_gradient(self.frequencies) * t
        return self.mlp(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)]))


class ContextEmbedding(eqx.Module):
    """Embedding of the diffusion time and an optional conditioning vector: ``(t (), cond (C,)) -> (width,)``."""

    time: FourierTimeEmbedding
    cond: eqx.nn.MLP | None
    cond_dim: int = eqx.field(static=True)

    def __init__(self, width: int, cond_dim: int, *, fourier_scale: float, key):
        k_time, k_cond = jax.random.split(key)
        self.time = FourierTimeEmbedding(width, scale=fourier_scale, key=k_time)
        self.cond_dim = cond_dim
        self.cond = (
            eqx.nn.MLP(cond_dim, width, width, depth=2, activation=jax.nn.silu, key=k_cond) if cond_dim > 0 else None
        )

    def __call__(self, t, cond=None):
        embedding = self.time(t)
        if self.cond is not None:
            if cond is None or cond.shape != (self.cond_dim,):
                got = None if cond is None else cond.shape
                raise ValueError(f"network expects a conditioning vector of shape ({self.cond_dim},), got {got}")
            embedding = embedding + self.cond(cond)
        return embedding


class TransformerBlock(eqx.Module):
    """Pre-LayerNorm block: ``h += Attn(LN(h + W c))``; ``h += MLP(LN(h))`` on ``(N, width)`` tokens."""

    context_proj: eqx.nn.Linear
    norm_attention: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm_mlp: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, key):
        k_ctx, k_att, k_mlp = jax.random.split(key, 3)
        self.context_proj = eqx.nn.Linear(width, width, key=k_ctx)
        self.norm_attention = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(
            num_heads, width, use_query_bias=True, use_key_bias=True, use_value_bias=True, use_output_bias=True,
            key=k_att,
        )
        self.norm_mlp = eqx.nn.LayerNorm(width)
        self.mlp = eqx.nn.MLP(width, width, mlp_ratio * width, depth=1, activation=jax.nn.gelu, key=k_mlp)

    def __call__(self, h, attention_mask, context):
        h = h + self.context_proj(context)
        normed = jax.vmap(self.norm_attention)(h)
        h = h + self.attention(normed, normed, normed, mask=attention_mask)
        return h + jax.vmap(self.mlp)(jax.vmap(self.norm_mlp)(h))


class GridEmbedding(eqx.Module):
    """A learned embedding of one input coordinate that lives on an integer grid (a calorimeter
    layer index): ``x (D,) -> (width,)``.

    The coordinate ``u = x[column] * scale + offset`` (``scale``/``offset`` undo a standardisation)
    selects rows of a table of ``size`` vectors, one per grid point ``k = 0 .. size - 1``, mixed
    with Gaussian weights ``softmax_k(-(u - k)^2 / (2 bandwidth^2))``: with the default bandwidth
    0.5 a point on grid point ``k`` takes 79 % of row ``k`` and 11 % of each neighbour, a point in
    between a smooth blend, so the network output stays differentiable in ``x`` (the
    probability-flow ODE and its divergence need that). Coordinates outside the grid
    take the nearest end row.
    """

    table: jax.Array
    column: int = eqx.field(static=True)
    offset: float = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    bandwidth: float = eqx.field(static=True)

    def __init__(self, size: int, width: int, *, column: int, offset: float = 0.0, scale: float = 1.0,
                 bandwidth: float = 0.5, key):
        if size < 1 or bandwidth <= 0:
            raise ValueError(f"GridEmbedding: need size >= 1 and bandwidth > 0, got {size}, {bandwidth}")
        self.table = jax.random.normal(key, (size, width)) / math.sqrt(width)
        self.column, self.offset, self.scale, self.bandwidth = int(column), float(offset), float(scale), float(bandwidth)

    def __call__(self, x):
        u = x[self.column] * self.scale + self.offset
        grid = jnp.arange(self.table.shape[0], dtype=x.dtype)
        weights = jax.nn.softmax(-0.5 * ((u - grid) / self.bandwidth) ** 2)
        return weights @ self.table


class SetTransformer(eqx.Module):
    """Masked, permutation-equivariant set transformer for one point cloud.

    Call signature ``(x (N, D), mask (N,), t (), cond (C,) | None) -> (N, D_out)``: ``mask`` is 1
    (or True) for real points and 0 for padding. Real points attend only to real points, padded
    points only to themselves, and padded outputs are exactly zero, so whatever sits in padded
    slots cannot change real outputs. Time (Gaussian Fourier features + MLP) and the optional
    conditioning vector are embedded, summed and added to every token in every block.
    ``grid = dict(column=, size=, offset=, scale=)`` adds a :class:`GridEmbedding` of one input
    coordinate (e.g. the calorimeter layer) to each point's token.
    """

    takes_mask: ClassVar[bool] = True

    embed: eqx.nn.Linear
    context: ContextEmbedding
    blocks: tuple[TransformerBlock, ...]
    norm_out: eqx.nn.LayerNorm
    readout: eqx.nn.Linear
    grid: GridEmbedding | None = None

    def __init__(
        self,
        in_dim: int,
        *,
        width: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        cond_dim: int = 0,
        mlp_ratio: int = 2,
        fourier_scale: float = 16.0,
        out_dim: int | None = None,
        grid: dict | None = None,
        key,
    ):
        if width % num_heads:
            raise ValueError(f"SetTransformer: width={width} must be divisible by num_heads={num_heads}")
        k_embed, k_ctx, k_blocks, k_out = jax.random.split(key, 4)
        if grid is not None:
            if not 0 <= grid["column"] < in_dim:
                raise ValueError(f"SetTransformer: grid column {grid['column']} outside the {in_dim} input features")
            self.grid = GridEmbedding(grid["size"], width, column=grid["column"], offset=grid.get("offset", 0.0),
                                      scale=grid.get("scale", 1.0), key=jax.random.fold_in(k_embed, 1))
        self.embed = eqx.nn.Linear(in_dim, width, key=k_embed)
        self.context = ContextEmbedding(width, cond_dim, fourier_scale=fourier_scale, key=k_ctx)
        self.blocks = tuple(
            TransformerBlock(width, num_heads, mlp_ratio, key=k) for k in jax.random.split(k_blocks, depth)
        )
        self.norm_out = eqx.nn.LayerNorm(width)
        self.readout = eqx.nn.Linear(width, in_dim if out_dim is None else out_dim, key=k_out)

    def __call__(self, x, mask, t, cond=None):
        real = jnp.asarray(mask).astype(bool)
        attention_mask = (real[:, None] & real[None, :]) | jnp.eye(real.shape[0], dtype=bool)
        context = self.context(t, cond)
        h = jax.vmap(self.embed)(x) + context
        if self.grid is not None:
            h = h + jax.vmap(self.grid)(x)
        for block in self.blocks:
            h = block(h, attention_mask, context)
        out = jax.vmap(self.readout)(jax.vmap(self.norm_out)(h))
        return jnp.where(real[:, None], out, 0.0)


class ResMLP(eqx.Module):
    """Residual MLP score network for one feature vector: ``(x (D,), t (), cond (C,) | None) -> (D_out,)``.

    Blocks are ``h += W2 SiLU(W1 LN(h) + W_c c)`` with ``c`` the embedding of time and condition.
    """

    takes_mask: ClassVar[bool] = False

    embed: eqx.nn.Linear
    context: ContextEmbedding
    norms: tuple[eqx.nn.LayerNorm, ...]
    hidden: tuple[eqx.nn.Linear, ...]
    context_projs: tuple[eqx.nn.Linear, ...]
    outputs: tuple[eqx.nn.Linear, ...]
    norm_out: eqx.nn.LayerNorm
    readout: eqx.nn.Linear

    def __init__(
        self,
        in_dim: int,
        *,
        width: int = 128,
        depth: int = 3,
        cond_dim: int = 0,
        fourier_scale: float = 16.0,
        out_dim: int | None = None,
        key,
    ):
        k_embed, k_ctx, k_hidden, k_proj, k_outs, k_read = jax.random.split(key, 6)
        self.embed = eqx.nn.Linear(in_dim, width, key=k_embed)
        self.context = ContextEmbedding(width, cond_dim, fourier_scale=fourier_scale, key=k_ctx)
        self.norms = tuple(eqx.nn.LayerNorm(width) for _ in range(depth))
        self.hidden = tuple(eqx.nn.Linear(width, 2 * width, key=k) for k in jax.random.split(k_hidden, depth))
        self.context_projs = tuple(eqx.nn.Linear(width, 2 * width, key=k) for k in jax.random.split(k_proj, depth))
        self.outputs = tuple(eqx.nn.Linear(2 * width, width, key=k) for k in jax.random.split(k_outs, depth))
        self.norm_out = eqx.nn.LayerNorm(width)
        self.readout = eqx.nn.Linear(width, in_dim if out_dim is None else out_dim, key=k_read)

    def __call__(self, x, t, cond=None):
        context = self.context(t, cond)
        h = self.embed(x)
        for norm, hidden, proj, out in zip(self.norms, self.hidden, self.context_projs, self.outputs):
            h = h + out(jax.nn.silu(hidden(norm(h)) + proj(context)))
        return self.readout(self.norm_out(h))


def count_parameters(model) -> int:
    """Number of trainable scalars (inexact array leaves, fixed Fourier frequencies included)."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))))


def apply_batched(model, x, t, *, mask=None, cond=None):
    """Apply a per-example network to a batch.

    Args:
      model: a :class:`SetTransformer`, :class:`ResMLP` or any module with the same call
        signature (``takes_mask`` says which).
      x: ``(B, N, D)`` for set models, ``(B, D)`` for vector models.
      t: ``(B,)`` diffusion times (a scalar is broadcast).
      mask: ``(B, N)`` (or ``(B, N, 1)``) for set models; required by them.
      cond: ``(B, C)`` conditioning vectors or None.

    Returns:
      The network output with the shape of ``x`` (for ``out_dim=None`` networks).
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    if getattr(model, "takes_mask", False):
        if mask is None:
            mask = jnp.ones(x.shape[:2], x.dtype)
        point_mask = mask if mask.ndim == 2 else mask.reshape(mask.shape[:2] + (-1,))[..., 0]
        if cond is None:
            return jax.vmap(lambda xi, mi, ti: model(xi, mi, ti))(x, point_mask, t)
        return jax.vmap(model)(x, point_mask, t, cond)
    if cond is None:
        out = jax.vmap(lambda xi, ti: model(xi, ti))(x, t)
    else:
        out = jax.vmap(model)(x, t, cond)
    if mask is not None:
        out = out * expand_mask(mask, out)
    return out


def prediction_to_eps(prediction: str, output, x_t, alpha, sigma):
    """Convert a network output to the noise estimate ``eps`` (``alpha``/``sigma`` broadcast to ``x_t``)."""
    if prediction == "eps":
        return output
    if prediction == "v":
        # v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps  =>  eps = alpha v + sigma x_t.
        return alpha * output + sigma * x_t
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


class NetworkScore(eqx.Module):
    """``score_fn(x (B, ...), t (B,)) -> score (B, ...)`` from a noise- or v-prediction network.

    ``score = -eps_hat(x, t) / sigma_t``. Padded entries (``mask == 0``) of the score are zero.
    A pytree, so jitted samplers taking it are not retraced when only the weights change.

    With ``x0_bounds = (low, high)`` (arrays broadcasting against the feature axis, e.g. the range
    of the standardised training data) the denoised estimate ``x0_hat = (x_t - sigma eps_hat) /
    alpha`` is clipped to that box and the noise estimate made consistent with the clipped one
    (DDPM's ``clip_denoised``, per feature): ``eps = eps_hat + alpha (x0_hat - clip(x0_hat)) / sigma``,
    exactly ``eps_hat`` wherever nothing is clipped. It keeps samplers from drifting outside the
    data's support (e.g. a constituent carrying more than the jet's pT); likelihoods need the
    unclipped score.
    """

    model: eqx.Module
    sde: VPSDE
    mask: jax.Array | None = None
    cond: jax.Array | None = None
    prediction: str = eqx.field(static=True, default="eps")
    x0_bounds: tuple | None = None

    def __check_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {PREDICTIONS}")

    def eps(self, x, t):
        """Noise estimate ``(B, ...)`` at ``x_t = x``."""
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        output = apply_batched(self.model, x, t, mask=self.mask, cond=self.cond)
        alpha, sigma = self.sde.marginal(broadcast_time(t, x))
        eps = prediction_to_eps(self.prediction, output, x, alpha, sigma)
        if self.x0_bounds is None:
            return eps
        x0 = alpha * x - sigma * output if self.prediction == "v" else (x - sigma * eps) / alpha
        low, high = (jnp.asarray(b, x.dtype) for b in self.x0_bounds)
        return eps + alpha * (x0 - jnp.clip(x0, low, high)) / sigma

    def __call__(self, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        _, sigma = self.sde.marginal(broadcast_time(t, x))
        score = -self.eps(x, t) / sigma
        if self.mask is not None:
            score = score * expand_mask(self.mask, score)
        return score


def score_fn_from(model, sde: VPSDE, *, prediction: str = "eps", mask=None, cond=None,
                  x0_bounds=None) -> NetworkScore:
    """Turn a network into a score function ``score_fn(x (B, ...), t (B,)) -> (B, ...)``.

    Args:
      model: per-example network (:class:`SetTransformer`, :class:`ResMLP`).
      sde: the :class:`~fpcd.sde.VPSDE` the network was trained with.
      prediction: ``"eps"`` (noise prediction) or ``"v"`` (v-prediction).
      mask: ``(B, N)`` or broadcastable to ``x``; 1 = real, 0 = padding. Fixed for the batch.
      cond: ``(B, C)`` conditioning vectors, fixed for the batch.
      x0_bounds: ``(low, high)`` box the denoised estimate is clipped to (:class:`NetworkScore`), or None.
    """
    return NetworkScore(model=model, sde=sde, mask=mask, cond=cond, prediction=prediction, x0_bounds=x0_bounds)
