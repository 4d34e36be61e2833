"""What the generated data sets share: chunked seeds, settings keys, the atomic hdf5 save and
the cache of generated files.

Every generator works in chunks (:func:`chunk_sizes`) whose randomness depends only on the
seed and the chunk's index (:func:`chunk_rng` for NumPy generators, :func:`chunk_seed` for
Pythia), so the first items of a larger sample are those of a smaller one and the result does
not depend on the number of worker processes. Generated files are cached under
:func:`default_cache_dir`, named by the sample and the key of its generator settings
(:class:`GeneratorSettingsBase`), and written atomically (:func:`save_hdf5`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Collection, Mapping, TypeVar

import h5py
import numpy as np

from fpcd.data.workers import map_chunks
from fpcd.io import atomic_write

T = TypeVar("T")
PYTHIA_MAX_SEED = 900_000_000


def chunk_sizes(total: int, chunk_size: int) -> list[int]:
    """Sizes of the chunks of ``total`` items: ``chunk_size`` each, the last one the remainder."""
    return [min(chunk_size, total - start) for start in range(0, total, chunk_size)]


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The NumPy generator of chunk ``chunk``: a function of ``(seed, chunk)`` only."""
    return np.random.default_rng([int(seed), int(chunk)])


def chunk_seed(seed: int, stream: int, chunk: int) -> int:
    """Pythia seed (1..900,000,000) of chunk ``chunk`` of the stream ``stream`` (e.g. a jet type's
    index): a function of ``(seed, stream, chunk)`` only."""
    state = np.random.SeedSequence([int(seed), int(stream), int(chunk)]).generate_state(1)[0]
    return int(state % PYTHIA_MAX_SEED) + 1


def check_integer(name: str, value, minimum: int | None = 1) -> int:
    """``value`` as an int (Python or NumPy integer, not bool), else ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: must be >= {minimum}")
    return int(value)


class GeneratorSettingsBase:
    """Base of the frozen dataclasses that hold every physics choice of a generator.

    :meth:`key` names the settings in cache file names; :meth:`to_json` is the provenance
    attribute written next to the data.
    """

    def key(self) -> str:
        """10 hex digits of the SHA-256 of every field (sorted by name)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def generate_in_chunks(target: str, tasks: list, sizes: list[int], *, workers: int | None, description: str,
                       unit: str, progress: bool) -> list:
    """Run ``target`` (``"module:function"``) on every task in worker processes
    (:func:`fpcd.data.workers.map_chunks`; default one per CPU) with a progress bar advanced by
    ``sizes[chunk]`` as each chunk finishes; the results in task order."""
    from tqdm.auto import tqdm

    with tqdm(total=sum(sizes), desc=description, unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        return map_chunks(target, tasks, workers=workers or os.cpu_count() or 1,
                          on_done=lambda chunk: bar.update(sizes[chunk]))


def save_hdf5(path: str, datasets: Mapping[str, np.ndarray], attrs: Mapping[str, object] | None = None, *,
              compressed: Collection[str] = ()) -> str:
    """Write ``datasets`` (gzip-compressed when named in ``compressed``) and the ``attrs`` that
    are not None to the hdf5 file ``path`` atomically: a failed write leaves an existing file as
    it was (:func:`fpcd.io.atomic_write`). Returns the absolute path."""

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=data, compression="gzip" if name in compressed else None)
            for name, value in (attrs or {}).items():
                if value is not None:
                    f.attrs[name] = value

    return atomic_write(path, write)


def default_cache_dir() -> str:
    """``$FPCD_CACHE`` or ``$XDG_CACHE_HOME/fpcd`` or ``~/.cache/fpcd``."""
    if os.environ.get("FPCD_CACHE"):
        return os.environ["FPCD_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fpcd")


def cache_path(kind: str, name: str, settings: GeneratorSettingsBase, cache_dir: str | None = None) -> str:
    """``<cache_dir>/<kind>/<name>_<settings.key()>.h5`` (``cache_dir`` default :func:`default_cache_dir`)."""
    return os.path.join(cache_dir or default_cache_dir(), kind, f"{name}_{settings.key()}.h5")


def cached_generate(path: str, generate: Callable[[], T], save: Callable[[T, str], object],
                    load: Callable[[str], T]) -> T:
    """``load(path)`` when the file exists, else ``generate()``, ``save(data, path)`` and the data.

    ``path`` names everything the data depend on (:func:`cache_path`), so a changed setting is
    a new file and is generated afresh.
    """
    if os.path.exists(path):
        return load(path)
    data = generate()
    save(data, path)
    return data


def first_free_candidates(candidates, valid, energy, group) -> np.ndarray:
    """One slot per item, without collisions inside a group where it can: item ``i`` takes the first
    slot of ``candidates[i]`` (flat indices, nearest first) that is ``valid`` and not yet taken in
    ``group[i]``, items of higher ``energy`` choosing first; an item whose candidates are all taken
    keeps ``candidates[i, 0]`` (shared). Used to digitise generated points to calorimeter cells or
    voxels so that a shower keeps its number of hits."""
    chosen = np.asarray(candidates)[:, 0].copy()
    taken: dict = {}
    for i in np.lexsort((-np.asarray(energy), np.asarray(group))):
        occupied = taken.setdefault(int(group[i]), set())
        for c, ok in zip(candidates[i], valid[i]):
            if ok and c not in occupied:
                chosen[i] = c
                break
        occupied.add(int(chosen[i]))
    return chosen
