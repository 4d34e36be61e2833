"""FPCD on JetNet jets: a two-stage class-conditional model, every sampler, the jet metrics.

Stage 1 (``"jet"``): a :class:`~fpcd.nets.ResMLP` score model of the standardised jet features
(pT, eta, mass, multiplicity) conditioned on the one-hot jet type. Stage 2 (``"particle"``): a
:class:`~fpcd.nets.SetTransformer` score model of the standardised constituents (eta_rel,
phi_rel, log pt_rel) conditioned on the jet features and the type, with the multiplicity as the
mask. Sampling draws jet features first, turns the multiplicity into the mask, then samples the
constituents; both are post-processed to JetNet units (:mod:`fpcd.data.jet_transforms`).

Outputs in the workdir: ``metrics.json`` (per type and sampler run: NFE of each stage, seconds,
jets/s, W1M, W1P, W1EFP, FPD, KPD with their errors, and the truth-vs-truth floor of each),
``samples_<type>.h5`` (JetNet layout: the first run at the top level, every run under
``runs/<name>/``), ``jets_<type>.png`` and ``nfe_vs_w1m.png`` / ``nfe_vs_w1p.png``.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from fpcd.config import ConfigError, get_field, require_float, require_int, validate_common
from fpcd.data import jet_transforms
from fpcd.data.jetnet import JET_TYPES, JetDataError, JetSet, cached_generate, load
from fpcd.io import atomic_write, write_json
from fpcd.metrics import jets as jet_metrics
from fpcd.nets import ResMLP, SetTransformer, score_fn_from
from fpcd.parallel import shard_batch
from fpcd.pipelines.common import build_sde, prepare_workdir, restore_stage, timed_sampling, train_stage
from fpcd.plots.common import nfe_vs_w1
from fpcd.plots.jets import compare
from fpcd.train import batch_indices

IDENTITY_FIELDS = ("experiment", "seed", "data", "sde", "jet_model", "particle_model", "train.prediction",
                   "train_jet.prediction")
NUM_JET_FEATURES = 4
NUM_PARTICLE_FEATURES = 3


def jet_types(cfg) -> tuple[str, ...]:
    types = tuple(t.strip() for t in str(cfg.data.jet_types).split(",") if t.strip())
    unknown = [t for t in types if t not in JET_TYPES]
    if unknown or not types:
        raise ConfigError(f"config.data.jet_types={cfg.data.jet_types!r}: unknown jet type(s) {unknown}; "
                          f"use a comma-separated subset of {','.join(JET_TYPES)}")
    return types


def validate(cfg, num_devices: int) -> None:
    validate_common(cfg, num_devices=num_devices, train_sections=("train_jet", "train"))
    jet_types(cfg)
    num_particles = require_int(cfg, "data.num_particles")
    if cfg.data.path_pattern and num_particles not in (30, 150):
        raise ConfigError(f"config.data.num_particles={num_particles}: the real JetNet files hold 30 or 150 "
                          "particles per jet")
    if cfg.data.path_pattern and "{type}" not in cfg.data.path_pattern:
        raise ConfigError(f"config.data.path_pattern={cfg.data.path_pattern!r} must contain '{{type}}'")
    require_int(cfg, "data.num_jets", minimum=10)
    require_float(cfg, "data.test_fraction", low=0.05, high=0.9)
    require_int(cfg, "data.workers", minimum=0)
    for section in ("jet_model", "particle_model"):
        require_int(cfg, f"{section}.width")
        require_int(cfg, f"{section}.depth")
    require_int(cfg, "particle_model.num_heads")
    if cfg.particle_model.width % cfg.particle_model.num_heads:
        raise ConfigError(f"config.particle_model.width ({cfg.particle_model.width}) must be divisible by "
                          f"config.particle_model.num_heads ({cfg.particle_model.num_heads})")
    require_int(cfg, "eval.num_batches")
    get_field(cfg, "eval.seed")


# --- data ---------------------------------------------------------------------------------------


def load_jets(cfg, jet_type: str, progress: bool) -> JetSet:
    """All jets of one type: the real file when ``data.path_pattern`` is set, else generated (cached)."""
    if cfg.data.path_pattern:
        suffix = "" if cfg.data.num_particles == 30 else "150"
        path = cfg.data.path_pattern.format(type=jet_type + suffix)
        return load(path, jet_type=jet_type, num_particles=cfg.data.num_particles)
    return cached_generate(jet_type, cfg.data.num_jets, num_particles=cfg.data.num_particles,
                           seed=cfg.seed + 1000 * JET_TYPES.index(jet_type), cache_dir=cfg.data.cache_dir or None,
                           workers=cfg.data.workers or None, progress=progress)


def split(jets: JetSet, test_fraction: float) -> tuple[JetSet, JetSet]:
    """(train, test): the last ``test_fraction`` of the file is the test split (as FPCD)."""
    cut = int(round(len(jets) * (1.0 - test_fraction)))
    return jets.take(slice(0, cut)), jets.take(slice(cut, None))


def one_hot(jet_type: str, types: tuple[str, ...], n: int) -> np.ndarray:
    vector = np.zeros((n, len(types)), np.float32)
    vector[:, types.index(jet_type)] = 1.0
    return vector


class PreparedData:
    """Centred train/test jets per type, their standardisation and the stacked training arrays."""

    def __init__(self, cfg, types, progress):
        self.types = types
        self.train, self.test, self.stats = {}, {}, {}
        parts = {"jet": [], "particles": [], "mask": [], "type": []}
        for jet_type in types:
            jets = load_jets(cfg, jet_type, progress)
            jets = JetSet(jet_type, jet_transforms.recenter(jets.particle_features), jets.jet_features)
            train, test = split(jets, cfg.data.test_fraction)
            self.train[jet_type], self.test[jet_type] = train, test
            stats = jet_transforms.fit_standardisation(train)
            self.stats[jet_type] = stats
            particles, mask, jet = jet_transforms.preprocess(train, stats)
            parts["jet"].append(jet)
            parts["particles"].append(particles)
            parts["mask"].append(mask)
            parts["type"].append(one_hot(jet_type, types, len(train)))
        self.jet = np.concatenate(parts["jet"])
        self.particles = np.concatenate(parts["particles"])
        self.mask = np.concatenate(parts["mask"])
        self.type = np.concatenate(parts["type"])

    def __len__(self):
        return len(self.jet)


# --- models ---------------------------------------------------------------------------------------


def make_models(cfg, num_types: int, key):
    k_jet, k_particle = jax.random.split(key)
    jet_model = ResMLP(NUM_JET_FEATURES, width=cfg.jet_model.width, depth=cfg.jet_model.depth, cond_dim=num_types,
                       fourier_scale=cfg.jet_model.fourier_scale, key=k_jet)
    particle_model = SetTransformer(
        NUM_PARTICLE_FEATURES, width=cfg.particle_model.width, depth=cfg.particle_model.depth,
        num_heads=cfg.particle_model.num_heads, mlp_ratio=cfg.particle_model.mlp_ratio,
        cond_dim=NUM_JET_FEATURES + num_types, fourier_scale=cfg.particle_model.fourier_scale, key=k_particle,
    )
    return jet_model, particle_model


def _keys(cfg):
    root = jax.random.key(cfg.seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("models", "train_jet", "train", "sampling"))}


def _train(cfg, workdir, mesh, data: PreparedData, sde, models, keys, progress):
    jet_model, particle_model = models

    def jet_batch(step):
        idx = batch_indices(cfg.seed, step, len(data), cfg.train_jet.batch_size)
        return shard_batch({"x": data.jet[idx], "cond": data.type[idx]}, mesh)

    def particle_batch(step):
        idx = batch_indices(cfg.seed + 1, step, len(data), cfg.train.batch_size)
        cond = np.concatenate([data.jet[idx], data.type[idx]], axis=1)
        return shard_batch({"x": data.particles[idx], "mask": data.mask[idx], "cond": cond}, mesh)

    config = cfg.to_dict()
    jet_state, jet_info = train_stage(stage="jet", model=jet_model, train_cfg=cfg.train_jet, sde=sde,
                                      key=keys["train_jet"], mesh=mesh, workdir=workdir, batch_fn=jet_batch,
                                      config=config, progress=progress)
    particle_state, particle_info = train_stage(stage="particle", model=particle_model, train_cfg=cfg.train, sde=sde,
                                                key=keys["train"], mesh=mesh, workdir=workdir,
                                                batch_fn=particle_batch, config=config, progress=progress)
    return (jet_state, particle_state), {"jet": jet_info, "particle": particle_info}


def _restore(cfg, workdir, mesh, sde, models, keys):
    jet_state = restore_stage(stage="jet", model=models[0], train_cfg=cfg.train_jet, sde=sde, key=keys["train_jet"],
                              mesh=mesh, workdir=workdir)
    particle_state = restore_stage(stage="particle", model=models[1], train_cfg=cfg.train, sde=sde,
                                   key=keys["train"], mesh=mesh, workdir=workdir)
    return jet_state, particle_state


# --- sampling --------------------------------------------------------------------------------------


def sample_type(cfg, states, sde, data: PreparedData, jet_type: str, run: dict, key, progress: bool,
                sample_fn=None, num_samples: int | None = None, mesh=None):
    """Generate ``num_samples`` (default ``sampling.num_samples``) jets of one type with one sampler
    run (both stages), using ``sample_fn`` (default :func:`fpcd.sampling.sample`).

    Returns ``(JetSet, info)`` with NFE and seconds of each stage.
    """
    jet_state, particle_state = states
    types, batch = data.types, cfg.sampling.batch_size
    n = num_samples or cfg.sampling.num_samples
    extra = {"mesh": mesh} if sample_fn is None else {"sample_fn": sample_fn}
    num_particles = cfg.data.num_particles
    stats = data.stats[jet_type]
    type_cond = jnp.asarray(one_hot(jet_type, types, batch))
    k_jet, k_particle = jax.random.split(key)
    jet_score = score_fn_from(jet_state.ema_model, sde, prediction=cfg.train_jet.prediction, cond=type_cond)
    jet_std, jet_nfe, jet_seconds = timed_sampling(
        lambda index, size: jet_score, sde, k_jet, num_samples=n, batch_size=batch, sample_shape=(NUM_JET_FEATURES,),
        run=run, description=f"sample {jet_type} jets", progress=progress, **extra,
    )
    # The multiplicity sets the mask; the particle stage sees the jet features it was trained on.
    multiplicity = np.clip(np.rint(jet_std[:, 3] * stats.jet_std[3] + stats.jet_mean[3]), 1, num_particles)
    jet_std = jet_std.copy()
    jet_std[:, 3] = (multiplicity - stats.jet_mean[3]) / stats.jet_std[3]
    mask = jet_transforms.multiplicity_mask(multiplicity, num_particles)
    num_batches = -(-n // batch)
    padded = num_batches * batch

    def batch_slice(index, size):
        rows = np.arange(index * size, (index + 1) * size) % n
        return rows

    def particle_score(index, size):
        rows = batch_slice(index, size)
        cond = jnp.asarray(np.concatenate([jet_std[rows], one_hot(jet_type, types, size)], axis=1))
        return score_fn_from(particle_state.ema_model, sde, prediction=cfg.train.prediction,
                             mask=jnp.asarray(mask[rows]), cond=cond)

    particles, particle_nfe, particle_seconds = timed_sampling(
        particle_score, sde, k_particle, num_samples=padded, batch_size=batch,
        sample_shape=(num_particles, NUM_PARTICLE_FEATURES), run=run, description=f"sample {jet_type} particles",
        make_mask=lambda index, size: jnp.asarray(mask[batch_slice(index, size)]), progress=progress, **extra,
    )
    finite = np.all(np.isfinite(particles[:n]), axis=(1, 2)) & np.all(np.isfinite(jet_std), axis=1)
    jets = jet_transforms.postprocess(particles[:n][finite], mask[finite], jet_std[finite], stats, jet_type)
    seconds = jet_seconds + particle_seconds
    return jets, {"nfe": particle_nfe, "nfe_jet_stage": jet_nfe, "seconds": seconds,
                  "num_nonfinite_dropped": int(np.sum(~finite)),
                  "seconds_jet_stage": jet_seconds, "jets_per_second": n / seconds if seconds > 0 else None}


def _write_samples(workdir, jet_type, results):
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for i, (name, (jets, info, run)) in enumerate(results.items()):
                groups = [f.require_group(f"runs/{name}")] + ([f] if i == 0 else [])
                for g in groups:
                    g.create_dataset("particle_features", data=jets.particle_features, compression="gzip")
                    g.create_dataset("jet_features", data=jets.jet_features, compression="gzip")
                f[f"runs/{name}"].attrs["options"] = json.dumps(run)
                f[f"runs/{name}"].attrs["info"] = json.dumps(info)
            f.attrs["jet_type"] = jet_type
            f.attrs["run"] = next(iter(results))

    atomic_write(os.path.join(workdir, f"samples_{jet_type}.h5"), write)


def _read_samples(workdir, jet_type):
    path = os.path.join(workdir, f"samples_{jet_type}.h5")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; run with --mode=sample first")
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f["runs"].items():
            jets = JetSet(jet_type, g["particle_features"][()], g["jet_features"][()])
            out[name] = (jets, json.loads(g.attrs["info"]), json.loads(g.attrs["options"]))
    return out


# --- evaluation -------------------------------------------------------------------------------------


def _metrics(truth: JetSet, jets: JetSet, cfg) -> dict:
    """W1M, W1P (mean of 3), W1EFP (mean of 5), FPD and KPD of ``jets`` against ``truth``."""
    n = min(len(truth), len(jets))
    kw = {"num_eval_samples": n, "num_batches": cfg.eval.num_batches, "seed": cfg.eval.seed}
    a, b = truth.particle_features, jets.particle_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w1m = jet_metrics.w1m(a, b, **kw)
        w1p = jet_metrics.w1p(a, b, **kw)
        w1efp = jet_metrics.w1efp(a, b, **kw)
        fa, fb = jet_metrics.get_fpd_kpd_jet_features(a), jet_metrics.get_fpd_kpd_jet_features(b)
        fpd = jet_metrics.fpd(fa, fb, min_samples=max(n // 2, 2), max_samples=n, num_batches=10, num_points=5,
                              seed=cfg.eval.seed)
        kpd = jet_metrics.kpd(fa, fb, batch_size=min(5000, n), seed=cfg.eval.seed)
    return {
        "w1m": w1m[0], "w1m_std": w1m[1],
        "w1p": float(np.mean(w1p[0])), "w1p_std": float(np.mean(w1p[1])), "w1p_per_feature": np.asarray(w1p[0]).tolist(),
        "w1efp": float(np.mean(w1efp[0])), "w1efp_std": float(np.mean(w1efp[1])),
        "fpd": fpd[0], "fpd_err": fpd[1], "kpd": kpd[0], "kpd_err": kpd[1],
    }


def _evaluate(cfg, workdir, data: PreparedData, samples: dict, train_info):
    n = cfg.sampling.num_samples
    metrics = {"experiment": cfg.experiment, "num_samples": n, "types": {}}
    for jet_type in data.types:
        test = data.test[jet_type]
        if len(test) < 2 * n:
            raise ConfigError(f"config.sampling.num_samples={n} needs at least {2 * n} test jets of type "
                              f"{jet_type!r} (two disjoint subsets for the floor), found {len(test)}")
        truth, other = test.take(slice(0, n)), test.take(slice(n, 2 * n))
        row = {"floor": _metrics(truth, other, cfg), "runs": {}}
        for name, (jets, info, run) in samples[jet_type].items():
            row["runs"][name] = {"method": run["method"], "options": {k: v for k, v in run.items() if k != "method"},
                                 **info, **_metrics(truth, jets, cfg)}
        metrics["types"][jet_type] = row
        compare(truth, {name: s[0] for name, s in samples[jet_type].items()},
                os.path.join(workdir, f"jets_{jet_type}.png"), title=f"{jet_type} jets: generated vs truth")
    if train_info is not None:
        metrics["train"] = {stage: {k: v for k, v in info.items() if k != "history"} for stage, info in
                            train_info.items()}
    write_json(os.path.join(workdir, "metrics.json"), metrics)
    for key, label in (("w1m", "W1M"), ("w1p", "W1P (mean of 3)")):
        runs = {f"{t}:{name}": {"method": f"{t} {r['method']}", "nfe": r["nfe"], key: r[key]}
                for t, row in metrics["types"].items() for name, r in row["runs"].items()}
        floor = float(np.mean([row["floor"][key] for row in metrics["types"].values()]))
        nfe_vs_w1(runs, os.path.join(workdir, f"nfe_vs_{key}.png"), floor=floor, metric_key=key, ylabel=label)
    return metrics


def run(cfg, workdir: str, mode: str, mesh, *, progress: bool = True):
    """Run the jets experiment's ``mode`` (``train``, ``sample``, ``eval`` or ``all``) in ``workdir``."""
    validate(cfg, mesh.devices.size)
    types = jet_types(cfg)
    try:
        data = PreparedData(cfg, types, progress)
    except JetDataError as err:
        raise ConfigError(str(err)) from None
    prepare_workdir(workdir, cfg.to_dict(), IDENTITY_FIELDS)
    sde = build_sde(cfg)
    keys = _keys(cfg)
    models = make_models(cfg, len(types), keys["models"])
    states, train_info = None, None
    if mode in ("train", "all"):
        states, train_info = _train(cfg, workdir, mesh, data, sde, models, keys, progress)
        if mode == "train":
            return None
    if states is None:
        states = _restore(cfg, workdir, mesh, sde, models, keys)
    if mode in ("sample", "all"):
        samples = {}
        for t_index, jet_type in enumerate(types):
            samples[jet_type] = {}
            for r_index, (name, run_cfg) in enumerate(cfg.sampling.runs.items()):
                run_dict = dict(run_cfg)
                key = jax.random.fold_in(jax.random.fold_in(keys["sampling"], t_index), r_index)
                start = time.perf_counter()
                jets, info = sample_type(cfg, states, sde, data, jet_type, run_dict, key, progress, mesh=mesh)
                if progress:
                    print(f"[sample] {jet_type} {name}: NFE {info['nfe']} (+{info['nfe_jet_stage']} jet stage), "
                          f"{info['seconds']:.2f} s sampling, {time.perf_counter() - start:.1f} s with compilation",
                          flush=True)
                samples[jet_type][name] = (jets, info, run_dict)
            _write_samples(workdir, jet_type, samples[jet_type])
        if mode == "sample":
            return None
    else:
        samples = {jet_type: _read_samples(workdir, jet_type) for jet_type in types}
    return _evaluate(cfg, workdir, data, samples, train_info)
