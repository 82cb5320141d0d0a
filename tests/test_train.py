"""train_pytorch.py end to end: flags, outputs, interrupt and resume, divergence, and one real epoch."""
import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_pytorch
from conftest import DEVICE, ROOT

SCRIPT = str(ROOT / "train_pytorch.py")


def run(*flags, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("model", ["simple", "improved"])
def test_dry_run_goes_through_train_validation_and_test_and_writes_nothing(tmp_path, model):
    result = run("--model", model, "--dry_run", "--device", DEVICE, "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "Setup works" in result.stdout
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--device", "tpu"], "unknown --device"),
    (["--optimizer", "lbfgs"], "invalid choice"),
    (["--label_smoothing", "1.0"], "--label_smoothing must be in [0, 1)"),
    (["--preset", "slow"], "invalid choice"),
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


SUBSET = ["--train_subset", "12000", "--device", DEVICE, "--no_progress", "--epochs", "2"]


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

    resumed = run("--save_dir", str(out), "--resume", "--device", DEVICE, "--no_progress")
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
        train_pytorch.main(["--train_subset", "2000", "--epochs", "3", "--device", DEVICE, "--no_progress",
                            "--save_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "diverged at epoch 2" in capsys.readouterr().err
    last = torch.load(tmp_path / "last_simple_pt.pth", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_one_epoch_on_full_mnist_reaches_98_8_percent(tmp_path):
    """The real thing: the documented command, one epoch on all 55,000 training images."""
    result = run("--model", "simple", "--epochs", "1", "--device", DEVICE, "--no_progress",
                 "--save_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "best_model_simple_pt.pth", weights_only=True)
    print(result.stdout)
    assert ckpt["test_accuracy"] >= 0.988


def test_fast_preset_trains_the_tiny_model_to_99_percent_in_one_epoch(tmp_path):
    """--preset fast: the record-speed recipe, on the full training set (its speed is benchmark.py's business)."""
    result = run("--preset", "fast", "--device", DEVICE, "--no_progress", "--save_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    assert ckpt["model"] == "tiny" and ckpt["epoch"] == 1 and ckpt["args"]["augment"] is False
    assert ckpt["test_accuracy"] >= 0.99


def test_accurate_preset_trains_improved_with_strong_augmentation_and_label_smoothing(tmp_path):
    """--preset accurate on a slice of MNIST: the recipe lands in the checkpoint, and it learns."""
    result = run("--preset", "accurate", "--epochs", "2", "--train_subset", "4000", "--device", DEVICE,
                 "--no_progress", "--save_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "best_model_improved_pt.pth", weights_only=True)
    args = ckpt["args"]
    assert ckpt["model"] == "improved" and args["strong_augment"] is True and args["label_smoothing"] == 0.1
    assert args["patience"] == 0 and args["epochs"] == 2  # an explicit flag still wins over the preset
    assert ckpt["test_accuracy"] > 0.9


def test_equal_validation_accuracy_keeps_the_epoch_with_the_lower_validation_loss(tmp_path, monkeypatch):
    """On 5,000 validation images ties are common; the later, better-fitted epoch must not lose to the first."""
    scores = iter([(0.30, 0.95), (0.20, 0.95), (0.25, 0.95)])  # (loss, accuracy) for epochs 1, 2, 3
    real = train_pytorch.evaluate
    monkeypatch.setattr(train_pytorch, "evaluate", lambda *a, **k: (real(*a, **k), next(scores))[1])
    code = train_pytorch.main(["--train_subset", "1000", "--val_size", "500", "--epochs", "3", "--device", DEVICE,
                               "--no_progress", "--save_dir", str(tmp_path)])
    assert code == 0
    assert torch.load(tmp_path / "best_model_simple_pt.pth", weights_only=True)["epoch"] == 2


def test_bf16_autocast_path_trains_on_the_cpu_too(tmp_path):
    """--amp is the default on CUDA; running it on the CPU keeps that code path tested without a GPU."""
    result = run("--preset", "fast", "--amp", "--train_subset", "4000", "--device", DEVICE, "--no_progress",
                 "--save_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "amp bf16" in result.stdout
    ckpt = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())  # weights stay fp32
    assert ckpt["test_accuracy"] > 0.9


def test_resume_accepts_a_state_written_before_the_newer_settings_existed(tmp_path, small_run):
    state = torch.load(small_run / "last_simple_pt.pth", weights_only=True)
    for key in ("strong_augment", "label_smoothing"):
        del state["args"][key]
    del state["best_val_loss"]
    torch.save(state, tmp_path / "last_simple_pt.pth")
    shutil.copy(small_run / "best_model_simple_pt.pth", tmp_path)
    result = run("--resume", "--epochs", "2", "--save_dir", str(tmp_path), "--device", DEVICE, "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1 of 1" in result.stdout  # the stored run settings win, as before


def test_compile_warm_up_puts_back_weights_batch_norm_statistics_gradients_and_random_state():
    from contextlib import nullcontext
    import data_loader
    from cnn_pytorch import build_model
    torch.manual_seed(0)
    model = build_model("improved")  # batch norm and dropout: both would leave traces
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (300,))
    batches = data_loader.DeviceBatches(images, labels, 128)  # 128, 128 and a last batch of 44
    rng = torch.get_rng_state()
    seconds = train_pytorch.compile_warm_up(model, model, batches, nullcontext(), 0.1)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_compile_is_timed_apart_and_trains_like_the_eager_model(tmp_path):
    """--compile warms up before the clock starts and reports the compile time on its own."""
    flags = ["--preset", "fast", "--train_subset", "2000", "--device", DEVICE, "--no_progress"]
    eager = run(*flags, "--save_dir", str(tmp_path / "eager"))
    compiled = run(*flags, "--compile", "--save_dir", str(tmp_path / "compiled"), timeout=600)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert "not counted as training time" in compiled.stdout
    e, c = (json.loads((tmp_path / name / "metrics_tiny.json").read_text()) for name in ("eager", "compiled"))
    assert e["compile_seconds"] == 0 and c["compile_seconds"] > 0
    (e_row,), (c_row,) = (list(csv.DictReader(open(tmp_path / name / "history_tiny.csv")))
                          for name in ("eager", "compiled"))
    assert float(c_row["train_loss"]) == pytest.approx(float(e_row["train_loss"]), rel=0.02)
    assert float(c_row["val_acc"]) == pytest.approx(float(e_row["val_acc"]), abs=0.005)
