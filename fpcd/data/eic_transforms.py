"""Features of EIC DIS events and their exact inverses (the physics note's, with a true charge).

Per event (stage 1): ``(pT_e, eta_e, N)`` of the scattered electron and the number ``N`` of other
particles. Per particle (stage 2), 13 entries, as the public preprocessing:

* 0: ``eta_i + eta_e`` (a shift: evaluation recovers eta_i by subtracting eta_e);
* 1: ``phi_i - (phi_e + pi)`` wrapped to (-pi, pi]: the azimuth from the recoil direction;
* 2: ``log(pT_i / pT_e)``;
* 3: the true electric charge (-1, 0, +1), not the sign of the PDG id;
* 4-12: the one-hot of the 9 species classes (:data:`fpcd.data.eic.SPECIES`).

:func:`event_features` / :func:`particle_features` compute them and :func:`events_from_features`
inverts them exactly (up to float32): the electron azimuth ``phi_e`` is a separate input (the
physics is symmetric in it; generated events draw it uniformly), the energy fraction ``z`` is
rebuilt from (pT, eta) and the class mass, and the PDG id from (class, charge)
(:func:`fpcd.data.eic.pdg_from_species`).

Model space (:func:`to_model` / :func:`from_model`): the electron is written in its DIS variables,
the event vector as (log Q^2, logit y, N) (:func:`dis_from_electron`, an exact bijection of
(pT_e, eta_e) for a massless electron: y near 0 and Q^2 near its cut are sharp in (pT_e, eta_e) but
smooth here), standardised. Each particle is 14 numbers: eta_i + eta_e and log(pT_i / pT_e)
standardised (masked: statistics over real particles), the azimuth as (cos phi, sin phi) (a
periodic variable has no edge at +-pi for the sampler to smear), then the charge and species;
the charge stays in {-1, 0, 1} and the one-hot is mapped to {-1, +1}, so the species are vertices
of a cube the sampler must reach. Decoding takes the argmax class and gives it its charge: the
sign of the charge entry for a charged class, 0 for a neutral one (:func:`decode_species`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fpcd.data import eic
from fpcd.data.kinematics import boost_z, energies, wrap_phi
from fpcd.data.standardisation import Standardisation

NUM_SPECIES = len(eic.SPECIES)
NUM_EVENT_FEATURES = 3
NUM_PARTICLE_FEATURES = 4 + NUM_SPECIES
#: Model space per particle: (eta_i + eta_e, cos phi, sin phi, log pT ratio) , charge, species in {-1, +1}.
NUM_MODEL_FEATURES = 5 + NUM_SPECIES
STANDARDISED = (0, 2)  # feature columns standardised in model space: eta_i + eta_e, log(pT_i / pT_e)
SPECIES_START = 5  # first species column in model space
LOG_PT_RATIO_MAX = float(np.log(20.0))  # guard on generated output (truth reaches log(pT_i/pT_e) < 1.5)


def event_features(events: eic.EventSet) -> np.ndarray:
    """``(N, 3)`` = (pT_e, eta_e, multiplicity) in float64."""
    return np.stack([events.electron[:, 0], events.electron[:, 1], events.multiplicity], axis=1).astype(np.float64)


def particle_features(events: eic.EventSet) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, P-1, 13), mask (N, P-1))`` of the particles after the electron (float64, bool);
    padding rows are zero."""
    p = events.particles.astype(np.float64)
    real = events.mask[:, 1:]
    pt_e, eta_e, phi_e = p[:, :1, 0], p[:, :1, 1], p[:, :1, 2]
    rest = p[:, 1:]
    pdg = np.rint(rest[..., 3]).astype(np.int64)
    out = np.zeros(rest.shape[:2] + (NUM_PARTICLE_FEATURES,), np.float64)
    out[..., 0] = rest[..., 1] + eta_e
    out[..., 1] = wrap_phi(rest[..., 2] - phi_e - np.pi)
    out[..., 2] = np.log(np.maximum(rest[..., 0], 1e-12) / pt_e)
    out[..., 3] = eic.charge_of(pdg)
    cls = eic.species_index(pdg)
    out[..., 4:] = np.eye(NUM_SPECIES)[np.maximum(cls, 0)]
    return out * real[..., None], real


