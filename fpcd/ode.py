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

less 1 when no step was accepted at all (a solve stopped in its first steps: ``7 * num_steps``).

``num_steps`` (accepted + rejected) is in ``sol.stats``; the rejections before the first
accepted step are not, so :class:`FirstAcceptTracking` (a thin wrapper around
``diffrax.PIDController``) records them in its controller state. One batched evaluation counts
once. Under ``jax.vmap`` of a whole solve the statistics stay per solve: the NFE is what that
solve alone needs (the batched loop itself runs until its slowest member finishes).

A solve stops early, without spending its ``max_steps`` budget, when a rejected step shrinks
below a few units in the last place of ``t`` (the solve could no longer advance). A non-finite
trial state (NaN/inf: the score function returned NaN or inf there, or the input was non-finite)
is rejected and retried with a shorter step, as diffrax does, so a field undefined only over a
too-long step is passed; where the field is NaN for good, the steps shrink geometrically and the
solve stops after a few dozen trials instead of creeping towards that region until ``max_steps``.
:class:`FirstAcceptTracking` records why (a non-finite last trial, or a collapse of a finite one)
and where in its state.

A failed solve (``max_steps`` exhausted, non-finite state, collapsed step) returns NaN states and
``succeeded = False``; :func:`checked_nfe` turns that into an error for concrete (eager) results:
:class:`NonFiniteStateError` for a non-finite state, ``RuntimeError`` otherwise.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

# Why a solve stopped (``SolveStats.stop_reason``).
STOP_NONE = 0  # finished, or ran out of max_steps
STOP_NONFINITE = 1  # a trial step's state held NaN/inf
STOP_STEP_COLLAPSE = 2  # a rejected step shrank below COLLAPSE_ULPS units in the last place of t
COLLAPSE_ULPS = 4.0


