"""Model-side representation of JetNet jets: centring and an invertible preprocessing pair.

* :func:`recenter` moves each jet's constituents so that their pT-weighted centroid in
  (eta_rel, phi_rel) is at 0 (FPCD's data cleaning; idempotent). Apply it to truth and model
  alike; it is not undone.
* :func:`preprocess` / :func:`postprocess` are exact inverses on centred jets:
  particle features (eta_rel, phi_rel, log pt_rel) and jet features (pT, eta, mass,
  num_particles) are standardised per feature with statistics stored in a
  :class:`JetStandardisation` (masked: only real constituents enter the particle statistics, and
  padded entries are exactly zero before and after). ``postprocess`` also accepts model output:
  it rounds and clips the multiplicity to ``[1, P]`` and rebuilds the mask column.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fpcd.data.jetnet import JetSet
from fpcd.data.kinematics import wrap_phi
from fpcd.data.standardisation import Standardisation

PT_REL_FLOOR = 1e-8
PT_REL_LOG_MAX = float(np.log(2.0))  # model output is capped at pt_rel = 2 (no constituent carries 2x the jet pT)


@dataclasses.dataclass(frozen=True)
class JetStandardisation:
    """The two :class:`~fpcd.data.standardisation.Standardisation` of one jet type."""

    particle: Standardisation  # (3,) of (eta_rel, phi_rel, log pt_rel) over real constituents
    jet: Standardisation  # (4,) of (pT, eta, mass, num_particles)

    def to_dict(self) -> dict:
        return {"particle": self.particle.to_dict(), "jet": self.jet.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "JetStandardisation":
        return cls(Standardisation.from_dict(data["particle"]), Standardisation.from_dict(data["jet"]))


def recenter(particle_features: np.ndarray) -> np.ndarray:
    """Shift (eta_rel, phi_rel) of each jet ``(N, P, 4)`` by its pT-weighted centroid; padding stays 0."""
    p = np.array(particle_features, np.float32, copy=True)
    real = p[..., 3] > 0.5
    weight = p[..., 2] * real
    total = np.maximum(weight.sum(1, keepdims=True), 1e-12)
    for axis in (0, 1):
        centre = (p[..., axis] * weight).sum(1, keepdims=True) / total
        shifted = p[..., axis] - centre
        p[..., axis] = np.where(real, wrap_phi(shifted) if axis == 1 else shifted, 0.0)
    return p


def _particle_inputs(particle_features):
    real = particle_features[..., 3] > 0.5
    x = np.stack([particle_features[..., 0], particle_features[..., 1],
                  np.log(np.maximum(particle_features[..., 2], PT_REL_FLOOR))], axis=-1).astype(np.float64)
    return x * real[..., None], real


def fit_standardisation(jets: JetSet) -> JetStandardisation:
    """Statistics of ``jets`` (typically the training split of one jet type)."""
    x, real = _particle_inputs(jets.particle_features)
    return JetStandardisation(particle=Standardisation.fit(x[real]), jet=Standardisation.fit(jets.jet_features))


def preprocess(jets: JetSet, stats: JetStandardisation):
    """Model inputs of ``jets``.

    Returns:
      ``(particles (N, P, 3), mask (N, P), jet_features (N, 4))`` as float32; ``particles`` is zero
      where ``mask`` is 0.
    """
    x, real = _particle_inputs(jets.particle_features)
    particles = stats.particle.apply(x) * real[..., None]
    return particles, real.astype(np.float32), stats.jet.apply(jets.jet_features)


def postprocess(particles, mask, jet_features, stats: JetStandardisation, jet_type: str) -> JetSet:
    """Invert :func:`preprocess`: back to JetNet units and layout.

    Multiplicities are rounded and clipped to ``[1, P]``, pt_rel is capped at 2 (a guard against
    diverging model output; real jets stay far below), and particles beyond a jet's mask are zero.
    """
    particles = np.asarray(particles, np.float64)
    real = np.asarray(mask) > 0.5
    num = particles.shape[1]
    x = stats.particle.invert(particles)
    out = np.zeros(particles.shape[:2] + (4,), np.float32)
    out[..., 0] = x[..., 0]
    out[..., 1] = x[..., 1]
    out[..., 2] = np.exp(np.minimum(x[..., 2], PT_REL_LOG_MAX))
    out[..., 3] = 1.0
    out *= real[..., None]
    jet = stats.jet.invert(jet_features)
    jet[:, 3] = np.clip(np.rint(jet[:, 3]), 1, num)
    return JetSet(jet_type, out, jet.astype(np.float32))


def multiplicity_mask(num_particles, max_particles: int) -> np.ndarray:
    """``(N, P)`` float mask with the first ``num_particles[i]`` entries of row ``i`` set."""
    n = np.clip(np.rint(np.asarray(num_particles)), 0, max_particles).astype(int)
    return (np.arange(max_particles)[None, :] < n[:, None]).astype(np.float32)
