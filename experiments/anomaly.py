"""Anomaly detection on jets with the probability-flow likelihood (Mikuni & Nachman 2023).

    python experiments/main.py --config=experiments/anomaly.py --workdir=runs/anomaly      # <= 20 min on 2 CPUs
    python experiments/main.py --config=experiments/anomaly.py:tiny                         # smoke run (tests)
    python experiments/main.py --config=experiments/anomaly.py:full --workdir=/scratch/ad   # paper scale, GPUs

Two-stage jet models are trained on background only, one per entry of ``config.backgrounds``
(QCD = g + q; and the reverse test, top), and every held-out jet of every type is scored by
``-log p(jet) - log p(particles | jet) / N`` (:mod:`fpcd.experiments.anomaly`). Outputs:
``metrics.json`` (AUC, max SIC and SIC at 10 % signal efficiency per background and anomalous
type beside the jet mass and the multiplicity alone, mean held-out log-likelihoods, cost per jet,
exact vs Hutchinson agreement), ``scores_<background>.h5`` and the figures
``anomaly_scores_<background>.png`` and ``anomaly_roc_<background>.png``.

Data: the jets experiment's generated jets (same seeds, so the same cache under
``data.cache_dir``) or the real JetNet files with ``--config.data.path_pattern=/data/jetnet/{type}.hdf5``.
Training with the likelihood weighting ``lambda(t) = g(t)^2``:
``--config.train_set.loss_weighting=likelihood --config.train_global.loss_weighting=likelihood``.
"""

import ml_collections

from fpcd.config import jet_sections
from fpcd.config import train_section as _train


def get_config(variant: str = ""):
    if variant not in ("", "tiny", "full"):
        raise ValueError(f"experiments/anomaly.py: unknown variant {variant!r}; expected '', 'tiny' or 'full'")
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "anomaly"
    cfg.name = "anomaly" + (f"_{variant}" if variant else "")
    cfg.seed = 0

    # data (the jets experiment's generated jets: one cache), sde, jet_model, particle_model
    cfg.update(jet_sections(variant))

    # One model pair per background, trained on those types alone; the other types are the anomalies.
    cfg.backgrounds = ml_collections.ConfigDict({"qcd": ("g", "q"), "top": ("t",)})
    # Both backgrounds' training takes ~13 of the default's 20 minutes on 2 CPU cores.
    cfg.train_global = _train(num_steps=3000, batch_size=256, learning_rate=1e-3, warmup_steps=200,
                              checkpoint_every=1000)
    cfg.train_set = _train(num_steps=3000, batch_size=128, learning_rate=5e-4, warmup_steps=300,
                           checkpoint_every=1000)  # the particle stage

    # The likelihood runs: every scored jet with Hutchinson's estimator (the anomaly score), and the
    # first num_jets of each type with the exact divergence (the estimator's check).
    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_samples = 400  # held-out jets scored per type
    cfg.sampling.batch_size = 500
    cfg.sampling.runs = ml_collections.ConfigDict({
        "hutchinson": {"method": "likelihood", "divergence": "hutchinson", "probes": 2, "rtol": 1e-3, "atol": 1e-3,
                       "t_min": 1e-5},
        "exact": {"method": "likelihood", "divergence": "exact", "num_jets": 10, "rtol": 1e-3, "atol": 1e-3,
                  "t_min": 1e-5},
    })

    cfg.eval = ml_collections.ConfigDict({"evaluators": ("anomaly", "agreement"), "signal_efficiency": 0.1,
                                          "min_background": 10})

    if variant == "tiny":
        cfg.backgrounds = ml_collections.ConfigDict({"qcd": ("q",)})
        cfg.train_global = _train(num_steps=150, batch_size=64, learning_rate=2e-3, warmup_steps=10,
                                  checkpoint_every=75, log_every=50)
        cfg.train_set = _train(num_steps=150, batch_size=32, learning_rate=2e-3, warmup_steps=10,
                               checkpoint_every=75, log_every=50)
        cfg.sampling.num_samples = 40
        cfg.sampling.batch_size = 80
        cfg.sampling.runs.hutchinson.probes = 2
        cfg.sampling.runs.exact.num_jets = 8
    elif variant == "full":
        cfg.train_global = _train(num_steps=50_000, batch_size=1024, learning_rate=1e-3, warmup_steps=1000,
                                  checkpoint_every=5000)
        cfg.train_set = _train(num_steps=300_000, batch_size=256, learning_rate=3e-4, warmup_steps=5000,
                               checkpoint_every=5000)
        cfg.sampling.num_samples = 20_000
        cfg.sampling.batch_size = 2000
        cfg.sampling.runs = ml_collections.ConfigDict({
            "hutchinson": {"method": "likelihood", "divergence": "hutchinson", "probes": 4, "rtol": 1e-5,
                           "atol": 1e-5},
            "exact": {"method": "likelihood", "divergence": "exact", "num_jets": 500, "rtol": 1e-5, "atol": 1e-5},
        })
    return cfg
