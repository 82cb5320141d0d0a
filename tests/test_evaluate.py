"""evaluate.py on a real checkpoint written by train_pytorch.py: same numbers, full report, clean errors."""
import argparse
import contextlib
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
from cnn_pytorch import build_model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


FIGURES = ("confusion_matrix.png", "sample_predictions.png", "misclassified.png", "per_class_metrics.png")


def run_main(argv):
    """evaluate.main in this process (no second torch start-up): (exit code, stdout, stderr), as the shell sees
    them whether it returned or exited."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = evaluate.main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def single(small_checkpoint, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("evaluate_single")
    code, out, err = run_main(["--model_path", small_checkpoint, "--save_dir", save_dir, "--device", "cpu"])
    assert code == 0, err
    return save_dir, out, err


def test_reproduces_the_test_accuracy_stored_by_training(single, small_checkpoint, small_run):
    save_dir, _, err = single
    stored = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    report = json.loads((save_dir / "metrics_simple.json").read_text())
    assert report["accuracy"] == stored["test_accuracy"]
    assert report["loss"] == pytest.approx(stored["test_loss"], rel=1e-6)
    assert "note:" not in err  # the "differs from the stored accuracy" warning did not fire
    # The very same predictions as the end of training: the confusion matrices agree cell by cell.
    trained = json.loads((small_run / "metrics_simple.json").read_text())
    assert report["confusion_matrix"] == trained["confusion_matrix"]


def test_json_holds_the_documented_keys(single, small_checkpoint):
    report = json.loads((single[0] / "metrics_simple.json").read_text())
    assert set(metrics.REPORT_KEYS) <= set(report) and set(metrics.RUN_KEYS) <= set(report)
    assert report["model"] == "simple" and report["seed"] == 0 and report["num_samples"] == 10_000
    assert report["parameters"] == count_parameters(build_model("simple"))
    assert report["checkpoint"] == str(small_checkpoint) and report["best_epoch"] == 1
    assert sum(map(sum, report["confusion_matrix"])) == 10_000
    assert len(report["most_confused"]) == metrics.TOP_PAIRS
    assert len(report["worst_misclassifications"]) == metrics.WORST
    assert "Worst misclassifications" in (single[0] / "metrics_simple.txt").read_text()


def _check_png(path):
    assert path.is_file(), f"{path.name} was not written"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        (w, h), pixels = im.size, np.asarray(im.convert("L"))
    assert 600 <= w <= 4000 and 300 <= h <= 4000, f"{path.name} is {w}x{h}"
    assert pixels.std() > 10, f"{path.name} looks blank"


def test_every_figure_is_a_readable_png(single, small_run):
    for name in FIGURES:
        _check_png(single[0] / name)
    _check_png(small_run / "training_history.png")  # drawn by visualization.py at the end of training


def test_prints_a_table(single):
    _, out, _ = single
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["model", "parameters", "test", "accuracy"]
    assert lines[1].split()[:2] == ["simple", f"{count_parameters(build_model('simple')):,}"]


@pytest.fixture
def first_test_images(monkeypatch):
    """The ensemble tests score the first 2,000 test images only: they check the averaging, not MNIST."""
    load_mnist = evaluate.data_loader.load_mnist

    def first_2000(*args, **kwargs):
        data = load_mnist(*args, **kwargs)
        return {**data, "test": tuple(t[:2000] for t in data["test"])}
    monkeypatch.setattr(evaluate.data_loader, "load_mnist", first_2000)


@pytest.fixture
def drawn(monkeypatch):
    """The figures are checked above; here only which probabilities would be drawn where."""
    calls = {}
    import visualization
    monkeypatch.setattr(visualization, "plot_test_report",
                        lambda folder, images, y, probs, report: calls.update({folder: probs}))
    return calls


def test_ensemble_of_two_copies_equals_the_model(small_checkpoint, tmp_path, first_test_images, drawn):
    copy = shutil.copy(small_checkpoint, tmp_path / "copy.pth")
    save_dir = tmp_path / "out"
    code, out, err = run_main(["--model_path", small_checkpoint, copy, "--save_dir", save_dir, "--device", "cpu"])
    assert code == 0, err
    reports = {name: json.loads((save_dir / f"metrics_{name}.json").read_text())
               for name in ("simple", "simple_2", "ensemble")}  # two "simple" models: no report overwritten
    one = reports["simple"]
    for report in reports.values():
        assert report["accuracy"] == one["accuracy"] and report["num_samples"] == 2000
        assert report["confusion_matrix"] == one["confusion_matrix"]
        assert report["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert reports["ensemble"]["parameters"] == 2 * one["parameters"]
    assert list(drawn) == [save_dir / "simple", save_dir / "simple_2", save_dir / "ensemble"]  # a folder each
    table = out.splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["simple", "simple_2", "ensemble"]  # ensemble last
    assert table[3].split()[2] == f"{one['accuracy'] * 100:.2f}%"


def test_ensemble_averages_the_softmax_of_different_models(small_checkpoint, tmp_path, first_test_images, drawn):
    ckpt = torch.load(small_checkpoint, map_location="cpu", weights_only=True)
    bias = ckpt["state_dict"]["classifier.5.bias"].clone()
    bias[7] += 4.0  # a second model that says "7" far more often
    other = tmp_path / "biased.pth"
    torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], "classifier.5.bias": bias}}, other)
    code, _, err = run_main(["--model_path", small_checkpoint, other, "--save_dir", tmp_path, "--device", "cpu"])
    assert code == 0, err
    first, second, ensemble = (drawn[tmp_path / name] for name in ("simple", "simple_2", "ensemble"))
    assert not np.allclose(first, second)
    np.testing.assert_allclose(ensemble, (first + second) / 2, rtol=1e-6)


def test_report_names_get_a_suffix_when_shared():
    names = evaluate.report_names([{"model": m} for m in ("simple", "simple", "improved", "simple")])
    assert names == ["simple", "simple_2", "improved", "simple_3"]


def _foreign_file(kind, folder, good):
    path = folder / f"{kind}.pth"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "other_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "bare_state_dict":  # what many tutorials save: weights without our format tag
        torch.save(build_model("simple").state_dict(), path)
    elif kind == "pickled_code":
        torch.save(argparse.Namespace(model="simple"), path)
    elif kind == "wrong_weights":
        ckpt = torch.load(good, map_location="cpu", weights_only=True)
        torch.save({**ckpt, "model_args": {"hidden": 10}}, path)
    return path


@pytest.mark.parametrize("kind", ["missing", "text", "other_dict", "bare_state_dict", "pickled_code",
                                  "wrong_weights"])
def test_bad_checkpoint_is_one_line_and_exit_2(kind, small_checkpoint, tmp_path):
    bad = _foreign_file(kind, tmp_path, small_checkpoint)
    save_dir = tmp_path / "out"
    code, out, err = run_main(["--model_path", small_checkpoint, bad, "--save_dir", save_dir, "--device", "cpu"])
    assert code == 2
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1, err
    assert bad.name in err
    assert not save_dir.exists()  # checked before anything is scored or written


@pytest.mark.parametrize("flags, message", [(["--batch_size", "0"], "--batch_size"),
                                            (["--device", "tpu"], "--device")])
def test_bad_flags_are_one_line_and_exit_2(flags, message, small_checkpoint, tmp_path):
    code, _, err = run_main(["--model_path", small_checkpoint, "--save_dir", tmp_path, *flags])
    assert code == 2 and err.count("\n") == 1 and message in err


def test_unwritable_save_dir_is_one_line_and_exit_2(small_checkpoint, tmp_path):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("a file where the folder should go\n")
    code, _, err = run_main(["--model_path", small_checkpoint, "--save_dir", not_a_folder, "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1 and "--save_dir" in err


@pytest.mark.slow
def test_command_line_exit_code(tmp_path, python):
    """The real command, as a person runs it: one line on stderr, exit status 2."""
    result = subprocess.run([python, "evaluate.py", "--model_path", str(tmp_path / "missing.pth"),
                             "--save_dir", str(tmp_path)], cwd=evaluate.PROJECT_DIR, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("evaluate.py: error:") and result.stderr.count("\n") == 1, result.stderr
