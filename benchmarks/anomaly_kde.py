"""How well an ideal density of the jet features alone could find each anomaly (issue 14 diagnostic).

    python benchmarks/anomaly_kde.py                  # the anomaly experiment's default data
    python benchmarks/anomaly_kde.py --num_fit=3000   # a smaller KDE

For each background of ``experiments/anomaly.py`` (QCD = g + q, top) a Gaussian KDE (scipy,
Scott's bandwidth) is fitted to ``--num_fit`` of the background's standardised training jet
features (pT, eta, mass, multiplicity; the multiplicity dequantised as in training) and every
held-out scored jet is scored by ``-log`` of the KDE density: the AUC the jet stage's likelihood
term would reach with a perfect density of those features, on the whole set and on subsets of
them (mass alone, ...). Prints a table and writes ``anomaly_kde.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy.stats import gaussian_kde

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import anomaly as anomaly_config  # noqa: E402  (experiments/anomaly.py)

from fpcd.experiments.anomaly import MULTIPLICITY, AnomalyExperiment  # noqa: E402
from fpcd.io import write_json  # noqa: E402
from fpcd.metrics.anomaly import auc  # noqa: E402

FEATURES = ("pT", "eta", "mass", "multiplicity")
SUBSETS = {"all four": (0, 1, 2, 3), "mass": (2,), "pT, mass": (0, 2), "mass, multiplicity": (2, 3), "pT": (0,),
           "eta": (1,), "multiplicity": (3,)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_fit", type=int, default=6000, help="training jets per background in the KDE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    experiment = AnomalyExperiment(anomaly_config.get_config(), progress=True)
    data = experiment.load_data()
    rng = np.random.default_rng(args.seed)
    results = {}
    for name, background in data.backgrounds.items():
        train = background.jet.astype(np.float64)
        train[:, MULTIPLICITY] += rng.uniform(-0.5, 0.5, len(train)) / background.stats.jet.std[MULTIPLICITY]
        fit = train[rng.choice(len(train), min(args.num_fit, len(train)), replace=False)]
        results[name] = {}
        for subset, columns in SUBSETS.items():
            kde = gaussian_kde(fit[:, columns].T)
            scores = {t: -kde.logpdf(background.scored[t][2].astype(np.float64)[:, columns].T) for t in data.types}
            bg = np.concatenate([scores[t] for t in background.types])
            results[name][subset] = {
                t: auc(np.r_[np.zeros(len(bg)), np.ones(len(scores[t]))], np.r_[bg, scores[t]])
                for t in data.types if t not in background.types}
    print(f"{'trained on':<12}{'features':<22}" + "".join(f"{t:>8}" for t in data.types))
    for name, rows in results.items():
        for subset, aucs in rows.items():
            print(f"{name:<12}{subset:<22}" + "".join(f"{aucs[t]:>8.3f}" if t in aucs else f"{'':>8}"
                                                      for t in data.types))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "anomaly_kde.json"),
               {"num_fit": args.num_fit, "features": FEATURES, "auc": results})
    return results


if __name__ == "__main__":
    main()
