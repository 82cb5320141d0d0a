"""--ema (a moving average of the weights beside the model) and the "writers" augmentation (thicker, thinner and
blurred strokes): the flag, the checkpoint, fast_step's device-side average against swa_utils', exact resume."""
import csv
import math
from contextlib import nullcontext

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import augment
import data_loader
import fast_step
import train_pytorch
from cnn_pytorch import build_model
from common import memory_format
from conftest import DEVICE
from test_train import interrupt_after  # Ctrl-C after a given number of training steps

SMALL = ["--model", "tiny", "--train_subset", "2000", "--val_size", "1000", "--device", DEVICE, "--no_progress",
         "--no_plots"]


# ---- the flag ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["-0.1", "1", "1.5", "nan"])
def test_ema_outside_0_to_1_is_one_line_and_exit_2(tmp_path, capsys, decay):
    with pytest.raises(SystemExit) as exit_info:
        train_pytorch.main(["--ema", decay, "--save_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "argument --ema: must be" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ema_and_augment_are_run_settings():
    import resume
    assert {"ema", "augment"} <= set(resume.RUN_SETTINGS)


# ---- the checkpoint ------------------------------------------------------------------------------------------

def test_the_average_differs_from_the_model_and_the_better_one_is_kept(tmp_path, monkeypatch, capsys):
    """Validation scores the model, then its average; here the average is made to score better, so the best
    checkpoint holds the average's weights and says so, while the resumable state keeps the model and beside it
    the average."""
    real, scores = train_pytorch.evaluate, iter([(0.50, 0.90), (0.40, 0.95)])  # (loss, accuracy): model, average
    monkeypatch.setattr(train_pytorch, "evaluate", lambda *a, **k: (real(*a, **k), next(scores))[1])
    assert train_pytorch.main([*SMALL, "--epochs", "1", "--ema", "0.9", "--augment", "writers", "--no_test",
                               "--save_dir", str(tmp_path)]) == 0
    assert "-> ema" in capsys.readouterr().out
    best = torch.load(tmp_path / "best_model_tiny_pt.pth", weights_only=True)
    last = torch.load(tmp_path / "last_tiny_pt.pth", weights_only=True)
    assert best["weights"] == "ema" and best["val_accuracy"] == 0.95 and last["weights"] == "model"
    assert best["args"]["ema"] == 0.9 and best["args"]["augment"] == "writers"
    ema = last["ema"]
    assert ema["n_averaged"].item() == 2000 // 128  # one update per step
    # the average's weights, its last layer divided by the temperature calibration fitted (train_pytorch.calibrate)
    last_layer = ("classifier.1.weight", "classifier.1.bias")
    assert all(torch.equal(best["state_dict"][k], ema[f"module.{k}"])
               for k in best["state_dict"] if k not in last_layer)
    assert all(torch.allclose(best["state_dict"][k], ema[f"module.{k}"] / best["temperature"]) for k in last_layer)
    floats = [k for k, v in last["state_dict"].items() if v.is_floating_point()]
    assert all(not torch.equal(last["state_dict"][k], ema[f"module.{k}"]) for k in floats if "weight" in k)
    rows = list(csv.DictReader(open(tmp_path / "history_tiny.csv")))
    assert rows[0]["weights"] == "ema" and float(rows[0]["ema_val_acc"]) == 0.95


# ---- fast_step's average against swa_utils' --------------------------------------------------------------------

def build_fast_step(decay, augment="writers", epochs=2, capturable=False):
    """The tiny CNN, 640 random images in batches of 64, and a FastStep with an AveragedModel, built the way
    train_pytorch.set_up builds them on one CUDA GPU (here on DEVICE, eagerly)."""
    import argparse
    torch.manual_seed(0)
    images = torch.randint(0, 256, (640, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (640,), generator=torch.Generator().manual_seed(2))
    device = torch.device(DEVICE)
    model = build_model("tiny").to(device).to(memory_format=memory_format(device))
    batches = data_loader.TrainBatches(images.to(device), labels.to(device), 64, augment=augment,
                                       generator=torch.Generator().manual_seed(0), memory_format=memory_format(device))
    args = argparse.Namespace(optimizer="adam", weight_decay=0.0, scheduler="onecycle", epochs=epochs,
                              learning_rate=1e-3, max_lr=5e-3)
    total = epochs * len(batches)
    lrs = fast_step.LearningRates(lambda opt: train_pytorch.make_scheduler(args, opt, total), args.learning_rate,
                                  total, device)
    optimizer = train_pytorch.make_optimizer(args, model, lrs.table[0].clone(), device.type, capturable=capturable)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    step = fast_step.FastStep(train_pytorch.train_step, model, optimizer, batches, lrs, nullcontext(), 0.1,
                              ema=ema, ema_decay=decay)
    return model, optimizer, batches, ema, step, args


def test_device_side_average_is_swa_utils_average_bit_for_bit():
    """DeviceEMA (no host-side branch, so capturable) against AveragedModel.update_parameters on the same
    weights after every step: the first update copies, later ones average, buffers included, exactly."""
    model, _, batches, ema, step, _ = build_fast_step(0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    model.train()
    batches.new_epoch()
    step.start_epoch(1)
    for i in range(12):
        step()
        reference.update_parameters(model)
        if i == 0:  # the first update is a copy of the model, as swa_utils makes it
            assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(),
                                                          model.state_dict().values()))
    mine, theirs = ema.state_dict(), reference.state_dict()
    assert mine["n_averaged"].item() == theirs["n_averaged"].item() == 12
    assert all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in theirs), \
        [k for k in theirs if not torch.equal(mine[k].cpu(), theirs[k].cpu())][:3]
    weights = [k for k in mine if k.endswith("weight")]
    assert any(not torch.equal(mine[k], model.state_dict()[k[len("module."):]]) for k in weights)


def test_fast_step_average_is_the_plain_loops_average():
    """The end-to-end contract: the plain loop (train_step, then AveragedModel.update_parameters, PyTorch's
    scheduler) and the FastStep over the same batches end with the same average. As in test_train's contract
    for the weights, the plain loop's rates are rounded to float32, the table's precision, and the two agree up
    to float32 rounding. With the standard augmentation: on these random images the writers' strokes leave
    weights whose gradient is near zero, where Adam magnifies that rounding (5e-4 measured), and this test
    could not tell a real difference from it; the bit-for-bit test above runs the writers' strokes."""
    steps = 15
    model, _, batches, ema, step, args = build_fast_step(0.8, augment="standard")
    model.train()
    batches.new_epoch()
    step.run_epoch(1, steps)  # 10 steps an epoch: the counter wraps through the same order, as the loop below
    fast = {k: v.float().cpu() for k, v in ema.state_dict().items()}

    plain_model, _, plain_batches, plain_ema, _, _ = build_fast_step(0.8, augment="standard")
    optimizer = train_pytorch.make_optimizer(args, plain_model, args.learning_rate, DEVICE)
    scheduler = train_pytorch.make_scheduler(args, optimizer, args.epochs * len(plain_batches))
    plain_model.train()
    plain_batches.new_epoch()
    for i in range(steps):
        optimizer.param_groups[0]["lr"] = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float32).item()
        train_pytorch.train_step(plain_model, optimizer, *plain_batches.batch(i % len(plain_batches)), nullcontext(),
                                 0.1)
        plain_ema.update_parameters(plain_model)
        scheduler.step()
    plain = {k: v.float().cpu() for k, v in plain_ema.state_dict().items()}
    assert plain["n_averaged"].item() == fast["n_averaged"].item() == steps
    differ = [k for k in plain if not torch.allclose(plain[k], fast[k], rtol=1e-5, atol=2e-5)]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_warm_up_puts_the_average_back_too():
    model, optimizer, _, ema, step, _ = build_fast_step(0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    fast_step.warm_up(step, model, optimizer, step.counter, ema=ema)
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    assert ema.n_averaged.item() == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU: run with MNIST_TEST_DEVICE=cuda; "
                                             "the eager DeviceEMA is held to swa_utils above")
