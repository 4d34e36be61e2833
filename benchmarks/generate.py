"""Generation throughput of a trained CaloChallenge workdir: showers per second of every sampler
run (and distilled student) beside the built-in simulator's, measured in one run.

    python benchmarks/generate.py                                  # runs/calochallenge, 500 showers
    python benchmarks/generate.py --workdir=runs/calochallenge_ds2 --config=experiments/calochallenge.py:ds2

Each sampler draws ``--num_showers`` showers through both stages from the workdir alone (its
``generation_state.json`` and checkpoints, as ``--mode=generate`` does) at incident energies
log-uniform over the training range; the time is the sampling time without compilation (the
runner's warm-up batch). The simulator (:func:`fpcd.data.calochallenge.simulate`) generates the
same number of showers, best of three. Prints a table and writes
``benchmarks/results/generate.json`` with the ratios to the simulator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.cli import experiment_class  # noqa: E402
from fpcd.config import student_steps  # noqa: E402
from fpcd.data import calochallenge as cc  # noqa: E402
from fpcd.io import write_json  # noqa: E402
from fpcd.parallel import data_mesh  # noqa: E402
from fpcd.runner import BatchSampler, restore_models, restore_students  # noqa: E402
from fpcd.runner.generation import read_generation_state  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _config(spec: str):
    import importlib

    path, _, variant = spec.partition(":")
    module = importlib.import_module(os.path.splitext(os.path.basename(path))[0])
    return module.get_config(variant)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "calochallenge"))
    parser.add_argument("--config", default="experiments/calochallenge.py")
    parser.add_argument("--num_showers", type=int, default=500)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    cfg = _config(args.config)
    saved = json.load(open(os.path.join(args.workdir, "config.json")))
    experiment = experiment_class(cfg.experiment)(cfg, progress=False)
    mesh = data_mesh()
    data = experiment.generation_data(read_generation_state(args.workdir))
    stages = experiment.generation_stages(data)
    teacher = restore_models(experiment, stages, mesh, args.workdir)
    rounds = saved.get("distill", {}).get("rounds", 0)
    students = {}
    if rounds:
        cfg.distill.rounds = rounds
        students = restore_students(experiment, stages, mesh, args.workdir, tuple(cfg.distill.sample_steps))
    low, high = data.state.energy_range_mev
    energies = np.exp(np.random.default_rng(0).uniform(np.log(low), np.log(high), args.num_showers))
    sampler = BatchSampler(experiment.sde, mesh, False)
    entries = [(name, dict(run), teacher) for name, run in cfg.sampling.runs.items()]
    entries += [(f"student_{k}", {"method": "ddim", "steps": k, "t_min": float(cfg.distill.t_min)}, students[k])
                for k in students]
    rows = []
    for name, run, models in entries:
        _, info = experiment.generate_showers(data.state, models, run, jax.random.key(1), sampler, energies)
        rows.append({"run": name, "nfe": info["nfe"], "seconds": info["seconds"],
                     "showers_per_second": args.num_showers / info["seconds"]})
    cc.simulate(100, dataset=data.state.dataset, seed=99)  # warm caches
    times = []
    for r in range(3):
        start = time.perf_counter()
        cc.simulate(args.num_showers, dataset=data.state.dataset, energy_range_mev=(low, high), seed=r)
        times.append(time.perf_counter() - start)
    simulator = args.num_showers / min(times)
    print(f"{'run':<14}{'NFE':>5}{'showers/s':>12}{'ms/shower':>11}{'/ simulator':>13}")
    for row in rows:
        row["ratio_to_simulator"] = row["showers_per_second"] / simulator
        print(f"{row['run']:<14}{row['nfe']:>5}{row['showers_per_second']:>12.1f}"
              f"{1000 / row['showers_per_second']:>11.2f}{row['ratio_to_simulator']:>13.4f}")
    print(f"{'simulator':<14}{'':>5}{simulator:>12.1f}{1000 / simulator:>11.2f}{1.0:>13.4f}")
    result = {"workdir": os.path.abspath(args.workdir), "num_showers": args.num_showers,
              "devices": [str(d) for d in jax.devices()], "simulator_showers_per_second": simulator, "runs": rows,
              "students_distilled": bool(student_steps(cfg))}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "generate.json"), result)
    return result


if __name__ == "__main__":
    main()
