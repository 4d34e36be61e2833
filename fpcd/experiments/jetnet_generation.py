"""``--mode=generate`` of the JetNet experiment (:mod:`fpcd.runner.generation`): jets of the
types of ``generate.jet_types`` from the saved standardisations, in the JetNet layout.

:class:`JetNetGeneration` is a mixin of :class:`fpcd.experiments.jetnet.JetNetExperiment`.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np

from fpcd.data import jet_transforms
from fpcd.errors import ConfigError


class JetNetGeneration:
    """The generate-mode hooks of the JetNet experiment."""

    def generation_state(self, data) -> dict:
        return {"types": list(data.types), "stats": {t: data.stats[t].to_dict() for t in data.types},
                "bounds": {t: {k: [np.asarray(v).tolist() for v in pair] for k, pair in data.bounds[t].items()}
                           for t in data.types}}

    def generation_data(self, state: dict):
        """What :meth:`generate` reads of the data: the types, their standardisations and bounds."""
        types = tuple(state["types"])
        return SimpleNamespace(types=types,
                               stats={t: jet_transforms.JetStandardisation.from_dict(state["stats"][t]) for t in types},
                               bounds={t: {k: tuple(np.asarray(v, np.float32) for v in pair)
                                           for k, pair in state["bounds"][t].items()} for t in types})

    def validate_generate(self) -> None:
        types = tuple(self.cfg.generate.jet_types)
        unknown = [t for t in types if t not in self.cfg.data.jet_types]
        if unknown or len(set(types)) != len(types):
            raise ConfigError(f"config.generate.jet_types={types!r}: unknown or repeated type(s) {unknown}; this run "
                              f"was trained on {tuple(self.cfg.data.jet_types)}")

    def generation_conditions(self, data, num_events, rng) -> dict:
        """Event ``i`` is a jet of type ``generate.jet_types[i % len]`` (default: every trained type)."""
        types = tuple(self.cfg.generate.jet_types) or data.types
        return {"jet_type": np.array([data.types.index(types[i % len(types)]) for i in range(num_events)])}

    def generate_chunk(self, data, models, run, key, sampler, num_events, conditions):
        """Jets in the JetNet layout (``particle_features (N, P, 4)``, ``jet_features (N, 4)``) and
        ``jet_type`` (the index into ``config.data.jet_types`` of each jet), in the events' order.
        Jets whose model output was not finite are left out (``keep``): the events of one type share
        their condition, so a type's surviving jets fill its first events."""
        index = np.asarray(conditions["jet_type"])
        out = {"particle_features": None, "jet_features": None}
        keep = np.zeros(len(index), bool)
        for t, jet_type in enumerate(data.types):
            members = np.flatnonzero(index == t)
            if not len(members):
                continue
            arrays, _ = self.generate(data, models, jet_type, run, jax.random.fold_in(key, t), sampler,
                                      num_samples=len(members))
            survivors = members[:len(arrays["jet_features"])]
            for name in out:
                if out[name] is None:
                    out[name] = np.zeros((len(index),) + arrays[name].shape[1:], arrays[name].dtype)
                out[name][survivors] = arrays[name]
            keep[survivors] = True
        return {**out, "jet_type": index.astype(np.int32), "keep": keep}
