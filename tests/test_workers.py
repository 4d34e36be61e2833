"""Generator chunks in fresh worker processes (fpcd.data.workers): order, errors, dying workers and
workers ending with their parent."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fpcd.data.workers import WorkerError, map_chunks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = """
import os
import time


def square(x):
    time.sleep(0.05 * (x % 3 == 0))  # finish out of order
    return x * x, os.getpid()


def fail_on_two(args):
    directory, x = args
    open(os.path.join(directory, f"{os.getpid()}.pid"), "w").close()
    if x == 2:
        raise ValueError(f"bad chunk value {x}")
    time.sleep(0.2)
    return x


def die(x):
    os._exit(3)


def record_and_sleep(args):
    directory, x = args
    open(os.path.join(directory, f"{os.getpid()}.pid"), "w").close()
    time.sleep(120)
"""


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    """``fpcd_test_tasks`` in tmp_path, importable by the workers through the parent's sys.path."""
    (tmp_path / "fpcd_test_tasks.py").write_text(TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_map_chunks_returns_results_in_task_order_from_fresh_processes(task_module):
    done = []
    results = map_chunks("fpcd_test_tasks:square", list(range(7)), workers=3, on_done=done.append)
    assert [r[0] for r in results] == [x * x for x in range(7)]
    assert sorted(done) == list(range(7))
    pids = {r[1] for r in results}
    assert len(pids) == 3 and os.getpid() not in pids


def test_a_worker_error_names_the_task_and_the_message_and_no_worker_survives(task_module):
    with pytest.raises(WorkerError, match=r"task 2 of fpcd_test_tasks:fail_on_two failed") as info:
        map_chunks("fpcd_test_tasks:fail_on_two", [(str(task_module), x) for x in range(4)], workers=2)
    assert "ValueError: bad chunk value 2" in str(info.value)
    assert 'raise ValueError(f"bad chunk value {x}")' in str(info.value)  # the worker's traceback
    pids = [int(p.stem) for p in task_module.glob("*.pid")]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


def test_a_dying_worker_raises_instead_of_hanging(task_module):
    with pytest.raises(WorkerError, match=r"task \d of fpcd_test_tasks:die: worker process \d+ died \(exit code 3\)"):
        map_chunks("fpcd_test_tasks:die", [0, 1], workers=2)
    with pytest.raises(WorkerError, match="ModuleNotFoundError: No module named 'no_such_module'"):
        map_chunks("no_such_module:f", [0, 1], workers=2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_workers_end_with_their_parent(task_module, sig):
    parent = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from fpcd.data.workers import map_chunks\n"
        f"map_chunks('fpcd_test_tasks:record_and_sleep', [({str(task_module)!r}, 0), ({str(task_module)!r}, 1)], "
        "workers=2)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(task_module)]))
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, cwd=task_module, stderr=subprocess.PIPE)
    pids = []
    try:
        assert _wait_until(lambda: len(list(task_module.glob("*.pid"))) == 2), proc.stderr.read()
        pids = [int(p.stem) for p in task_module.glob("*.pid")]
        proc.send_signal(sig)
        assert proc.wait(timeout=30) != 0
        assert _wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10), pids
    finally:
        proc.kill()
        proc.wait()
        for pid in filter(_alive, pids):  # only after a failure: do not leave sleepers behind
            os.kill(pid, signal.SIGKILL)
