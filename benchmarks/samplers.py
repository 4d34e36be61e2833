"""Sampler overhead and diffrax-vs-scipy ODE benchmark on one SetTransformer.

    python benchmarks/samplers.py                 # CPU-sized defaults
    python benchmarks/samplers.py --width=128 --depth=4 --batch=256   # the CPU budget example

(a) For each fixed-step sampler (em, pc, ddim, dpmpp_2m, heun): wall time per NFE divided by the
    time of one bare jitted batched forward pass of the same network on the same batch (goal
    <= 1.10: the sampler adds little beyond its network calls).
(b) The probability-flow ODE with diffrax Dopri5 (one compiled solve) against scipy's
    ``solve_ivp(method="RK45")`` calling the same jitted vector field from the host, at
    rtol = atol = 1e-3 and 1e-5: NFE of each and the wall-time ratio (goal: NFE within 10%,
    diffrax >= 10x faster).

Times are the best of several warm (compiled) calls, forward and samplers interleaved; ratios are measured in the same run.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.io import write_json  # noqa: E402
from fpcd.nets import SetTransformer, score_fn_from  # noqa: E402
from fpcd.sampling import sample  # noqa: E402
from fpcd.sde import VPSDE  # noqa: E402
from scipy_rk45 import sample_scipy_rk45  # noqa: E402  (benchmarks/, this script's directory)


def best_time(fn, repeats):
    """Shortest wall time of ``repeats`` warm calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--particles", type=int, default=30)
    parser.add_argument("--features", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-5])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "samplers.json"))
    args = parser.parse_args()

    sde = VPSDE()
    model = SetTransformer(args.features, width=args.width, depth=args.depth, num_heads=args.heads,
                           key=jax.random.key(0))
    shape = (args.batch, args.particles, args.features)
    multiplicity = jax.random.randint(jax.random.key(1), (args.batch,), args.particles // 2, args.particles + 1)
    mask = (jnp.arange(args.particles)[None, :] < multiplicity[:, None]).astype(jnp.float32)
    score_fn = score_fn_from(model, sde, mask=mask)
    x = jax.random.normal(jax.random.key(2), shape) * mask[..., None]
    t = jnp.full((args.batch,), 0.5)

    params, static = eqx.partition(score_fn, eqx.is_array)
    forward_jit = jax.jit(lambda p, x, t: eqx.combine(p, static)(x, t))
    forward = lambda: forward_jit(params, x, t)  # noqa: E731
    jax.block_until_ready(forward())

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  network: SetTransformer width "
          f"{args.width} depth {args.depth}, batch {shape}")
    # Interleave the forward and sampler timings over rounds so that slow phases of a shared
    # machine hit both alike; keep the best of each.
    methods = [("em", {}), ("pc", {"snr": 0.16}), ("ddim", {}), ("dpmpp_2m", {}), ("heun", {})]
    runs = {m: (lambda m=m, o=o: sample(score_fn, sde, jax.random.key(3), shape, method=m, mask=mask,
                                        steps=args.steps, **o)) for m, o in methods}
    nfes = {m: run()[1] for m, run in runs.items()}
    best = {name: float("inf") for name in ["forward", *runs]}
    for _ in range(args.repeats):
        best["forward"] = min(best["forward"], best_time(forward, 10))
        for m, run in runs.items():
            best[m] = min(best[m], best_time(lambda run=run: run()[0], 1))
    forward_seconds = best["forward"]
    print(f"bare forward pass: {forward_seconds * 1e3:.3f} ms")
    print(f"\n(a) fixed-step samplers, {args.steps} steps")
    print(f"{'method':<8}{'NFE':>6}{'seconds':>10}{'ms/NFE':>10}{'ratio':>8}")
    fixed = []
    for method, _ in methods:
        nfe, seconds = nfes[method], best[method]
        ratio = seconds / nfe / forward_seconds
        fixed.append({"method": method, "steps": args.steps, "nfe": nfe, "seconds": seconds,
                      "seconds_per_nfe": seconds / nfe, "ratio_to_forward": ratio})
        print(f"{method:<8}{nfe:>6}{seconds:>10.3f}{seconds / nfe * 1e3:>10.3f}{ratio:>8.3f}")

    print("\n(b) probability-flow ODE: diffrax Dopri5 vs scipy solve_ivp RK45 (no padding)")
    print(f"{'tol':>8}{'NFE dfx':>9}{'NFE scipy':>11}{'NFE ratio':>11}{'s dfx':>9}{'s scipy':>9}{'speed-up':>10}"
          f"{'max |dx|':>10}")
    full_score = score_fn_from(model, sde)
    sample_scipy_rk45(full_score, sde, jax.random.key(4), shape, rtol=0.5, atol=0.5)  # compile the vector field
    ode = []
    for tol in args.tolerances:
        run = lambda: sample(full_score, sde, jax.random.key(4), shape, method="ode", rtol=tol, atol=tol)  # noqa: E731
        x_dfx, nfe_dfx = run()
        seconds_dfx = best_time(lambda: run()[0], args.repeats)
        start = time.perf_counter()
        x_sp, nfe_sp = sample_scipy_rk45(full_score, sde, jax.random.key(4), shape, rtol=tol, atol=tol)
        seconds_sp = time.perf_counter() - start
        diff = float(np.max(np.abs(np.asarray(x_dfx) - x_sp)))
        row = {"tol": tol, "nfe_diffrax": nfe_dfx, "nfe_scipy": nfe_sp, "nfe_ratio": nfe_dfx / nfe_sp,
               "seconds_diffrax": seconds_dfx, "seconds_scipy": seconds_sp, "speedup": seconds_sp / seconds_dfx,
               "max_abs_difference": diff}
        ode.append(row)
        print(f"{tol:>8.0e}{nfe_dfx:>9}{nfe_sp:>11}{row['nfe_ratio']:>11.3f}{seconds_dfx:>9.3f}{seconds_sp:>9.3f}"
              f"{row['speedup']:>10.1f}{diff:>10.2e}")

    result = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "num_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "network": {"width": args.width, "depth": args.depth, "heads": args.heads},
        "batch_shape": list(shape),
        "forward_seconds": forward_seconds,
        "fixed_step": fixed,
        "ode": ode,
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
