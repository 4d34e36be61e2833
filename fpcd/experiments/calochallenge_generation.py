"""``--mode=generate`` of the CaloChallenge experiment (:mod:`fpcd.runner.generation`): showers at
chosen incident energies from the saved :class:`GenerationState`, in the challenge's layout.

:class:`CaloChallengeGeneration` is a mixin of
:class:`fpcd.experiments.calochallenge.CaloChallengeExperiment` (it calls its ``generate_showers``).
"""

from __future__ import annotations

import numpy as np

from fpcd.config import ConfigError, require_range
from fpcd.data import calochallenge as cc
from fpcd.data.standardisation import Standardisation
from fpcd.runner.generation import warn_beyond_training

MIN_LAYER_SHARE = 1e-6  # layer shares are modelled as log10(max(share, MIN_LAYER_SHARE)): an empty layer is the floor


class GenerationState:
    """What generating showers needs besides the trained models: the geometry, the standardisations,
    the padded lengths and the training range of incident energies. Saved with the workdir
    (:meth:`to_dict`), so that ``--mode=generate`` needs no training data."""

    def __init__(self, *, dataset: str, layer_energies: bool, cond_stats: Standardisation,
                 global_stats: Standardisation, point_stats: Standardisation, max_points: int, lengths: tuple,
                 energy_range_mev: tuple, threshold_mev: float, bounds: dict | None = None):
        self.dataset, self.layer_energies = str(dataset), bool(layer_energies)
        self.geometry = cc.dataset_geometry(self.dataset)
        self.cond_stats, self.global_stats, self.point_stats = cond_stats, global_stats, point_stats
        self.max_points, self.lengths = int(max_points), tuple(int(v) for v in lengths)
        self.energy_range_mev = tuple(float(v) for v in energy_range_mev)
        self.threshold_mev = float(threshold_mev)
        self.bounds = bounds or {}

    @property
    def num_global(self) -> int:
        return 2 + (self.geometry.num_layers if self.layer_energies else 0)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "layer_energies": self.layer_energies, "cond_stats": self.cond_stats.to_dict(),
                "global_stats": self.global_stats.to_dict(), "point_stats": self.point_stats.to_dict(),
                "max_points": self.max_points, "lengths": list(self.lengths),
                "energy_range_mev": list(self.energy_range_mev), "threshold_mev": self.threshold_mev,
                "bounds": {k: [np.asarray(v).tolist() for v in pair] for k, pair in self.bounds.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationState":
        return cls(dataset=d["dataset"], layer_energies=d["layer_energies"],
                   cond_stats=Standardisation.from_dict(d["cond_stats"]),
                   global_stats=Standardisation.from_dict(d["global_stats"]),
                   point_stats=Standardisation.from_dict(d["point_stats"]), max_points=d["max_points"],
                   lengths=d["lengths"], energy_range_mev=d["energy_range_mev"], threshold_mev=d["threshold_mev"],
                   bounds={k: tuple(np.asarray(v, np.float32) for v in pair) for k, pair in d["bounds"].items()})

    def conditions(self, incident_energies) -> np.ndarray:
        return self.cond_stats.apply(np.log10(np.asarray(incident_energies, np.float64)).reshape(-1, 1))



class CaloChallengeGeneration:
    """The generate-mode hooks of the CaloChallenge experiment."""

    def generation_state(self, data) -> dict:
        return data.state.to_dict()

    def generation_data(self, state: dict):
        """The saved state, with the readout threshold of this config (it acts on generated showers only)."""
        state = GenerationState.from_dict(state)
        state.threshold_mev = float(self.cfg.data.threshold_mev)
        return GenerationData(state)

    def validate_generate(self) -> None:
        g = self.cfg.generate
        if not isinstance(g.conditions_file, str):
            raise ConfigError(f"config.generate.conditions_file must be a path (a string), got {g.conditions_file!r}")
        asked = g.energy_range != () and g.energy_range is not None
        if asked:
            require_range(self.cfg, "generate.energy_range", low=0.0, high=float("inf"), unit="MeV", open_low=True)
        if g.conditions_file and asked:
            raise ConfigError("config.generate.conditions_file and config.generate.energy_range are both set; "
                              "give one")

    def generation_conditions(self, data, num_events: int, rng) -> dict:
        """``incident_energies (num_events,)`` MeV: those of ``generate.conditions_file`` (an hdf5
        with ``incident_energies``, reused in order and cycled), or log-uniform in
        ``generate.energy_range`` (default: the training range); a range beyond the training range
        is warned about, naming both."""
        g, state = self.cfg.generate, data.state
        low, high = state.energy_range_mev
        if g.conditions_file:
            energies = read_incident_energies(g.conditions_file)
            energies = energies[np.arange(num_events) % len(energies)]
            asked = (float(energies.min()), float(energies.max()))
        else:
            asked = tuple(float(v) for v in g.energy_range) or (low, high)
            energies = np.exp(rng.uniform(np.log(asked[0]), np.log(asked[1]), num_events))
        warn_beyond_training("incident energies", asked, (low, high), "MeV")
        return {"incident_energies": energies}

    def generate_chunk(self, data, models, run, key, sampler, num_events, conditions):
        arrays, _ = self.generate_showers(data.state, models, run, key, sampler, conditions["incident_energies"])
        return {"incident_energies": arrays["incident_energies"], "showers": arrays["showers"], "keep": arrays["finite"]}


class GenerationData:
    """The ``data`` of ``--mode=generate``: only the saved :class:`GenerationState`."""

    def __init__(self, state: GenerationState):
        self.state = state


def read_incident_energies(path: str) -> np.ndarray:
    """The ``incident_energies`` of an hdf5 file (MeV, finite and positive; a file in GeV is refused)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "incident_energies" not in f:
                raise ConfigError(f"config.generate.conditions_file={path!r}: no dataset 'incident_energies' "
                                  f"(found {sorted(f)})")
            energies = np.asarray(f["incident_energies"][()], np.float64).reshape(-1)
    except OSError as err:
        raise ConfigError(f"config.generate.conditions_file={path!r}: cannot read it ({err})") from None
    if not len(energies) or not np.all(np.isfinite(energies)) or np.any(energies <= 0):
        raise ConfigError(f"config.generate.conditions_file={path!r}: incident energies must be finite and positive")
    if float(np.median(energies)) < 50.0:
        raise ConfigError(f"config.generate.conditions_file={path!r}: median incident energy "
                          f"{np.median(energies):.3g}; CaloChallenge energies are in MeV (this looks like GeV)")
    return energies


def rescale(showers, state: GenerationState, total, globals_=None) -> np.ndarray:
    """Showers scaled to the sampled deposited energy ``total (N,)`` (MeV): with ``globals_`` (the
    layer shares of stage 1) each layer with hits first takes its sampled share (a share at the
    floor of empty layers empties it); then voxels below the readout threshold are cut."""
    showers = np.asarray(showers, np.float64)
    if globals_ is not None:
        # An empty layer is MIN_LAYER_SHARE in training: a sampled share within a factor 3 of it
        # empties the layer, instead of scaling its points to a share no real layer has.
        log_shares = globals_[:, 2:]
        shares = np.where(log_shares < np.log10(3 * MIN_LAYER_SHARE), 0.0, 10.0 ** log_shares)
        for i, s in enumerate(state.geometry.layer_slices()):
            layer_sum = showers[:, s].sum(axis=1)
            scale = np.where(layer_sum > 0, shares[:, i] * total / np.where(layer_sum > 0, layer_sum, 1.0), 0.0)
            showers[:, s] *= scale[:, None]
    sums = showers.sum(axis=1)
    showers *= np.where(sums > 0, total / np.where(sums > 0, sums, 1.0), 0.0)[:, None]
    showers[showers < state.threshold_mev] = 0.0
    return showers.astype(np.float32)
