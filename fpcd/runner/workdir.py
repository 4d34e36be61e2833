"""The workdir and the run's identity.

One run per workdir: ``config.json`` records the config of the run it holds; a config that
differs from it on the experiment's ``IDENTITY_FIELDS`` is another run and is refused
(:func:`check_workdir`), and so are checkpoints saved by another run's config
(:func:`check_checkpoints`). Fields added to a config after runs of it were saved are compared
with the value such a run had (the experiment's ``FIELDS_ADDED_LATER``), and fields renamed since
under their new names (``FIELDS_RENAMED``: a run saved before the rename is the same run, and its
``config.json`` is rewritten with the new names when it is next used). A live run holds
``<workdir>/.lock`` (:func:`lock_workdir`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from fpcd.checkpoint import Checkpointer
from fpcd.errors import ConfigError
from fpcd.io import WorkdirLock, WorkdirLockedError, write_json
from fpcd.runner.processes import is_main_process

CONFIG_FILE = "config.json"


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def renamed_fields(flat: dict, renamed: Mapping[str, str] | None) -> dict:
    """``flat`` (dotted field -> value) with each field under an old dotted prefix of ``renamed``
    moved to the new prefix (``{"train_event": "train_global"}`` makes ``train_event.num_steps``
    ``train_global.num_steps``; ``"train"`` does not match ``train_event``)."""
    if not renamed:
        return flat
    out = {}
    for key, value in flat.items():
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def config_differences(saved: dict, config: dict, fields: tuple[str, ...],
                       added_later: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> str:
    """The fields under the dotted prefixes ``fields`` where ``saved`` and ``config`` differ, as
    ``"field: old -> new, ..."`` (at most five), or ``""``. A field of ``added_later`` that
    ``config`` has and ``saved`` lacks counts as saved with its value there; the fields of
    ``saved`` under an old prefix of ``renamed`` (old -> new dotted prefix) are read under the new one."""
    previous, current = renamed_fields(_flatten(saved), renamed), _flatten(json.loads(json.dumps(config)))
    for k, value in (added_later or {}).items():
        if k in current and k not in previous:
            previous[k] = value
    keys = sorted(k for k in set(previous) | set(current) if any(k == p or k.startswith(p + ".") for p in fields))
    differing = [k for k in keys if previous.get(k) != current.get(k)]
    return ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in differing[:5])


def compare_run(saved: dict, config: dict, identity_fields: tuple[str, ...], where: str,
                added_later: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` (``"<where> holds a run of ..."``) unless the recorded config ``saved``
    is a run of ``config``: the same experiment and the same values under ``identity_fields``
    (:func:`config_differences`)."""
    if saved.get("experiment") != config.get("experiment"):
        raise ConfigError(f"{where} holds a run of experiment {saved.get('experiment')!r}, not "
                          f"{config.get('experiment')!r}; choose another --workdir")
    details = config_differences(saved, config, identity_fields, added_later, renamed)
    if details:
        raise ConfigError(f"{where} holds a run of a different config ({details}); "
                          "choose another --workdir or remove that one")


def check_workdir(workdir: str, config: dict, identity_fields: tuple[str, ...],
                  added_later: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> bool:
    """Refuse a workdir holding a run of a different config; True when it holds one of this config.

    Two configs are the same run when they agree on every field under ``identity_fields``
    (dotted prefixes such as ``"model"`` or ``"train.prediction"``), a field of ``added_later``
    missing from the saved config counting as its value there and a field under an old prefix of
    ``renamed`` read under its new name; other fields (number of steps,
    sampling runs) may change between invocations so a run can be extended or resampled.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"workdir {workdir}: {path} cannot be read ({err}); choose another --workdir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"workdir {workdir}: {path} does not hold a config; choose another --workdir")
    compare_run(saved, config, identity_fields, f"workdir {workdir}", added_later, renamed)
    return True


def check_checkpoints(workdir: str, config: dict, identity_fields: tuple[str, ...],
                      added_later: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> None:
    """Refuse a workdir whose checkpoints were saved by a run of another config (compared as in
    :func:`check_workdir`, on the config stored with each stage's newest readable step), before
    restoring them would fail on the arrays' shapes; e.g. a workdir whose ``config.json`` was
    removed."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        directory = os.path.join(root, name)
        if not os.path.isdir(directory):
            continue
        with Checkpointer(directory, save_every=1) as checkpointer:
            for step in sorted(checkpointer.all_steps(), reverse=True):
                saved = checkpointer.saved_config(step)
                if saved is not None:
                    compare_run(saved, config, identity_fields, f"workdir {workdir} (checkpoints/{name}/{step})",
                                added_later, renamed)
                    break


def prepare_workdir(workdir: str, config: dict, identity_fields: tuple[str, ...],
                    added_later: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> None:
    """Create ``workdir`` and record ``config`` there (process 0); refuse a workdir of another run."""
    check_workdir(workdir, config, identity_fields, added_later, renamed)
    if is_main_process():
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, CONFIG_FILE), config)


def lock_workdir(workdir: str) -> WorkdirLock:
    """Take ``workdir``'s lock (:class:`fpcd.io.WorkdirLock`) on process 0; collective. Every process
    raises :class:`fpcd.io.WorkdirLockedError` when another run holds it. Release it with
    ``.release()``."""
    lock, error = WorkdirLock(workdir), None
    if is_main_process():
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = err
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 could not lock it)")
    if error is not None:
        raise error
    return lock


def checkpoint_dir(workdir: str, stage: str) -> str:
    """The checkpoints of stage ``stage``: ``<workdir>/checkpoints/<stage>`` (absolute)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def read_json(path: str) -> dict:
    """The JSON object in ``path``; ``{}`` when there is no such file."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
