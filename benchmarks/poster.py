"""The poster's speed/fidelity table ("Accelerating Diffusion Models in Particle Physics"), measured.

    python benchmarks/poster.py --workdir=runs/jetnet            # after training the jets experiment
    python benchmarks/poster.py --workdir=runs/jetnet_tiny --quick  # a smoke run of the sweep

For every jet type of the trained run and every row of the sweep -- the probability-flow ODE with
scipy RK45 (the papers' baseline) at rtol = atol = 1e-5 and 1e-3 and with diffrax Dopri5 at 1e-5,
1e-4, 1e-3; Euler-Maruyama at 50-1000 steps; predictor-corrector at 25-500 steps with a few snr
values; DDIM at 10-500 steps -- it generates jets with both stages and measures NFE (particle
stage), wall time, the time ratio to the RK45 1e-5 row, and W1M, W1P, W1EFP against held-out
truth (and the truth-vs-truth floors). It prints the table, names the cheapest setting per type
whose three W1 are within 10 % of the RK45 1e-5 row, and writes JSON and a PNG (W1 vs NFE, one
curve per sampler, floors as lines) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from scipy_rk45 import sample_scipy_rk45  # noqa: E402  (benchmarks/scipy_rk45.py)

from fpcd.data.jetnet import JetSet  # noqa: E402
from fpcd.experiments.jetnet import JetNetExperiment  # noqa: E402
from fpcd.io import write_json  # noqa: E402
from fpcd.metrics import jets as jet_metrics  # noqa: E402
from fpcd.parallel import data_mesh  # noqa: E402
from fpcd.plots.common import save_figure  # noqa: E402
from fpcd.runner import BatchSampler, restore_models, run_key  # noqa: E402
from fpcd.sampling import sample  # noqa: E402

BASELINE = "rk45_1e-5"
TOLERANCE = 0.10


def sweep(quick: bool):
    """``name -> (sampler function, run options)`` rows of the table."""
    rows = {
        "rk45_1e-5": (sample_scipy_rk45, {"method": "ode", "rtol": 1e-5, "atol": 1e-5}),
        "rk45_1e-3": (sample_scipy_rk45, {"method": "ode", "rtol": 1e-3, "atol": 1e-3}),
    }
    for tol in ("1e-5", "1e-4", "1e-3"):
        rows[f"ode_{tol}"] = (sample, {"method": "ode", "rtol": float(tol), "atol": float(tol)})
    for steps in ((50, 300) if quick else (50, 100, 300, 500, 1000)):
        rows[f"em_{steps}"] = (sample, {"method": "em", "steps": steps})
    for steps in ((25, 125) if quick else (25, 50, 125, 250, 500)):
        for snr in ((0.16,) if quick else (0.1, 0.16, 0.3)):  # named by NFE, as in every config
            rows[f"pc_{2 * steps}_snr{snr}"] = (sample, {"method": "pc", "steps": steps, "snr": snr})
    for steps in ((10, 100) if quick else (10, 50, 100, 500)):
        rows[f"ddim_{steps}"] = (sample, {"method": "ddim", "steps": steps})
    return rows


def w1s(truth, jets, seed):
    n = min(len(truth), len(jets))
    kw = {"num_eval_samples": n, "num_batches": 1, "seed": seed}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "w1m": jet_metrics.w1m(truth.particle_features, jets.particle_features, **kw)[0],
            "w1p": float(np.mean(jet_metrics.w1p(truth.particle_features, jets.particle_features, **kw)[0])),
            "w1efp": float(np.mean(jet_metrics.w1efp(truth.particle_features, jets.particle_features, **kw)[0])),
        }


def cheapest(rows: dict) -> str | None:
    """The fastest row whose W1M, W1P and W1EFP are all within 10 % of the baseline's."""
    base = rows[BASELINE]
    good = [name for name, r in rows.items()
            if all(r[k] <= (1 + TOLERANCE) * base[k] for k in ("w1m", "w1p", "w1efp"))]
    return min(good, key=lambda name: rows[name]["seconds"]) if good else None


