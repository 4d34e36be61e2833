"""The CaloChallenge 2022 high-level features and separation power (arXiv 2410.21611), with the
definitions of the challenge's own evaluation (``HighLevelFeatures``, ``evaluate.py``).

Voxel positions are the bin centres of :class:`fpcd.data.calochallenge.CylindricalGeometry`
(radial midpoint ``r``, angular midpoint ``alpha`` in ``[-pi, pi)``), seen in the transverse plane
as ``eta = r cos(alpha)`` and ``phi = r sin(alpha)`` (mm, the challenge's names). Per shower:

* ``E_ratio``: the total deposited energy over the incident energy;
* ``E_layer_<l>``: the energy of each layer with voxels;
* ``EC_eta_<l>``, ``EC_phi_<l>``: the centre of energy of each layer binned in angle,
  ``sum(x E) / (sum(E) + 1e-16)``;
* ``width_eta_<l>``, ``width_phi_<l>``: its width, ``sqrt(max(<x^2> - <x>^2, 0))`` with the same
  energy weights.
"""

from __future__ import annotations

import numpy as np

from fpcd.data.calochallenge import CylindricalGeometry

EPSILON = 1e-16  # the challenge's guard against empty layers


def high_level_features(showers, incident_energies, geometry: CylindricalGeometry) -> dict[str, np.ndarray]:
    """The challenge's high-level features of ``showers (N, voxels)`` (MeV) at
    ``incident_energies (N,)`` (MeV): ``name -> (N,)`` float64 arrays, in the order of the module
    docstring (layers ascending)."""
    showers = np.asarray(showers, np.float64)
    energies = np.asarray(incident_energies, np.float64).reshape(-1)
    if showers.ndim != 2 or showers.shape[1] != geometry.num_voxels or len(showers) != len(energies):
        raise ValueError(f"high_level_features: need showers (N, {geometry.num_voxels}) and N incident energies, "
                         f"got {showers.shape} and {energies.shape}")
    centres = geometry.voxel_centres()
    eta, phi = centres["r"] * np.cos(centres["alpha"]), centres["r"] * np.sin(centres["alpha"])
    features = {"E_ratio": showers.sum(axis=1) / energies}
    slices = geometry.layer_slices()
    for layer, s in zip(geometry.layers, slices):
        if layer.num_voxels:
            features[f"E_layer_{layer.layer}"] = showers[:, s].sum(axis=1)
    for layer, s in zip(geometry.layers, slices):
        if layer.num_voxels and layer.num_alpha > 1:
            e = showers[:, s]
            total = e.sum(axis=1) + EPSILON
            for name, x in (("eta", eta[s]), ("phi", phi[s])):
                mean = (e * x).sum(axis=1) / total
                second = (e * x * x).sum(axis=1) / total
                features[f"EC_{name}_{layer.layer}"] = mean
                features[f"width_{name}_{layer.layer}"] = np.sqrt(np.clip(second - mean**2, 0.0, None))
    return features


def separation_power(reference, generated, bins) -> float:
    """The challenge's histogram distance ``1/2 sum_i (h1_i - h2_i)^2 / (h1_i + h2_i)`` of the two
    samples' normalised histograms over ``bins`` (edges; entries outside are dropped, as
    ``np.histogram`` does): 0 for identical histograms, 1 for disjoint ones, and 1 when one sample
    has no entry inside the bins and the other has (0 when neither has)."""
    edges = np.asarray(bins, np.float64)
    counts = [np.histogram(np.asarray(sample, np.float64), bins=edges)[0].astype(np.float64)
              for sample in (reference, generated)]
    totals = [c.sum() for c in counts]
    if min(totals) == 0:
        return 0.0 if max(totals) == 0 else 1.0
    h1, h2 = (c / t for c, t in zip(counts, totals))
    return float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + EPSILON)))


def high_level_vector(features: dict[str, np.ndarray], incident_energies) -> np.ndarray:
    """``(N, F)``: the challenge's high-level input of its classifier and of FPD/KPD (its
    ``prepare_high_data_for_classifier``): ``log10 E_inc``, ``log10(E_layer + 1e-8)`` per layer, then
    ``EC_eta / 100``, ``EC_phi / 100``, ``width_eta / 100``, ``width_phi / 100`` per angular-binned
    layer (mm / 100), from :func:`high_level_features`."""
    names = list(features)
    layers = [n for n in names if n.startswith("E_layer_")]
    columns = [np.log10(np.asarray(incident_energies, np.float64).reshape(-1))]
    columns += [np.log10(features[n] + 1e-8) for n in layers]
    for kind in ("EC_eta_", "EC_phi_", "width_eta_", "width_phi_"):
        columns += [features[n] / 100.0 for n in names if n.startswith(kind)]
    return np.stack(columns, axis=1)


def physics_distances(reference: dict, generated: dict, *, min_samples: int = 20_000, max_samples: int = 50_000,
                      kpd_batch_size: int = 5_000, seed: int = 42, fpd_batches: int = 20, fpd_points: int = 10) -> dict:
    """FPD and KPD (arXiv 2211.10295; :func:`fpcd.metrics.jets.fpd`, :func:`~fpcd.metrics.jets.kpd`)
    between two high-level vectors (:func:`high_level_vector`), as the challenge's final paper
    quotes them: ``{"fpd", "fpd_error", "kpd", "kpd_error"}`` (raw values; the paper prints x1e3).
    FPD fits ``fpd_batches`` draws at each of ``fpd_points`` sample sizes (jetnet's 20 and 10; each
    draw is one matrix square root of the vector's size, about 0.15 s for dataset 2's 226 features)."""
    from fpcd.metrics.jets import fpd, kpd

    fpd_value, fpd_error = fpd(reference, generated, min_samples=min_samples, max_samples=max_samples, seed=seed,
                               num_batches=fpd_batches, num_points=fpd_points)
    kpd_value, kpd_error = kpd(reference, generated, batch_size=kpd_batch_size, seed=seed)
    return {"fpd": float(fpd_value), "fpd_error": float(fpd_error), "kpd": float(kpd_value),
            "kpd_error": float(kpd_error)}
