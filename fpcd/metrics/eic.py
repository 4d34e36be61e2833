"""Observables and physics checks of EIC DIS events (:class:`fpcd.data.eic.EventSet`).

* :func:`observables`: per event the electron pT and eta, the multiplicity and the DIS variables
  of the electron (log10 Q^2, log10 x, y); per particle (real particles after the electron, pooled)
  eta, the azimuth from the recoil direction and log(pT_i / pT_e), with each particle's species.
* :func:`w1_block`: W1 of each observable against truth, and per species (fraction, W1 of eta and
  log pT ratio).
* :func:`conservation`: charge (electron included, beams e- p: 0), energy-fraction sum (2) and
  transverse-momentum balance (0).
* :func:`classifier_features`: the per-event rows the generated-vs-truth classifier sees.
"""

from __future__ import annotations

import numpy as np

from fpcd.data import eic
from fpcd.data.kinematics import wrap_phi
from fpcd.metrics.distances import wasserstein_1d

EVENT_OBSERVABLES = ("electron_pt", "electron_eta", "multiplicity", "log10_q2", "log10_x", "y")
PARTICLE_OBSERVABLES = ("eta", "phi_recoil", "log_pt_ratio")
OBSERVABLES = EVENT_OBSERVABLES + PARTICLE_OBSERVABLES
Z_SUM_TOLERANCE = 0.05  # "within 5 % of 2"
LEADING = 5  # leading particles whose features the classifier sees
MIN_SPECIES_ENTRIES = 20  # per-species W1 only where both samples hold this many particles


def observables(events: eic.EventSet) -> dict:
    """Event-level arrays ``(N,)`` of :data:`EVENT_OBSERVABLES` and pooled particle arrays of
    :data:`PARTICLE_OBSERVABLES` plus ``species`` (class index per pooled particle)."""
    p = events.particles.astype(np.float64)
    real = events.mask[:, 1:]
    electron = p[:, 0]
    k = eic.dis_kinematics(electron[:, :3])
    rest = p[:, 1:]
    log_pt = np.log(np.maximum(rest[..., 0], 1e-12) / electron[:, None, 0])
    phi = wrap_phi(rest[..., 2] - electron[:, None, 2] - np.pi)
    return {
        "electron_pt": electron[:, 0], "electron_eta": electron[:, 1], "multiplicity": real.sum(axis=1).astype(float),
        "log10_q2": np.log10(np.maximum(k[:, 0], 1e-12)), "log10_x": np.log10(np.clip(k[:, 1], 1e-12, None)),
        "y": k[:, 2],
        "eta": rest[..., 1][real], "phi_recoil": phi[real], "log_pt_ratio": log_pt[real],
        "species": eic.species_index(rest[..., 3][real]),
    }


def species_fractions(obs: dict) -> np.ndarray:
    """``(9,)`` fraction of the particles in each class."""
    counts = np.bincount(obs["species"][obs["species"] >= 0], minlength=len(eic.SPECIES)).astype(float)
    return counts / max(counts.sum(), 1.0)


def w1_block(truth: dict, generated: dict) -> dict:
    """W1 of every observable, and per species the fraction difference and the W1 of eta and log pT
    ratio (None where a species has fewer than :data:`MIN_SPECIES_ENTRIES` particles in either)."""
    out = {"w1": {name: wasserstein_1d(truth[name], generated[name]) if len(generated[name]) else None
                  for name in OBSERVABLES}}
    fractions_t, fractions_g = species_fractions(truth), species_fractions(generated)
    species = {}
    for index, name in enumerate(eic.SPECIES):
        t, g = truth["species"] == index, generated["species"] == index
        row = {"fraction_truth": float(fractions_t[index]), "fraction": float(fractions_g[index]),
               "fraction_abs_difference": float(abs(fractions_g[index] - fractions_t[index]))}
        for obs in ("eta", "log_pt_ratio"):
            enough = t.sum() >= MIN_SPECIES_ENTRIES and g.sum() >= MIN_SPECIES_ENTRIES
            row[f"w1_{obs}"] = wasserstein_1d(truth[obs][t], generated[obs][g]) if enough else None
        species[name] = row
    out["species"] = species
    return out