def decode_species(one_hot, charge) -> tuple[np.ndarray, np.ndarray]:
    """``(class, charge)`` of model or feature output: the argmax class, and for a charged class the
    sign of ``charge`` (+1 when it is exactly 0), for a neutral class 0."""
    cls = np.argmax(np.asarray(one_hot), axis=-1)
    charged = eic.SPECIES_CHARGE[cls] != 0
    sign = np.where(np.asarray(charge) < 0, -1, 1)
    return cls, np.where(charged, sign, 0)


def events_from_features(event, particles, mask, phi_e) -> eic.EventSet:
    """Invert :func:`event_features` and :func:`particle_features` to the raw layout.

    Args:
      event: ``(N, 3)`` = (pT_e, eta_e, multiplicity); the multiplicity is not used (``mask`` is).
      particles: ``(N, P-1, 13)`` features; species by :func:`decode_species`.
      mask: ``(N, P-1)`` real particles (the first ones of each row must be the real ones).
      phi_e: ``(N,)`` electron azimuths.

    Particles are sorted by decreasing pT (the raw layout's order); ``kinematics`` is recomputed
    from the electron (:func:`fpcd.data.eic.dis_kinematics`).
    """
    event = np.asarray(event, np.float64)
    particles = np.asarray(particles, np.float64)
    real = np.asarray(mask) > 0.5
    n, num = real.shape
    pt_e, eta_e, phi_e = event[:, 0], event[:, 1], np.asarray(phi_e, np.float64)
    cls, charge = decode_species(particles[..., 4:], particles[..., 3])
    pt = pt_e[:, None] * np.exp(np.minimum(particles[..., 2], LOG_PT_RATIO_MAX))
    eta = particles[..., 0] - eta_e[:, None]
    phi = wrap_phi(particles[..., 1] + phi_e[:, None] + np.pi)
    root_s = eic.sqrt_s()
    rows = np.zeros((n, num + 1, 5), np.float64)
    rows[:, 0] = np.stack([pt_e, eta_e, phi_e, np.full(n, 11.0),
                           2.0 * energies(pt_e, eta_e, eic.ELECTRON_MASS) / root_s], axis=1)
    z = 2.0 * energies(pt, eta, eic.SPECIES_MASS[cls]) / root_s
    rest = np.stack([pt, eta, phi, eic.pdg_from_species(cls, charge), z], axis=-1) * real[..., None]
    order = np.argsort(np.where(real, -pt, np.inf), axis=1, kind="stable")
    rows[:, 1:] = np.take_along_axis(rest, order[..., None], axis=1)
    return eic.EventSet(rows.astype(np.float32), eic.dis_kinematics(rows[:, 0, :3]).astype(np.float32))


