"""``--mode=generate`` of the calorimeter experiment (:mod:`fpcd.runner.generation`): showers at
chosen generated momenta and polar angles from the saved standardisations, in the ePIC point-cloud
layout (``hcal_cells (N, max_cells, 5)``, ``cluster (N, 4)``; :func:`fpcd.data.calo.load` reads it).

:class:`CaloGeneration` is a mixin of :class:`fpcd.experiments.calo.CaloExperiment`.
"""

from __future__ import annotations

import numpy as np

from fpcd.config import ConfigError, require_range
from fpcd.data.standardisation import Standardisation
from fpcd.runner.generation import warn_beyond_training


class CaloGenerationData:
    """What :meth:`fpcd.experiments.calo.CaloExperiment.generate` reads of the data, rebuilt from
    the saved generation state (no training showers)."""

    def __init__(self, state: dict):
        self.cluster_stats = Standardisation.from_dict(state["cluster_stats"])
        self.cond_stats = Standardisation.from_dict(state["cond_stats"])
        self.max_cells, self.phi = int(state["max_cells"]), float(state["phi"])
        self.bounds = {k: tuple(np.asarray(v, np.float32) for v in pair) for k, pair in state["bounds"].items()}
        self.momentum_range, self.theta_range = tuple(state["momentum_range"]), tuple(state["theta_range"])
        if "cell_stats" in state:
            self.cell_stats, self.lengths = Standardisation.from_dict(state["cell_stats"]), tuple(state["lengths"])
        if "image_stats" in state:
            self.image_stats, self.image_shape = Standardisation.from_dict(state["image_stats"]), tuple(state["image_shape"])

    @staticmethod
    def stage2_cond(cluster_std, cond_std):
        return np.concatenate([cond_std, cluster_std], axis=1).astype(np.float32)


class CaloGeneration:
    """The generate-mode hooks of the calorimeter experiment."""

    def generation_state(self, data) -> dict:
        state = {"cluster_stats": data.cluster_stats.to_dict(), "cond_stats": data.cond_stats.to_dict(),
                 "max_cells": data.max_cells, "phi": data.phi,
                 "bounds": {k: [np.asarray(v).tolist() for v in pair] for k, pair in data.bounds.items()},
                 "momentum_range": [float(data.train.momentum.min()), float(data.train.momentum.max())],
                 "theta_range": [float(data.train.theta.min()), float(data.train.theta.max())]}
        if self.cfg.representation == "cloud":
            state.update(cell_stats=data.cell_stats.to_dict(), lengths=list(data.lengths))
        else:
            state.update(image_stats=data.image_stats.to_dict(), image_shape=list(data.image_shape))
        return state

    def generation_data(self, state: dict) -> CaloGenerationData:
        return CaloGenerationData(state)

    def validate_generate(self) -> None:
        if self.cfg.representation != "cloud":
            raise ConfigError("--mode=generate writes the point-cloud layout; the image representation's showers "
                              "are in samples.h5 (voxels) from --mode=sample")
        for field, high, unit in (("momentum_range", float("inf"), "GeV"), ("theta_range", 60.0, "deg")):
            if self.cfg.generate[field] != ():
                require_range(self.cfg, f"generate.{field}", low=0.0, high=high, unit=unit,
                              open_low=field == "momentum_range")

    def generation_conditions(self, data: CaloGenerationData, num_events: int, rng) -> dict:
        """Momenta log-uniform in ``generate.momentum_range`` (GeV) and polar angles uniform in
        ``generate.theta_range`` (deg), by default the training ranges; a range beyond the
        training one is warned about, naming both."""
        g = self.cfg.generate
        out = {}
        for field, name in (("momentum_range", "momentum"), ("theta_range", "theta")):
            trained = getattr(data, field)
            asked = tuple(float(v) for v in g[field]) or trained
            warn_beyond_training(name, asked, trained, "GeV" if name == "momentum" else "deg")
            u = rng.random(num_events)
            out[name] = (np.exp(np.log(asked[0]) + u * np.log(asked[1] / asked[0])) if name == "momentum"
                         else asked[0] + u * (asked[1] - asked[0]))
        return out

    def generate_chunk(self, data, models, run, key, sampler, num_events, conditions):
        arrays, _ = self.generate(data, models, "", run, key, sampler, momentum=conditions["momentum"],
                                  theta=conditions["theta"])
        return {"hcal_cells": arrays["hcal_cells"], "cluster": arrays["cluster"], "keep": arrays["finite"]}
