"""The physics papers' probability-flow baseline: scipy's ``solve_ivp(method="RK45")`` on the host.

For comparison with ``fpcd.sampling.sample(..., method="ode")`` only (``benchmarks/samplers.py``,
``benchmarks/poster.py``); not part of the library. Import it from a script in ``benchmarks/``
with ``from scipy_rk45 import sample_scipy_rk45`` (a script's own directory is on ``sys.path``;
the script must put the repository root there too, for ``fpcd``).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from fpcd.sampling import ProbabilityFlow
from fpcd.sde import VPSDE, expand_mask


@eqx.filter_jit
def _evaluate_flow(flow, t, x):
    return flow(t, x)


def sample_scipy_rk45(score_fn, sde: VPSDE, key, shape, *, mask=None, rtol=1e-5, atol=1e-5, t_min=1e-3, **unused):
    """The physics papers' baseline: the probability-flow ODE solved by scipy's
    ``solve_ivp(method="RK45")`` on the host, calling the jitted vector field once per evaluation
    (the whole batch is one flattened state, as in score_sde). Returns ``(x, nfev)``.

    Same arguments as ``fpcd.sampling.sample(..., method="ode")`` (other options are ignored).
    Slower on accelerators because every evaluation synchronises with the host.
    """
    from scipy.integrate import solve_ivp

    del unused
    x1 = sde.prior_sample(key, tuple(shape))
    m = None if mask is None else expand_mask(jnp.asarray(mask, jnp.float32), x1)
    if m is not None:
        x1 = x1 * m
    flow = ProbabilityFlow(score_fn, sde, m)

    def fun(t, y):
        x = jnp.asarray(y.reshape(x1.shape), jnp.float32)
        return np.asarray(_evaluate_flow(flow, jnp.asarray(t, jnp.float32), x), np.float64).ravel()

    solution = solve_ivp(fun, (1.0, t_min), np.asarray(x1, np.float64).ravel(), method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"scipy RK45 failed: {solution.message}")
    return jnp.asarray(solution.y[:, -1].reshape(x1.shape), jnp.float32), int(solution.nfev)
