"""Atomic, resumable checkpoints with orbax's ``CheckpointManager``.

Each save writes ``<dir>/<step>`` through a temporary directory that orbax renames when the
write is complete, so a run killed mid-save leaves the previous checkpoint intact and
``latest_step()`` ignores the leftover. Only the newest ``max_to_keep`` are kept.

What is stored: the array leaves of a pytree (e.g. :class:`fpcd.train.TrainState`) in
flattening order, plus the run's config as JSON. Restoring needs a template of the same
structure (a freshly initialised state); non-array leaves and shardings come from it.
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _array_leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))


class Checkpointer:
    """Save every ``save_every`` steps into ``directory``, keep the last ``max_to_keep``.

    Methods are collective in multi-process runs: call them on every process.
    """

    def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 3, config: dict | None = None):
        if save_every < 1 or max_to_keep < 1:
            raise ValueError(f"Checkpointer: save_every={save_every} and max_to_keep={max_to_keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        self.save_every = int(save_every)
        self.config = config
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, tree) -> None:
        """Start an asynchronous, atomic save of ``tree``'s arrays (and the config) at ``step``.

        The arrays are copied first, so the caller may donate ``tree``'s buffers right away.
        """
        items = {"state": ocp.args.StandardSave([jnp.copy(leaf) for leaf in _array_leaves(tree)])}
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Block until pending saves are committed."""
        self._manager.wait_until_finished()

    def restore(self, template, step: int | None = None):
        """The tree saved at ``step`` (default: newest) rebuilt on ``template``, or None if none exist."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        arrays, static = eqx.partition(template, eqx.is_array)
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        targets = [ocp.utils.to_shape_dtype_struct(leaf) for leaf in leaves]
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(targets))
        )["state"]
        if len(restored) != len(leaves):
            raise ValueError(
                f"checkpoint {self.directory}/{step} holds {len(restored)} arrays but the model has {len(leaves)}: "
                "the checkpoint was written by a different model configuration"
            )
        for saved, leaf in zip(restored, leaves):
            if saved.shape != leaf.shape or saved.dtype != leaf.dtype:
                raise ValueError(
                    f"checkpoint {self.directory}/{step} holds an array {saved.shape} {saved.dtype} where the model "
                    f"has {leaf.shape} {leaf.dtype}: the checkpoint was written by a different model configuration"
                )
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, list(restored)), static)

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config JSON stored with ``step`` (default: newest), or None."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return self._manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - an older checkpoint without config
            return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
