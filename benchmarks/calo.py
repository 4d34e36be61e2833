"""Calorimeter benchmarks: generator throughput and its physics figures, and the point-cloud vs
image comparison of two finished runs.

    python benchmarks/calo.py                                   # generator only
    python benchmarks/calo.py --cloud runs/calo --image runs/calo_image

Generator: showers per second on one core (``OMP/OPENBLAS_NUM_THREADS=1`` are set before numpy
loads) for the default sample, mean number of hit cells, response and resolution per momentum
for pions and electrons. Comparison: the two runs' ``metrics.json`` summaries side by side.
Prints tables and writes ``benchmarks/results/calo.json`` and ``calo_comparison.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fpcd.data import calo  # noqa: E402
from fpcd.io import write_json  # noqa: E402
from fpcd.metrics.calo import SCALAR_OBSERVABLES, VECTOR_OBSERVABLES  # noqa: E402
from fpcd.plots.common import save_figure  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def generator_figures(num_showers: int, repeats: int) -> dict:
    calo.simulate(calo.CHUNK, seed=99)  # warm caches
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        showers = calo.simulate(num_showers, seed=r)
        times.append(time.perf_counter() - start)
    rate = num_showers / min(times)
    print(f"simulate({num_showers}): best of {repeats} {min(times):.2f} s -> {rate:,.0f} showers/s on one core")
    print(f"hit cells: mean {showers.cluster[:, 3].mean():.1f}, max {int(showers.cluster[:, 3].max())}, "
          f"showers above the 200 cap: {int(np.sum(showers.dropped_energy > 0))}")
    rows = []
    print(f"{'particle':<10}{'P [GeV]':>8}{'<E_vis>/P':>11}{'expected':>10}{'sigma/E':>9}{'<N_cells>':>11}"
          f"{'<z_cog> [mm]':>14}")
    for particle in ("pion", "electron"):
        for p in (2.0, 5.0, 10.0, 20.0, 50.0, 100.0):
            s = calo.simulate(2000, momentum_range=(p, p), seed=7, particle=particle, max_cells=1000)
            e = s.cluster[:, 2]
            z = (s.cells[..., 0] * s.cells[..., 3]).sum(axis=1) / e
            expected = calo.EPIC_FORWARD_HCAL.mean_response(p) if particle == "pion" else \
                calo.EPIC_FORWARD_HCAL.sampling_fraction
            row = {"particle": particle, "momentum": p, "response": float(e.mean() / p), "expected_response": expected,
                   "resolution": float(e.std() / e.mean()), "num_cells": float(s.cluster[:, 3].mean()),
                   "z_cog_mm": float(z.mean())}
            rows.append(row)
            print(f"{particle:<10}{p:>8.0f}{row['response']:>11.4f}{expected:>10.4f}{row['resolution']:>9.3f}"
                  f"{row['num_cells']:>11.1f}{row['z_cog_mm']:>14.0f}")
    return {"num_showers": num_showers, "seconds": min(times), "showers_per_second": rate, "per_momentum": rows}


def comparison(cloud_dir: str, image_dir: str) -> dict:
    from fpcd.experiments.calo import comparison_table

    summaries = {}
    for name, path in (("cloud", cloud_dir), ("image", image_dir)):
        with open(os.path.join(path, "metrics.json")) as f:
            summaries[name] = json.load(f)["summary"]
    print(comparison_table(summaries["cloud"], summaries["image"]))
    import matplotlib.pyplot as plt

    names = list(SCALAR_OBSERVABLES + VECTOR_OBSERVABLES)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(names))
    for offset, (label, row) in zip((-0.2, 0.2), (("point cloud", summaries["cloud"]), ("image", summaries["image"]))):
        left.bar(x + offset, [row["w1_voxel"][k] / max(1e-12, summaries["cloud"]["w1_voxel"][k]) for k in names], 0.4,
                 label=label)
        right.bar(np.arange(2) + offset, [row["auc_high_level"], row["auc_voxel_image"]], 0.4, label=label)
    left.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    left.set_ylabel("voxel-level W1 / point cloud's")
    left.set_yscale("log")
    left.legend()
    right.set_xticks([0, 1], ["high-level", "voxel image"])
    right.set_ylim(0.45, 1.0)
    right.axhline(0.5, color="grey", lw=0.8)
    right.set_ylabel("classifier AUC")
    save_figure(fig, os.path.join(RESULTS, "calo_comparison.png"))
    return summaries


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_showers", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cloud", default="", help="workdir of a finished point-cloud run")
    parser.add_argument("--image", default="", help="workdir of a finished image run")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    out = {"generator": generator_figures(args.num_showers, args.repeats)}
    if args.cloud and args.image:
        out["comparison"] = comparison(args.cloud, args.image)
    write_json(os.path.join(RESULTS, "calo.json"), out)


if __name__ == "__main__":
    main()