class NonFiniteStateError(RuntimeError, FloatingPointError):
    """The ODE state became non-finite (NaN/inf) during a solve: the score function (network)
    returned NaN/inf, or the input was non-finite. A ``RuntimeError`` and a ``FloatingPointError``."""


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
    yet and how many steps were rejected before the first accepted one, and which stops the solve
    when a rejected step collapses (a few ulps of ``t``, or a step the controller could not size).

    State: ``(pid_state, accepted_any: bool[], rejected_before_first_accept: int32[],
    stop_reason: int32[], stop_interval: float[2])``; read it from ``sol.controller_state`` with
    ``SaveAt(controller_state=True)``. ``stop_reason`` is ``STOP_NONE``, ``STOP_NONFINITE`` or
    ``STOP_STEP_COLLAPSE``; ``stop_interval`` is the ``(t0, t1)`` of the step that stopped the solve
    in the caller's time (NaN when none did). A stop ends the solve with
    ``diffrax.RESULTS.dt_min_reached``. Otherwise the step decisions are the wrapped controller's,
    unchanged.
    """

    controller: diffrax.PIDController
    direction: jax.Array | float = 1.0

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
        return FirstAcceptTracking(self.controller.wrap(direction), direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, pid_state = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        interval = jnp.full((2,), jnp.nan, jnp.result_type(t0, float))
        return tnext, (pid_state, jnp.array(False), jnp.array(0, jnp.int32), jnp.array(STOP_NONE, jnp.int32), interval)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        pid_state, accepted_any, early_rejections, stop_reason, interval = controller_state
        keep_step, next_t0, next_t1, made_jump, pid_state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, pid_state
        )
        # Diffrax rejects a non-finite trial state and retries with a smaller step (a field that is
        # undefined only over a step too long is then passed). Where the field is NaN for good, the
        # solve creeps up to that region with ever shorter steps until max_steps runs out: stop it
        # once a rejected step could no longer move t (a few ulps), naming a non-finite last trial.
        finite = jnp.array(True)
        for leaf in jax.tree_util.tree_leaves(y1_candidate):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        nonfinite = ~finite
        scale = jnp.maximum(jnp.maximum(jnp.abs(next_t0), jnp.abs(t1)), jnp.finfo(jnp.result_type(next_t0)).tiny)
        ulp = jnp.finfo(jnp.result_type(next_t0)).eps * scale
        proposed = next_t1 - next_t0  # NaN when the controller could not size the next step
        stop = ~keep_step & ((jnp.abs(proposed) < COLLAPSE_ULPS * ulp) | ~jnp.isfinite(proposed))
        first_stop = stop & (stop_reason == STOP_NONE)
        reason = jnp.where(nonfinite, STOP_NONFINITE, STOP_STEP_COLLAPSE).astype(jnp.int32)
        stop_reason = jnp.where(first_stop, reason, stop_reason)
        here = (jnp.stack([t0, t1]) * self.direction).astype(interval.dtype)
        interval = jnp.where(first_stop, here, interval)
        result = diffrax.RESULTS.where(stop, diffrax.RESULTS.dt_min_reached, result)
        early_rejections = early_rejections + jnp.where(accepted_any | keep_step, 0, 1).astype(jnp.int32)
        state = (pid_state, accepted_any | keep_step, early_rejections, stop_reason, interval)
        return keep_step, next_t0, next_t1, made_jump, state, result


class SolveStats(eqx.Module):
    """Statistics of one :func:`solve_dopri5` solve: int32/bool arrays and the float
    ``stop_interval`` (2,) (batched under vmap).

    ``nfe`` is the number of vector-field evaluations (module docstring); ``succeeded`` is False
    when the solve failed (its states are then NaN): it ran out of ``max_steps``
    (``stop_reason == STOP_NONE``), a trial state was non-finite (``STOP_NONFINITE``) or the step
    size collapsed (``STOP_STEP_COLLAPSE``); ``stop_interval`` is the ``(t0, t1)`` of the step that
    stopped it (NaN when none did).
    """

    nfe: jax.Array
    num_steps: jax.Array
    num_accepted: jax.Array
    num_rejected: jax.Array
    num_rejected_before_first_accept: jax.Array
    succeeded: jax.Array
    stop_reason: jax.Array
    stop_interval: jax.Array


def dopri5_nfe(num_steps, num_rejected_before_first_accept, accepted_any=True):
    """Vector-field evaluations of a Dopri5 solve (FSAL): ``6 * num_steps + 1`` plus one per
    rejection before the first accepted step, less one if no step was accepted (each of those
    trials evaluated 7 stages); 0 when no step was taken."""
    nfe = 6 * num_steps + 1 + num_rejected_before_first_accept - jnp.where(accepted_any, 0, 1)
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
    _, accepted_any, early_rejections, stop_reason, stop_interval = solution.controller_state
    num_steps = jnp.asarray(solution.stats["num_steps"], jnp.int32)
    stats = SolveStats(
        nfe=dopri5_nfe(num_steps, early_rejections, accepted_any),
        num_steps=num_steps,
        num_accepted=jnp.asarray(solution.stats["num_accepted_steps"], jnp.int32),
        num_rejected=jnp.asarray(solution.stats["num_rejected_steps"], jnp.int32),
        num_rejected_before_first_accept=early_rejections,
        succeeded=succeeded,
        stop_reason=stop_reason,
        stop_interval=stop_interval,
    )
    return y1, stats


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def as_int(value):
    """``value`` as a Python int when it is a concrete integer: a Python ``int`` (not ``bool``), a
    NumPy integer scalar, or a 0-d integer NumPy/JAX array; ``None`` otherwise (floats, bools,
    traced values, arrays of other shapes)."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is not None and shape == () and np.issubdtype(dtype, np.integer):
        return int(value)
    return None