# --- model space ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EicStandardisation:
    """Statistics of the training events: ``event`` over (log Q^2, logit y, N), ``particle`` over the
    three continuous particle features of real particles."""

    event: Standardisation
    particle: Standardisation

    def to_dict(self) -> dict:
        return {"event": self.event.to_dict(), "particle": self.particle.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "EicStandardisation":
        return cls(Standardisation.from_dict(data["event"]), Standardisation.from_dict(data["particle"]))


def dis_from_electron(pt, eta) -> tuple[np.ndarray, np.ndarray]:
    """``(Q^2, y)`` of a massless scattered electron of CM-frame ``pt`` and ``eta`` (the lab formulas
    Q^2 = 2 E E' (1 + cos theta), y = 1 - E' (1 - cos theta) / (2 E), theta from the proton direction)."""
    pt, eta = np.asarray(pt, np.float64), np.asarray(eta, np.float64)
    e_lab, pz_lab = boost_z(pt * np.cosh(eta), pt * np.sinh(eta), -eic.cm_boost_beta())
    beam = eic.ELECTRON_ENERGY
    return 2.0 * beam * (e_lab + pz_lab), 1.0 - (e_lab - pz_lab) / (2.0 * beam)


def electron_from_dis(q2, y) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`dis_from_electron`: the CM-frame ``(pt, eta)`` of the electron of ``(Q^2, y)``."""
    q2, y = np.asarray(q2, np.float64), np.asarray(y, np.float64)
    beam = eic.ELECTRON_ENERGY
    plus, minus = q2 / (2.0 * beam), 2.0 * beam * (1.0 - y)  # E' + pz', E' - pz' in the lab
    e_cm, pz_cm = boost_z(0.5 * (plus + minus), 0.5 * (plus - minus), eic.cm_boost_beta())
    pt = np.sqrt(np.maximum(plus * minus, 0.0))
    return pt, np.arcsinh(pz_cm / np.maximum(pt, 1e-12))


def _event_inputs(event):
    event = np.asarray(event, np.float64)
    q2, y = dis_from_electron(event[:, 0], event[:, 1])
    return np.stack([np.log(q2), np.log(y) - np.log1p(-y), event[:, 2]], axis=1)


def fit_standardisation(events: eic.EventSet) -> EicStandardisation:
    """Statistics of ``events`` (the training split)."""
    features, real = particle_features(events)
    return EicStandardisation(event=Standardisation.fit(_event_inputs(event_features(events))),
                              particle=Standardisation.fit(features[real][:, STANDARDISED]))


def to_model(events: eic.EventSet, stats: EicStandardisation):
    """Model inputs: ``(event (N, 3), particles (N, P-1, 14), mask (N, P-1), phi_e (N,))`` float32;
    ``particles`` is zero where ``mask`` is 0."""
    features, real = particle_features(events)
    scaled = stats.particle.apply(features[..., STANDARDISED])
    x = np.concatenate([scaled[..., :1], np.cos(features[..., 1:2]), np.sin(features[..., 1:2]), scaled[..., 1:],
                        features[..., 3:4], 2.0 * features[..., 4:] - 1.0], axis=-1)
    event = stats.event.apply(_event_inputs(event_features(events)))
    return event, (x * real[..., None]).astype(np.float32), real.astype(np.float32), events.electron[:, 2].copy()


def multiplicity_from_model(event_std, stats: EicStandardisation, max_particles: int) -> np.ndarray:
    """Integer multiplicities of standardised event vectors, rounded and clipped to [1, max_particles]."""
    n = stats.event.invert(event_std)[:, 2]
    return np.clip(np.rint(n), 1, max_particles).astype(np.int64)


def from_model(event_std, particles, mask, phi_e, stats: EicStandardisation) -> eic.EventSet:
    """Invert :func:`to_model` (model output included): species by argmax, charge consistent with it."""
    event_in = stats.event.invert(event_std)
    # Guard on model output: Q^2 <= s (truth: <= s y); y in (0, 1) by the logistic.
    q2 = np.exp(np.minimum(event_in[:, 0], 2.0 * np.log(eic.sqrt_s())))
    y = 1.0 / (1.0 + np.exp(-np.clip(event_in[:, 1], -30.0, 30.0)))
    pt_e, eta_e = electron_from_dis(q2, y)
    event = np.stack([pt_e, eta_e, np.asarray(mask).sum(axis=1)], axis=1)
    particles = np.asarray(particles, np.float64)
    scaled = stats.particle.invert(particles[..., [0, 3]])
    phi = np.arctan2(particles[..., 2], particles[..., 1])
    features = np.concatenate([scaled[..., :1], phi[..., None], scaled[..., 1:], particles[..., 4:]], axis=-1)
    return events_from_features(event, features, mask, phi_e)


def sharp_fraction(particles, mask) -> float:
    """Fraction of real generated particles whose species entries (model space, {-1, +1} targets) have
    exactly one positive entry, within 0.5 of +1, and every other entry within 0.5 of -1."""
    one_hot = np.asarray(particles)[..., SPECIES_START:]
    real = np.asarray(mask) > 0.5
    top = one_hot.max(axis=-1)
    second = np.sort(one_hot, axis=-1)[..., -2]
    sharp = (np.abs(top - 1.0) < 0.5) & (second < -0.5)
    return float(sharp[real].mean()) if real.any() else float("nan")
