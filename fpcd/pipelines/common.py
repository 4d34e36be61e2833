"""Pieces every experiment pipeline uses: workdir bookkeeping, a trained stage, timed sampling."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fpcd.checkpoint import Checkpointer
from fpcd.config import ConfigError
from fpcd.io import write_json
from fpcd.parallel import batch_sharding, replicate
from fpcd.sampling import sample
from fpcd.sde import VPSDE
from fpcd.train import fit, init_train_state, make_optimizer, make_train_step

CONFIG_FILE = "config.json"


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def prepare_workdir(workdir: str, config: dict, identity_fields: tuple[str, ...]) -> None:
    """Create ``workdir`` and record ``config`` there; refuse a workdir holding a different run.

    Two configs are the same run when they agree on every field under ``identity_fields``
    (dotted prefixes such as ``"model"`` or ``"train.prediction"``); other fields (number of
    steps, sampling runs) may change between invocations so a run can be extended or resampled.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = _flatten(json.load(f))
        current = _flatten(json.loads(json.dumps(config)))
        keys = sorted(k for k in set(previous) | set(current) if any(k == p or k.startswith(p + ".") for p in identity_fields))
        differing = [k for k in keys if previous.get(k) != current.get(k)]
        if differing:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in differing[:5])
            raise ConfigError(
                f"workdir {workdir} holds a run of a different config ({details}); "
                "choose another --workdir or remove that one"
            )
    write_json(path, config)


def build_sde(cfg) -> VPSDE:
    return VPSDE(beta_min=float(cfg.sde.beta_min), beta_max=float(cfg.sde.beta_max), schedule=cfg.sde.schedule)


def checkpoint_dir(workdir: str, stage: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def make_stage(model, train_cfg, sde: VPSDE, key, mesh):
    """(fresh train state replicated on ``mesh``, jitted step) for one model stage."""
    optimizer = make_optimizer(
        learning_rate=train_cfg.learning_rate,
        num_steps=train_cfg.num_steps,
        warmup_steps=train_cfg.warmup_steps,
        grad_clip=train_cfg.grad_clip or None,
        weight_decay=train_cfg.weight_decay,
        schedule=train_cfg.schedule,
    )
    state = replicate(init_train_state(model, optimizer, key), mesh)
    step_fn = make_train_step(
        sde, optimizer, prediction=train_cfg.prediction, ema_decay=train_cfg.ema_decay, t_min=train_cfg.t_min, mesh=mesh
    )
    return state, step_fn


def train_stage(*, stage: str, model, train_cfg, sde, key, mesh, workdir, batch_fn: Callable[[int], dict],
                config: dict, progress: bool = True):
    """Train one model stage, resuming from its newest checkpoint. Returns ``(state, info)``."""
    state, step_fn = make_stage(model, train_cfg, sde, key, mesh)
    with Checkpointer(checkpoint_dir(workdir, stage), save_every=train_cfg.checkpoint_every,
                      max_to_keep=train_cfg.keep_checkpoints, config=config) as checkpointer:
        restored = checkpointer.restore(state)
        if restored is not None:
            state = restored
            if jax.process_index() == 0:
                print(f"[{stage}] resuming from checkpoint at step {int(state.step)}", flush=True)
        start = time.perf_counter()
        state, history = fit(state, step_fn=step_fn, batch_fn=batch_fn, num_steps=train_cfg.num_steps,
                             checkpointer=checkpointer, log_every=train_cfg.log_every, description=f"train {stage}",
                             progress=progress)
        seconds = time.perf_counter() - start
    return state, {"steps": int(state.step), "seconds_this_invocation": seconds, "history": history}


def restore_stage(*, stage: str, model, train_cfg, sde, key, mesh, workdir):
    """The newest checkpointed state of a stage; ConfigError when there is none."""
    state, _ = make_stage(model, train_cfg, sde, key, mesh)
    with Checkpointer(checkpoint_dir(workdir, stage), save_every=train_cfg.checkpoint_every,
                      max_to_keep=train_cfg.keep_checkpoints) as checkpointer:
        restored = checkpointer.restore(state)
    if restored is None:
        raise ConfigError(f"no checkpoint of stage {stage!r} in {workdir}; run with --mode=train first")
    return restored


def warmup_options(method: str, options: dict) -> dict:
    """Options compiling the same sampler as ``options`` but running almost no steps."""
    if method == "ode":
        return {**options, "rtol": 0.5, "atol": 0.5}
    return {**options, "steps": 1}


def timed_sampling(make_score_fn: Callable, sde: VPSDE, key, *, num_samples: int, batch_size: int,
                   sample_shape: tuple, run: dict, description: str, make_mask: Callable | None = None,
                   progress: bool = True, sample_fn: Callable = sample, mesh=None):
    """Sample ``num_samples`` in batches with one sampler run; compile time is excluded.

    Args:
      make_score_fn: ``(batch_index, batch_size) -> score_fn`` (conditioning may vary by batch).
      sample_shape: shape of one sample, e.g. ``(D,)`` or ``(N, D)``.
      run: ``{"method": ..., **options}``.
      make_mask: optional ``(batch_index, batch_size) -> mask``.
      sample_fn: the sampler, :func:`fpcd.sampling.sample` or one with its signature.
      mesh: when given (and ``batch_size`` divides by its size), each batch is sampled
        data-parallel over its devices.

    Returns:
      ``(samples (num_samples, ...), nfe, seconds)`` where ``seconds`` is the sampling wall time
      of all batches and ``nfe`` the largest per-batch NFE.
    """
    options = dict(run)
    method = options.pop("method")
    num_batches = -(-num_samples // batch_size)
    shape = (batch_size,) + tuple(sample_shape)
    sharded = sample_fn is sample and mesh is not None and mesh.devices.size > 1 and batch_size % mesh.devices.size == 0
    extra = {"sharding": batch_sharding(mesh)} if sharded else {}

    def draw(index, opts, k):
        mask = None if make_mask is None else make_mask(index, batch_size)
        x, nfe = sample_fn(make_score_fn(index, batch_size), sde, k, shape, method=method, mask=mask, **extra, **opts)
        return jax.block_until_ready(x), nfe

    draw(0, warmup_options(method, options), jax.random.fold_in(key, 10**6))  # compile
    outputs, nfes = [], []
    start = time.perf_counter()
    for index in tqdm(range(num_batches), desc=description, disable=not progress, dynamic_ncols=True, leave=False):
        x, nfe = draw(index, options, jax.random.fold_in(key, index))
        outputs.append(np.asarray(x))
        nfes.append(nfe)
    seconds = time.perf_counter() - start
    return np.concatenate(outputs)[:num_samples], max(nfes), seconds
