"""Atomic, resumable checkpoints with orbax's ``CheckpointManager``.

Each save writes ``<dir>/<step>`` through a temporary directory that orbax renames when the
write is complete, so a run killed mid-save (or stopped by a full disk) leaves the previous
checkpoint intact and ``latest_step()`` ignores the leftover. Only the newest ``max_to_keep`` are
kept.

What is stored: the array leaves of a pytree (e.g. :class:`fpcd.train.TrainState`) in
flattening order, plus the run's config as JSON. Restoring needs a template of the same
structure (a freshly initialised state); non-array leaves and shardings come from it. A step that
cannot be read (truncated or deleted files) is skipped with a one-line note and the newest intact
step is restored instead.
"""

from __future__ import annotations

import os
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fpcd.errors import ExpectedError
from fpcd.io import DiskFullError, is_disk_full

UNREADABLE_SUFFIX = ".unreadable"


class CheckpointMismatchError(ExpectedError, ValueError):
    """A checkpoint holds arrays of other shapes or number than the model: another model configuration."""


class UnreadableCheckpointError(ExpectedError, ValueError):
    """No checkpoint step of a directory can be read."""


def _array_leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))


def _short_reason(err: BaseException, limit: int = 240) -> str:
    """Why ``err``'s step cannot be read, in one line of at most ``limit`` characters: for a
    tensorstore error its status, the file and the last clause (``OUT_OF_RANGE reading
    .../state/d/3de6...: Requested byte range [0, 287) is not valid for value of size 0``)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"\s*\[tensorstore_spec(\[\d+\])?='.*", "", text)
    files = list(re.finditer(r'local file "([^"]+)"', text))
    if files:
        status = re.match(r"([A-Z_]+): ", text)
        tail = text[files[-1].end():].lstrip(": ").strip()
        text = f"{status.group(1) if status else type(err).__name__} reading {files[-1].group(1)}" + \
               (f": {tail}" if tail else "")
    else:
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_closed_loop_callback(unraisable) -> bool:
    """True for the leftover of a failed orbax read: tensorstore completing a future of a read that
    was abandoned, on the asyncio loop orbax had already closed."""
    value = unraisable.exc_value
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def ignore_closed_loop_callbacks() -> None:
    """Install (once) a ``sys.unraisablehook`` that drops :func:`_is_closed_loop_callback` reports
    (other reports go to the previous hook): an unreadable step would otherwise print hundreds of
    them around the one-line note. Process-wide, so the library never calls it: the command line
    (``experiments/main.py``) does; a notebook may."""
    previous = sys.unraisablehook
    if getattr(previous, "_fpcd_closed_loop_filter", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook._fpcd_closed_loop_filter = True
    sys.unraisablehook = hook


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process of a multi-process job."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    """Save every ``save_every`` steps into ``directory``, keep the last ``max_to_keep``.

    Methods are collective in multi-process runs: call them on every process. A full disk raises
    :class:`~fpcd.io.DiskFullError` (the previous checkpoints stay intact).
    """

    def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 3, config: dict | None = None):
        if save_every < 1 or max_to_keep < 1:
            raise ValueError(f"Checkpointer: save_every={save_every} and max_to_keep={max_to_keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        self.save_every = int(save_every)
        self.config = config
        self._pending = None  # the step of the save in flight
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            )
        except Exception as err:
            if is_disk_full(err):
                raise DiskFullError(self.directory) from err
            raise

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _disk_full(self, err: BaseException, step) -> DiskFullError:
        previous = [s for s in self.all_steps() if step is None or s < step]
        kept = f"the previous checkpoint (step {max(previous)})" if previous else "no earlier checkpoint"
        where = self.directory if step is None else f"{self.directory}/{step}"
        hint = (f"{'that checkpoint was not written' if step is not None else 'a checkpoint was not written'}; "
                f"{kept} is intact: free some space and run again to resume from it")
        return DiskFullError(where, hint)

    def save(self, step: int, tree) -> None:
        """Start an asynchronous, atomic save of ``tree``'s arrays (and the config) at ``step``.

        The arrays are copied first, so the caller may donate ``tree``'s buffers right away. A
        previous save that failed raises here or in :meth:`wait`.
        """
        items = {"state": ocp.args.StandardSave([jnp.copy(leaf) for leaf in _array_leaves(tree)])}
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as err:
            if is_disk_full(err):
                raise self._disk_full(err, self._pending if self._pending is not None else int(step)) from err
            raise
        self._pending = int(step)

    def wait(self) -> None:
        """Block until pending saves are committed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            if is_disk_full(err):
                raise self._disk_full(err, self._pending) from err
            raise
        self._pending = None

    def _stored_shapes(self, step: int):
        """``[(shape, dtype)]`` of the arrays stored at ``step``, or None when unreadable."""
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
            return [(tuple(m.shape), np.dtype(m.dtype)) for m in jax.tree_util.tree_leaves(metadata.tree)]
        except Exception:  # noqa: BLE001 - unreadable metadata: judged by the restore itself
            return None

    def _check_shapes(self, step: int, stored, leaves) -> None:
        if len(stored) != len(leaves):
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} holds {len(stored)} arrays but the model has {len(leaves)}: "
                "the checkpoint was written by a different model configuration")
        for (shape, dtype), leaf in zip(stored, leaves):
            if tuple(shape) != tuple(leaf.shape) or np.dtype(dtype) != np.dtype(leaf.dtype):
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} holds an array {tuple(shape)} {np.dtype(dtype)} where the "
                    f"model has {tuple(leaf.shape)} {np.dtype(leaf.dtype)}: the checkpoint was written by a "
                    "different model configuration")

    def _restore_step(self, step: int, leaves, targets):
        """The arrays of ``step``; CheckpointMismatchError for another model, other errors for unreadable files."""
        try:
            restored = self._manager.restore(
                int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(targets))
            )["state"]
        except Exception:
            stored = self._stored_shapes(step)
            if stored is not None:
                self._check_shapes(step, stored, leaves)
            raise
        self._check_shapes(step, [(saved.shape, saved.dtype) for saved in restored], leaves)
        return restored

    def restore(self, template, step: int | None = None, *, set_aside_unreadable: bool = False):
        """The tree saved at ``step`` (default: the newest intact step) rebuilt on ``template``, or
        None if no step exists.

        Without ``step``, a step whose files cannot be read is skipped (process 0 prints one line
        naming it and why) and the next older one is tried; with ``set_aside_unreadable`` the
        skipped steps are renamed ``<step>.unreadable`` once an intact step is found, so that
        training can save those steps again.

        Raises:
          CheckpointMismatchError: the checkpoint holds arrays of another model configuration.
          UnreadableCheckpointError: no step (or not the requested ``step``) can be read.
        """
        steps = sorted(self.all_steps(), reverse=True) if step is None else [int(step)]
        if not steps:
            return None
        arrays, static = eqx.partition(template, eqx.is_array)
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        targets = [ocp.utils.to_shape_dtype_struct(leaf) for leaf in leaves]
        skipped = []
        for s in steps:
            error = None
            try:
                restored = self._restore_step(s, leaves, targets)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - unreadable files, judged below
                error = err
            if _all_processes_agree(error is None):
                break
            reason = "unreadable on another process" if error is None else _short_reason(error)
            skipped.append((s, reason))
            if jax.process_index() == 0:
                print(f"[checkpoint] skipping step {s} of {self.directory}, which cannot be read ({reason}); "
                      "trying the previous step", flush=True)
        else:
            what = f"step {step} of {self.directory}" if step is not None else f"no step of {self.directory}"
            raise UnreadableCheckpointError(
                f"{what} can be read ({'; '.join(f'step {s}: {r}' for s, r in skipped)}); remove that directory "
                "(or its broken steps) to start again, or use another --workdir")
        if skipped and set_aside_unreadable:
            self._set_aside([s for s, _ in skipped])
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, list(restored)), static)

    def _set_aside(self, steps) -> None:
        """Rename the unreadable ``steps`` to ``<step>.unreadable`` (process 0) and reload the step list."""
        if jax.process_index() == 0:
            for s in steps:
                source = os.path.join(self.directory, str(s))
                target, n = source + UNREADABLE_SUFFIX, 1
                while os.path.exists(target):
                    target, n = f"{source}{UNREADABLE_SUFFIX}.{n}", n + 1
                os.rename(source, target)
                print(f"[checkpoint] moved the unreadable step {s} to {target}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fpcd.checkpoint.set_aside")
        self._manager.reload()

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config JSON stored with ``step`` (default: newest), or None."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return self._manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - an older checkpoint without config, or an unreadable one
            return None

    def saved_configs(self) -> dict[int, dict]:
        """``step -> config JSON`` of every step that stores a readable config."""
        configs = {s: self.saved_config(s) for s in self.all_steps()}
        return {s: c for s, c in configs.items() if c is not None}

    def close(self) -> None:
        """Wait for pending saves (raising their errors), then release the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:  # already failing: a pending save's own error must not replace that one
            self.close()
        except Exception:  # noqa: BLE001
            pass
