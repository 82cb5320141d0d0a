"""demo.py: the setup check passes here and its next command works as printed; it names a corrupted data file, a
missing, old or broken package and its install; what only the tests or one command need is a note; a broken
training step, checkpoint load or picture preprocessing fails its check."""
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
import demo
import preprocess
import train_pytorch

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "data" / "MNIST" / "raw"
CHECKS = (["Python"] + [req.name for req, _ in demo.read_requirements()]
          + ["Compute", "Data", "Learning", "Round trip", "Prediction", "Plot"])
REAL_VERSION = importlib.metadata.version  # the lookup itself, never a stand-in an earlier call put there


def run_in_process(argv, capsys):
    code = demo.main(argv)
    return code, capsys.readouterr().out


def line_of(out, name):
    return next(line for line in out.splitlines() if f" {name} " in line)


@pytest.mark.slow
def test_demo_passes_here_and_prints_every_check(tmp_path, capsys, monkeypatch, python):
    """Every check passes and the plot is written, run from another folder (the paths are the script's). In this
    process: the quick start and docs/demo.md run the command itself, in a process of its own (tests/test_readme.py)."""
    monkeypatch.chdir(tmp_path)
    code, out = run_in_process(["--device", "cpu", "--save_dir", str(tmp_path)], capsys)
    assert code == 0, out
    for name in CHECKS:
        assert line_of(out, name).startswith("✓"), (name, out)
    assert not any(line.startswith(("✗", "–", "○")) for line in out.splitlines()), out
    assert "Ready" in out and "5 of 5 pictures" in line_of(out, "Prediction")
    plot = tmp_path / "demo_predictions.png"
    assert plot.is_file() and plot.stat().st_size > 10_000

    # It ends with the next command to try, and that command works as printed, from where demo.py was run.
    last = out.splitlines()[-1]
    assert last.startswith("Next: python ") and "examples" in last
    tried = subprocess.run(last[len("Next: "):].replace("python", shlex.quote(python), 1), shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert tried.returncode == 0, tried.stderr
    read = re.findall(r"^(\S+)_(\d)\.\w+: (\d) \(", tried.stdout, re.M)
    assert len(read) == 5 and all(name_digit == said for _, name_digit, said in read), tried.stdout


@pytest.mark.slow
@pytest.mark.parametrize("with_unpacked", [False, True], ids=["gz-only", "gz-and-unpacked"])
def test_corrupted_data_file_is_named_with_its_fix(tmp_path, capsys, with_unpacked):
    """One shipped .gz damaged: exit 1, the file named, the git command to restore it; training is not tried.
    With the unpacked files still good (the usual state after a first run) the damage is found by SHA256SUMS."""
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
    assert line_of(out, "Data").startswith("✗") and "t10k-labels-idx1-ubyte.gz" in line_of(out, "Data")
    assert "git checkout -- data/MNIST/raw/t10k-labels-idx1-ubyte.gz" in out
    assert "Ready" not in out and line_of(out, "Learning").startswith("–")
    assert not (tmp_path / "demo_predictions.png").exists()


def _pretend_missing(monkeypatch, *names):
    def version(dist):
        if dist.lower() in names:
            raise importlib.metadata.PackageNotFoundError(dist)
        return REAL_VERSION(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.slow
def test_missing_package_is_named_with_its_install_command(tmp_path, capsys, monkeypatch):
    """torch looks uninstalled (its metadata gone): it is named with the pip command, and nothing needing it runs."""
    _pretend_missing(monkeypatch, "torch")
    code, out = run_in_process(["--save_dir", str(tmp_path)], capsys)
    assert code == 1
    assert line_of(out, "torch").startswith("✗") and "not installed" in line_of(out, "torch")
    assert "fix: pip install 'torch>=2.6'" in out
    for name in ("Compute", "Data", "Learning", "Round trip", "Prediction", "Plot"):
        assert line_of(out, name).startswith("–"), name
    assert "Ready" not in out and out.splitlines()[-1] == "Then run `python demo.py` again."


def _requirement(text):
    from packaging.requirements import Requirement
    return Requirement(text)


def test_package_check_imports_by_import_name(monkeypatch):
    """scikit-learn is imported as sklearn, pillow as PIL; a package whose import fails is reported as broken."""
    imported = []

    def import_module(name, *args):
        imported.append(name)
        if name == "sklearn":
            raise ImportError("numpy.core.multiarray failed to import")
        return importlib.__import__(name)

    monkeypatch.setattr(importlib, "import_module", import_module)
    demo.check_package(_requirement("pillow>=10.0"))
    with pytest.raises(demo.Failed) as failed:
        demo.check_package(_requirement("scikit-learn>=1.3"))
    assert imported == ["PIL", "sklearn"]
    detail, fix = failed.value.args
    assert "`import sklearn` fails: numpy.core.multiarray" in detail
    assert fix == "pip install --force-reinstall 'scikit-learn>=1.3'"


def test_import_names_agree_with_the_installed_packages_records():
    """IMPORT_NAMES covers every requirement whose module is not its name: checked against what pip recorded."""
    records = importlib.metadata.packages_distributions()
    for req, _ in demo.read_requirements():
        modules = [m for m, dists in records.items() if req.name.lower() in map(str.lower, dists) and m[0] != "_"]
        if modules:  # installed here
            expected = demo.IMPORT_NAMES.get(req.name.lower(), req.name.lower().replace("-", "_"))
            assert expected in modules, (req.name, modules)


@pytest.mark.parametrize("installed, passes", [("2.5.1", False), ("2.6.0rc1", False), ("2.6.0", True),
                                               ("2.14.1+cu128", True)])
def test_versions_are_compared_by_packaging(monkeypatch, installed, passes):
    """Numbers, not text; a release candidate is older than its release; a CUDA build's local tag is fine."""
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: installed)
    if passes:
        assert demo.check_package(_requirement("torch>=2.6"))[0] == f"{installed} (needs >=2.6)"
        return
    with pytest.raises(demo.Failed) as failed:
        demo.check_package(_requirement("torch>=2.6"))
    detail, fix = failed.value.args
    assert detail == f"{installed} installed; requirements.txt wants torch>=2.6" and fix == "pip install 'torch>=2.6'"


def test_requirements_are_read_with_who_needs_them(tmp_path):
    specs = {req.name: str(req.specifier) for req, _ in demo.read_requirements()}
    needed_by = {req.name: only for req, only in demo.read_requirements()}
    assert specs["torch"] == ">=2.6" and specs["scikit-learn"] == ">=1.3"
    # As requirements.txt has them today (others may join): every command's, the tests', one command's.
    for name in ("torch", "numpy", "pillow", "matplotlib", "seaborn", "scikit-learn"):
        assert needed_by[name] is None, name
    for name in ("pytest", "pytest-xdist", "playwright"):
        assert needed_by[name] == "the tests", name
    assert {name: needed_by[name] for name in ("optuna", "onnx", "onnxscript", "onnxruntime")} == {
        "optuna": "tune.py", "onnx": "export.py and predict.py", "onnxscript": "export.py",
        "onnxruntime": "export.py and predict.py"}
    # Options and blank lines are skipped; extras and markers are understood; a marker for another platform
    # leaves its package out.
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("--index-url https://example.org/simple\n\n# Runtime\nnumpy [dev] >= 1.24\n"
                            "pywin32>=300; sys_platform == 'nonesuch'\n# Extras\nonnx>=1.17  # export.py: ONNX\n"
                            "# Tests\npytest>=8.0  # runs them: not a command\n")
    assert [(str(req), only) for req, only in demo.read_requirements(requirements)] == [
        ("numpy[dev]>=1.24", None), ("onnx>=1.17", "export.py"), ("pytest>=8.0", "the tests")]


def test_a_terminal_that_cannot_show_the_marks_gets_question_marks_not_a_crash():
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    demo.Checklist(out).say("✓ Plot  C:\\Users\\zoë\\results")
    out.seek(0)
    assert out.read() == "? Plot  C:\\Users\\zoë\\results\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a GPU that is not there")
