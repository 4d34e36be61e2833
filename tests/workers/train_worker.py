"""A training run in its own process, for the resume and multi-device tests.

    python tests/workers/train_worker.py WORKDIR NUM_STEPS [--kill-at STEP] [--devices N]

Trains a small ResMLP on a Gaussian mixture with checkpoints every 5 steps (the last 2 kept),
resuming from the newest one; ``--kill-at`` sends SIGKILL to itself after that step (the save of
the step before it may still be in flight). At the end it writes the final state's arrays to
``WORKDIR/final.npz``. ``--devices N`` trains data-parallel over the first N devices.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.checkpoint import Checkpointer  # noqa: E402
from fpcd.data.gmm import toy_mixture  # noqa: E402
from fpcd.nets import ResMLP  # noqa: E402
from fpcd.parallel import data_mesh, replicate, shard_batch  # noqa: E402
from fpcd.sde import VPSDE  # noqa: E402
from fpcd.train import batch_indices, fit, init_train_state, make_optimizer, make_train_step  # noqa: E402

BATCH = 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("num_steps", type=int)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--no-checkpoints", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    mesh = data_mesh(jax.devices()[: args.devices] if args.devices else None)
    sde = VPSDE()
    data = np.asarray(toy_mixture(2).sample(jax.random.key(0), 1000), np.float32)
    model = ResMLP(2, width=32, depth=2, key=jax.random.key(1))
    optimizer = make_optimizer(learning_rate=3e-3, num_steps=args.num_steps, warmup_steps=5)
    state = replicate(init_train_state(model, optimizer, jax.random.key(2)), mesh)
    step_fn = make_train_step(sde, optimizer, ema_decay=0.9, mesh=mesh)

    def batch_fn(step):
        return shard_batch({"x": data[batch_indices(0, step, len(data), BATCH)]}, mesh)

    def on_step(step, _):
        if args.kill_at is not None and step == args.kill_at:
            print(f"killing myself after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointer = None
    if not args.no_checkpoints:
        checkpointer = Checkpointer(os.path.join(args.workdir, "ckpt"), save_every=5, max_to_keep=2)
        restored = checkpointer.restore(state)
        if restored is not None:
            state = restored
            print(f"resumed at step {int(state.step)}", flush=True)
    state, history = fit(state, step_fn=step_fn, batch_fn=batch_fn, num_steps=args.num_steps,
                         checkpointer=checkpointer, log_every=5, progress=False, on_step=on_step)
    if checkpointer is not None:
        checkpointer.close()
    leaves = jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))
    np.savez(os.path.join(args.workdir, "final.npz"), *[np.asarray(leaf) for leaf in leaves])
    np.savez(os.path.join(args.workdir, "history.npz"), losses=[row["loss"] for row in history],
             grad_norms=[row["grad_norm"] for row in history])
    x_sharding = batch_fn(0)["x"].sharding
    print(f"final loss {history[-1]['loss']:.6f}; batch on {len(x_sharding.device_set)} devices; "
          f"params on {len(leaves[0].sharding.device_set)} devices", flush=True)


if __name__ == "__main__":
    main()
