"""Shared fixtures: a small model trained by our own train_pytorch.py, once per test session."""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The device the training tests run on: the CPU in CI; MNIST_TEST_DEVICE=cuda runs them on a GPU unchanged.
DEVICE = os.environ.get("MNIST_TEST_DEVICE", "cpu")
# cuBLAS reads this when it starts: without it, tests that ask for deterministic algorithms fail on a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Under pytest-xdist (`python -m pytest -n auto`), the cores are shared out between the workers: a worker and
# the commands its tests start get cores / workers threads each, instead of every one of them taking all the
# cores and the threads fighting over them. Set before torch is imported, so it applies to torch's own pool.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)


@pytest.fixture(scope="session")
def mnist_splits():
    """Real MNIST, train/val/test uint8 tensors on the CPU (the default split: seed 0, 5,000 validation)."""
    import data_loader
    return data_loader.get_splits()


def pytest_configure(config):
    """With -n (pytest-xdist), schedule by worksteal unless --dist was given: a worker that runs out of tests takes
    half of another's queue. The default, load, hands out fixed chunks up front, and left one worker busy four
    minutes after the other was done. Set here rather than in pytest.ini, so pytest still runs where xdist is
    not installed (the GPU machine's image)."""
    given = any(arg.startswith(("--dist", "-d")) for arg in config.invocation_params.args)
    if getattr(config.option, "dist", None) == "load" and not given:
        config.option.dist = "worksteal"
    # The controller starts one warm python server for all the workers (python_bin, below): it imports its
    # packages while they collect, and ~8 s of imports are paid once, not once a worker. Started before the
    # workers are, so they inherit where it listens.
    controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if controller and warm_python_works() and SHARED_WARM_SOCKET not in os.environ:
        config._warm_server = start_warm_server()
        os.environ[SHARED_WARM_SOCKET] = config._warm_server[1]


def pytest_unconfigure(config):
    if getattr(config, "_warm_server", None):
        stop_warm_server(*config._warm_server)
        del os.environ[SHARED_WARM_SOCKET]


DURATIONS = "mnist/durations"  # pytest's cache (.pytest_cache): each test's seconds in the last run that ran it
UNKNOWN_SLOW = 10.0             # the seconds a slow test not timed yet is taken to need


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    """The order the tests are handed out in: each worker's share starts with the long end-to-end runs.

    pytest-xdist's worksteal (above) gives worker i the next len(rest) // (workers left) tests of this list, and a
    worker that runs out takes the second half of the longest queue, from its end. So each share is built here:
    the slow tests go, longest first (their time in the last run, from pytest's cache; else file order), to the
    share with the least work so far, and the quick tests fill the shares up. The long runs then start at once on
    every worker, and what is left to take at the end is quick tests, not one long run keeping the suite waiting.
    """
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider (.ci/gpu_check)
    seconds = cache.get(DURATIONS, {}) if cache else {}
    slow = sorted((item for item in items if item.get_closest_marker("slow")),
                  key=lambda item: -seconds.get(item.nodeid, UNKNOWN_SLOW))  # a stable sort: file order for ties
    quick = [item for item in items if not item.get_closest_marker("slow")]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    sizes, left = [], len(items)
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    shares, work = [[] for _ in sizes], [0.0] * len(sizes)
    for item in slow:
        open_shares = [i for i in range(len(sizes)) if len(shares[i]) < sizes[i]]
        i = min(open_shares, key=lambda i: work[i])
        shares[i].append(item)
        work[i] += seconds.get(item.nodeid, UNKNOWN_SLOW)
    for i, size in enumerate(sizes):
        shares[i] += [quick.pop(0) for _ in range(size - len(shares[i]))]
    items[:] = [item for share in shares for item in share]


def pytest_runtest_logreport(report):
    """Note each test's time (set-up, call and tear-down) for the next run's order, above."""
    if report.when in ("setup", "call", "teardown"):
        _timed[report.nodeid] = _timed.get(report.nodeid, 0.0) + report.duration


_timed = {}


def pytest_sessionfinish(session):
    """Write the times down, once, from the process that saw every test's report (under xdist, the controller)."""
    cache = getattr(session.config, "cache", None)
    if not hasattr(session.config, "workerinput") and cache and _timed:
        cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_timed})