def as_number(value):
    """``value`` as a Python float when it is a concrete real number (Python/NumPy scalar or a 0-d
    NumPy/JAX array of integer or float dtype, not ``bool``); ``None`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is not None and shape == () and (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        return float(value)
    return None


def solve_dopri5(vector_field, y0, *, t0, t1, rtol, atol, args=None, dt0=0.01, max_steps=100_000, mask=None):
    """Integrate ``dy/dt = vector_field(t, y, args)`` from ``t0`` to ``t1`` with Dopri5 + PID control.

    Works eagerly and inside ``jax.jit``/``jax.vmap``; never raises on a failed solve. The solve
    stops at once when a trial state is non-finite or a rejected step collapses (module docstring).

    Args:
      vector_field: pure function ``(t (), y pytree, args) -> dy/dt``; may be an ``eqx.Module``.
      y0: initial state pytree; its first leaf is the sample batch ``x``.
      t0, t1: start and end times (``t1 < t0`` integrates backwards); may be traced.
      rtol, atol: tolerances of the PID controller (RMS error norm); may be traced.
      dt0: magnitude of the first trial step (its sign follows ``t1 - t0``).
      max_steps: step budget (a positive integer: Python or NumPy int, or a 0-d integer array; it
        fixes the compiled loop).
      mask: if given, broadcast to the first leaf; padded entries are left out of the error norm.

    Returns:
      ``(y1, stats)``: the state at ``t1`` (NaN everywhere if the solve failed) and a
      :class:`SolveStats` of arrays (``nfe``, step counts, ``succeeded``, ``stop_reason``,
      ``stop_interval``).

    Raises:
      ValueError: concrete ``rtol``/``atol``/``dt0`` not positive and finite, ``max_steps`` not a
        positive integer (:func:`check_solver_options`).
    """
    checked = check_solver_options(rtol=rtol, atol=atol, dt0=dt0, max_steps=max_steps)
    scalars = [jnp.asarray(v, jnp.result_type(float)) for v in (t0, t1, checked["dt0"], checked["rtol"],
                                                                   checked["atol"])]
    return _solve(vector_field, y0, args, *scalars, checked["max_steps"], mask)


def check_solver_options(*, rtol, atol, dt0=0.01, max_steps=100_000, prefix: str = "") -> dict:
    """The options of a Dopri5 solve (:func:`solve_dopri5`) checked: ``rtol``, ``atol`` and ``dt0``
    positive finite numbers (returned as Python floats; traced values pass unchecked), ``max_steps``
    a positive integer (a Python int). The one check of these options, used by the ODE sampler's
    and the likelihood's option checks.

    Raises:
      ValueError: naming the first bad option, after ``prefix`` (e.g. ``"sampling option "``).
    """
    checked = {}
    for name, value in (("rtol", rtol), ("atol", atol), ("dt0", dt0)):
        if not _is_concrete(value):
            checked[name] = value
            continue
        number = as_number(value)
        if number is None or not 0.0 < number < np.inf:
            raise ValueError(f"{prefix}{name} must be a positive number, got {value!r}")
        checked[name] = number
    steps = as_int(max_steps)
    if steps is None or steps < 1:
        raise ValueError(f"{prefix}max_steps must be a positive integer, got {max_steps!r}")
    checked["max_steps"] = steps
    return checked


def _first_failed(stats: SolveStats) -> int:
    """Flat index of the first failed solve in (possibly vmapped) ``stats``."""
    return int(np.flatnonzero(~np.asarray(stats.succeeded).ravel())[0])


def checked_nfe(stats: SolveStats, *, t1, max_steps):
    """The NFE of a solve as its caller reports it.

    Concrete (eager) ``stats``: a Python int, after raising if the solve failed. Traced (inside
    jit/vmap): ``stats.nfe`` as an int32 array; check ``stats.succeeded`` (and ``stats.stop_reason``)
    or the NaN states yourself.

    Raises:
      NonFiniteStateError: (concrete stats) a trial state became NaN/inf; the message names the
        step ``t0 -> t1`` where it happened.
      RuntimeError: (concrete stats) the step size collapsed, or the solve did not reach ``t1``
        within ``max_steps``.
    """
    if not _is_concrete(stats.succeeded):
        return stats.nfe
    if not bool(jnp.all(stats.succeeded)):
        i = _first_failed(stats)
        reason = int(np.asarray(stats.stop_reason).ravel()[i])
        start, end = (float(v) for v in np.asarray(stats.stop_interval).reshape(-1, 2)[i])
        took = f"{int(np.asarray(stats.num_steps).ravel()[i])} steps, {int(np.asarray(stats.nfe).ravel()[i])} evaluations"
        if reason == STOP_NONFINITE:
            raise NonFiniteStateError(
                f"the ODE state became non-finite (NaN/inf) in the step from t={start:.6g} to t={end:.6g}: the score "
                f"function (network) returned NaN/inf there; the solve stopped at once ({took}) instead of "
                f"running to max_steps={max_steps}"
            )
        if reason == STOP_STEP_COLLAPSE:
            raise RuntimeError(
                f"Dopri5 step size collapsed at t={start:.6g} (a rejected step of {abs(end - start):.3g} no longer moves "
                f"t; {took}): the vector field is too stiff or erratic there; check the score function"
            )
        raise RuntimeError(
            f"Dopri5 did not reach t1={t1} within max_steps={max_steps} (took {int(jnp.max(stats.num_steps))} "
            f"steps, {int(jnp.max(stats.nfe))} evaluations); loosen rtol/atol or raise max_steps"
        )
    return int(stats.nfe)
