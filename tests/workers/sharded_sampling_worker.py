"""Sample a Gaussian mixture with and without a 4-device batch sharding; print JSON of the checks.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/test_sampling.py does).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.data.gmm import ExactScore, toy_mixture  # noqa: E402
from fpcd.parallel import batch_sharding, data_mesh  # noqa: E402
from fpcd.sampling import sample  # noqa: E402
from fpcd.sde import VPSDE  # noqa: E402


class CountingScore(eqx.Module):
    inner: eqx.Module
    tally: list = eqx.field(static=True)

    def __call__(self, x, t):
        jax.debug.callback(lambda: self.tally.append(1))
        return self.inner(x, t)


def main():
    sde = VPSDE()
    score = ExactScore(toy_mixture(2), sde)
    sharding = batch_sharding(data_mesh())
    out = {"devices": jax.device_count()}
    for method, opts in (("em", {"steps": 30}), ("pc", {"steps": 10}), ("ddim", {"steps": 12}),
                         ("ode", {"rtol": 1e-4, "atol": 1e-4})):
        plain, nfe_plain = sample(score, sde, jax.random.key(0), (64, 2), method=method, **opts)
        tally = []
        sharded, nfe_sharded = sample(CountingScore(score, tally), sde, jax.random.key(0), (64, 2), method=method,
                                      sharding=sharding, **opts)
        jax.effects_barrier()
        out[method] = {
            "nfe": [nfe_plain, nfe_sharded],
            "calls": len(tally),
            "max_diff": float(np.max(np.abs(np.asarray(plain) - np.asarray(sharded)))),
            "num_shards": len(sharded.sharding.device_set),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
