"""train_pytorch.py end to end: flags, outputs, interrupt and resume, divergence, and one real epoch."""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_pytorch
from conftest import ROOT

SCRIPT = str(ROOT / "train_pytorch.py")


def run(*flags, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("model", ["simple", "improved"])
def test_dry_run_goes_through_train_validation_and_test_and_writes_nothing(tmp_path, model):
    result = run("--model", model, "--dry_run", "--device", "cpu", "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "Setup works" in result.stdout
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--device", "tpu"], "unknown --device"),
    (["--optimizer", "lbfgs"], "invalid choice"),
])
def test_bad_flags_give_one_line_and_exit_2_and_write_nothing(tmp_path, flags, message):
    out = tmp_path / "out"
    result = run(*flags, "--save_dir", str(out))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    result = run("--device", "cuda", "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unwritable_save_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run("--save_dir", str(blocker / "results"))
    assert result.returncode == 2 and "cannot write to --save_dir" in result.stderr
    assert blocker.read_text() == "not a folder"


def test_a_run_writes_every_documented_output(small_run):
    names = {p.name for p in small_run.iterdir()}
    assert {"best_model_simple_pt.pth", "last_simple_pt.pth", "history_simple.csv", "metrics_simple.txt",
            "metrics_simple.json", "training_history.png"} <= names
    ckpt = torch.load(small_run / "best_model_simple_pt.pth", map_location="cpu", weights_only=True)
    assert {"format", "model", "model_args", "state_dict", "normalization", "classes", "epoch", "val_accuracy",
            "test_accuracy", "args", "torch_version"} <= set(ckpt)
    assert ckpt["test_accuracy"] > 0.9
    report = json.loads((small_run / "metrics_simple.json").read_text())
    assert report["accuracy"] == pytest.approx(ckpt["test_accuracy"])
    assert "test accuracy" in (small_run / "metrics_simple.txt").read_text()
    rows = list(csv.DictReader(open(small_run / "history_simple.csv")))
    assert len(rows) == 1 and float(rows[0]["val_acc"]) == pytest.approx(ckpt["val_accuracy"], abs=1e-6)


SUBSET = ["--train_subset", "12000", "--device", "cpu", "--no_progress", "--epochs", "2"]


def test_ctrl_c_saves_state_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = run(*SUBSET, "--save_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, SCRIPT, *SUBSET, "--save_dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for epoch 1 to finish, then press Ctrl-C during epoch 2
        if line.startswith("epoch   1/2"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "after epoch 1" in err
    assert torch.load(out / "last_simple_pt.pth", weights_only=True)["epoch"] == 1

    resumed = run("--save_dir", str(out), "--resume", "--device", "cpu", "--no_progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1 of 2" in resumed.stdout
    history = list(csv.DictReader(open(out / "history_simple.csv")))
    expected = list(csv.DictReader(open(tmp_path / "straight" / "history_simple.csv")))
    assert [r["epoch"] for r in history] == ["1", "2"]
    # Same seed, same restored RNG and optimiser state: the resumed epoch 2 is the uninterrupted epoch 2.
    assert float(history[1]["val_acc"]) == pytest.approx(float(expected[1]["val_acc"]), abs=0.002)
    assert float(history[1]["train_loss"]) == pytest.approx(float(expected[1]["train_loss"]), rel=0.02)


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path):
    result = run("--resume", "--save_dir", str(tmp_path))
    assert result.returncode == 2 and "nothing to resume" in result.stderr


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_pytorch.train_one_epoch
    calls = []

    def diverge_in_epoch_2(*args, **kwargs):
        calls.append(1)
        loss, acc = real(*args, **kwargs)
        return (float("nan"), acc) if len(calls) == 2 else (loss, acc)
    monkeypatch.setattr(train_pytorch, "train_one_epoch", diverge_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        train_pytorch.main(["--train_subset", "2000", "--epochs", "3", "--device", "cpu", "--no_progress",
                            "--save_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "diverged at epoch 2" in capsys.readouterr().err
    last = torch.load(tmp_path / "last_simple_pt.pth", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_one_epoch_on_full_mnist_on_the_cpu_reaches_98_8_percent(tmp_path):
    """The real thing: the documented command, one epoch on all 55,000 training images."""
    result = run("--model", "simple", "--epochs", "1", "--device", "cpu", "--no_progress",
                 "--save_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "best_model_simple_pt.pth", weights_only=True)
    print(result.stdout)
    assert ckpt["test_accuracy"] >= 0.988


def test_fast_preset_trains_the_tiny_model_to_99_percent_in_one_epoch(tmp_path):
    """--preset fast: the record-speed recipe, on the full training set (its speed is benchmark.py's business)."""
    result = run("--preset", "fast", "--device", "cpu", "--no_progress", "--save_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    assert ckpt["model"] == "tiny" and ckpt["epoch"] == 1 and ckpt["args"]["augment"] is False
    assert ckpt["test_accuracy"] >= 0.99
