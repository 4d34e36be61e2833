"""The toy experiment: learn a 2-D Gaussian mixture, sample with every method, judge against the truth.

Stages of ``run`` (``mode``): ``train`` (ResMLP, checkpoints, resume), ``sample`` (every run of
``config.sampling.runs`` from the EMA model, ``samples.h5``), ``eval`` (``metrics.json`` with NFE,
seconds and per-dimension W1 against fresh data and the truth-vs-truth floor; the model's
log-likelihood against the exact one; PNGs).
"""

from __future__ import annotations

import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from fpcd.config import ConfigError, require_int, validate_common
from fpcd.data.gmm import toy_mixture
from fpcd.io import atomic_write, write_json
from fpcd.likelihood import log_likelihood
from fpcd.metrics import w1_per_dimension, w1_truth_floor
from fpcd.nets import ResMLP, score_fn_from
from fpcd.parallel import shard_batch
from fpcd.pipelines.common import (
    build_sde, prepare_workdir, restore_stage, timed_sampling, train_stage,
)
from fpcd.plots.common import marginals, nfe_vs_w1, samples_vs_truth_2d
from fpcd.train import batch_indices

IDENTITY_FIELDS = ("experiment", "seed", "data", "sde", "model", "train.prediction")
STAGE = "score"
NUM_LIKELIHOOD_POINTS = 500


def validate(cfg, num_devices: int) -> None:
    validate_common(cfg, num_devices=num_devices)
    require_int(cfg, "data.dim")
    num_train = require_int(cfg, "data.num_train")
    require_int(cfg, "data.num_test")
    require_int(cfg, "model.width")
    require_int(cfg, "model.depth")
    if cfg.train.batch_size > num_train:
        raise ConfigError(
            f"config.train.batch_size ({cfg.train.batch_size}) exceeds config.data.num_train ({num_train})"
        )


def _keys(cfg):
    root = jax.random.key(cfg.seed)
    names = ("train_data", "test_data", "floor_data", "model", "train", "sampling", "likelihood")
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(names)}


def _model(cfg, key):
    return ResMLP(cfg.data.dim, width=cfg.model.width, depth=cfg.model.depth, fourier_scale=cfg.model.fourier_scale,
                  key=key)


def _train(cfg, workdir, mesh, mixture, sde, keys, progress):
    data = np.asarray(mixture.sample(keys["train_data"], cfg.data.num_train), np.float32)

    def batch_fn(step):
        idx = batch_indices(cfg.seed, step, cfg.data.num_train, cfg.train.batch_size)
        return shard_batch({"x": data[idx]}, mesh)

    return train_stage(stage=STAGE, model=_model(cfg, keys["model"]), train_cfg=cfg.train, sde=sde, key=keys["train"],
                       mesh=mesh, workdir=workdir, batch_fn=batch_fn, config=cfg.to_dict(), progress=progress)


def _sample(cfg, workdir, state, sde, keys, progress, mesh=None):
    score_fn = score_fn_from(state.ema_model, sde, prediction=cfg.train.prediction)
    results = {}
    for i, (name, run) in enumerate(cfg.sampling.runs.items()):
        run = dict(run)
        x, nfe, seconds = timed_sampling(
            lambda index, size: score_fn, sde, jax.random.fold_in(keys["sampling"], i),
            num_samples=cfg.sampling.num_samples, batch_size=cfg.sampling.batch_size,
            sample_shape=(cfg.data.dim,), run=run, description=f"sample {name}", progress=progress, mesh=mesh,
        )
        if progress:
            print(f"[sample] {name}: NFE {nfe}, {seconds:.2f} s", flush=True)
        results[name] = {"samples": x, "nfe": nfe, "seconds": seconds, "run": run}

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for name, r in results.items():
                d = f.create_dataset(f"samples/{name}", data=r["samples"])
                d.attrs["method"] = r["run"]["method"]
                d.attrs["options"] = json.dumps(r["run"])
                d.attrs["nfe"] = r["nfe"]
                d.attrs["seconds"] = r["seconds"]

    atomic_write(os.path.join(workdir, "samples.h5"), write)
    return results