def ratios_to_floor(block: dict, floor: dict) -> dict:
    """``w1 / floor`` per observable (``w1_over_floor``, with its ``_max`` and ``_mean``) and per species
    quantity (``species_over_floor``; None where either is missing or 0)."""

    def ratio(a, b):
        return None if a is None or b is None or b <= 0 else float(a / b)

    out = {"w1_over_floor": {k: ratio(v, floor["w1"][k]) for k, v in block["w1"].items()}, "species_over_floor": {}}
    for name, row in block["species"].items():
        f = floor["species"][name]
        out["species_over_floor"][name] = {k: ratio(row[k], f[k]) for k in ("fraction_abs_difference", "w1_eta",
                                                                             "w1_log_pt_ratio")}
    values = [v for v in out["w1_over_floor"].values() if v is not None]
    out["w1_over_floor_max"] = float(max(values)) if values else None
    out["w1_over_floor_mean"] = float(np.mean(values)) if values else None
    return out


def charge_sums(events: eic.EventSet) -> np.ndarray:
    """``(N,)`` sum of the true charges over every entry, the electron included."""
    return events.charges.sum(axis=1)


def z_sums(events: eic.EventSet) -> np.ndarray:
    """``(N,)`` sum of z = 2 E / sqrt(s) over every entry, the electron included."""
    return np.where(events.mask, events.particles[..., 4].astype(np.float64), 0.0).sum(axis=1)


def pt_imbalance(events: eic.EventSet) -> np.ndarray:
    """``(N,)`` |sum of the transverse momenta of every entry| / pT_e (truth: 0 over a complete event)."""
    p = events.particles.astype(np.float64)
    px = np.where(events.mask, p[..., 0] * np.cos(p[..., 2]), 0.0).sum(axis=1)
    py = np.where(events.mask, p[..., 0] * np.sin(p[..., 2]), 0.0).sum(axis=1)
    return np.hypot(px, py) / p[:, 0, 0]


def conservation(events: eic.EventSet) -> dict:
    """Fraction of events whose charges sum to 0, the distribution of the z sum (truth: 2) and of the
    transverse-momentum imbalance (truth: 0)."""
    charge, z, imbalance = charge_sums(events), z_sums(events), pt_imbalance(events)
    return {
        "fraction_charge_conserved": float(np.mean(charge == 0)),
        "charge_sum_mean": float(charge.mean()), "charge_sum_std": float(charge.std()),
        "fraction_z_sum_within_5_percent": float(np.mean(np.abs(z - 2.0) < 2.0 * Z_SUM_TOLERANCE)),
        "z_sum_mean": float(z.mean()), "z_sum_std": float(z.std()),
        "z_sum_quantiles_5_50_95": np.quantile(z, [0.05, 0.5, 0.95]).tolist(),
        "fraction_pt_balanced_within_5_percent": float(np.mean(imbalance < Z_SUM_TOLERANCE)),
        "pt_imbalance_median": float(np.median(imbalance)),
    }


def classifier_features(events: eic.EventSet, *, sums: bool = True) -> np.ndarray:
    """``(N, F)`` per-event rows for the generated-vs-truth classifier: electron (pT, eta), the
    multiplicity, DIS variables, the conservation sums (charge, z, transverse-momentum imbalance over
    pT_e; left out with ``sums=False``, to see what else separates the samples), the species counts,
    the mean and spread of particle eta and log pT ratio, and the (eta, phi from the recoil, log pT
    ratio, charge) of the :data:`LEADING` leading particles (zeros where absent)."""
    p = events.particles.astype(np.float64)
    real = events.mask[:, 1:]
    obs = observables(events)
    pt_e = p[:, 0, 0]
    rest = p[:, 1:]
    log_pt = np.where(real, np.log(np.maximum(rest[..., 0], 1e-12) / pt_e[:, None]), 0.0)
    eta = np.where(real, rest[..., 1], 0.0)
    phi = np.where(real, wrap_phi(rest[..., 2] - p[:, :1, 2] - np.pi), 0.0)
    charge = events.charges[:, 1:].astype(float)
    cls = eic.species_index(rest[..., 3])
    counts = np.stack([np.sum(real & (cls == i), axis=1) for i in range(len(eic.SPECIES))], axis=1)
    n = np.maximum(real.sum(axis=1), 1)

    def spread(x, mean):
        return np.sqrt(np.sum(np.where(real, (x - mean[:, None]) ** 2, 0.0), axis=1) / n)

    mean_eta, mean_pt = eta.sum(axis=1) / n, log_pt.sum(axis=1) / n
    columns = [pt_e, p[:, 0, 1], obs["multiplicity"], obs["log10_q2"], obs["log10_x"], obs["y"],
               *((charge_sums(events), z_sums(events), pt_imbalance(events)) if sums else ()), mean_eta,
               spread(eta, mean_eta), mean_pt, spread(log_pt, mean_pt)]
    leading = np.stack([eta, phi, log_pt, charge], axis=-1)[:, :LEADING].reshape(len(p), -1)
    return np.concatenate([np.stack(columns, axis=1), counts, leading], axis=1).astype(np.float32)
