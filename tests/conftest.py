"""Shared fixtures: a small model trained by our own train_pytorch.py, once per test session."""
import os
import sys
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


def pytest_collection_modifyitems(items):
    """The slow end-to-end runs first. pytest-xdist (worksteal, above) splits the tests between the workers in
    this order, and a worker that runs out takes from the end of another's queue: with the long runs at the
    front, what is left to share at the end is short tests, not one long run keeping the suite waiting."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: file order otherwise


def shared_folder(tmp_path_factory, name):
    """A folder every xdist worker of this session sees (one session's base folder), else this run's own."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return tmp_path_factory.getbasetemp().parent / name
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A simple model trained for one epoch on 6,000 real MNIST images by train_pytorch.py (1,000 validation).

    Returns the save_dir holding best_model_simple_pt.pth, last_simple_pt.pth and the reports (read only: the
    tests share it). It reaches about 96% test accuracy: good enough to check that tools agree with it, not a
    quality bar. Under xdist the first worker to need it trains it and the others wait for it (a file lock),
    rather than every worker training its own copy.
    """
    from filelock import FileLock
    import train_pytorch
    save_dir = shared_folder(tmp_path_factory, "small_run")
    done = save_dir.with_name(save_dir.name + ".done")  # beside the folder: the folder holds the run's files only
    with FileLock(str(save_dir) + ".lock"):
        if not done.exists():
            code = train_pytorch.main(["--model", "simple", "--epochs", "1", "--train_subset", "6000", "--val_size",
                                       "1000", "--device", DEVICE, "--save_dir", str(save_dir), "--no_progress"])
            assert code == 0
            done.touch()
    return save_dir


@pytest.fixture(scope="session")
def small_checkpoint(small_run):
    return small_run / "best_model_simple_pt.pth"