def test_device_without_gpu_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(["--device", "cuda"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA" in err


@pytest.mark.parametrize("argv", [["--epochs", "3"], ["--save-dir", "x"], ["--data-dir", "x"]])
def test_bad_flag_exits_2(capsys, argv):
    """Flags are spelt with underscores only: the dashed duplicates are gone."""
    with pytest.raises(SystemExit) as stop:
        demo.main(argv)
    assert stop.value.code == 2


def test_help_does_not_repeat_the_defaults_argparse_appends():
    parser, _ = demo.parse_args([])
    for action in parser._actions:
        assert "default" not in (action.help or "").lower(), action.option_strings


# ---------------------------------------------------------------------------------------------------------
# Test-only packages, and those of one command, are optional
# ---------------------------------------------------------------------------------------------------------

def _packages_and_summary(requirements):
    out = io.StringIO()
    cl = demo.Checklist(out)
    demo.check_packages(cl, requirements)
    return cl, demo.summary(cl), out.getvalue().splitlines()


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
        assert line.startswith("○") and "not installed, for the tests only" in line, line
    assert next(line for line in lines if " numpy " in line).startswith("✓")
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
    assert optuna.startswith("○") and "for tune.py only" in optuna, optuna
    onnx = next(line for line in lines if " onnx " in line)
    assert onnx.startswith("○") and "for export.py and predict.py only" in onnx, onnx
    note = next(line for line in lines if line.startswith("Optional"))
    assert "optuna (pip install 'optuna>=4.0')" in note and "onnxruntime (pip install 'onnxruntime>=1.20')" in note

    # A package every command needs missing is still a cross, whatever else is optional.
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
    assert "`import onnxruntime` fails: libonnxruntime.so" in line and "for export.py and predict.py only" in line


# ---------------------------------------------------------------------------------------------------------
# The learning run, the round trip and the prediction prove what they claim
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the step that never steps
def test_learning_fails_when_the_step_does_not_update(monkeypatch, mnist_splits):
    """The check runs train_pytorch's own step: one that computes the loss but never steps the optimiser fails."""
    def no_update(model, optimizer, x, y, ctx, label_smoothing):
        with torch.no_grad():
            logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y), logits

    monkeypatch.setattr(train_pytorch, "train_step", no_update)
    with pytest.raises(demo.Failed) as failed:
        demo.check_learning(mnist_splits, torch.device("cpu"))
    detail, fix = failed.value.args
    assert "needs 95%" in detail and "restore the project's files" in fix


@pytest.fixture(scope="module")
def trained_like():
    """A tiny CNN as check_learning leaves it: channels-last, on the CPU."""
    torch.manual_seed(0)
    return cnn_pytorch.build_model(demo.LEARN_MODEL).to(memory_format=torch.channels_last)


def test_round_trip_passes_with_a_faithful_load(trained_like):
    detail, (loaded, ckpt) = demo.check_round_trip(trained_like, torch.device("cpu"))
    assert "tensors equal" in detail and ckpt["model"] == demo.LEARN_MODEL and not loaded.training
    for key, value in trained_like.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def _perturb_one_weight(real_load):
    def load(path, device="cpu", **kwargs):
        model, ckpt = real_load(path, device, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-6  # one number, off by rounding size
        return model, ckpt
    return load


def _skip_load_state_dict(real_load):
    def load(path, device="cpu", **kwargs):
        _, ckpt = real_load(path, device, **kwargs)
        return cnn_pytorch.build_model(ckpt["model"], **ckpt["model_args"]).to(device).eval(), ckpt  # fresh weights
    return load


def _add_a_buffer(real_load):
    def load(path, device="cpu", **kwargs):
        model, ckpt = real_load(path, device, **kwargs)
        model.register_buffer("stray", torch.zeros(1))  # a state the trained model does not have
        return model, ckpt
    return load


@pytest.mark.parametrize("broken", [_perturb_one_weight, _skip_load_state_dict, _add_a_buffer],
                         ids=["one-weight-off", "no-load_state_dict", "extra-tensor"])
def test_round_trip_fails_when_the_load_is_broken(trained_like, monkeypatch, broken):
    monkeypatch.setattr(checkpoint, "load_checkpoint", broken(checkpoint.load_checkpoint))
    with pytest.raises(demo.Failed) as failed:
        demo.check_round_trip(trained_like, torch.device("cpu"))
    detail, fix = failed.value.args
    assert "differ after save and load" in detail and fix == "restore checkpoint.py"


@pytest.fixture(scope="module")
def shipped_model():
    """A model that reads every example picture, without training one here: the shipped one."""
    return checkpoint.load_checkpoint(checkpoint.PRETRAINED_MODEL)


def test_prediction_reads_every_example_picture(shipped_model):
    detail, samples = demo.check_prediction(*shipped_model, torch.device("cpu"))
    assert detail.startswith("5 of 5 pictures in ") and detail.endswith(" read right")
    assert sorted(digit for digit, *_ in samples) == [2, 3, 5, 7, 8]


def test_broken_preprocessing_fails_the_prediction_and_the_plot_still_shows_it(shipped_model, monkeypatch,
                                                                                 tmp_path):
    """Pictures turned into MNIST digits without the ink made white (as if inversion were lost): the model misreads
    them, the check names the pictures, and the plot still draws what the model was given."""
    real = preprocess.image_to_mnist

    def dark_ink(path, mean, std):
        pixels = real(path, mean, std) * std + mean  # back to [0, 1], white ink
        return ((1 - pixels) - mean) / std

    monkeypatch.setattr(preprocess, "image_to_mnist", dark_ink)
    with pytest.raises(demo.Failed) as failed:
        demo.check_prediction(*shipped_model, torch.device("cpu"))
    detail, fix, samples = failed.value.args
    assert "read as" in detail and "preprocess.py" in fix and len(samples) == 5
    detail, path = demo.check_plot(samples, tmp_path)
    assert path.is_file() and path.stat().st_size > 10_000