def _read_samples(workdir):
    path = os.path.join(workdir, "samples.h5")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; run with --mode=sample first")
    with h5py.File(path, "r") as f:
        return {
            name: {"samples": d[()], "nfe": int(d.attrs["nfe"]), "seconds": float(d.attrs["seconds"]),
                   "run": json.loads(d.attrs["options"])}
            for name, d in f["samples"].items()
        }


def _evaluate(cfg, workdir, state, sde, mixture, keys, results, train_info):
    n = cfg.sampling.num_samples
    truth = np.asarray(mixture.sample(keys["test_data"], max(n, cfg.data.num_test)))[:n]
    floor = w1_truth_floor(truth, np.asarray(mixture.sample(keys["floor_data"], n)))
    runs = {}
    for name, r in results.items():
        w1 = w1_per_dimension(r["samples"], truth)
        runs[name] = {
            "method": r["run"]["method"],
            "options": {k: v for k, v in r["run"].items() if k != "method"},
            "nfe": r["nfe"],
            "seconds": r["seconds"],
            "samples_per_second": n / r["seconds"] if r["seconds"] > 0 else None,
            "w1": w1.tolist(),
            "w1_mean": float(w1.mean()),
            "w1_over_floor": float(w1.mean() / floor.mean()),
        }

    points = jnp.asarray(truth[:NUM_LIKELIHOOD_POINTS])
    score_fn = score_fn_from(state.ema_model, sde, prediction=cfg.train.prediction)
    model_logp, nfe = log_likelihood(score_fn, sde, points, divergence="exact", rtol=1e-5, atol=1e-5)
    exact_logp = mixture.log_prob(points)
    metrics = {
        "experiment": cfg.experiment,
        "num_samples": n,
        "floor": {"w1": floor.tolist(), "w1_mean": float(floor.mean())},
        "runs": runs,
        "log_likelihood": {
            "num_points": int(points.shape[0]),
            "model_mean_nats": float(model_logp.mean()),
            "exact_mean_nats": float(exact_logp.mean()),
            "nfe": nfe,
        },
    }
    if train_info is not None:
        metrics["train"] = {k: v for k, v in train_info.items() if k != "history"}
        metrics["train"]["final_loss"] = train_info["history"][-1]["loss"] if train_info["history"] else None
    write_json(os.path.join(workdir, "metrics.json"), metrics)
    samples = {name: r["samples"] for name, r in results.items()}
    samples_vs_truth_2d(truth, samples, os.path.join(workdir, "samples.png"))
    marginals(truth, samples, os.path.join(workdir, "marginals.png"))
    nfe_vs_w1(runs, os.path.join(workdir, "nfe_vs_w1.png"), floor=float(floor.mean()))
    return metrics


def run(cfg, workdir: str, mode: str, mesh, *, progress: bool = True):
    """Run the toy experiment's ``mode`` (``train``, ``sample``, ``eval`` or ``all``) in ``workdir``."""
    validate(cfg, mesh.devices.size)
    prepare_workdir(workdir, cfg.to_dict(), IDENTITY_FIELDS)
    mixture = toy_mixture(cfg.data.dim)
    sde = build_sde(cfg)
    keys = _keys(cfg)
    state, train_info, results = None, None, None
    if mode in ("train", "all"):
        state, train_info = _train(cfg, workdir, mesh, mixture, sde, keys, progress)
    if mode in ("sample", "eval") or state is None:
        if mode == "train":
            return None
        state = restore_stage(stage=STAGE, model=_model(cfg, keys["model"]), train_cfg=cfg.train, sde=sde,
                              key=keys["train"], mesh=mesh, workdir=workdir)
    if mode in ("sample", "all"):
        results = _sample(cfg, workdir, state, sde, keys, progress, mesh)
    if mode == "sample":
        return results
    if results is None:
        results = _read_samples(workdir)
    return _evaluate(cfg, workdir, state, sde, mixture, keys, results, train_info)
