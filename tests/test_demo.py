"""demo.py: the setup check passes here, names a corrupted data file, names a missing package and its install."""
import importlib
import importlib.metadata
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
from cnn_pytorch import MODELS

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "data" / "MNIST" / "raw"
CHECKS = (["Python"] + [name for name, _ in demo.parse_requirements()] + ["Compute", "Data"]
          + [f"Model {name}" for name in MODELS] + ["Learning", "Round trip", "Prediction", "Plot"])


def run_in_process(argv, capsys):
    code = demo.main(argv)
    return code, capsys.readouterr().out


def test_demo_passes_here_and_prints_every_check(tmp_path):
    """The real thing, as a user runs it: every check passes and the plot is written."""
    done = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--device", "cpu", "--save_dir", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # cwd: paths are the script's
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in CHECKS:
        assert any(f" {name} " in line and line.startswith(("✓", "ok")) for line in lines), (name, done.stdout)
    assert not any(line.startswith(("✗", "FAIL", "–", "skip")) for line in lines), done.stdout
    assert "Ready" in done.stdout and demo.NEXT_COMMAND in done.stdout
    plot = tmp_path / "demo_predictions.png"
    assert plot.is_file() and plot.stat().st_size > 10_000


@pytest.mark.parametrize("with_unpacked", [False, True], ids=["gz-only", "gz-and-unpacked"])
def test_corrupted_data_file_is_named_with_its_fix(tmp_path, capsys, with_unpacked):
    """One shipped .gz damaged: exit 1, the file named, the git command to restore it; training is not tried.

    With the unpacked files still good (the usual state after a first run) the damage is found by SHA256SUMS.
    """
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in RAW.iterdir():
        if path.suffix == ".gz" or path.name == "SHA256SUMS" or (with_unpacked and path.name.endswith("-ubyte")):
            shutil.copy(path, raw / path.name)
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
    bad.write_bytes(bytes(data))

    code, out = run_in_process(["--device", "cpu", "--data_dir", str(tmp_path), "--save_dir", str(tmp_path)],
                               capsys)
    assert code == 1
    data_line = next(line for line in out.splitlines() if " Data " in line)
    assert data_line.startswith(("✗", "FAIL")) and "t10k-labels-idx1-ubyte.gz" in data_line
    assert "git checkout -- data/MNIST/raw/t10k-labels-idx1-ubyte.gz" in out
    assert "Ready" not in out and "not run because of these: Learning" in out
    assert not (tmp_path / "demo_predictions.png").exists()


def test_missing_package_is_named_with_its_install_command(tmp_path, capsys, monkeypatch):
    """torch looks uninstalled (its metadata gone): it is named with the pip command, and nothing needing it runs."""
    real_version = importlib.metadata.version

    def version(dist):
        if dist.lower() == "torch":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    code, out = run_in_process(["--save_dir", str(tmp_path)], capsys)
    assert code == 1
    torch_line = next(line for line in out.splitlines() if " torch " in line)
    assert torch_line.startswith(("✗", "FAIL")) and "not installed" in torch_line
    assert "pip install 'torch>=2.6'" in out
    for name in ("Compute", "Data", "Learning", "Prediction", "Plot"):
        assert any(line.startswith(("–", "skip")) and f" {name} " in line for line in out.splitlines()), name
    assert "Ready" not in out


def test_package_check_imports_by_import_name(monkeypatch):
    """scikit-learn is imported as sklearn, pillow as PIL; a package whose import fails is reported as broken."""
    imported = []
    real_import = importlib.import_module

    def import_module(name, *args):
        imported.append(name)
        if name == "sklearn":
            raise ImportError("numpy.core.multiarray failed to import")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    demo.check_package("pillow", ">=10.0")
    with pytest.raises(demo.Failed) as failed:
        demo.check_package("scikit-learn", ">=1.3")
    assert imported == ["PIL", "sklearn"]
    assert "import sklearn" in failed.value.detail and "scikit-learn>=1.3" in failed.value.fix


def test_old_package_is_named_with_upgrade_command(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "2.5.1")
    with pytest.raises(demo.Failed) as failed:
        demo.check_package("torch", ">=2.6")
    assert "2.5.1" in failed.value.detail and failed.value.fix == "pip install --upgrade 'torch>=2.6'"


def test_requirements_and_versions_are_read_right():
    reqs = dict(demo.parse_requirements())
    assert reqs["torch"] == ">=2.6" and reqs["scikit-learn"] == ">=1.3" and "pytest" in reqs
    assert demo.version_tuple("2.14.1+cu128") == (2, 14, 1) and demo.version_tuple("2.6.0") == (2, 6)
    assert demo.satisfies("0.13.2", ">=0.13") and not demo.satisfies("0.9.0", ">=0.13")  # numbers, not text
    assert demo.satisfies("2.6.0", ">=2.6") and not demo.satisfies("2.6.0rc1", ">=2.6.1")
    assert demo.satisfies("1.5", ">=1.3,<2") and not demo.satisfies("2.0", ">=1.3,<2")


def test_marks_fall_back_to_ascii():
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    utf8_out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    assert demo.pick_marks(ascii_out)["pass"] == "ok" and demo.pick_marks(utf8_out)["pass"] == "✓"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a GPU that is not there")
def test_device_without_gpu_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(["--device", "cuda"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA" in err


def test_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(["--epochs", "3"])
    assert stop.value.code == 2
