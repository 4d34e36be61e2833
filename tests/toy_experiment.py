"""A new experiment in one small file: a two-stage toy on the shared layer (fpcd.experiments.two_stage).

Each event is a set of 2 to 8 points in 2-D drawn around a per-event centre (c, -c) with
c ~ N(0, 1); the global features are (c, number of points). Stage ``global`` learns them, stage
``set`` the points given them, bucketed by multiplicity. The evaluator compares the generated
multiplicities and point centroids with held-out events, beside the truth-vs-truth floor, and
checks that the generated points follow the generated centre they were conditioned on.
"""

import types

import jax
import ml_collections
import numpy as np

from fpcd.config import train_section
from fpcd.data import buckets
from fpcd.data.standardisation import Standardisation
from fpcd.experiments.two_stage import TwoStageExperiment, bucketed_stage, run_row, sample_global, sample_set, split
from fpcd.metrics.distances import wasserstein_1d

MAX_POINTS = 8


class ToyEvents:
    """``points (N, 8, 2)``, ``counts (N,)`` and ``centre (N,)`` of toy events."""

    def __init__(self, points, counts, centre):
        self.points, self.counts, self.centre = points, counts, centre

    def __len__(self):
        return len(self.counts)

    def take(self, rows):
        return ToyEvents(self.points[rows], self.counts[rows], self.centre[rows])


def toy_events(n: int, seed: int) -> ToyEvents:
    rng = np.random.default_rng(seed)
    counts, centre = rng.integers(2, MAX_POINTS + 1, n), rng.normal(size=n)
    points = centre[:, None, None] * np.array([1.0, -1.0]) + 0.3 * rng.normal(size=(n, MAX_POINTS, 2))
    return ToyEvents(np.where(np.arange(MAX_POINTS)[None, :, None] < counts[:, None, None], points, 0.0), counts, centre)


class ToyExperiment(TwoStageExperiment):
    IDENTITY_FIELDS = ("experiment", "seed", "data", "sde", "global_model", "set_model")

    def load_data(self):
        data = types.SimpleNamespace()  # any object the hooks understand
        train, data.test = split(toy_events(self.cfg.data.num_events, self.cfg.seed), 0.5)
        globals_ = np.stack([train.centre, train.counts], axis=1)
        data.global_stats, data.point_stats = Standardisation.fit(globals_), Standardisation.fit(train.points[:, 0])
        data.globals, data.mask = data.global_stats.apply(globals_).astype(np.float32), \
            (np.arange(MAX_POINTS)[None, :] < train.counts[:, None]).astype(np.float32)
        data.points = (data.point_stats.apply(train.points) * data.mask[..., None]).astype(np.float32)
        data.lengths, data.buckets = buckets.training_buckets(train.counts, (4, MAX_POINTS), self.cfg.train_set.batch_size)
        return data

    def model_dims(self, data):
        return {"global": (2, 0), "set": (2, 2)}

    def global_arrays(self, data):
        return {"x": data.globals}

    def set_stage(self, data, model):
        def rows_batch(idx, rows, length, step):
            idx = idx[rows]
            return {"x": data.points[idx, :length], "mask": data.mask[idx, :length], "cond": data.globals[idx]}

        s = self.stage_settings("set")
        return bucketed_stage(s["name"], model, s["section"], s["key"], seed=s["seed"], bucket_of=data.buckets,
                              lengths=data.lengths, rows_batch=rows_batch)

    def generate(self, data, models, group, run, key, sampler):
        n, prediction = self.cfg.sampling.num_samples, self.cfg.train_set.prediction
        k_global, k_set = jax.random.split(key)
        g, nfe_global, seconds_global = sample_global(sampler, models["global"], self.sde, run, k_global,
                                                      prediction=prediction,
                                                      num_samples=n, batch_size=self.batch_size(n, sampler),
                                                      num_features=2, description="sample globals")
        counts = np.clip(np.rint(data.global_stats.invert(g)[:, 1]), 2, MAX_POINTS).astype(int)
        x, nfe, seconds = sample_set(sampler, models["set"], self.sde, run, k_set, prediction=prediction, counts=counts,
                                     max_length=MAX_POINTS, num_features=2, conditions=g,
                                     batch_size=lambda rows: self.batch_size(rows, sampler), description="sample points",
                                     lengths=data.lengths)
        points = data.point_stats.invert(x) * (np.arange(MAX_POINTS)[None, :, None] < counts[:, None, None])
        centre = data.global_stats.invert(g)[:, 0]
        return ({"points": points, "counts": counts, "centre": centre},
                {"nfe": nfe + nfe_global, "seconds": seconds + seconds_global})

    def evaluators(self):
        return {"w1": self.evaluate_w1}

    def evaluate_w1(self, data, samples, models, *, figures_dir):
        def features(points, counts):
            return {"counts": counts.astype(float), "centroid_x": points[..., 0].sum(axis=1) / counts}

        n = self.cfg.sampling.num_samples
        truth = features(data.test.points[:n], data.test.counts[:n])
        other = features(data.test.points[n:2 * n], data.test.counts[n:2 * n])
        metrics = {"floor": {k: wasserstein_1d(truth[k], other[k]) for k in truth}, "runs": {}}
        for name, r in samples[""].items():
            generated = features(r.arrays["points"], r.arrays["counts"])
            metrics["runs"][name] = {**run_row(r), **{k: wasserstein_1d(truth[k], generated[k]) for k in truth},
                                     # the set stage follows its condition: the centroid tracks the centre
                                     "centre_centroid_correlation": float(np.corrcoef(r.arrays["centre"],
                                                                                      generated["centroid_x"])[0, 1])}
        return metrics

    def format_results(self, metrics):
        return "\n".join(f"{name}: W1 counts {r['counts']:.3f}, centroid {r['centroid_x']:.3f}"
                         for name, r in metrics["runs"].items())


def toy_config(global_steps: int = 2000, set_steps: int = 800) -> ml_collections.ConfigDict:
    model = {"width": 32, "depth": 2, "fourier_scale": 16.0}
    return ml_collections.ConfigDict({
        "experiment": "toy", "seed": 0, "data": {"num_events": 2000},
        "sde": {"beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"},
        "global_model": model, "set_model": {**model, "num_heads": 2, "mlp_ratio": 2},
        "train_global": train_section(num_steps=global_steps, batch_size=64, learning_rate=2e-3, warmup_steps=20,
                                      checkpoint_every=global_steps),
        "train_set": train_section(num_steps=set_steps, batch_size=64, learning_rate=2e-3, warmup_steps=20,
                                   checkpoint_every=set_steps),
        "sampling": {"num_samples": 400, "batch_size": 200, "runs": {"ddim_20": {"method": "ddim", "steps": 20}}},
        "eval": {"evaluators": ("w1",)},
    })
