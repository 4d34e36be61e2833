"""The toy experiment: learn a Gaussian mixture, sample with every method, judge against the truth.

One stage (``"score"``): a :class:`~fpcd.nets.ResMLP` score model of samples of
:func:`~fpcd.data.gmm.toy_mixture`. Evaluation: per-dimension W1 of every sampler run (and every
distilled student) against the mixture itself, represented by a reference sample of
``REFERENCE_SIZE`` points, beside the floor (the mean W1 of ``sampling.num_samples`` fresh mixture
samples to the same reference, over ``FLOOR_DRAWS`` draws: what a perfect sampler scores), the
model's log-likelihood of held-out points against the exact density, and PNGs (``samples.png``,
``marginals.png``, ``nfe_vs_w1.png``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fpcd.config import ConfigError, require_int
from fpcd.data.gmm import toy_mixture
from fpcd.likelihood import log_likelihood
from fpcd.metrics import w1_per_dimension
from fpcd.nets import ResMLP, score_fn_from
from fpcd.plots.common import marginals, nfe_vs_w1, samples_vs_truth_2d
from fpcd.runner import Experiment, Stage
from fpcd.train import batch_indices

STAGE = "score"
NUM_LIKELIHOOD_POINTS = 500
REFERENCE_SIZE = 400_000  # ~sqrt(20) less sampling noise than a truth set of 20k
FLOOR_DRAWS = 5


class GaussianMixtureExperiment(Experiment):
    KEY_NAMES = ("train_data", "test_data", "floor_data", "model", "train", "sampling", "likelihood")
    IDENTITY_FIELDS = ("experiment", "seed", "data", "sde", "model", "train.prediction")

    def validate(self, num_devices: int) -> None:
        super().validate(num_devices)
        cfg = self.cfg
        require_int(cfg, "data.dim")
        num_train = require_int(cfg, "data.num_train")
        require_int(cfg, "data.num_test")
        require_int(cfg, "model.width")
        require_int(cfg, "model.depth")
        if cfg.train.batch_size > num_train:
            raise ConfigError(f"config.train.batch_size ({cfg.train.batch_size}) exceeds config.data.num_train "
                              f"({num_train})")

    def load_data(self):
        mixture = toy_mixture(self.cfg.data.dim)
        return mixture, np.asarray(mixture.sample(self.key("train_data"), self.cfg.data.num_train), np.float32)

    def stages(self, data):
        cfg = self.cfg
        _, train = data
        model = ResMLP(cfg.data.dim, width=cfg.model.width, depth=cfg.model.depth,
                       fourier_scale=cfg.model.fourier_scale, key=self.key("model"))

        def batch(step, rows):
            return {"x": train[batch_indices(cfg.seed, step, cfg.data.num_train, cfg.train.batch_size)[rows]]}

        return (Stage(STAGE, model, cfg.train, self.key("train"), batch),)

    def training_examples(self, data):
        return {"train": len(data[1])}

    def generate(self, data, models, group, run, key, sampler):
        cfg = self.cfg
        score_fn = score_fn_from(models[STAGE], self.sde, prediction=cfg.train.prediction)
        x, nfe, seconds = sampler(lambda cond, mask: score_fn, key, num_samples=cfg.sampling.num_samples,
                                  batch_size=cfg.sampling.batch_size, sample_shape=(cfg.data.dim,), run=run,
                                  description="sample")
        return {"samples": x}, {"nfe": nfe, "seconds": seconds}

    def evaluators(self):
        return {"w1": self.evaluate_w1, "likelihood": self.evaluate_likelihood}

    def _truth(self, mixture, n):
        return np.asarray(mixture.sample(self.key("test_data"), max(n, self.cfg.data.num_test)))[:n]

    def evaluate_w1(self, data, samples, models, *, figures_dir):
        """Per-dimension W1 of every run against the mixture (a large reference sample), the floor
        (fresh mixture samples of the same size against the same reference, averaged), PNGs."""
        mixture, _ = data
        n = self.cfg.sampling.num_samples
        reference = np.asarray(mixture.sample(self.key("floor_data"), REFERENCE_SIZE))
        floor = np.mean([w1_per_dimension(np.asarray(mixture.sample(jax.random.fold_in(self.key("test_data"), i), n)),
                                          reference) for i in range(FLOOR_DRAWS)], axis=0)
        truth = self._truth(mixture, n)
        runs = {}
        for name, r in samples[""].items():
            w1 = w1_per_dimension(r.arrays["samples"], reference)
            runs[name] = {
                "method": r.run["method"], "options": {k: v for k, v in r.run.items() if k != "method"}, **r.info,
                "samples_per_second": n / r.info["seconds"] if r.info["seconds"] > 0 else None,
                "w1": w1.tolist(), "w1_mean": float(w1.mean()), "w1_over_floor": float(w1.mean() / floor.mean()),
            }
        if figures_dir is not None:
            generated = {name: r.arrays["samples"] for name, r in samples[""].items()}
            samples_vs_truth_2d(truth, generated, os.path.join(figures_dir, "samples.png"))
            marginals(truth, generated, os.path.join(figures_dir, "marginals.png"))
            nfe_vs_w1(runs, os.path.join(figures_dir, "nfe_vs_w1.png"), floor=float(floor.mean()))
        return {"num_samples": n, "reference_size": REFERENCE_SIZE, "floor_draws": FLOOR_DRAWS,
                "floor": {"w1": floor.tolist(), "w1_mean": float(floor.mean())}, "runs": runs}

    def evaluate_likelihood(self, data, samples, models, *, figures_dir):
        """The model's mean log-likelihood (exact divergence) of held-out points against the exact density."""
        mixture, _ = data
        points = jnp.asarray(self._truth(mixture, self.cfg.sampling.num_samples)[:NUM_LIKELIHOOD_POINTS])
        score_fn = score_fn_from(models[STAGE], self.sde, prediction=self.cfg.train.prediction)
        model_logp, nfe = log_likelihood(score_fn, self.sde, points, divergence="exact", rtol=1e-5, atol=1e-5)
        return {"log_likelihood": {"num_points": int(points.shape[0]), "model_mean_nats": float(np.mean(model_logp)),
                                   "exact_mean_nats": float(np.mean(mixture.log_prob(points))), "nfe": int(nfe)}}

    def format_results(self, metrics):
        lines = []
        if "runs" in metrics:
            lines.append(f"{'run':<12} {'NFE':>6} {'seconds':>8} {'W1 mean':>9}  (truth floor "
                         f"{metrics['floor']['w1_mean']:.4f})")
            lines += [f"{name:<12} {row['nfe']:>6} {row['seconds']:>8.2f} {row['w1_mean']:>9.4f}"
                      for name, row in metrics["runs"].items()]
        if "log_likelihood" in metrics:
            ll = metrics["log_likelihood"]
            lines.append(f"log-likelihood of {ll['num_points']} held-out points: model {ll['model_mean_nats']:.4f}, "
                         f"exact {ll['exact_mean_nats']:.4f} nats (NFE {ll['nfe']})")
        return "\n".join(lines)
