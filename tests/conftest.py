"""Shared fixtures: the VP SDE and a Gaussian mixture with exact score and density."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest

from fpcd.data.gmm import ExactScore, toy_mixture
from fpcd.metrics import w1_per_dimension
from fpcd.sde import VPSDE


@pytest.fixture(scope="session")
def sde():
    return VPSDE()


@pytest.fixture(scope="session")
def mixture():
    return toy_mixture(2)


@pytest.fixture(scope="session")
def exact_score(mixture, sde):
    return ExactScore(mixture, sde)


def truth_floor(mixture, num_samples, *, repeats=4, seed=1000):
    """Mean per-dimension W1 between independent truth samples of ``num_samples`` (averaged)."""
    values = [
        w1_per_dimension(
            np.asarray(mixture.sample(jax.random.key(seed + 2 * r), num_samples)),
            np.asarray(mixture.sample(jax.random.key(seed + 2 * r + 1), num_samples)),
        )
        for r in range(repeats)
    ]
    return np.mean(values, axis=0)


class OracleNet(eqx.Module):
    """Predicts exactly what a perfect eps- or v-network would for a Gaussian mixture."""

    takes_mask = False
    mixture: eqx.Module
    sde: eqx.Module
    prediction: str = eqx.field(static=True)

    def __call__(self, x, t, cond=None):
        alpha, sigma = self.sde.marginal(t)
        eps = -sigma * self.mixture.score(x[None], t[None], self.sde)[0]
        if self.prediction == "eps":
            return eps
        x0 = (x - sigma * eps) / alpha
        return alpha * eps - sigma * x0


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(config: str, *args, devices: int | None = None, timeout: int = 900):
    """Run ``experiments/main.py --config=<config> --progress=false *args`` in a subprocess from the
    repository root; ``devices`` forces that many CPU devices."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if devices:
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "experiments", "main.py"), f"--config={config}", "--progress=false",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
