"""What the anomaly experiment (:mod:`fpcd.experiments.anomaly`) trains on and scores: each
background's standardisation and training arrays (with the multiplicity dequantised) and the
held-out jets of every type."""

from __future__ import annotations

import numpy as np

from fpcd.data import jet_transforms
from fpcd.data.jetnet import JetSet
from fpcd.experiments.two_stage import split

MULTIPLICITY = 3  # the jet features' multiplicity column


class BackgroundData:
    """One background's standardisation, training arrays and the standardised jets it scores."""

    def __init__(self, types: tuple[str, ...], train: dict, scored: dict):
        self.types = types
        pooled = JetSet(types[0], np.concatenate([train[t].particle_features for t in types]),
                        np.concatenate([train[t].jet_features for t in types]))
        self.stats = jet_transforms.fit_standardisation(pooled)
        self.particles, self.mask, self.jet = jet_transforms.preprocess(pooled, self.stats)
        self.scored = {t: jet_transforms.preprocess(jets, self.stats) for t, jets in scored.items()}

    def __len__(self):
        return len(self.jet)

    def dequantised(self, jet, seed: int, step: int, batch_size: int, rows: slice) -> np.ndarray:
        """The rows ``rows`` of a global training batch of standardised jet features with uniform
        dequantisation noise ``u ~ U(-1/2, 1/2)`` added to the multiplicity (in particles), drawn
        from ``(seed, step)`` alone so that every process and a resumed run see the same noise.

        The jet stage thus learns a density that is flat within each integer's bin instead of
        spikes at integers, and its density at an integer ``N`` (where jets are scored)
        approximates the probability of ``N``."""
        noise = np.random.default_rng([seed, step, 7]).uniform(-0.5, 0.5, batch_size)[rows]
        jet = np.array(jet, np.float32, copy=True)
        jet[:, MULTIPLICITY] += (noise / self.stats.jet.std[MULTIPLICITY]).astype(np.float32)
        return jet


class AnomalyData:
    """The scored jets of every type (physical units, centred) and each background's model data."""

    def __init__(self, backgrounds: dict, jets_by_type: dict, test_fraction: float, num_scored: int):
        self.types = tuple(jets_by_type)
        train, self.scored = {}, {}
        for jet_type, jets in jets_by_type.items():
            jets = JetSet(jet_type, jet_transforms.recenter(jets.particle_features), jets.jet_features)
            train[jet_type], test = split(jets, test_fraction)
            self.scored[jet_type] = test.take(slice(0, num_scored))
        self.backgrounds = {name: BackgroundData(tuple(types), train, self.scored)
                            for name, types in backgrounds.items()}