def plot(results: dict, path: str):
    types = list(results)
    fig, axes = plt.subplots(len(types), 3, figsize=(13, 3.4 * len(types)), squeeze=False)
    for row_axes, jet_type in zip(axes, types):
        rows, floor = results[jet_type]["rows"], results[jet_type]["floor"]
        for ax, key in zip(row_axes, ("w1m", "w1p", "w1efp")):
            families = {}
            for name, r in rows.items():
                family = "rk45 (scipy)" if name.startswith("rk45") else name.split("_")[0] + (
                    "_" + name.split("_")[2] if name.startswith("pc") else "")
                families.setdefault(family, []).append((r["nfe"], r[key]))
            for i, (family, points) in enumerate(sorted(families.items())):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}", label=family, ms=3)
            ax.axhline(floor[key], color="k", ls="--", lw=1, label="truth vs truth")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{jet_type} jets: {key.upper()}", fontsize=9)
            ax.set_xlabel("NFE (particle stage)")
        row_axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="workdir of a trained jets experiment")
    parser.add_argument("--num_samples", type=int, default=None, help="jets per type (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    with open(os.path.join(args.workdir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    experiment = JetNetExperiment(cfg, progress=True)
    data = experiment.load_data()
    types = data.types
    mesh = data_mesh()
    models = restore_models(experiment, experiment.stages(data), mesh, args.workdir)
    n = args.num_samples or cfg.sampling.num_samples
    results = {}
    for t_index, jet_type in enumerate(types):
        test = data.test[jet_type]
        truth, other = test.take(slice(0, n)), test.take(slice(n, 2 * n))
        floor = w1s(truth, other, cfg.eval.seed)
        rows = {}
        for r_index, (name, (sample_fn, run)) in enumerate(sweep(args.quick).items()):
            key = run_key(experiment.key("sampling"), types, t_index, 100 + r_index)
            sampler = BatchSampler(experiment.sde, mesh, progress=False, sample_fn=sample_fn)
            arrays, info = experiment.generate(data, models, jet_type, dict(run), key, sampler, num_samples=n)
            jets = JetSet(jet_type, arrays["particle_features"], arrays["jet_features"])
            rows[name] = {**run, "nfe": info["nfe"], "nfe_jet_stage": info["nfe_jet_stage"],
                          "seconds": info["seconds"], **w1s(truth, jets, cfg.eval.seed)}
            print(f"{jet_type} {name:<16} NFE {info['nfe']:>5}  {info['seconds']:8.2f} s  "
                  f"W1M {rows[name]['w1m']:.5f}  W1P {rows[name]['w1p']:.5f}  W1EFP {rows[name]['w1efp']:.3e}",
                  flush=True)
        for r in rows.values():
            r["time_ratio_to_rk45_1e-5"] = r["seconds"] / rows[BASELINE]["seconds"]
        results[jet_type] = {"floor": floor, "rows": rows, "cheapest_within_10pct_of_rk45_1e-5": cheapest(rows)}

    print(f"\n{'type':<5}{'setting':<18}{'NFE':>6}{'seconds':>10}{'t/t_RK45':>10}{'W1M':>10}{'W1P':>10}{'W1EFP':>11}")
    for jet_type, res in results.items():
        for name, r in [("floor", {**res["floor"], "nfe": 0, "seconds": 0.0, "time_ratio_to_rk45_1e-5": 0.0}),
                        *res["rows"].items()]:
            print(f"{jet_type:<5}{name:<18}{r['nfe']:>6}{r['seconds']:>10.2f}{r['time_ratio_to_rk45_1e-5']:>10.3f}"
                  f"{r['w1m']:>10.5f}{r['w1p']:>10.5f}{r['w1efp']:>11.3e}")
        print(f"{jet_type}: cheapest setting within 10% of RK45 1e-5 on W1M, W1P and W1EFP: "
              f"{res['cheapest_within_10pct_of_rk45_1e-5']}")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "poster.json"), {"workdir": os.path.abspath(args.workdir), "num_samples": n,
                                                       "device": jax.devices()[0].device_kind, "types": results})
    plot(results, os.path.join(args.out, "poster.png"))
    print(f"wrote {os.path.join(args.out, 'poster.json')} and poster.png")


if __name__ == "__main__":
    main()
