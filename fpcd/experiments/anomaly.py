"""Anomaly detection on jets with the probability-flow likelihood (Mikuni & Nachman 2023).

For each *background* (``config.backgrounds``: name -> jet types, e.g. ``qcd = (g, q)`` and the
reverse test ``top = (t,)``) a two-stage model is trained on that background alone:

* stage ``jet_<name>``: a :class:`~fpcd.nets.ResMLP` score model of the standardised jet features
  (pT, eta, mass, multiplicity), unconditional, trained with the integer multiplicity dequantised
  (uniform noise within its bin, so that the density at an integer approximates its probability
  instead of sampling a spike);
* stage ``particle_<name>``: a :class:`~fpcd.nets.SetTransformer` score model of the standardised
  constituents (eta_rel, phi_rel, log pt_rel) conditioned on the jet features, padding masked out.

Both are standardised with the statistics of the background's pooled training jets, and every
scored jet, of whatever type, goes through the same transformation. The anomaly score of a jet
with ``N`` real particles is

    score = -log p(jet features) - log p(particles | jet features) / N,

both terms in nats in the model's (standardised) coordinates, from
:func:`fpcd.likelihood.log_likelihood`: the jet stage with the exact divergence, the particle
stage with Hutchinson's estimator (``sampling.runs`` with ``divergence="hutchinson"``) or, on a
subset, the exact divergence (``divergence="exact"``) to check the estimator. A linear
standardisation adds the same constant to every jet's jet term and per-particle term, so AUCs are
those of the physical features' density up to the log-pT map of the constituents.

The runner's ``sample`` step computes the likelihoods: one group per background, written to
``scores_<name>.h5`` (per run: ``type_index``, ``log_p_jet``, ``log_p_particles``,
``num_particles``, ``mass``, ``score``); ``eval`` turns them into ``metrics.json`` (per background
and anomalous type: AUC, max SIC and SIC at 10 % signal efficiency of the likelihood score, of
each of its two terms, of the jet mass alone and of the multiplicity alone; the mean held-out
log-likelihood; the cost per jet; the exact-vs-Hutchinson agreement) and the figures
``anomaly_scores_<name>.png`` and ``anomaly_roc_<name>.png``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from fpcd.config import (ConfigError, get_field, require_float, require_int, require_models,
                         require_strings, validate_sde, validate_train)
from fpcd.data.jetnet import JetDataError
from fpcd.experiments.anomaly_data import MULTIPLICITY, AnomalyData, BackgroundData  # noqa: F401  (also here)
from fpcd.experiments.anomaly_evaluation import AnomalyEvaluation
from fpcd.experiments.jetnet import NUM_JET_FEATURES, NUM_PARTICLE_FEATURES, JetNetExperiment, validate_jet_data
from fpcd.experiments.two_stage import array_stage, resmlp_from, set_transformer_from
from fpcd.likelihood import check_likelihood_options, log_likelihood
from fpcd.nets import score_fn_from
from fpcd.runner import Experiment, batch_placement, main_process_first, run_batched

SCORE_ARRAYS = ("type_index", "log_p_jet", "log_p_particles", "num_particles", "mass", "score")
RUN_OPTIONS = {"divergence": "hutchinson", "probes": 1, "num_jets": 0, "rtol": 1e-3, "atol": 1e-3, "t_min": 1e-5}


def anomaly_score(log_p_jet, log_p_particles, num_particles) -> np.ndarray:
    """``-log p(jet) - log p(particles | jet) / N`` per jet (higher = more anomalous)."""
    return -np.asarray(log_p_jet, np.float64) - np.asarray(log_p_particles, np.float64) / np.asarray(num_particles)


def run_options(run: dict) -> dict:
    """A likelihood run's options with their defaults (:data:`RUN_OPTIONS`)."""
    return {**RUN_OPTIONS, **{k: v for k, v in run.items() if k != "method"}}


