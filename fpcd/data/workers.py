"""Run a function over a list of tasks in fresh worker interpreters, safely from scripts and notebooks.

:func:`map_chunks` starts ``workers`` new Python processes with :mod:`subprocess`, each running
``python -m fpcd.data.workers <module:function> <parent pid>``. A worker imports the function by its
module path and never imports the caller's ``__main__``, so a plain script without
``if __name__ == "__main__":`` is not re-executed (``multiprocessing``'s ``spawn`` re-runs it), and no
process is forked from a parent whose JAX threads exist (``fork`` is unsafe then).

Protocol: the parent writes length-prefixed pickled tasks to a worker's stdin, one at a time, and
reads one length-prefixed pickled reply per task from its stdout (the worker moves its own file
descriptor 1 to stderr, so stray prints cannot corrupt the stream). Workers get the parent's
``sys.path`` through ``PYTHONPATH``, so fpcd need not be installed. A worker dies with its parent:
it watches ``os.getppid()``, and stops at the end of its input; the parent kills its workers on any
exception, Ctrl-C included. POSIX only (``selectors`` on pipes).
"""

from __future__ import annotations

import importlib
import os
import pickle
import selectors
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

_HEADER = struct.Struct("!QQ")  # (task index, payload bytes)


class WorkerError(RuntimeError):
    """A task raised in its worker process, or the worker process died."""


def resolve(function_path: str) -> Callable:
    """The function named ``"package.module:function"``."""
    module, sep, name = function_path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"function path must look like 'package.module:function', got {function_path!r}")
    return getattr(importlib.import_module(module), name)


def _send(stream, index: int, payload: bytes) -> None:
    stream.write(_HEADER.pack(index, len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream) -> tuple[int, bytes] | None:
    """One frame, or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    index, size = _HEADER.unpack(header)
    payload = stream.read(size)
    return None if len(payload) < size else (index, payload)


def _child_env() -> dict[str, str]:
    """The environment with ``PYTHONPATH`` = the directory holding this fpcd, then the parent's ``sys.path``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    entries = [root] + [os.path.abspath(p or os.curdir) for p in sys.path]
    seen, path = set(), []
    for entry in entries:
        if entry not in seen and os.pathsep not in entry:
            seen.add(entry)
            path.append(entry)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def map_chunks(
    function_path: str,
    tasks: Sequence[Any],
    *,
    workers: int,
    on_done: Callable[[int], None] | None = None,
) -> list:
    """``[function(task) for task in tasks]``, computed by ``workers`` fresh processes.

    Args:
      function_path: ``"package.module:function"``; the function and the tasks and results must
        be picklable by reference to importable modules (nothing defined in ``__main__``).
      tasks: one argument per call.
      workers: number of processes (at most ``len(tasks)`` are started); 1 runs in this process.
      on_done: called with a task's index as soon as it finishes (in completion order), e.g. to
        advance a progress bar.

    Returns:
      the results in task order.

    Raises:
      WorkerError: naming the task index and the worker's exception and traceback, when a task
        raises or a worker process dies; the other workers are killed first.
    """
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    results: list = [None] * len(tasks)
    if workers == 1 or len(tasks) <= 1:
        function = resolve(function_path)
        for index, task in enumerate(tasks):
            results[index] = function(task)
            if on_done is not None:
                on_done(index)
        return results

    payloads = [pickle.dumps(task, pickle.HIGHEST_PROTOCOL) for task in tasks]
    command = [sys.executable, "-m", "fpcd.data.workers", function_path, str(os.getpid())]
    env = _child_env()
    procs: list[subprocess.Popen] = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(min(workers, len(tasks))):
            # A new session: Ctrl-C in a terminal reaches only this process, which then kills the workers.
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                          start_new_session=True))
        queue = iter(range(len(tasks)))
        busy: dict[int, int] = {}  # pid -> index of the task it runs

        def died(proc, index):
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = "unknown"
            return WorkerError(f"task {index} of {function_path}: worker process {proc.pid} died (exit code {code})")

        def feed(proc):
            index = next(queue, None)
            if index is None:
                selector.unregister(proc.stdout)
                proc.stdin.close()  # end of input: the worker exits
                return
            busy[proc.pid] = index
            try:
                _send(proc.stdin, index, payloads[index])
            except BrokenPipeError:
                raise died(proc, index) from None

        for proc in procs:
            selector.register(proc.stdout, selectors.EVENT_READ, proc)
            feed(proc)
        while busy:
            for key, _ in selector.select():
                proc = key.data
                index = busy.pop(proc.pid)
                frame = _receive(proc.stdout)
                if frame is None:
                    raise died(proc, index)
                status, value = pickle.loads(frame[1])
                if status == "error":
                    message, trace = value
                    raise WorkerError(f"task {index} of {function_path} failed in worker process {proc.pid}: "
                                      f"{message}\n\nworker traceback:\n{trace}")
                results[index] = value
                if on_done is not None:
                    on_done(index)
                feed(proc)
        for proc in procs:
            proc.wait(timeout=60)
    finally:
        selector.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:  # a broken pipe when flushing a killed worker's stdin
                    pass
            proc.wait()
    return results


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _serve(function_path: str, parent: int) -> None:
    """Worker loop: read tasks from stdin, write ``("ok", result)`` or ``("error", (message, traceback))``."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints (Python or C) go to stderr, not into the reply stream
    function = None
    while (frame := _receive(sys.stdin.buffer)) is not None:
        index, payload = frame
        try:
            function = function or resolve(function_path)
            reply = pickle.dumps(("ok", function(pickle.loads(payload))), pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            reply = pickle.dumps(("error", (message, traceback.format_exc())), pickle.HIGHEST_PROTOCOL)
        _send(replies, index, reply)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
