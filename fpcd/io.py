"""Atomic file output: write to a temporary file in the same directory, then rename over the target."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` and rename the result to ``path``; a crash leaves ``path`` as it was."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str, data) -> str:
    """Atomically write ``data`` as indented JSON."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    return atomic_write(path, write)


def open_hdf5(path: str, error: type[Exception] = ValueError):
    """``h5py.File(path, "r")``, or ``error`` naming the file when it is missing or not HDF5."""
    import h5py

    if not os.path.exists(path):
        raise error(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise error(f"{path}: not a readable hdf5 file ({err})") from None


@contextlib.contextmanager
def silenced_stdout():
    """Redirect the process's file descriptor 1 (C++ banners) to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
