"""Time every jet metric on 50k-jet samples (the jetnet recommendation).

    python benchmarks/metrics.py [--num_jets 50000] [--source_jets 2000]

The 50k-jet samples are built from ``--source_jets`` generated top and light-quark jets (cached),
each copy with a small random jitter, so the timing is that of full-size inputs; the values are
not physics results. Prints a table and writes ``benchmarks/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fpcd.data.jetnet import cached_generate  # noqa: E402
from fpcd.io import write_json  # noqa: E402
from fpcd.metrics import jets as J  # noqa: E402


def enlarge(particles, num_jets, seed):
    rng = np.random.default_rng(seed)
    out = particles[rng.integers(0, len(particles), num_jets)].copy()
    real = out[..., 3] > 0.5
    out[..., 0] += rng.normal(0, 0.01, out.shape[:2]) * real
    out[..., 1] += rng.normal(0, 0.01, out.shape[:2]) * real
    out[..., 2] *= np.exp(rng.normal(0, 0.02, out.shape[:2])) * real
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_jets", type=int, default=50_000)
    parser.add_argument("--source_jets", type=int, default=2000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "metrics.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Recommended number")
    truth = enlarge(cached_generate("t", args.source_jets, seed=101).particle_features, args.num_jets, 1)
    generated = enlarge(cached_generate("q", args.source_jets, seed=102).particle_features, args.num_jets, 2)

    rows = []

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
        value = np.asarray(value, float)
        shown = f"shape {value.shape}" if value.size > 5 else value.round(6).tolist()
        rows.append({"metric": name, "seconds": seconds, "value": shown if value.size > 5 else value.tolist()})
        print(f"{name:<28}{seconds:>9.2f} s   {shown}", flush=True)
        return value

    print(f"{args.num_jets} jets per sample, 30 particles\n{'metric':<28}{'time':>11}   value")
    features = {}
    features["truth"] = timed("EFPs d<=4 (36), sample 1", lambda: J.get_fpd_kpd_jet_features(truth))
    features["generated"] = timed("EFPs d<=4 (36), sample 2", lambda: J.get_fpd_kpd_jet_features(generated))
    timed("w1m (5 x 50k)", lambda: J.w1m(truth, generated)[0])
    timed("w1p (5 x 50k)", lambda: J.w1p(truth, generated)[0])
    timed("w1efp (5 x 50k, incl. EFPs)", lambda: np.mean(J.w1efp(truth, generated)[0]))
    timed("fpd (10 sizes x 20)", lambda: J.fpd(features["truth"], features["generated"])[0])
    timed("kpd (10 x 5k)", lambda: J.kpd(features["truth"], features["generated"])[0])
    total = sum(r["seconds"] for r in rows)
    print(f"{'total':<28}{total:>9.2f} s")
    write_json(args.out, {"num_jets": args.num_jets, "rows": rows, "total_seconds": total})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