def test_graphed_average_equals_the_eager_average():
    """The average updated inside the captured graph (replayed 15 times, the first update a copy) is the
    average the eager FastStep makes."""
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for capture in (False, True):
            model, optimizer, batches, ema, step, _ = build_fast_step(0.8, capturable=capture)
            step.graph, _ = fast_step.warm_up(step, model, optimizer, step.counter, capture_graph=capture, ema=ema)
            model.train()
            batches.new_epoch()
            step.run_epoch(1, 15)
            torch.cuda.synchronize()
            results.append({k: v.float().cpu() for k, v in ema.state_dict().items()})
        eager, graphed = results
        assert eager["n_averaged"].item() == graphed["n_averaged"].item() == 15
        assert all(torch.allclose(eager[k], graphed[k], rtol=1e-5, atol=1e-6) for k in eager)
    finally:
        torch.use_deterministic_algorithms(False)


# ---- resume --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_then_resume_with_ema_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys):
    exact = ["--cuda_graphs", "off", "--deterministic"] if DEVICE == "cuda" else []
    flags = [*SMALL, "--epochs", "2", "--batch_size", "100", "--ema", "0.95", "--augment", "writers",
             "--no_test", *exact]  # 20 steps an epoch
    assert train_pytorch.main([*flags, "--save_dir", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 20 + 7)  # 7 steps into epoch 2
        assert train_pytorch.main([*flags, "--save_dir", str(tmp_path / "cut")]) == 130
    assert "interrupted in epoch 2" in capsys.readouterr().err
    assert train_pytorch.main(["--resume", *exact, "--save_dir", str(tmp_path / "cut"), "--model", "tiny",
                               "--device", DEVICE, "--no_progress", "--no_plots"]) == 0
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / name / "last_tiny_pt.pth", weights_only=True) for name in ("straight", "cut"))
    assert b["args"]["ema"] == 0.95 and b["args"]["augment"] == "writers"
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["ema"]["n_averaged"].item() == 40
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a["history"]] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in b["history"]]