class AnomalyExperiment(AnomalyEvaluation, Experiment):
    KEY_NAMES = ("models", "train_global", "train_set", "sampling")
    IDENTITY_FIELDS = ("experiment", "seed", "data", "backgrounds", "sde", "jet_model", "particle_model",
                       "train_set.prediction", "train_global.prediction")
    TRAIN_SECTIONS = ("train_global", "train_set")
    FIELDS_RENAMED = {"train_jet": "train_global", "train": "train_set"}  # the stage sections' old names

    # --- config --------------------------------------------------------------------------------

    def validate(self, num_devices: int) -> None:
        """Check every field (the likelihood runs replace the sampler runs of other experiments)."""
        cfg = self.cfg
        require_int(cfg, "seed", minimum=0)
        validate_sde(cfg)
        for section in self.TRAIN_SECTIONS:
            validate_train(cfg, num_devices=num_devices, section=section)
        if "distill" in cfg and cfg.distill.rounds:
            raise ConfigError("config.distill.rounds: the anomaly experiment scores with the trained models' "
                              "likelihood and does not distil; set it to 0")
        types = validate_jet_data(cfg)
        backgrounds = get_field(cfg, "backgrounds")
        if not backgrounds:
            raise ConfigError("config.backgrounds is empty: name at least one background, e.g. {'qcd': ('g', 'q')}")
        for name in backgrounds:
            if not name.isidentifier():
                raise ConfigError(f"config.backgrounds.{name}: a background's name must be a plain identifier")
            background = require_strings(cfg, f"backgrounds.{name}")
            missing = [t for t in background if t not in types]
            if missing or len(set(background)) != len(background):
                raise ConfigError(f"config.backgrounds.{name}={background!r}: every background type must be one of "
                                  f"config.data.jet_types={types!r}, once (missing: {missing})")
            if len(background) == len(types):
                raise ConfigError(f"config.backgrounds.{name}={background!r} leaves no jet type to score as the "
                                  "anomaly; add types to config.data.jet_types")
        require_models(cfg, "jet_model", "particle_model")
        require_int(cfg, "sampling.num_samples", minimum=2)
        batch_size = require_int(cfg, "sampling.batch_size")
        if batch_size % num_devices:
            raise ConfigError(f"config.sampling.batch_size ({batch_size}) must be a multiple of the number of "
                              f"devices ({num_devices})")
        self.validate_runs()
        require_float(cfg, "eval.signal_efficiency", low=0.0, high=1.0, open_low=True)
        require_int(cfg, "eval.min_background")
        names = require_strings(cfg, "eval.evaluators")
        if [n for n in names if n not in self.evaluators()]:
            raise ConfigError(f"config.eval.evaluators={names!r}: this experiment has {tuple(self.evaluators())}")

    def validate_runs(self) -> None:
        runs = get_field(self.cfg, "sampling.runs")
        if not runs:
            raise ConfigError("config.sampling.runs is empty: name at least one likelihood run")
        num_full = 0
        for name, run in runs.items():
            field = f"sampling.runs.{name}"
            if run.get("method") != "likelihood":
                raise ConfigError(f"config.{field}.method must be 'likelihood' (the anomaly experiment's runs are "
                                  f"likelihood evaluations), got {run.get('method')!r}")
            unknown = sorted(set(run) - set(RUN_OPTIONS) - {"method"})
            if unknown:
                raise ConfigError(f"config.{field}: unknown option(s) {unknown}; a likelihood run takes "
                                  f"{sorted(RUN_OPTIONS)}")
            options = run_options(dict(run))
            try:
                check_likelihood_options(**{k: options[k] for k in ("divergence", "rtol", "atol", "t_min")})
            except ValueError as err:
                raise ConfigError(f"config.{field}: {err}") from None
            for key, minimum in (("probes", 1), ("num_jets", 0)):
                if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < minimum:
                    raise ConfigError(f"config.{field}.{key} must be an integer >= {minimum}, got {options[key]!r}")
            if options["divergence"] == "exact" and options["probes"] != 1:
                raise ConfigError(f"config.{field}.probes: the exact divergence takes no probes")
            num_full += options["num_jets"] == 0
        if num_full == 0:
            raise ConfigError("config.sampling.runs needs a run over every scored jet (num_jets=0): the anomaly "
                              "score's run")

    # --- data and models -----------------------------------------------------------------------

    @staticmethod
    def options_of(run: dict) -> dict:
        """A likelihood run's options with their defaults."""
        return run_options(run)

    @property
    def backgrounds(self) -> dict:
        return {name: tuple(types) for name, types in self.cfg.backgrounds.items()}

    def load_data(self) -> AnomalyData:
        """Every type's jets (generated and cached like the jets experiment's, or the real files)."""
        loader = JetNetExperiment(self.cfg, progress=self.progress)
        types = tuple(self.cfg.data.jet_types)
        try:
            jets = main_process_first(lambda: {t: loader.load_jets(t) for t in types})
        except JetDataError as err:
            raise ConfigError(str(err)) from None
        data = AnomalyData(self.backgrounds, jets, self.cfg.data.test_fraction, self.cfg.sampling.num_samples)
        for jet_type, scored in data.scored.items():
            if len(scored) < self.cfg.sampling.num_samples:
                raise ConfigError(f"config.sampling.num_samples={self.cfg.sampling.num_samples} jets of each type "
                                  f"are scored, but type {jet_type!r} holds only {len(scored)} test jets; lower it "
                                  "or raise config.data.num_jets")
        return data

    def stages(self, data: AnomalyData):
        """Per background ``index``: the jet stage (keys and seeds folded with the index; the
        multiplicity dequantised in every batch) and the particle stage."""
        cfg = self.cfg
        stages = []
        for index, (name, background) in enumerate(data.backgrounds.items()):
            k_jet, k_particle = jax.random.split(jax.random.fold_in(self.key("models"), index))
            jet_model = resmlp_from(cfg.jet_model, NUM_JET_FEATURES, key=k_jet)
            particle_model = set_transformer_from(cfg.particle_model, NUM_PARTICLE_FEATURES, cond_dim=NUM_JET_FEATURES,
                                                  key=k_particle)
            jet_seed = cfg.seed + 2 * index

            def dequantise(batch, step, rows, b=background, seed=jet_seed):
                return {"x": b.dequantised(batch["x"], seed, step, cfg.train_global.batch_size, rows)}

            stages += [array_stage(f"jet_{name}", jet_model, cfg.train_global,
                                   jax.random.fold_in(self.key("train_global"), index), seed=jet_seed,
                                   arrays={"x": background.jet}, transform=dequantise, probe=False),
                       array_stage(f"particle_{name}", particle_model, cfg.train_set,
                                   jax.random.fold_in(self.key("train_set"), index), seed=jet_seed + 1,
                                   arrays={"x": background.particles, "mask": background.mask,
                                           "cond": background.jet}, probe=False)]
        return tuple(stages)

    def training_examples(self, data: AnomalyData):
        """The smallest background's training jets (both sections draw from every background)."""
        count = min(len(b) for b in data.backgrounds.values())
        return {"train_global": count, "train_set": count}

    # --- likelihoods (the runner's sampling step) ----------------------------------------------

    def sample_groups(self, data):
        return tuple(data.backgrounds)

    def samples_file(self, group: str) -> str:
        return f"scores_{group}.h5"

    def samples_attrs(self, group):
        return {"background": group, "background_types": ",".join(self.backgrounds[group]),
                "types": ",".join(self.cfg.data.jet_types)}

    def generate(self, data: AnomalyData, models, group, run, key, sampler):
        """The likelihoods of the scored jets of every type under background ``group``'s models.

        Returns ``(arrays, info)``: the per-jet arrays of :data:`SCORE_ARRAYS` (types in
        ``data.types`` order, ``num_jets`` per type, or every scored jet) and the cost per jet of
        each stage (NFE: the largest over batches; ms per jet without compilation).
        """
        cfg = self.cfg
        options = run_options(run)
        background = data.backgrounds[group]
        n = options["num_jets"] or cfg.sampling.num_samples
        parts = {"particles": [], "mask": [], "jet": [], "type_index": [], "mass": []}
        for index, jet_type in enumerate(data.types):
            particles, mask, jet = background.scored[jet_type]
            for name, value in (("particles", particles[:n]), ("mask", mask[:n]), ("jet", jet[:n]),
                                ("type_index", np.full(min(n, len(jet)), index, np.int32)),
                                ("mass", data.scored[jet_type].jet_features[:n, 2])):
                parts[name].append(value)
        particles, mask, jet, type_index, mass = (np.concatenate(parts[k]) for k in
                                                  ("particles", "mask", "jet", "type_index", "mass"))
        k_probe = jax.random.fold_in(key, 1)
        jet_model, particle_model = models[f"jet_{group}"], models[f"particle_{group}"]
        tolerances = {"rtol": float(options["rtol"]), "atol": float(options["atol"]), "t_min": float(options["t_min"])}

        def jet_log_p(rows, tol):
            score_fn = score_fn_from(jet_model, self.sde, prediction=cfg.train_global.prediction)
            return log_likelihood(score_fn, self.sde, rows["jet"], divergence="exact", **tol)

        def particle_log_p(rows, tol, k):
            probes = options["probes"]
            x, m, c = (jnp.tile(rows[name], (probes,) + (1,) * (rows[name].ndim - 1))
                       for name in ("particles", "mask", "jet"))
            score_fn = score_fn_from(particle_model, self.sde, prediction=cfg.train_set.prediction, mask=m, cond=c)
            log_p, nfe = log_likelihood(score_fn, self.sde, x, key=k, divergence=options["divergence"], mask=m, **tol)
            return log_p.reshape(probes, -1).mean(axis=0), nfe

        arrays = {"particles": particles, "mask": mask, "jet": jet}
        log_p_jet, jet_nfe, jet_seconds = self.batched(lambda rows, tol, k: jet_log_p(rows, tol), arrays, k_probe,
                                                       tolerances, sampler, f"[{group}] jet likelihood")
        log_p_particles, particle_nfe, particle_seconds = self.batched(
            particle_log_p, arrays, k_probe, tolerances, sampler,
            f"[{group}] particle likelihood ({options['divergence']})")
        num_particles = mask.sum(axis=1)
        result = {"type_index": type_index, "log_p_jet": log_p_jet, "log_p_particles": log_p_particles,
                  "num_particles": num_particles.astype(np.int32), "mass": mass.astype(np.float32),
                  "score": anomaly_score(log_p_jet, log_p_particles, num_particles)}
        count = len(jet)
        info = {"nfe": particle_nfe, "nfe_jet_stage": jet_nfe, "seconds": jet_seconds + particle_seconds,
                "seconds_jet_stage": jet_seconds, "num_jets": count,
                "ms_per_jet": 1000.0 * (jet_seconds + particle_seconds) / count,
                "ms_per_jet_jet_stage": 1000.0 * jet_seconds / count,
                "ms_per_jet_particle_stage": 1000.0 * particle_seconds / count}
        return result, info

    def batched(self, log_p_fn, arrays: dict, key, tolerances: dict, sampler, description: str):
        """``log_p_fn(rows, tolerances, key)`` over ``sampling.batch_size`` rows at a time, on every device of
        ``sampler.mesh`` (:func:`fpcd.runner.run_batched`).

        Returns ``(values (N,), largest NFE of a batch, seconds without compilation)``. The last
        batch wraps around to keep one compiled shape; the extra rows are dropped. Batch ``i``
        draws its probe from ``fold_in(key, i)``; the warm-up compiles with loose tolerances (values,
        not part of the program).
        """
        count = len(arrays["jet"])
        batch = self.batch_size(count, sampler)
        loose = {**tolerances, "rtol": 0.5, "atol": 0.5}
        result = run_batched(lambda rows, k: log_p_fn(rows, tolerances, k), key, num_items=count, batch_size=batch,
                             inputs=arrays, sharding=batch_placement(sampler.mesh, batch),
                             warmup=lambda rows, k: log_p_fn(rows, loose, k), progress=self.progress,
                             description=description)
        values = result.outputs.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise FloatingPointError(f"{description}: {int(np.sum(~np.isfinite(values)))} of {count} "
                                     "log-likelihoods are not finite")
        return values, max(int(nfe) for nfe in result.extras), result.seconds
