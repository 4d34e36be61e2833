"""Where a CPU training step of the calo point-cloud model goes, and what width/depth cost.

    python benchmarks/train_step.py            # the default calo preset's data and cell model
    python benchmarks/train_step.py --quick --models=64x3   # fewer repetitions, one variant

For the default preset (``experiments/calo.py``) it times, in one process:

* the host side of a step: building a bucketed batch (``CaloData.cloud_batch``: shuffling,
  dequantisation noise, features, standardisation);
* the compiled train step (forward, backward, AdamW, EMA) at every bucket length, and the
  forward pass alone, for the configured cell model and for other widths and depths;
* the expected steps/s over the bucket mix the run trains on (fraction of batches per bucket).

Prints a table and writes ``train_step.json`` under ``--out``; times are medians of repeated
calls after compilation, and the width/depth rows are given as ratios to the default model's
per-step time measured in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import calo as calo_config  # noqa: E402
from fpcd.experiments.calo import CaloExperiment  # noqa: E402
from fpcd.nets import apply_batched, count_parameters  # noqa: E402
from fpcd.parallel import data_mesh  # noqa: E402
from fpcd.runner import make_stage_state  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="64x2,96x2e,64x3e,128x2e,48x4e",
                        help="widthxdepth variants timed beside the configured cell model; a trailing e adds "
                             "the layer embedding (without it, none)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 20
    cfg = calo_config.get_config("")
    experiment = CaloExperiment(cfg, progress=False)
    data = experiment.load_data()
    stage = experiment.stages(data)[1]

    batch_size = cfg.train_set.batch_size

    def bucket_batch(b, step):
        """The training batch of ``batch_size`` showers of bucket ``b`` (padded to its length) at ``step``."""
        idx = np.flatnonzero(data.buckets == b)[:batch_size]
        return data.cloud_batch(cfg.seed + 1, idx, slice(None), int(data.lengths[b]), step)

    biggest = int(np.argmax(np.bincount(data.buckets, minlength=len(data.lengths))))
    host = _median_seconds(lambda: bucket_batch(biggest, 17), repeats)
    counts = np.bincount(data.buckets, minlength=len(data.lengths))
    batches = counts // batch_size
    share = batches / batches.sum()

    def time_model(width, depth, num_heads, layer_embedding):
        with cfg.unlocked():
            cfg.cell_model.update({"width": width, "depth": depth, "num_heads": num_heads,
                                   "layer_embedding": layer_embedding})
        model = experiment.models(data)[1]
        state, step_fn = make_stage_state(dataclasses.replace(stage, model=model), experiment.sde,
                                          data_mesh(jax.devices()[:1]))
        per_length = {}
        for b, length in enumerate(data.lengths):
            batch = bucket_batch(b, 0)
            holder = {"state": state}

            def one_step():
                holder["state"], metrics = step_fn(holder["state"], batch)
                return metrics["loss"]

            one_step()  # compile
            step = _median_seconds(one_step, repeats)
            forward = eqx.filter_jit(lambda m, x: apply_batched(m, x, jax.numpy.full((len(x),), 0.5), mask=batch["mask"],
                                                         cond=batch["cond"]))
            forward(model, batch["x"]).block_until_ready()
            per_length[int(length)] = {"step_ms": 1e3 * step,
                                       "forward_ms": 1e3 * _median_seconds(lambda: forward(model, batch["x"]), repeats)}
            state = holder["state"]
        mean_step = float(sum(share[b] * per_length[int(n)]["step_ms"] for b, n in enumerate(data.lengths)))
        return {"width": width, "depth": depth, "layer_embedding": layer_embedding,
                "parameters": count_parameters(model), "per_length": per_length,
                "mean_step_ms": mean_step, "steps_per_second": 1e3 / (mean_step + 1e3 * host)}

    m = cfg.cell_model
    default = (m.width, m.depth, m.num_heads, bool(m.layer_embedding))
    variants = [default]
    for item in filter(None, args.models.split(",")):  # "96x2", or "64x2e" with the layer embedding
        width, depth = item.rstrip("e").split("x")
        variants.append((int(width), int(depth), m.num_heads, item.endswith("e")))
    rows = [time_model(*v) for v in variants]
    base = rows[0]["mean_step_ms"]
    print(f"host batch: {1e3 * host:.2f} ms; bucket lengths {list(map(int, data.lengths))}, "
          f"share of batches {np.round(share, 3).tolist()}")
    print("| width | depth | layer embedding | parameters | " + " | ".join(f"step ms @{n}" for n in data.lengths)
          + " | fwd ms @max | mean step ms | ratio | steps/s |")
    print("|" + " --- |" * (len(data.lengths) + 8))
    for r in rows:
        longest = r["per_length"][int(data.lengths[-1])]["forward_ms"]
        print(f"| {r['width']} | {r['depth']} | {'yes' if r['layer_embedding'] else 'no'} | {r['parameters']:,} | "
              + " | ".join(f"{r['per_length'][int(n)]['step_ms']:.1f}" for n in data.lengths)
              + f" | {longest:.1f} | {r['mean_step_ms']:.1f} | {r['mean_step_ms'] / base:.2f} | "
              f"{r['steps_per_second']:.1f} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_step.json")
    with open(path, "w") as f:
        json.dump({"host_batch_ms": 1e3 * host, "bucket_lengths": [int(n) for n in data.lengths],
                   "bucket_share": share.tolist(), "models": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
