"""Shared fixtures and helpers: the VP SDE, a Gaussian mixture with exact score and density, score
wrappers that count calls or break down, and the subprocess runs of experiments/main.py and launch.sh."""

import os
import pathlib
import subprocess
import sys

# The suite compiles far more XLA programs than it runs steps of them, so its CPU programs are built
# without LLVM's optimisation passes: about 30 % less CPU time per test file, measured; every comparison
# in the suite is between programs built the same way. FPCD_TEST_XLA_OPTIMISE=1 tests the optimised
# build instead. The flags reach the pytest-xdist workers and every subprocess (xla_flags).
TEST_XLA_FLAGS = () if os.environ.get("FPCD_TEST_XLA_OPTIMISE") == "1" else ("--xla_backend_optimization_level=0",)


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` of a test process: the suite's compile flags and, with ``devices``, that many CPU
    devices."""
    return " ".join(TEST_XLA_FLAGS + ((f"--xla_force_host_platform_device_count={devices}",) if devices else ()))


_own_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_own_flags + [f for f in TEST_XLA_FLAGS if f not in _own_flags])

import equinox as eqx  # noqa: E402  (after XLA_FLAGS, which XLA reads when JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fpcd.data.gmm import ExactScore, toy_mixture  # noqa: E402
from fpcd.metrics import w1_per_dimension  # noqa: E402
from fpcd.sde import VPSDE  # noqa: E402


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


class CountingScore(eqx.Module):
    """Wraps a score function and tallies executed (batched) calls on the host: an NFE count made
    independently of the samplers' and solvers' own accounting."""

    inner: eqx.Module
    tally: list = eqx.field(static=True)

    def __call__(self, x, t):
        jax.debug.callback(lambda: self.tally.append(1))
        return self.inner(x, t)


class NaNScore(eqx.Module):
    """The exact score, but NaN wherever ``t`` lies in ``[t_lo, t_hi]`` (a network that breaks down
    at some noise levels); tallies its executed calls on the host."""

    inner: eqx.Module
    t_lo: jax.Array
    t_hi: jax.Array
    tally: list = eqx.field(static=True)

    def __call__(self, x, t):
        jax.debug.callback(lambda: self.tally.append(1))
        bad = ((t >= self.t_lo) & (t <= self.t_hi)).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(bad, jnp.nan, self.inner(x, t))


def nan_score(exact_score, t_lo, t_hi):
    return NaNScore(exact_score, jnp.asarray(t_lo, jnp.float32), jnp.asarray(t_hi, jnp.float32), [])


def re_shape(shape):
    """``shape`` as a regular expression matching its printed tuple."""
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


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


def _environment(devices: int | None = None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(devices)
    # The interpreter running the tests (and its environment's scripts) come first on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_main(config: str, *args, devices: int | None = None, timeout: int = 900):
    """Run ``experiments/main.py --config=<config> --progress=false *args`` in a subprocess from the
    repository root; ``devices`` forces that many CPU devices."""
    cmd = [sys.executable, os.path.join(REPO, "experiments", "main.py"), f"--config={config}", "--progress=false",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=_environment(devices))


def run_launch(config: str, *args, processes: int = 2, timeout: int = 900):
    """Run ``launch.sh --local --processes N -- --config=<config> --progress=false *args``: N processes
    of one CPU device each, joined by jax.distributed over gloo."""
    cmd = ["bash", os.path.join(REPO, "launch.sh"), "--local", "--processes", str(processes), "--",
           f"--config={config}", "--progress=false", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=_environment())


def tensorboard_scalars(directory) -> dict:
    """``tag -> [(step, value)]`` of every scalar in the TensorBoard event files under ``directory``
    (TFRecord framing: length, CRC, an ``Event`` protobuf, CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict = {}
    for path in sorted(pathlib.Path(directory).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def expected_log_steps(train_section, start: int = 0) -> list[int]:
    """Steps after ``start`` at which :func:`fpcd.train.fit` logs: every ``log_every`` steps, every
    checkpoint and the last step."""
    n = train_section.num_steps
    steps = {s for s in range(1, n + 1) if s % train_section.log_every == 0 or s % train_section.checkpoint_every == 0}
    return sorted(s for s in steps | {n} if s > start)


@pytest.fixture(scope="session")
def tiny_jet_cache(tmp_path_factory):
    """One jet cache directory for the tiny jets and anomaly runs (the same q and t jets: generated
    once by whichever runs first)."""
    return tmp_path_factory.mktemp("tiny_jet_cache")
