"""train_pytorch.py end to end: flags, outputs, interrupt and resume, divergence, and one real epoch."""
import csv
import json
import math
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F

import train_pytorch
from checkpoint import load_checkpoint, read_checkpoint
from conftest import DEVICE, ROOT

SCRIPT = str(ROOT / "train_pytorch.py")


def run(*flags):
    """The command in a process of its own, as a person runs it."""
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=300)


def run_here(capsys, *flags):
    """The command's main() in this process: (exit code, stdout, stderr). For the flag checks and the runs that
    need no process of their own (a training process spends ~8 s importing torch, its compiler, which the optimiser
    loads, and scikit-learn); the dry run and a bad flag below go through a real process."""
    try:
        code = train_pytorch.main(list(flags))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_dry_run_goes_through_train_validation_and_test_and_writes_nothing(tmp_path):
    result = run("--dry_run", "--device", DEVICE, "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "Setup works" in result.stdout
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_dry_run_of_the_improved_model_too(tmp_path, capsys):
    code, out, _ = run_here(capsys, "--model", "improved", "--dry_run", "--device", DEVICE, "--save_dir",
                            str(tmp_path / "out"))
    assert code == 0 and "Setup works" in out
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--batch_size", "0"], "--batch_size: must be at least 1"),
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--device", "tpu"], "unknown --device"),
    (["--optimizer", "lbfgs"], "invalid choice"),
    (["--label_smoothing", "1.0"], "--label_smoothing: must be below 1"),
    (["--augment", "heavy"], "invalid choice: 'heavy'"),
    (["--model", "tiny", "--dropout", "0.2"], "the tiny model has no dropout"),
    (["--preset", "slow"], "invalid choice"),
    (["--init_from", "model.pth", "--resume"], "--init_from starts a new run from a model file"),
])
def test_bad_flags_give_one_line_and_exit_2_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code, _, err = run_here(capsys, *flags, "--save_dir", str(out))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_a_bad_flag_exits_2_from_the_command_itself(tmp_path):
    result = run("--epochs", "0", "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "train_pytorch.py: error: argument --epochs: must be at least 1, got 0 (see --help)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_here(capsys, "--device", "cuda", "--save_dir", str(tmp_path / "out"))
    assert code == 2 and "no CUDA GPU" in err
    assert len(err.strip().splitlines()) == 1


def test_unwritable_save_dir_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_here(capsys, "--save_dir", str(blocker / "results"))
    assert code == 2 and "cannot write to --save_dir" in err
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


def test_the_kept_model_is_calibrated_on_validation(small_run):
    # The temperature fitted on the run's validation split is folded into the saved model: on those images its
    # cross-entropy is the lowest any temperature gives, so it beats the model as trained (temperature 1).
    import data_loader
    model, ckpt = load_checkpoint(small_run / "best_model_simple_pt.pth")
    t = ckpt["temperature"]
    assert 0.05 < t < 20 and t != 1.0
    images, labels = data_loader.split_train_val(*data_loader.load_mnist()["train"], val_size=1000, seed=0)[1]
    with torch.no_grad():
        logits = model(data_loader.normalize(images))
    nll = {s: F.cross_entropy(logits * s, labels).item() for s in (1.0, t, 0.9, 1.1)}
    assert nll[1.0] <= min(nll[t], nll[0.9], nll[1.1])  # logits * t: as trained; 0.9, 1.1: a little off the fit
    report = json.loads((small_run / "metrics_simple.json").read_text())
    assert report["temperature"] == pytest.approx(t, abs=1e-4)
    assert "temperature" in (small_run / "metrics_simple.txt").read_text()


# On a GPU: eager steps (a replayed graph does not call TrainStep, so it could not be interrupted by counting
# calls) and deterministic kernels (else the resumed run is only close to the uninterrupted one, not equal).
EXACT_ON_GPU = ["--cuda_graphs", "off", "--deterministic"] if DEVICE == "cuda" else []


def test_init_from_fine_tunes_a_saved_model_instead_of_starting_from_scratch(tmp_path, small_run, capsys):
    # 256 images at a rate too small to move the weights: the run ends where the file began (about 96% on the
    # same 1,000 validation images), where a new model would be near chance
    flags = ["--model", "simple", "--epochs", "1", "--train_subset", "256", "--val_size", "1000", "--learning_rate",
             "1e-9", "--max_lr", "1e-8", "--device", DEVICE, "--no_test", "--no_plots", "--no_progress"]
    code, _, err = run_here(capsys, *flags, "--init_from", str(small_run / "best_model_simple_pt.pth"),
                            "--save_dir", str(tmp_path / "tuned"))
    assert code == 0, err
    start = read_checkpoint(small_run / "best_model_simple_pt.pth")
    tuned = read_checkpoint(tmp_path / "tuned" / "best_model_simple_pt.pth")
    assert tuned["val_accuracy"] > 0.9 and abs(tuned["val_accuracy"] - start["val_accuracy"]) < 0.01
    code, _, err = run_here(capsys, *flags, "--save_dir", str(tmp_path / "new"))
    assert code == 0 and read_checkpoint(tmp_path / "new" / "best_model_simple_pt.pth")["val_accuracy"] < 0.5


def test_init_from_a_file_of_another_model_is_a_clear_error(tmp_path, small_run, capsys):
    code, _, err = run_here(capsys, "--model", "improved", "--init_from", str(small_run / "best_model_simple_pt.pth"),
                            "--device", DEVICE, "--save_dir", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds a 'simple' model, not 'improved'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def interrupt_after(monkeypatch, steps):
    """Ctrl-C after a given number of training steps (counted from the start of this process's run, the warm-up's
    3 on a GPU included): the same KeyboardInterrupt a SIGINT raises, at a point that does not depend on the
    machine's speed."""
    real, taken = train_pytorch.train_step, []

    def step(*args):
        taken.append(1)
        if len(taken) > steps:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train_pytorch, "train_step", step)


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow
def test_ctrl_c_then_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys):
    """Same seed, same restored optimiser, schedule, batch-norm and random state: on the CPU the resumed run is
    the uninterrupted run, bit for bit (history rows and final weights)."""
    flags = ["--train_subset", "1000", "--val_size", "500", "--epochs", "3", "--device", DEVICE, "--no_progress",
             "--no_plots", "--no_test", "--batch_size", "100", *EXACT_ON_GPU]  # 10 steps an epoch; dropout,
    # augmentation, onecycle in play; the test set is left out: equal best weights say all its scoring would
    assert train_pytorch.main([*flags, "--save_dir", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 10 + 5)  # 5 steps into epoch 2
        assert train_pytorch.main([*flags, "--save_dir", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 2" in err and "--resume" in err
    assert torch.load(tmp_path / "cut" / "last_simple_pt.pth", weights_only=True)["epoch"] == 1
    assert train_pytorch.main(["--resume", *EXACT_ON_GPU, "--save_dir", str(tmp_path / "cut"), "--device", DEVICE,
                               "--no_progress", "--no_plots"]) == 0
    assert "resuming after epoch 1 of 3" in capsys.readouterr().out
    straight, resumed = (list(csv.DictReader(open(tmp_path / name / "history_simple.csv")))
                         for name in ("straight", "cut"))
    assert without_seconds(resumed) == without_seconds(straight)
    a, b = (torch.load(tmp_path / name / "last_simple_pt.pth", weights_only=True) for name in ("straight", "cut"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    best_a, best_b = (torch.load(tmp_path / name / "best_model_simple_pt.pth", weights_only=True)
                      for name in ("straight", "cut"))
    assert best_a["epoch"] == best_b["epoch"]
    assert all(torch.equal(best_a["state_dict"][k], best_b["state_dict"][k]) for k in best_a["state_dict"])


def test_ctrl_c_before_the_first_epoch_ends_writes_nothing(tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, 3)
    code = train_pytorch.main(["--train_subset", "2000", "--device", DEVICE, "--no_progress", "--no_plots",
                               *EXACT_ON_GPU, "--save_dir", str(tmp_path)])
    assert code == 130 and "nothing to resume, nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_here(capsys, "--resume", "--save_dir", str(tmp_path))
    assert code == 2 and "nothing to resume" in err


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_pytorch.train_epoch
    calls = []

    def diverge_in_epoch_2(*args, **kwargs):
        calls.append(1)
        loss, acc, seconds = real(*args, **kwargs)
        return (float("nan") if len(calls) == 2 else loss), acc, seconds
    monkeypatch.setattr(train_pytorch, "train_epoch", diverge_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        train_pytorch.main(["--train_subset", "512", "--val_size", "256", "--epochs", "3", "--device", DEVICE,
                            "--no_progress", "--no_plots", "--save_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "diverged at epoch 2" in capsys.readouterr().err
    last = torch.load(tmp_path / "last_simple_pt.pth", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.slow
def test_one_epoch_on_full_mnist_reaches_98_8_percent(tmp_path, capsys):
    """The real thing: the documented command, one epoch on all 55,000 training images (in this process: the
    command's own process is tested above, and a process of its own would add ~8 s of imports)."""
    code, out, err = run_here(capsys, "--model", "simple", "--epochs", "1", "--device", DEVICE, "--no_progress",
                              "--no_plots", "--save_dir", str(tmp_path))
    assert code == 0, err
    ckpt = torch.load(tmp_path / "best_model_simple_pt.pth", weights_only=True)
    print(out)
    assert ckpt["test_accuracy"] >= 0.988


@pytest.mark.slow
def test_fast_preset_trains_the_tiny_model_to_99_percent_in_one_epoch(tmp_path, capsys):
    """--preset fast: the record-speed recipe, on the full training set (its speed is benchmark.py's business)."""
    code, _, err = run_here(capsys, "--preset", "fast", "--device", DEVICE, "--no_progress", "--no_plots",
                            "--save_dir", str(tmp_path))
    assert code == 0, err
    ckpt = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    assert ckpt["model"] == "tiny" and ckpt["epoch"] == 1 and ckpt["args"]["augment"] == "none"
    assert ckpt["test_accuracy"] >= 0.99


@pytest.mark.slow
def test_accurate_preset_trains_improved_with_strong_augmentation_and_label_smoothing(tmp_path, capsys):
    """--preset accurate on a slice of MNIST: the recipe lands in the checkpoint, and it learns (scored on 1,000
    validation images: the improved CNN on the 10,000 test images would cost this test most of its time)."""
    code, _, err = run_here(capsys, "--preset", "accurate", "--epochs", "1", "--train_subset", "2000", "--val_size",
                            "1000", "--no_test", "--device", DEVICE, "--no_progress", "--no_plots", "--save_dir",
                            str(tmp_path))
    assert code == 0, err
    ckpt = torch.load(tmp_path / "best_model_improved_pt.pth", weights_only=True)
    args = ckpt["args"]
    assert ckpt["model"] == "improved" and args["augment"] == "strong" and args["label_smoothing"] == 0.1
    assert args["patience"] == 0 and args["epochs"] == 1  # an explicit flag still wins over the preset
    assert ckpt["val_accuracy"] > 0.8  # measured: 85.9% (one epoch of 2,000 images; chance is 10%)


@pytest.mark.slow
def test_equal_validation_accuracy_keeps_the_epoch_with_the_lower_validation_loss(tmp_path, monkeypatch):
    """On 5,000 validation images ties are common; the later, better-fitted epoch must not lose to the first."""
    scores = iter([(0.30, 0.95), (0.20, 0.95), (0.25, 0.95)])  # (loss, accuracy) for epochs 1, 2, 3
    real = train_pytorch.evaluate
    monkeypatch.setattr(train_pytorch, "evaluate", lambda *a, **k: (real(*a, **k), next(scores))[1])
    code = train_pytorch.main(["--train_subset", "1000", "--val_size", "500", "--epochs", "3", "--device", DEVICE,
                               "--no_progress", "--no_plots", "--no_test", "--save_dir", str(tmp_path)])
    assert code == 0
    assert torch.load(tmp_path / "best_model_simple_pt.pth", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_bf16_autocast_path_trains_on_the_cpu_too(tmp_path, capsys):
    """--amp is the default on CUDA; running it on the CPU keeps that code path tested without a GPU. Scored on
    1,000 validation images: bf16 is slow on a CPU without bf16 units, and the 10,000 test images would cost
    this test most of its time (test scoring under autocast is in the float64 test below)."""
    code, out, err = run_here(capsys, "--preset", "fast", "--amp", "--train_subset", "3000", "--val_size", "1000",
                              "--no_test", "--device", DEVICE, "--no_progress", "--no_plots", "--save_dir",
                              str(tmp_path))
    assert code == 0, err
    assert "amp bf16" in out
    ckpt = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())  # weights stay fp32
    assert ckpt["val_accuracy"] > 0.85  # measured: 90.3% (one epoch of 3,000 images)


@pytest.mark.slow
def test_resume_accepts_a_state_written_before_the_newer_settings_existed(tmp_path, small_run, capsys):
    state = torch.load(small_run / "last_simple_pt.pth", weights_only=True)
    for key in ("augment", "label_smoothing"):
        del state["args"][key]
    del state["best_val_loss"], state["scheduler"]  # what states of earlier versions lack
    torch.save(state, tmp_path / "last_simple_pt.pth")
    shutil.copy(small_run / "best_model_simple_pt.pth", tmp_path)
    code, out, err = run_here(capsys, "--resume", "--epochs", "2", "--save_dir", str(tmp_path), "--device", DEVICE,
                              "--no_progress", "--no_plots")
    assert code == 0, err
    assert "resuming after epoch 1 of 1" in out  # the stored run settings win, as before


@contextmanager
def deterministic_kernels():
    """Deterministic kernels, so two runs on a GPU can be compared bit for bit (the CPU is deterministic anyway)."""
    torch.use_deterministic_algorithms(True)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, benchmark


@pytest.fixture
def deterministic():
    with deterministic_kernels():
        yield


def make_args(epochs=3):
    import argparse
    return argparse.Namespace(optimizer="adam", weight_decay=0.0, scheduler="onecycle", epochs=epochs,
                              learning_rate=1e-3, max_lr=5e-3, dropout=None)


def make_batches(model_name="tiny", augment="standard", batch_size=64):
    """A model and 640 random images on DEVICE in batches of batch_size (64: 10 steps an epoch), seed 0, laid out as
    train_pytorch.set_up lays them out."""
    import data_loader
    from cnn_pytorch import build_model
    from common import memory_format
    torch.manual_seed(0)
    images = torch.randint(0, 256, (640, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (640,), generator=torch.Generator().manual_seed(2))
    device = torch.device(DEVICE)
    model = build_model(model_name).to(device).to(memory_format=memory_format(device))
    batches = data_loader.TrainBatches(images.to(device), labels.to(device), batch_size, augment=augment,
                                       generator=torch.Generator().manual_seed(0), memory_format=memory_format(device))
    return model, batches


def make_step(model_name="tiny", compiled=False, augment="standard", capturable=False, epochs=3, batch_size=64):
    """A fast_step.FastStep built the way train_pytorch.set_up builds it on one CUDA GPU (here on DEVICE)."""
    import fast_step
    args = make_args(epochs)
    model, batches = make_batches(model_name, augment, batch_size)
    device = torch.device(DEVICE)
    total = args.epochs * len(batches)
    lrs = fast_step.LearningRates(lambda opt: train_pytorch.make_scheduler(args, opt, total), args.learning_rate,
                                  total, device)
    optimizer = train_pytorch.make_optimizer(args, model, lrs.table[0].clone(), device.type, capturable=capturable)
    step_model = torch.compile(model) if compiled else model
    step = fast_step.FastStep(train_pytorch.train_step, step_model, optimizer, batches, lrs, nullcontext(),
                              label_smoothing=0.1)
    return model, optimizer, batches, step


def take_steps(model, batches, step, n):
    model.train()
    batches.new_epoch()
    step.start_epoch(1)
    for _ in range(n):
        step()


def check_warm_up_leaves_no_trace(model_name, compiled=False, augment="standard", batch_size=64):
    """Warm-up steps (and, on CUDA, the capture) change weights, batch-norm statistics, Adam's moments, the step
    counter and the random state; all of it must be put back, with the compiled model when the run compiles."""
    import fast_step
    model, optimizer, batches, step = make_step(model_name, compiled, augment, batch_size=batch_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state(), torch.cuda.get_rng_state() if DEVICE == "cuda" else None
    graph, _ = fast_step.warm_up(step, model, optimizer, step.counter)
    assert graph is None  # capture_graph=False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng[0]) and step.counter.item() == 0
    assert DEVICE != "cuda" or torch.equal(torch.cuda.get_rng_state(), rng[1])
    assert all(p.grad is None for p in model.parameters())
    take_steps(model, batches, step, 5)
    warmed = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg_sq"].clone() for s in optimizer.state.values()]

    model, optimizer, batches, step = make_step(model_name, compiled, augment, batch_size=batch_size)  # not warmed up
    take_steps(model, batches, step, 5)
    assert all(torch.equal(warmed[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, optimizer.state.values()))


def test_warm_up_leaves_no_trace_in_the_run_that_follows(deterministic):
    check_warm_up_leaves_no_trace("improved")  # batch norm, dropout, augmentation; compiled: in the --compile test


STEPS = 15  # 10 steps an epoch: the counter wraps through the order as it does in training


def fast_steps(capture):
    """STEPS steps of the FastStep on DEVICE, replayed from a CUDA graph when capture (CUDA only): the weights,
    the device sums, the counter, the last learning rate, and the table.

    Everything but the capture runs on the CPU too, so a mistake in this set-up (such as more steps than the
    learning-rate table has rates: a device-side assert on CUDA) fails the CPU suite first."""
    import fast_step
    model, optimizer, batches, step = make_step("improved", augment="strong", capturable=capture)
    assert STEPS <= len(step.lrs.table), "the steps must stay inside the run's learning-rate table"
    graph, _ = fast_step.warm_up(step, model, optimizer, step.counter, capture_graph=capture)
    model.train()
    batches.new_epoch()
    step.graph = graph
    step.run_epoch(1, STEPS)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return ({k: v.float().cpu() for k, v in model.state_dict().items()}, step.loss_sum.item(), step.correct.item(),
            step.counter.item(), step.lr.item(), step.lrs.table)


def float32(x):
    return torch.tensor(x, dtype=torch.float32).item()


@pytest.mark.slow
def test_fast_step_trains_as_the_plain_loop_does(deterministic):
    """The contract between train_pytorch's plain loop and fast_step: the same steps over the same batches give
    the same weights. The one difference between them is the learning rate: the plain loop's comes from
    PyTorch's scheduler as a Python float, fast_step's from the same scheduler's values in a float32 table on
    the device. So the table must hold exactly those rates rounded to float32, and with the plain loop's rates
    rounded the same way the two must agree up to float32 rounding (Adam works out lr / bias correction in
    float32 for a tensor rate, in float64 for a float one: measured 2e-6 at most after 25 steps). Unrounded, Adam
    magnifies the last bit of the rate in weights whose gradient is near zero, so the test could not tell a
    real difference from that."""
    args = make_args()
    model, batches = make_batches("improved", augment="strong")
    optimizer = train_pytorch.make_optimizer(args, model, args.learning_rate, DEVICE)
    scheduler = train_pytorch.make_scheduler(args, optimizer, args.epochs * len(batches))
    model.train()
    batches.new_epoch()
    rates = []
    for i in range(STEPS):  # through the same order again after 10 steps, as the FastStep's counter wraps
        optimizer.param_groups[0]["lr"] = float32(optimizer.param_groups[0]["lr"])
        rates.append(optimizer.param_groups[0]["lr"])
        train_pytorch.train_step(model, optimizer, *batches.batch(i % len(batches)), nullcontext(), 0.1)
        scheduler.step()
    plain = {k: v.float().cpu() for k, v in model.state_dict().items()}
    fast, loss_sum, correct, counter, lr, table = fast_steps(capture=False)  # one new_epoch(): the same order
    assert counter == STEPS and lr == pytest.approx(table[STEPS - 1].item())  # the set-up the CUDA graph test uses
    assert 0 < correct <= STEPS * 64 and math.isfinite(loss_sum)
    assert table[:STEPS].tolist() == rates
    differ = [k for k in plain if not torch.allclose(plain[k], fast[k], rtol=1e-5, atol=2e-5)]
    worst = max((plain[k] - fast[k]).abs().max().item() for k in plain)
    assert differ == [], f"{len(differ)} tensors differ (max diff {worst}), e.g. {differ[:3]}"


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU: .ci/gpu_check runs this with "
                                             "MNIST_TEST_DEVICE=cuda; its set-up runs on the CPU in the test above")
def test_graphed_steps_equal_eager_steps(deterministic):
    """The captured step, replayed, trains exactly as the eager step does: same augmentation and dropout draws
    (the CUDA generator inside the graph), same learning-rate schedule (the table on the device), same Adam."""
    (eager, *eager_sums, _), (graphed, *graphed_sums, table) = fast_steps(False), fast_steps(True)
    assert eager_sums[2:] == graphed_sums[2:] == [STEPS, pytest.approx(table[STEPS - 1].item())]
    assert graphed_sums[0] == pytest.approx(eager_sums[0], rel=1e-5) and graphed_sums[1] == eager_sums[1]
    worst = max((eager[k] - graphed[k]).abs().max().item() for k in eager)
    assert all(torch.allclose(eager[k], graphed[k], rtol=1e-5, atol=1e-6) for k in eager), f"max diff {worst}"


def test_train_batches_of_two_ranks_together_are_the_single_process_batch():
    import data_loader
    images = torch.arange(1000, dtype=torch.uint8).repeat_interleave(784).view(1000, 28, 28)  # image i shows i % 256
    labels = torch.arange(1000)
    single = data_loader.TrainBatches(images, labels, 100, generator=torch.Generator().manual_seed(3))
    ranks = [data_loader.TrainBatches(images, labels, 50, generator=torch.Generator().manual_seed(3), rank=r,
                                      world_size=2) for r in (0, 1)]
    for b in (single, *ranks):
        b.new_epoch()
    assert len(single) == len(ranks[0]) == 10
    for i in range(len(single)):
        _, y = single.batch(torch.tensor(i))
        parts = [r.batch(torch.tensor(i))[1] for r in ranks]
        assert sorted(torch.cat(parts).tolist()) == sorted(y.tolist())
    order = single.order.flatten().tolist()
    assert len(set(order)) == 1000  # every image once per epoch


@pytest.mark.slow
def test_compile_is_timed_apart_leaves_no_trace_and_trains_like_the_eager_model(tmp_path, capsys):
    """--compile compiles in the warm-up, before the clock starts, and reports that time on its own; the warm-up
    of the compiled model leaves no trace, as the eager one's does (above).

    One test for both, on one graph, so that the check's compiles are read from inductor's cache: as two tests on
    two xdist workers, each compiled a graph of its own cold (~30 s each on the 2-core CPU, with a fresh cache).
    A graph is keyed on more than the model: the batch's shape and strides (the tiny model, unaugmented batches of
    128, as --preset fast trains; augmented ones are laid out otherwise) and the deterministic setting. So the check
    trains unaugmented, and the random state's return is held by the eager test above, whose augmentation and
    dropout draw from it."""
    flags = ["--preset", "fast", "--train_subset", "2000", "--deterministic", "--device", DEVICE, "--no_progress",
             "--no_plots"]
    with deterministic_kernels():  # put back off afterwards: main() leaves the setting as --deterministic asked
        assert train_pytorch.main([*flags, "--save_dir", str(tmp_path / "eager")]) == 0
        assert "not counted as training time" not in capsys.readouterr().out or DEVICE == "cuda"
        assert train_pytorch.main([*flags, "--compile", "--save_dir", str(tmp_path / "compiled")]) == 0
        assert "compiled in" in capsys.readouterr().out
        check_warm_up_leaves_no_trace("tiny", compiled=True, augment="none", batch_size=128)
    e, c = (json.loads((tmp_path / name / "metrics_tiny.json").read_text()) for name in ("eager", "compiled"))
    assert e["compile_seconds"] == 0 and c["warmup_seconds"] == c["compile_seconds"] > 0
    (e_row,), (c_row,) = (list(csv.DictReader(open(tmp_path / name / "history_tiny.csv")))
                          for name in ("eager", "compiled"))
    assert float(c_row["train_loss"]) == pytest.approx(float(e_row["train_loss"]), rel=0.02)
    assert float(c_row["val_acc"]) == pytest.approx(float(e_row["val_acc"]), abs=0.005)


def history_of(save_dir, model="tiny"):
    return list(csv.DictReader(open(save_dir / f"history_{model}.csv")))


SHORT = ["--model", "tiny", "--train_subset", "2000", "--val_size", "1000", "--device", DEVICE, "--no_progress",
         "--no_plots", "--no_test"]
# For the tests of what the loop does between epochs (when the rate halves, when it stops), not what it learns:
# 4 steps an epoch are enough, in a third of the time (the last flag wins).
FEW = [*SHORT, "--train_subset", "512", "--val_size", "256"]


@pytest.mark.slow
def test_every_scheduler_draws_the_learning_rate_curve_it_promises(tmp_path):
    lrs = {}
    for name in ("onecycle", "cosine", "none"):
        assert train_pytorch.main([*FEW, "--epochs", "3", "--scheduler", name,
                                   "--learning_rate", "0.002", "--max_lr", "0.01", "--patience", "0",
                                   "--save_dir", str(tmp_path / name)]) == 0
        lrs[name] = [float(r["lr"]) for r in history_of(tmp_path / name)]
    assert lrs["none"] == pytest.approx([0.002] * 3)
    # cosine, per step: the rate of the last of 12 steps (4 an epoch) is the curve's 11/12 point, near 0
    assert lrs["cosine"][0] > lrs["cosine"][1] > lrs["cosine"][2] == pytest.approx(
        0.002 * (1 + math.cos(math.pi * 11 / 12)) / 2, rel=1e-3)
    # onecycle: up to --max_lr in the first 15% of the steps, then down to --learning_rate / 1000
    assert lrs["onecycle"][0] < 0.01 and lrs["onecycle"][0] > lrs["onecycle"][1] > lrs["onecycle"][2]
    assert lrs["onecycle"][2] == pytest.approx(0.002 / 1000, rel=0.01)


@pytest.mark.slow
def test_early_stopping_stops_after_patience_epochs_without_a_better_validation_accuracy(tmp_path, monkeypatch):
    scores = iter([(0.3, 0.90), (0.2, 0.95), (0.25, 0.94), (0.3, 0.93), (0.1, 0.99), (0.1, 0.99)])
    real = train_pytorch.evaluate
    monkeypatch.setattr(train_pytorch, "evaluate", lambda *a, **k: (real(*a, **k), next(scores))[1])
    assert train_pytorch.main([*FEW, "--epochs", "6", "--patience", "2", "--save_dir", str(tmp_path)]) == 0
    assert [int(r["epoch"]) for r in history_of(tmp_path)] == [1, 2, 3, 4]  # stopped: 3 and 4 were no better
    assert torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_sgd_and_rmsprop_train_too(tmp_path, optimizer):
    lr = {"sgd": "0.02", "rmsprop": "0.001"}[optimizer]
    assert train_pytorch.main([*SHORT, "--epochs", "2", "--optimizer", optimizer, "--learning_rate", lr,
                               "--scheduler", "none", "--save_dir", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    # 30 steps on 2,000 images: far above the 10% of chance (measured: SGD 95%, RMSprop 79%)
    assert ckpt["args"]["optimizer"] == optimizer and ckpt["val_accuracy"] > 0.7


@pytest.mark.slow
def test_weight_decay_shrinks_the_weights(tmp_path):
    norms = {}
    for wd in ("0", "0.5"):
        assert train_pytorch.main([*SHORT, "--epochs", "1", "--optimizer", "sgd", "--learning_rate", "0.02",
                                   "--scheduler", "none", "--weight_decay", wd, "--save_dir", str(tmp_path / wd)]) == 0
        state = torch.load(tmp_path / wd / "best_model_tiny_pt.pth", weights_only=True)["state_dict"]
        norms[wd] = sum(v.norm() ** 2 for k, v in state.items() if k.endswith("weight")).sqrt().item()
    assert norms["0.5"] < 0.8 * norms["0"]


def test_dropout_flag_reaches_the_model_and_the_checkpoint(tmp_path):
    assert train_pytorch.main(["--model", "simple", "--dropout", "0.3", "--train_subset", "1000", "--val_size",
                               "500", "--epochs", "1", "--device", DEVICE, "--no_progress", "--no_plots", "--no_test",
                               "--save_dir", str(tmp_path)]) == 0
    from checkpoint import load_checkpoint
    model, ckpt = load_checkpoint(tmp_path / "best_model_simple_pt.pth")
    assert ckpt["model_args"] == {"dropout": 0.3}
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert not (tmp_path / "metrics_simple.json").exists()  # --no_test: the test set was not scored


def test_on_epoch_sees_every_history_row_and_can_stop_the_run(tmp_path):
    rows = []

    class Enough(Exception):
        pass

    def on_epoch(row):
        rows.append(row)
        if row["epoch"] == 2:
            raise Enough
    with pytest.raises(Enough):
        train_pytorch.main([*FEW, "--epochs", "4", "--save_dir", str(tmp_path)], on_epoch=on_epoch)
    assert [r["epoch"] for r in rows] == [1, 2] and {"val_acc", "val_loss", "lr"} <= set(rows[0])
    assert torch.load(tmp_path / "last_tiny_pt.pth", weights_only=True)["epoch"] == 2


def test_no_float64_on_the_training_device(tmp_path, monkeypatch):
    """Apple's MPS has no float64: an epoch, validation and test scoring must never make one on the device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import data_loader
    real_splits = data_loader.get_splits

    def small_test_split(*args, **kwargs):  # test scoring runs, on 512 test images: the path, not the figure
        splits = real_splits(*args, **kwargs)
        return {**splits, "test": tuple(t[:512] for t in splits["test"])}
    monkeypatch.setattr(data_loader, "get_splits", small_test_split)

    class Float64Watch(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == DEVICE:
                    self.seen.append(str(func))
            return out
    with Float64Watch() as watch:
        code = train_pytorch.main([*SHORT[:-1], "--train_subset", "512", "--val_size", "256", "--epochs", "1", "--amp",
                                   "--save_dir", str(tmp_path)])  # the test set too
    assert code == 0
    assert watch.seen == []


def test_deterministic_runs_give_the_same_weights(tmp_path):
    for name in ("a", "b"):
        assert train_pytorch.main([*FEW, "--epochs", "1", "--deterministic", "--save_dir", str(tmp_path / name)]) == 0
    a, b = (torch.load(tmp_path / n / "best_model_tiny_pt.pth", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_graphs_on_without_cuda_is_a_clear_error(tmp_path, capsys):
    if DEVICE == "cuda":
        pytest.skip("this run is on CUDA")
    code, _, err = run_here(capsys, "--cuda_graphs", "on", "--device", "cpu", "--save_dir", str(tmp_path / "out"))
    assert code == 2 and "--cuda_graphs on needs a CUDA device" in err


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_validation_loss_is_the_loss_training_minimises(smoothing):
    """The history's train and validation losses are drawn on one axis: the validation loss must be the same
    cross-entropy, label smoothing included, as F.cross_entropy computes it in train_step."""
    import data_loader
    import distributed
    from cnn_pytorch import build_model
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(2))
    loss, _ = train_pytorch.evaluate(model, images, labels, nullcontext(), distributed.Dist(torch.device("cpu")),
                                     label_smoothing=smoothing)
    with torch.no_grad():
        expected = F.cross_entropy(model(data_loader.normalize(images)), labels, label_smoothing=smoothing).item()
    assert loss == pytest.approx(expected, rel=1e-4)
