"""demo.py: the setup check passes here and its next command works as printed; it names a corrupted data file,
a missing package and its install; test-only packages are optional; a broken checkpoint load fails the round trip."""
import importlib
import importlib.metadata
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import checkpoint
import cnn_pytorch
import data_loader
import demo
from cnn_pytorch import MODELS

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "data" / "MNIST" / "raw"
CHECKS = (["Python"] + [p.name for p in demo.parse_requirements()] + ["Compute", "Data"]
          + [f"Model {name}" for name in MODELS] + ["Learning", "Round trip", "Prediction", "Plot"])


def run_in_process(argv, capsys):
    code = demo.main(argv)
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_demo_passes_here_and_prints_every_check(tmp_path, capsys, monkeypatch, python):
    """Every check passes and the plot is written, run from another folder (the paths are the script's). In this
    process: the quick start and docs/demo.md run the command itself, in a process of its own (tests/test_readme.py)."""
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process(["--device", "cpu", "--save_dir", str(tmp_path)], capsys)
    assert code == 0, out
    lines = out.splitlines()
    for name in CHECKS:
        assert any(f" {name} " in line and line.startswith(("✓", "ok")) for line in lines), (name, out)
    assert not any(line.startswith(("✗", "FAIL", "–", "skip")) for line in lines), out
    assert "Ready" in out
    plot = tmp_path / "demo_predictions.png"
    assert plot.is_file() and plot.stat().st_size > 10_000

    # It ends with the next command to try, and that command works as printed, from where demo.py was run.
    assert lines[-1].startswith("Next: python ")
    command = lines[-1][len("Next: "):]
    assert "examples" in command
    tried = subprocess.run(command.replace("python", shlex.quote(python), 1), shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert tried.returncode == 0, tried.stderr
    read = re.findall(r"^(\S+)_(\d)\.\w+: (\d) \(", tried.stdout, re.M)
    assert len(read) == 5 and all(name_digit == said for _, name_digit, said in read), tried.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_requirements_and_versions_are_read_right(tmp_path):
    found = {p.name: p for p in demo.parse_requirements()}
    assert found["torch"].spec == ">=2.6" and found["scikit-learn"].spec == ">=1.3" and "pytest" in found
    assert found["torch"].section == "runtime" and found["torch"].commands == ()
    assert {name for name, p in found.items() if p.section == demo.TEST_SECTION} == {"pytest", "pytest-xdist", "filelock", "playwright"}
    # The packages one command alone needs, as requirements.txt names them; the core is needed by every command.
    assert {name: p.commands for name, p in found.items() if p.commands} == {
        "optuna": ("tune.py",), "onnx": ("export.py", "predict.py"), "onnxscript": ("export.py",),
        "onnxruntime": ("export.py", "predict.py")}
    assert {name for name, p in found.items() if demo.needed_by(p) is None} == {
        "torch", "torchvision", "numpy", "pillow", "matplotlib", "seaborn", "scikit-learn", "tqdm"}
    assert demo.satisfies("2.14.1+cu128", ">=2.6") and demo.satisfies("2.6.0", ">=2.6")
    assert demo.satisfies("0.13.2", ">=0.13") and not demo.satisfies("0.9.0", ">=0.13")  # numbers, not text
    assert not demo.satisfies("2.6.0rc1", ">=2.6.1") and not demo.satisfies("2.6.0rc1", ">=2.6")
    assert demo.satisfies("1.5", ">=1.3,<2") and not demo.satisfies("2.0", ">=1.3,<2")
    assert demo.satisfies("1.4.2", "~=1.4") and not demo.satisfies("2.0", "~=1.4")
    # Options and blank lines are skipped; extras and markers are understood; a marker for another platform
    # leaves its package out.
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("--index-url https://example.org/simple\n\n# Runtime\nnumpy [dev] >= 1.24\n"
                            "pywin32>=300; sys_platform == 'nonesuch'\n# Extras\nonnx>=1.17  # export.py: ONNX\n")
    assert demo.parse_requirements(requirements) == [demo.Package("numpy", ">=1.24", "runtime", ()),
                                                     demo.Package("onnx", ">=1.17", "extras", ("export.py",))]


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


# ---------------------------------------------------------------------------------------------------------
# Test-only packages, and those of one command, are optional
# ---------------------------------------------------------------------------------------------------------

REAL_VERSION = importlib.metadata.version  # the lookup itself, never a stand-in an earlier call put there


def _pretend_missing(monkeypatch, *names):
    def version(dist):
        if dist.lower() in names:
            raise importlib.metadata.PackageNotFoundError(dist)
        return REAL_VERSION(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)


def _packages_and_summary(requirements):
    out = io.StringIO()
    cl = demo.Checklist(out)
    demo.check_packages(cl, requirements)
    return cl, demo.summary(cl, 1.0), out.getvalue().splitlines()


def test_missing_test_packages_are_an_optional_note(tmp_path, monkeypatch):
    """pytest and playwright (requirements.txt's "# Tests" section) missing: a note with the install, exit 0;
    a runtime package missing in the same file is still a failure."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# Runtime\nnumpy>=1.24   # arrays\n# Tests\npytest>=8.0\nplaywright>=1.40  # browser\n")
    _pretend_missing(monkeypatch, "pytest", "playwright")
    cl, code, lines = _packages_and_summary(requirements)
    assert code == 0 and not cl.failures
    for name in ("pytest", "playwright"):
        line = next(line for line in lines if f" {name} " in line)
        assert line.startswith(("○", "opt")) and "only the tests need it" in line, line
    assert next(line for line in lines if " numpy " in line).startswith(("✓", "ok"))
    assert any(line.startswith("Ready") for line in lines)
    note = next(line for line in lines if line.startswith("Optional"))
    assert "pip install 'pytest>=8.0'" in note and "pip install 'playwright>=1.40'" in note
    assert lines[-1].startswith("Next: ")

    _pretend_missing(monkeypatch, "pytest", "playwright", "numpy")
    cl, code, lines = _packages_and_summary(requirements)
    assert code == 1 and not any(line.startswith("Ready") for line in lines)
    assert [name for name, _, _ in cl.failures] == ["numpy"]
    assert [name for name, _, _ in cl.notes] == ["pytest", "playwright"]


@pytest.mark.slow
def test_a_machine_without_optuna_or_onnx_passes_with_a_note_naming_the_command(monkeypatch):
    """The lent GPU machine's image: every package a user needs but optuna and the ONNX packages. They are
    tune.py's and export.py's own: a note that names the command and the install line, and the demo passes."""
    _pretend_missing(monkeypatch, "optuna", "onnx", "onnxscript", "onnxruntime")
    cl, code, lines = _packages_and_summary(demo.REQUIREMENTS)
    assert code == 0 and not cl.failures and any(line.startswith("Ready") for line in lines)
    optuna = next(line for line in lines if " optuna " in line)
    assert optuna.startswith(("○", "opt")) and "only tune.py needs it" in optuna, optuna
    onnx = next(line for line in lines if " onnx " in line)
    assert onnx.startswith(("○", "opt")) and "only export.py and predict.py need it" in onnx, onnx
    note = next(line for line in lines if line.startswith("Optional"))
    assert "optuna (pip install 'optuna>=4.0')" in note and "onnxruntime (pip install 'onnxruntime>=1.20')" in note
    # Nothing past the package lines needs them: the core is what every later check waits on.
    assert not set(demo.CORE) & {"optuna", "onnx", "onnxscript", "onnxruntime"}

    # A core package missing is still a cross, whatever else is optional.
    _pretend_missing(monkeypatch, "optuna", "seaborn")
    cl, code, lines = _packages_and_summary(demo.REQUIREMENTS)
    assert code == 1 and [name for name, _, _ in cl.failures] == ["seaborn"]
    assert [name for name, _, _ in cl.notes] == ["optuna"]


@pytest.mark.slow
def test_a_broken_command_package_is_a_note_too(monkeypatch):
    """Installed but failing to import (a broken binary): only its command is affected, so a note, not a cross."""
    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "onnxruntime":
            raise ImportError("libonnxruntime.so: cannot open shared object file")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    cl, code, lines = _packages_and_summary(demo.REQUIREMENTS)
    assert code == 0 and [name for name, _, _ in cl.notes] == ["onnxruntime"]
    line = next(line for line in lines if " onnxruntime " in line)
    assert "import onnxruntime` fails" in line and "only export.py and predict.py need it" in line, line


# ---------------------------------------------------------------------------------------------------------
# The round trip proves what it claims
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_like():
    """A simple CNN as check_learning leaves it (channels-last, on the CPU), and 64 real validation images."""
    torch.manual_seed(0)
    model = cnn_pytorch.build_model(demo.LEARN_MODEL).to(memory_format=torch.channels_last)
    return model, data_loader.get_splits()["val"][0][:64]


def test_round_trip_passes_with_a_faithful_load(trained_like, tmp_path):
    model, sample = trained_like
    detail, (loaded, ckpt) = demo.check_round_trip(model, sample, torch.device("cpu"), tmp_path)
    assert "tensors equal" in detail and ckpt["model"] == demo.LEARN_MODEL
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def _perturb_one_weight(real_load):
    def load(path, device="cpu", expected_model=None):
        model, ckpt = real_load(path, device, expected_model)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-6  # one number, off by rounding size
        return model, ckpt
    return load


def _skip_load_state_dict(real_load):
    def load(path, device="cpu", expected_model=None):
        _, ckpt = real_load(path, device, expected_model)
        return cnn_pytorch.build_model(ckpt["model"], **ckpt["model_args"]).to(device).eval(), ckpt  # fresh weights
    return load


def _drop_a_buffer(real_load):
    def load(path, device="cpu", expected_model=None):
        model, ckpt = real_load(path, device, expected_model)
        model.register_buffer("stray", torch.zeros(1))  # a state the trained model does not have
        return model, ckpt
    return load


@pytest.mark.parametrize("broken", [_perturb_one_weight, _skip_load_state_dict, _drop_a_buffer],
                         ids=["one-weight-off", "no-load_state_dict", "extra-tensor"])
def test_round_trip_fails_when_the_load_is_broken(trained_like, tmp_path, monkeypatch, broken):
    model, sample = trained_like
    monkeypatch.setattr(checkpoint, "load_checkpoint", broken(checkpoint.load_checkpoint))
    with pytest.raises(demo.Failed) as failed:
        demo.check_round_trip(model, sample, torch.device("cpu"), tmp_path)
    assert "differ" in failed.value.detail
    assert "checkpoint.py" in failed.value.fix and "reinstall" not in failed.value.fix.lower()


def test_round_trip_fails_on_logits_a_device_cannot_explain(trained_like, tmp_path, monkeypatch):
    """Equal weights but a model that computes something else once loaded (here: its last layer scaled)."""
    model, sample = trained_like
    real_load = checkpoint.load_checkpoint

    def load(path, device="cpu", expected_model=None):
        loaded, ckpt = real_load(path, device, expected_model)
        forward = loaded.forward
        loaded.forward = lambda x: forward(x) * (1 + 1e-3)
        return loaded, ckpt

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    with pytest.raises(demo.Failed) as failed:
        demo.check_round_trip(model, sample, torch.device("cpu"), tmp_path)
    assert "logits" in failed.value.detail and "reinstall" not in failed.value.fix.lower()


def test_logit_tolerance_fits_the_device():
    assert demo.logits_rtol("cpu") == 1e-5
    assert demo.logits_rtol(torch.device("cuda", 0)) == demo.logits_rtol("mps") == 1e-3


def test_a_package_imported_under_another_name_is_found_from_its_records():
    """pytest-xdist is imported as xdist: read from the installed package's records, not guessed from its name."""
    assert demo.import_name("pytest-xdist") == "xdist"
    assert demo.import_name("torch") == "torch" and demo.import_name("pillow") == "PIL"