def shared_folder(tmp_path_factory, name):
    """A folder every xdist worker of this session sees (one session's base folder), else this run's own."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return tmp_path_factory.getbasetemp().parent / name
    return tmp_path_factory.mktemp(name)


def made_once(tmp_path_factory, name, make):
    """A folder that make(folder) fills once per test session, for the tests to read. Under xdist the first worker
    to need it makes it and the others wait for it (a file lock), rather than every worker making its own copy."""
    from filelock import FileLock
    folder = shared_folder(tmp_path_factory, name)
    done = folder.with_name(folder.name + ".done")  # beside the folder: the folder holds what make() wrote only
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A simple model trained for one epoch on 6,000 real MNIST images by train_pytorch.py (1,000 validation).

    Returns the save_dir holding best_model_simple_pt.pth, last_simple_pt.pth and the reports (read only: the
    tests share it). It reaches about 96% test accuracy: good enough to check that tools agree with it, not a
    quality bar. Trained once for all workers (made_once).
    """
    import train_pytorch

    def train(save_dir):
        assert train_pytorch.main(["--model", "simple", "--epochs", "1", "--train_subset", "6000", "--val_size",
                                   "1000", "--device", DEVICE, "--save_dir", str(save_dir), "--no_progress"]) == 0
    return made_once(tmp_path_factory, "small_run", train)


@pytest.fixture(scope="session")
def small_checkpoint(small_run):
    return small_run / "best_model_simple_pt.pth"


def python_shim(folder, executable, *args):
    """`python` and `python3` in `folder`: scripts that exec `executable` by the path given (not resolved, not a
    symlink, so a venv's interpreter still finds its pyvenv.cfg and its packages), with `args` before the command's."""
    prefix = " ".join(shlex.quote(str(word)) for word in (executable, *args))
    for name in ("python", "python3"):
        (folder / name).write_text(f"#!/bin/sh\nexec {prefix} \"$@\"\n")
        (folder / name).chmod(0o755)
    return folder


WARM_PYTHON = ROOT / "tests" / "warm_python.py"


def ctrl_c(ignored=False):
    """The start of a command line that runs the rest with Ctrl-C (SIGINT) ignored or at its default. A suite run
    as a background job of a script starts with it ignored, and a shell cannot undo that: a test that interrupts
    a command starts it with this, as a terminal would, whatever started the suite."""
    handler = "SIG_IGN" if ignored else "SIG_DFL"
    return [sys.executable, "-S", "-c",
            f"import os, signal, sys; signal.signal(signal.SIGINT, signal.{handler}); os.execv(sys.argv[1], sys.argv[1:])"]
SHARED_WARM_SOCKET = "MNIST_TEST_WARM_SOCKET"  # set by the xdist controller for its workers (pytest_configure)


def warm_python_works():
    return not os.environ.get("MNIST_TEST_COLD") and hasattr(socket, "send_fds") and hasattr(os, "fork")


def start_warm_server():
    """Start tests/warm_python.py's server in the background: (process, socket path). It has imported its packages
    and answers once wait_for_warm_server says so."""
    sock_dir = tempfile.mkdtemp(prefix="warm-")  # a short path: a UNIX socket's is limited to ~100 characters
    sock = os.path.join(sock_dir, "python.sock")
    # Without the thread settings the server's torch picks a cold start's default; each command then takes
    # its own OMP_NUM_THREADS (under xdist, the worker's share) or that default.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # stdin from /dev/null: a pytest-xdist worker's own stdin is its channel to the controller
    server = subprocess.Popen([sys.executable, str(WARM_PYTHON), "--serve", sock], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return server, sock


def wait_for_warm_server(sock, server=None, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock + ".ready"):
        assert server is None or server.poll() is None, "the warm python server ended before it was ready"
        assert time.monotonic() < deadline, f"the warm python server was not ready within {timeout} s"
        time.sleep(0.05)


def stop_warm_server(server, sock):
    server.terminate()
    server.wait(timeout=60)
    shutil.rmtree(os.path.dirname(sock), ignore_errors=True)


@pytest.fixture(scope="session")
def python_bin(tmp_path_factory):
    """A folder whose `python` runs a command as `python` would, but warm (tests/warm_python.py: a server that has
    imported torch, scikit-learn and matplotlib forks it, saving 3-8 s of imports a command); put first on PATH,
    or use the `python` fixture below. MNIST_TEST_COLD=1, or a system without fork and UNIX sockets, gives the
    plain interpreter. Under xdist the controller has started one server for every worker (pytest_configure);
    alone, this session starts its own."""
    folder = tmp_path_factory.mktemp("bin")
    if not warm_python_works():
        yield python_shim(folder, sys.executable)
        return
    shared = os.environ.get(SHARED_WARM_SOCKET)
    server, sock = (None, shared) if shared else start_warm_server()
    try:
        wait_for_warm_server(sock, server)
        yield python_shim(folder, sys.executable, "-S", WARM_PYTHON, "--client", sock, sys.executable,
                          folder / "python")
    finally:
        if server is not None:
            stop_warm_server(server, sock)


@pytest.fixture(scope="session")
def python(python_bin):
    """The interpreter for a command a test runs in a process of its own: str(path), used as sys.executable is."""
    return str(python_bin / "python")
