"""The fidelity ablation table: one row per lever (one workdir each), every metric, the cost.

    python benchmarks/ablation.py --experiment=calo baseline=runs/calo lognormal=runs/calo_lognormal ...
    python benchmarks/ablation.py --experiment=jets baseline=runs/jetnet clip=runs/jetnet_clip

Each ``name=workdir`` argument is a finished run of ``experiments/main.py`` (its ``metrics.json``
and ``train_info.json``), one row (group) per workdir in the order given, the reference first by
convention. Calo rows: per sampler run, the cell- and voxel-level W1 / floor (mean over the
observables and the largest one), the classifier AUCs, the seconds spent training (distillation
excluded) and the observable that separates generated from true showers best on its own; an
image-representation workdir has voxel-level columns only. Jets rows: per type the best sampler's W1M, W1P, W1EFP over their
floors, the FPD and KPD with their errors, and the worst FPD of any sampler (a broken tail).
Prints a Markdown table and writes ``ablation_<experiment>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os


def _read(workdir: str, name: str) -> dict:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: is {workdir} a finished run?")
    with open(path) as f:
        return json.load(f)


def _training_seconds(workdir: str) -> float:
    info = _read(workdir, "train_info.json")
    return float(sum(stage.get("seconds", 0.0) for name, stage in info.items()
                     if isinstance(stage, dict) and "_student_" not in name))


def _configured_runs(workdir: str, runs: dict) -> dict:
    """The sampler runs of ``config.sampling.runs`` (not the students, nor the teacher's few-step
    DDIM rows paired with them)."""
    configured = _read(workdir, "config.json")["sampling"]["runs"]
    return {k: v for k, v in runs.items() if k in configured}


def calo_rows(name: str, workdir: str) -> list[dict]:
    """One row per configured sampler run of a calo workdir."""
    metrics, rows = _read(workdir, "metrics.json"), []
    floors = metrics["floor"]
    for run, r in _configured_runs(workdir, metrics["runs"]).items():
        if "voxel" not in r:
            continue
        row = {"lever": name, "run": run, "training_seconds": _training_seconds(workdir)}
        for level in ("cell", "voxel"):
            block = r.get(level, {})
            ratios = {k: v / floors[level][k] for k, v in block.get("w1", {}).items() if floors[level][k] > 0}
            worst = max(ratios, key=ratios.get) if ratios else None
            row[f"w1_over_floor_{level}"] = block.get("w1_over_floor_mean")
            row[f"worst_{level}"] = f"{worst} {ratios[worst]:.1f}" if worst else ""
            row[f"auc_{level}"] = block.get("classifier_high_level", {}).get("auc")
        row["auc_image"] = r["voxel"].get("classifier_voxel_image", {}).get("auc")
        separating = (r.get("cell") or r["voxel"]).get("separating_features") or []
        row["most_separating"] = f"{separating[0]['feature']} ({separating[0]['auc']:.2f})" if separating else ""
        rows.append(row)
    return rows


JET_METRICS = ("w1m", "w1p", "w1efp")


def jets_rows(name: str, workdir: str) -> list[dict]:
    """One row per jet type: the best configured sampler run (by the largest of W1M, W1P, W1EFP over
    their floors) and the worst FPD of any configured run."""
    metrics, rows = _read(workdir, "metrics.json"), []
    for jet_type, block in metrics["types"].items():
        floor = block["floor"]
        teacher = _configured_runs(workdir, block["runs"])
        scores = {k: max(v[m] / floor[m] for m in JET_METRICS) for k, v in teacher.items()}
        best = min(scores, key=scores.get)
        worst = max(teacher, key=lambda k: teacher[k]["fpd"])
        b = teacher[best]
        rows.append({"lever": name, "type": jet_type, "best": best,
                     **{f"{m}_over_floor": b[m] / floor[m] for m in JET_METRICS},
                     "fpd": b["fpd"], "fpd_err": b["fpd_err"], "fpd_floor": floor["fpd"],
                     "kpd": b["kpd"], "kpd_err": b["kpd_err"],
                     "worst_fpd": f"{worst} {teacher[worst]['fpd']:.3g}",
                     "training_seconds": _training_seconds(workdir)})
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=("calo", "jets"), required=True)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("runs", nargs="+", help="name=workdir, the reference first")
    args = parser.parse_args(argv)
    pairs = []
    for item in args.runs:
        if "=" not in item:
            parser.error(f"{item!r}: expected name=workdir")
        pairs.append(item.split("=", 1))
    build = calo_rows if args.experiment == "calo" else jets_rows
    rows = [row for name, workdir in pairs for row in build(name, workdir)]
    if not rows:
        raise SystemExit("no sampler runs in these workdirs")
    print(markdown(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"ablation_{args.experiment}.json")
    with open(path, "w") as f:
        json.dump({"runs": dict(pairs), "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
