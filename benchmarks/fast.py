"""Few-step generation: fidelity against NFE and against time, jets (per type) and calo, one run each.

    python benchmarks/fast.py --jets_workdir=runs/jetnet --calo_workdir=runs/calo   # after --mode=all
    python benchmarks/fast.py --calo_workdir=runs/calo_tiny --quick                  # a smoke run

For every jet type of a trained (and distilled) jets workdir, and for a calo workdir, every row of
the sweep generates samples through both stages and is timed (compilation excluded) in the same
process: scipy RK45 at rtol = atol = 1e-5 (the physics papers' baseline), diffrax Dopri5 at 1e-5
and 1e-3, EM, PC and DDIM at 8-100 NFE, DPM-Solver++(2M) and Heun at 4-32 NFE, the teacher's DDIM
and the distilled students at 8, 4, 2 and 1 steps. Each row's time is given as a ratio to the
RK45 1e-5 row.

Jets: ``--num_jets`` (default 2,000) generated jets per type against as many *fresh* held-out
jets (generated with a seed of their own, cached like the training jets), the floor from a second
set of fresh jets; W1M, W1P, W1EFP, FPD and KPD with their errors: the spread over
``--batches`` bootstrap batches of ``--num_jets`` jets (as jetnet's ``num_batches``). Calo: the
experiment's own evaluators (W1 / floor of the shower observables, classifier AUCs) on
``sampling.num_samples`` showers of the held-out momenta and angles.

Writes ``fast.json`` and ``fast_jets.png`` / ``fast_calo.png`` (fidelity vs NFE and vs time)
under ``--out`` and prints each table with the goals of issue 11 checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from scipy_rk45 import sample_scipy_rk45  # noqa: E402  (benchmarks/scipy_rk45.py)

from fpcd.config import student_steps  # noqa: E402
from fpcd.data import jet_transforms  # noqa: E402
from fpcd.data.jetnet import JET_TYPES, JetSet, cached_generate  # noqa: E402
from fpcd.io import write_json  # noqa: E402
from fpcd.parallel import data_mesh  # noqa: E402
from fpcd.plots.common import save_figure  # noqa: E402
from fpcd.runner import BatchSampler, RunSamples, restore_models, restore_students, run_key  # noqa: E402
from fpcd.sampling import sample  # noqa: E402

BASELINE = "rk45_1e-5"
STUDENT_STEPS = (8, 4, 2, 1)
JET_KEYS = ("w1m", "w1p", "w1efp")


def sweep(quick: bool, students: tuple[int, ...], t_min: float = 1e-3):
    """``name -> (sample function, run options, student steps or None)``, named ``<method>_<NFE>``;
    the teacher's DDIM and the students at ``STUDENT_STEPS`` run on the students' grid (``t_min``)."""
    rows = {BASELINE: (sample_scipy_rk45, {"method": "ode", "rtol": 1e-5, "atol": 1e-5}, None),
            "ode_1e-5": (sample, {"method": "ode", "rtol": 1e-5, "atol": 1e-5}, None),
            "ode_1e-3": (sample, {"method": "ode", "rtol": 1e-3, "atol": 1e-3}, None)}
    nfes = (8, 32) if quick else (8, 16, 32, 100)
    for nfe in nfes:
        rows[f"em_{nfe}"] = (sample, {"method": "em", "steps": nfe}, None)
        rows[f"pc_{nfe}"] = (sample, {"method": "pc", "steps": nfe // 2, "snr": 0.16}, None)
    for nfe in sorted(set(nfes) | set(STUDENT_STEPS)):
        rows[f"ddim_{nfe}"] = (sample, {"method": "ddim", "steps": nfe, "t_min": t_min}, None)
    for nfe in ((4, 16) if quick else (4, 8, 16, 32)):
        rows[f"dpmpp_2m_{nfe}"] = (sample, {"method": "dpmpp_2m", "steps": nfe}, None)
    for steps in ((2, 8) if quick else (2, 4, 8, 16)):  # NFE 2 steps - 1: 3, 7, 15, 31
        rows[f"heun_{2 * steps - 1}"] = (sample, {"method": "heun", "steps": steps}, None)
    for k in students:
        rows[f"student_{k}"] = (sample, {"method": "ddim", "steps": k, "t_min": t_min}, k)
    return rows


def load(workdir: str, experiment_class):
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    experiment = experiment_class(cfg, progress=False)
    data = experiment.load_data()
    stages = experiment.stages(data)
    mesh = data_mesh()
    models = restore_models(experiment, stages, mesh, workdir)
    available = [k for k in STUDENT_STEPS if k in student_steps(cfg)]
    students = restore_students(experiment, stages, mesh, workdir, tuple(available)) if available else {}
    return cfg, experiment, data, mesh, models, students


def run_rows(experiment, data, mesh, models, students, group, group_index, groups, rows, **generate_kw):
    """``name -> (RunSamples)`` of every row for one sample group, printing each as it is done."""
    out = {}
    for index, (name, (sample_fn, run, student)) in enumerate(rows.items()):
        key = run_key(experiment.key("sampling"), groups, group_index, 200 + index)
        if student is not None:  # the student draws the same prior noise as the teacher's DDIM
            key = run_key(experiment.key("sampling"), groups, group_index, 200 + list(rows).index(f"ddim_{student}"))
        sampler = BatchSampler(experiment.sde, mesh, progress=False, sample_fn=sample_fn)
        arrays, info = experiment.generate(data, models if student is None else students[student], group, dict(run),
                                           key, sampler, **generate_kw)
        out[name] = RunSamples(arrays, info, run)
        print(f"{group} {name:<14} NFE {info['nfe']:>5}  {info['seconds']:8.2f} s", flush=True)
    return out


def fresh_jets(cfg, jet_type: str, n: int, offset: int) -> JetSet:
    """``n`` held-out jets never seen in training: generated with a seed of their own, centred."""
    jets = cached_generate(jet_type, n, num_particles=cfg.data.num_particles,
                           seed=cfg.seed + 1000 * JET_TYPES.index(jet_type) + offset,
                           cache_dir=cfg.data.cache_dir or None, progress=True)
    return JetSet(jet_type, jet_transforms.recenter(jets.particle_features), jets.jet_features)


def bench_jets(workdir: str, n: int, batches: int, quick: bool) -> dict:
    from fpcd.experiments.jetnet import JetNetExperiment, jet_metric_row

    cfg, experiment, data, mesh, models, students = load(workdir, JetNetExperiment)
    rows = sweep(quick, tuple(students), float(cfg.distill.t_min) if "distill" in cfg else 1e-3)
    results = {}
    for t_index, jet_type in enumerate(data.types):
        truth, other = fresh_jets(cfg, jet_type, n, 101), fresh_jets(cfg, jet_type, n, 202)
        kw = {"num_batches": batches, "seed": cfg.eval.seed}
        table = {"floor": jet_metric_row(truth, other, **kw)}
        samples = run_rows(experiment, data, mesh, models, students, jet_type, t_index, data.types, rows,
                           num_samples=n)
        for name, r in samples.items():
            jets = JetSet(jet_type, r.arrays["particle_features"], r.arrays["jet_features"])
            table[name] = {"nfe": r.info["nfe"], "nfe_jet_stage": r.info["nfe_jet_stage"],
                           "seconds": r.info["seconds"], "ms_per_jet": 1000 * r.info["seconds"] / n,
                           **jet_metric_row(truth, jets, **kw)}
        for name, r in table.items():
            if name != "floor":
                r["time_ratio_to_rk45_1e-5"] = r["seconds"] / table[BASELINE]["seconds"]
        results[jet_type] = table
    return {"workdir": os.path.abspath(workdir), "num_jets": n, "batches": batches, "types": results,
            "goals": jet_goals(results)}


def within(row, base, factor):
    return all(row[k] <= factor * base[k] for k in JET_KEYS)


def jet_goals(results: dict) -> dict:
    goals = {}
    for jet_type, table in results.items():
        base = table[BASELINE]
        free = [name for name, r in table.items() if name.split("_")[0] in ("dpmpp", "heun") and r["nfe"] <= 16
                and within(r, base, 1.10)]
        goal = {"training_free_within_10pct_at_<=16_nfe": free}
        if "student_8" in table:
            goal["student_8_within_10pct"] = within(table["student_8"], base, 1.10)
        if "student_1" in table:
            goal["student_1_within_1.5x"] = within(table["student_1"], base, 1.5)
            goal["student_1_speedup"] = base["seconds"] / table["student_1"]["seconds"]
        goals[jet_type] = goal
    return goals


def bench_calo(workdir: str, quick: bool) -> dict:
    from fpcd.experiments.calo import CaloExperiment

    cfg, experiment, data, mesh, models, students = load(workdir, CaloExperiment)
    rows = sweep(quick, tuple(students), float(cfg.distill.t_min) if "distill" in cfg else 1e-3)
    samples = run_rows(experiment, data, mesh, models, students, "", 0, ("",), rows)
    metrics = experiment.evaluate(data, {"": samples}, models, figures_dir=None)
    table = {}
    for name, r in metrics["runs"].items():
        table[name] = {"nfe": r["nfe"], "seconds": r["seconds"], "ms_per_shower": r["ms_per_shower"],
                       "time_ratio_to_rk45_1e-5": r["seconds"] / metrics["runs"][BASELINE]["seconds"]}
        for level in ("cell", "voxel"):
            if level in r:
                table[name][f"w1_over_floor_{level}"] = r[level]["w1_over_floor_mean"]
                if "classifier_high_level" in r[level]:
                    table[name][f"auc_{level}"] = r[level]["classifier_high_level"]["auc"]
        if "classifier_voxel_image" in r.get("voxel", {}):
            table[name]["auc_voxel_image"] = r["voxel"]["classifier_voxel_image"]["auc"]
    aucs = [k for k in table[BASELINE] if k.startswith("auc_")]
    goals = {f"student_{k}_auc_minus_teacher": {a: table[f"student_{k}"][a] - table[BASELINE][a] for a in aucs}
             for k in (8, 1) if f"student_{k}" in table}
    return {"workdir": os.path.abspath(workdir), "num_showers": cfg.sampling.num_samples, "rows": table,
            "truth_auc": metrics.get("summary", {}), "goals": goals}


def family(name: str) -> str:
    return "rk45 (scipy)" if name.startswith("rk45") else name.rsplit("_", 1)[0]


def plot(tables: dict, keys: tuple[str, ...], path: str, floors: dict | None = None):
    """One row of panels per table (jet type or calo): each key against NFE and against ms per sample."""
    fig, axes = plt.subplots(len(tables), 2 * len(keys), figsize=(4.2 * 2 * len(keys), 3.3 * len(tables)),
                             squeeze=False)
    for row_axes, (label, table) in zip(axes, tables.items()):
        families = {}
        for name, r in table.items():
            if name != "floor":
                families.setdefault(family(name), []).append(r)
        for j, key in enumerate(keys):
            for x_key, ax in (("nfe", row_axes[2 * j]), ("ms", row_axes[2 * j + 1])):
                for i, (fam, points) in enumerate(sorted(families.items())):
                    xs = [p["nfe"] if x_key == "nfe" else 1000 * p["seconds"] / max(p.get("n", 1), 1) for p in points]
                    order = np.argsort(xs)
                    ys = [points[o][key] for o in order]
                    errs = [points[o].get(f"{key}_std", 0.0) for o in order]
                    ax.errorbar(np.asarray(xs)[order], ys, yerr=errs, fmt="o", ms=3, color=f"C{i % 10}",
                                ls="--" if i >= 10 else "-", label=fam)
                if floors is not None and label in floors:
                    ax.axhline(floors[label][key], color="k", ls=":", lw=1, label="truth vs truth")
                ax.set_xscale("log")
                ax.set_title(f"{label}: {key}", fontsize=9)
                ax.set_xlabel("NFE (stage 2)" if x_key == "nfe" else "ms per sample (both stages)")
        row_axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def print_jets(result: dict) -> None:
    print(f"\n{'type':<5}{'row':<14}{'NFE':>5}{'ms/jet':>9}{'t/tRK45':>9}{'W1M':>17}{'W1P':>17}{'W1EFP':>21}")
    for jet_type, table in result["types"].items():
        for name, r in table.items():
            ms = r.get("ms_per_jet", 0.0)
            print(f"{jet_type:<5}{name:<14}{r.get('nfe', 0):>5}{ms:>9.3f}{r.get('time_ratio_to_rk45_1e-5', 0):>9.3f}"
                  f"{r['w1m']:>10.5f}±{r['w1m_std']:<6.5f}{r['w1p']:>10.5f}±{r['w1p_std']:<6.5f}"
                  f"{r['w1efp']:>11.3e}±{r['w1efp_std']:<9.2e}")
        print(f"{jet_type} goals: {result['goals'][jet_type]}")


def print_calo(result: dict) -> None:
    rows = result["rows"]
    keys = [k for k in next(iter(rows.values())) if k.startswith(("w1_", "auc_"))]
    print(f"\n{'row':<14}{'NFE':>5}{'ms/shower':>11}{'t/tRK45':>9}" + "".join(f"{k:>24}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<14}{r['nfe']:>5}{r['ms_per_shower']:>11.3f}{r['time_ratio_to_rk45_1e-5']:>9.3f}"
              + "".join(f"{r[k]:>24.3f}" for k in keys))
    print(f"calo goals (student AUC - RK45 1e-5 teacher AUC): {result['goals']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jets_workdir", default=None, help="workdir of a trained and distilled jets experiment")
    parser.add_argument("--calo_workdir", default=None, help="workdir of a trained and distilled calo experiment")
    parser.add_argument("--num_jets", type=int, default=2000, help="generated and held-out jets per type")
    parser.add_argument("--batches", type=int, default=5, help="bootstrap batches for the W1 errors")
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not (args.jets_workdir or args.calo_workdir):
        parser.error("give --jets_workdir and/or --calo_workdir")
    os.makedirs(args.out, exist_ok=True)
    results = {"device": jax.devices()[0].device_kind}
    if args.jets_workdir:
        results["jets"] = bench_jets(args.jets_workdir, args.num_jets, args.batches, args.quick)
        for table in results["jets"]["types"].values():
            for r in table.values():
                r["n"] = args.num_jets
        print_jets(results["jets"])
        plot({t: {k: v for k, v in table.items() if k != "floor"} for t, table in results["jets"]["types"].items()},
             JET_KEYS, os.path.join(args.out, "fast_jets.png"),
             floors={t: table["floor"] for t, table in results["jets"]["types"].items()})
    if args.calo_workdir:
        results["calo"] = bench_calo(args.calo_workdir, args.quick)
        print_calo(results["calo"])
        rows = {name: {**r, "n": results["calo"]["num_showers"]} for name, r in results["calo"]["rows"].items()}
        plot({"calo": rows}, tuple(k for k in next(iter(rows.values())) if k.startswith(("w1_", "auc_"))),
             os.path.join(args.out, "fast_calo.png"))
    write_json(os.path.join(args.out, "fast.json"), results)
    print(f"wrote {os.path.join(args.out, 'fast.json')} and the PNGs")


if __name__ == "__main__":
    main()