# ---- the strokes ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    """16 copies of one MNIST digit and 16 different digits, float in [0, 1], (N, 1, 28, 28)."""
    x = data_loader.load_mnist()["train"][0][:16].float().div(255).unsqueeze(1)
    return x[:1].expand(16, 1, 28, 28).clone(), x


def ink(x):
    return x.sum(dim=(1, 2, 3))


def test_thicker_strokes_add_ink_and_thinner_ones_take_it_away(digits):
    """Each image draws a share in [-1, 1): thicker only, the images with a positive share gain ink and the
    others stay as they were; thinner only, the other way round."""
    same = digits[0][:1].expand(64, 1, 28, 28)
    torch.manual_seed(0)
    thick = augment.random_strokes(same, thicker=1.0, thinner=0.0, blur=0.0)
    thin = augment.random_strokes(same, thicker=0.0, thinner=0.5, blur=0.0)
    assert (ink(thick) >= ink(same) - 1e-4).all() and (ink(thick) > ink(same) * 1.1).sum() >= 16
    assert (ink(thin) <= ink(same) + 1e-4).all() and (ink(thin) < ink(same) * 0.9).sum() >= 16
    full = augment.random_strokes(same[:1], thicker=1.0, thinner=0.0, blur=0.0, generator=None)
    assert ink(full) <= ink(torch.nn.functional.max_pool2d(same[:1], 3, 1, 1)) + 1e-4  # at most a full dilation


def test_strokes_differ_per_image_and_keep_shape_dtype_device_and_range(digits):
    same, different = digits
    torch.manual_seed(0)
    out = augment.random_strokes(same)
    assert out.shape == same.shape and out.dtype == same.dtype and out.device == same.device
    assert out.min() >= 0 and out.max() <= 1
    diffs = [(out[i] - out[0]).abs().sum().item() for i in range(1, 16)]
    assert min(diffs) > 0.5, "two images got the same strokes"
    writers = augment.augment_batch(different, **augment.AUGMENTATIONS["writers"])
    assert writers.shape == different.shape and 0 <= writers.min() and writers.max() <= 1
    assert math.isfinite(ink(writers).sum().item())


def test_the_levels_without_strokes_draw_what_they_always_drew(digits):
    """augment_batch adds the strokes only where a level has them: standard and strong give random_affine's
    own images for the same seed, so their measured figures still hold."""
    _, x = digits
    for level in ("standard", "strong"):
        a = augment.augment_batch(x, **augment.AUGMENTATIONS[level],
                                      generator=torch.Generator().manual_seed(3))
        b = augment.random_affine(x, **augment.AUGMENTATIONS[level],
                                      generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_a_coarse_scan_looks_like_a_low_resolution_picture_read_by_preprocess(digits):
    """coarse_scans stands in, in training, for a picture of an 8x8 grid of ink counts blown up (as the UCI digits
    are shown): on real MNIST digits its edges are as soft as those of such a picture read by preprocess
    (score_writers' coarse_scan, its validation stand-in), far softer than the digit's own, and it lies nearer
    to that picture than the digit does. Share 0 leaves a batch as it was, blank stays blank."""
    from make_user_images import grid_picture
    from score_writers import as_read, coarse_scan
    _, x = digits
    read = torch.stack([as_read(grid_picture(coarse_scan((d[0] * 255).round().byte().numpy()))) for d in x])
    scanned = augment.coarse_scans(x, 1.0)[:, 0]

    def edge_per_ink(t):
        return ((t.diff(dim=1).abs().sum((1, 2)) + t.diff(dim=2).abs().sum((1, 2))) / t.sum((1, 2))).mean()

    assert abs(edge_per_ink(scanned) / edge_per_ink(read) - 1) < 0.15 < 1 - edge_per_ink(read) / edge_per_ink(x[:, 0])
    assert (scanned - read).abs().mean() < 0.9 * (x[:, 0] - read).abs().mean()
    assert torch.equal(augment.coarse_scans(x, 0.0), x)
    assert augment.coarse_scans(torch.zeros(2, 1, 28, 28), 1.0).abs().max() == 0
    some = augment.coarse_scans(x.repeat(4, 1, 1, 1), 0.5, generator=torch.Generator().manual_seed(0))
    assert 16 <= (some != x.repeat(4, 1, 1, 1)).flatten(1).any(1).sum() <= 48  # about half, each drawn alone
