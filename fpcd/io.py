"""File output and the workdir lock.

* Atomic writes: write to a temporary file in the same directory, then rename over the target
  (:func:`atomic_write`, :func:`write_json`); a full disk raises :class:`DiskFullError` naming the
  file and leaves the previous file as it was.
* JSON is always valid: NaN and inf are written as ``null`` (:func:`nonfinite_entries` lists them).
* :class:`WorkdirLock`: one run per workdir (``<workdir>/.lock``, an ``flock`` the kernel releases
  when the holder dies, even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import numbers
import os
import socket
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from fpcd.errors import ExpectedError

LOCK_FILE = ".lock"


class DiskFullError(ExpectedError, OSError):
    """No space left on the device while writing ``filename``; what was written before is intact.

    ``str(err)`` is one line naming the path and what to do (``hint`` replaces the default advice).
    """

    def __init__(self, path: str, hint: str = ""):
        super().__init__(errno.ENOSPC, "no space left on device", path)
        self.hint = hint or "files written before are intact; free some space and run again"

    def __str__(self):
        return f"no space left on device writing {self.filename}: {self.hint}"


def is_disk_full(err: BaseException | None) -> bool:
    """True when ``err`` or an exception it was raised from is a full disk (``ENOSPC``; orbax and
    tensorstore report it as a ValueError naming ``os_error_code='28'``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        text = str(err)
        if "No space left on device" in text or f"os_error_code='{errno.ENOSPC}'" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_path(err: BaseException | None) -> str | None:
    """The file named by the first ``OSError`` of ``err``'s chain that has one, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.filename:
            return str(err.filename)
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` and rename the result to ``path``; a crash leaves ``path`` as it was.

    Raises:
      DiskFullError: the disk filled up (the temporary file is removed, ``path`` is unchanged).
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(fd)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, Exception) and not isinstance(err, DiskFullError) and is_disk_full(err):
            raise DiskFullError(path, f"{os.path.basename(path)} is unchanged; free some space and run "
                                      "again") from err
        raise
    return path


def _nonfinite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
        and not math.isfinite(value)


def nonfinite_entries(data, prefix: str = "") -> dict[str, float]:
    """``dotted path -> value`` of every NaN or inf float in ``data`` (nested dicts, lists, tuples
    and numpy arrays; list items are numbered: ``runs.em_20.w1.0``)."""
    found = {}
    if isinstance(data, dict):
        for key, value in data.items():
            found.update(nonfinite_entries(value, f"{prefix}{key}."))
    elif isinstance(data, (list, tuple, np.ndarray)):
        for i, value in enumerate(data):
            found.update(nonfinite_entries(value, f"{prefix}{i}."))
    elif _nonfinite(data):
        found[prefix[:-1]] = float(data)
    return found


def finite_json(data):
    """``data`` as plain JSON types with every NaN or inf float replaced by None (JSON null)."""
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple, np.ndarray)):
        return [finite_json(value) for value in data]
    if isinstance(data, np.generic):
        data = data.item()
    if _nonfinite(data):
        return None
    return data


def write_json(path: str, data) -> str:
    """Atomically write ``data`` as indented, valid JSON: NaN and inf become ``null`` (list them with
    :func:`nonfinite_entries` beforehand to say why)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(finite_json(data), f, indent=2, sort_keys=False, allow_nan=False)
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


# --- one run per workdir ---------------------------------------------------------------------------


class WorkdirLockedError(ExpectedError, RuntimeError):
    """Another live run holds the workdir's lock; the message names the workdir and the holder."""


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``<workdir>/.lock``.

    The file records the holder (pid, host, start time) for the refusal message of a second run.
    The kernel releases the lock when the holder exits or is killed (SIGKILL included), so a stale
    file never blocks the next run; :meth:`release` removes the file (and the workdir when
    :meth:`acquire` created it and it is still empty). Locking is per process: in a multi-process
    job only process 0 takes it. Not reentrant.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd = None
        self._created_workdir = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WorkdirLock":
        """Take the lock (creating the workdir if needed).

        Raises:
          WorkdirLockedError: another process holds it.
        """
        if self._fd is not None:
            return self
        if not os.path.isdir(self.workdir):
            try:
                os.makedirs(self.workdir)
                self._created_workdir = True
            except FileExistsError:
                pass
            except OSError as err:
                if is_disk_full(err):
                    raise DiskFullError(self.workdir) from err
                raise
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 1000, 0).decode(errors="replace").strip()
                os.close(fd)
                self._remove_created_workdir()
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by another run ({holder or 'holder unknown'}; lock file "
                    f"{self.path}); wait for that run to finish or stop it, or choose another --workdir") from None
            except OSError as err:  # a filesystem without flock: run unlocked rather than not at all
                os.close(fd)
                print(f"warning: cannot lock {self.path} ({err}); two runs on this workdir would not be refused",
                      file=sys.stderr, flush=True)
                return self
            # A holder that released meanwhile removed the file we opened: lock the new one instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock: a waiting run then retries on a new file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created_workdir()

    def _remove_created_workdir(self) -> None:
        if self._created_workdir:
            try:
                os.rmdir(self.workdir)  # only when still empty: a refused run leaves nothing behind
            except OSError:
                pass
            self._created_workdir = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
