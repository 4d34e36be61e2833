"""Adaptive ODE solves with diffrax's Dopri5, and their number of vector-field evaluations.

Both the probability-flow sampler (:mod:`fpcd.sampling`) and the likelihood
(:mod:`fpcd.likelihood`) integrate with :func:`solve_dopri5`: the whole batch is one state,
so the batch shares its steps (RMS error norm over the real entries). Everything is traced, so
a solve works inside ``jax.jit`` and ``jax.vmap``; one compiled solve serves every
``t0``, ``t1``, ``dt0``, ``rtol`` and ``atol``.

The number of function evaluations (NFE) comes from the solver's own statistics. Dopri5 has 7
stages with FSAL: the first stage of a step reuses the last stage of the previous accepted step,
and a rejected step keeps the cached stage of the step before it. Before the first accepted step
there is nothing cached, so each trial step evaluates all 7 stages::

    NFE = 6 * num_steps + 1 + num_rejected_before_first_accept     (0 if num_steps == 0)

``num_steps`` (accepted + rejected) is in ``sol.stats``; the rejections before the first
accepted step are not, so :class:`FirstAcceptTracking` (a thin wrapper around
``diffrax.PIDController``) records them in its controller state. One batched evaluation counts
once. Under ``jax.vmap`` of a whole solve the statistics stay per solve: the NFE is what that
solve alone needs (the batched loop itself runs until its slowest member finishes).

A failed solve (``max_steps`` exhausted) returns NaN states and ``succeeded = False``;
:func:`checked_nfe` turns that into a ``RuntimeError`` for concrete (eager) results.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx


def masked_rms_norm(mask):
    """Error norm for diffrax's step-size controller: RMS over the real (``mask == 1``) entries of
    the first leaf (the state ``x``) and all entries of the other leaves."""

    def norm(error_tree):
        leaves = jax.tree_util.tree_leaves(error_tree)
        first, rest = leaves[0], leaves[1:]
        total = jnp.sum(mask * first**2)
        count = jnp.sum(mask)
        for leaf in rest:
            total = total + jnp.sum(leaf**2)
            count = count + leaf.size
        return jnp.sqrt(total / jnp.maximum(count, 1.0))

    return norm


class FirstAcceptTracking(diffrax.AbstractAdaptiveStepSizeController):
    """A ``diffrax.PIDController`` whose state also records whether any step has been accepted
    yet and how many steps were rejected before the first accepted one.

    State: ``(pid_state, accepted_any: bool[], rejected_before_first_accept: int32[])``; read it
    from ``sol.controller_state`` with ``SaveAt(controller_state=True)``. Step decisions are the
    wrapped controller's, unchanged.
    """

    controller: diffrax.PIDController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return FirstAcceptTracking(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, pid_state = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return tnext, (pid_state, jnp.array(False), jnp.array(0, jnp.int32))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        pid_state, accepted_any, early_rejections = controller_state
        keep_step, next_t0, next_t1, made_jump, pid_state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, pid_state
        )
        early_rejections = early_rejections + jnp.where(accepted_any | keep_step, 0, 1).astype(jnp.int32)
        state = (pid_state, accepted_any | keep_step, early_rejections)
        return keep_step, next_t0, next_t1, made_jump, state, result


class SolveStats(eqx.Module):
    """Statistics of one :func:`solve_dopri5` solve, all int32/bool arrays (batched under vmap).

    ``nfe`` is the number of vector-field evaluations (module docstring); ``succeeded`` is False
    when the solve ran out of ``max_steps`` (its states are then NaN).
    """

    nfe: jax.Array
    num_steps: jax.Array
    num_accepted: jax.Array
    num_rejected: jax.Array
    num_rejected_before_first_accept: jax.Array
    succeeded: jax.Array


def dopri5_nfe(num_steps, num_rejected_before_first_accept):
    """Vector-field evaluations of a Dopri5 solve (FSAL): ``6 * num_steps + 1`` plus one per
    rejection before the first accepted step; 0 when no step was taken."""
    nfe = 6 * num_steps + 1 + num_rejected_before_first_accept
    return jnp.where(num_steps > 0, nfe, 0).astype(jnp.int32)


@eqx.filter_jit
def _solve(vector_field, y0, args, t0, t1, dt0, rtol, atol, max_steps, mask):
    norm = optx.rms_norm if mask is None else masked_rms_norm(mask)
    controller = FirstAcceptTracking(diffrax.PIDController(rtol=rtol, atol=atol, norm=norm))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Dopri5(),
        t0=t0,
        t1=t1,
        dt0=jnp.sign(t1 - t0) * jnp.abs(dt0),
        y0=y0,
        args=args,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(t1=True, controller_state=True),
        max_steps=max_steps,
        throw=False,
    )
    succeeded = solution.result == diffrax.RESULTS.successful
    y1 = jax.tree_util.tree_map(lambda leaf: jnp.where(succeeded, leaf[-1], jnp.nan), solution.ys)
    _, _, early_rejections = solution.controller_state
    num_steps = jnp.asarray(solution.stats["num_steps"], jnp.int32)
    stats = SolveStats(
        nfe=dopri5_nfe(num_steps, early_rejections),
        num_steps=num_steps,
        num_accepted=jnp.asarray(solution.stats["num_accepted_steps"], jnp.int32),
        num_rejected=jnp.asarray(solution.stats["num_rejected_steps"], jnp.int32),
        num_rejected_before_first_accept=early_rejections,
        succeeded=succeeded,
    )
    return y1, stats


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def solve_dopri5(vector_field, y0, *, t0, t1, rtol, atol, args=None, dt0=0.01, max_steps=100_000, mask=None):
    """Integrate ``dy/dt = vector_field(t, y, args)`` from ``t0`` to ``t1`` with Dopri5 + PID control.

    Works eagerly and inside ``jax.jit``/``jax.vmap``; never raises on a failed solve.

    Args:
      vector_field: pure function ``(t (), y pytree, args) -> dy/dt``; may be an ``eqx.Module``.
      y0: initial state pytree; its first leaf is the sample batch ``x``.
      t0, t1: start and end times (``t1 < t0`` integrates backwards); may be traced.
      rtol, atol: tolerances of the PID controller (RMS error norm); may be traced.
      dt0: magnitude of the first trial step (its sign follows ``t1 - t0``).
      max_steps: step budget (a Python int: it fixes the compiled loop).
      mask: if given, broadcast to the first leaf; padded entries are left out of the error norm.

    Returns:
      ``(y1, stats)``: the state at ``t1`` (NaN everywhere if the solve failed) and a
      :class:`SolveStats` of arrays (``nfe``, step counts, ``succeeded``).
    """
    if all(_is_concrete(v) for v in (rtol, atol)) and not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    scalars = [jnp.asarray(v, jnp.result_type(float)) for v in (t0, t1, dt0, rtol, atol)]
    return _solve(vector_field, y0, args, *scalars, int(max_steps), mask)


def checked_nfe(stats: SolveStats, *, t1, max_steps):
    """The NFE of a solve as its caller reports it.

    Concrete (eager) ``stats``: a Python int, after raising ``RuntimeError`` if the solve failed.
    Traced (inside jit/vmap): ``stats.nfe`` as an int32 array; check ``stats.succeeded`` or the
    NaN states yourself.
    """
    if not _is_concrete(stats.succeeded):
        return stats.nfe
    if not bool(jnp.all(stats.succeeded)):
        raise RuntimeError(
            f"Dopri5 did not reach t1={t1} within max_steps={max_steps} (took {int(jnp.max(stats.num_steps))} "
            f"steps, {int(jnp.max(stats.nfe))} evaluations); loosen rtol/atol or raise max_steps"
        )
    return int(stats.nfe)
