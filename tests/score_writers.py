"""The validation figures --writers and its augmentation were chosen on (docs/writers.md), for any checkpoint:

  mnist_val          MNIST's 5,000 validation digits (the split train_pytorch.py holds out, seed 0)
  w_pendigits/w_font the other writers' held-out digits, per source (data/writers/, split "val")
  world, control     tests/make_world_shapes.py's validation split, read like user pictures, with each world shape
  coarse_scan        every validation digit above (MNIST and writers) scanned coarsely the way the UCI optical
                     digits were made (a 32x32 bitmap counted in 4x4 blocks to an 8x8 grid of 0-16, Alpaydin and
                     Kaynak's recipe), then shown as tests/make_user_images.py shows UCI digits (grid_picture:
                     8x8 -> 80x80 bicubic, dark on white) and read through preprocess: a stand-in for
                     low-resolution scans made without the UCI digits themselves, which are only ever scored, at the end

Never the UCI digits, never MNIST's test split: this is what choosing is done on.

    python tests/score_writers.py results/best_model_simple_pt.pth [more checkpoints ...]
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_loader  # noqa: E402
import preprocess  # noqa: E402
import writers  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from make_user_images import grid_picture  # noqa: E402
from make_world_shapes import make_set  # noqa: E402


def coarse_scan(digit):
    """A 28x28 uint8 digit as an 8x8 grid of 0-16: its ink box fitted into 28 of 32 pixels (a 2-pixel margin:
    ink that fills the whole frame reads as paper to preprocess), thresholded, counted in 4x4 blocks."""
    rows, cols = np.nonzero(digit > 40)
    crop = digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = 28 / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    big = np.zeros((32, 32), np.uint8)
    big[(32 - h) // 2:(32 - h) // 2 + h, (32 - w) // 2:(32 - w) // 2 + w] = \
        np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
    return (big > 127).reshape(8, 4, 8, 4).sum((1, 3))


def as_read(picture):
    """A picture through preprocess as predict.py reads it, 28x28 in [0, 1]; blank (counted wrong) when refused."""
    try:
        return preprocess.image_to_mnist(picture, 0.0, 1.0)[0]
    except preprocess.ImageError:
        return torch.zeros(28, 28)


def build():
    """{name: (images 28x28 in [0, 1], labels, group)} for every figure above."""
    val_x, val_y = data_loader.get_splits(val_size=5000, seed=0)["val"]
    wx, wy, source = writers.load("val")
    sets = {"mnist_val": (val_x.float() / 255, val_y.numpy(), np.full(len(val_y), "mnist")),
            "writers_val": (wx.float() / 255, wy.numpy(), np.asarray(source))}
    digits = np.concatenate([val_x.numpy(), wx.numpy()])
    sets["coarse_scan"] = (torch.stack([as_read(grid_picture(coarse_scan(d))) for d in digits]),
                           np.concatenate([val_y, wy]),
                           np.concatenate([sets["mnist_val"][2], sets["writers_val"][2]]))
    with tempfile.TemporaryDirectory() as out:
        made = make_set(out, "val", per_shape=60)
        sets["world_val"] = (torch.stack([as_read(p) for p, *_ in made]), np.array([y for _, y, *_ in made]),
                             np.array([shape for *_, shape in made]))
    return sets


def score(path, sets):
    model, ckpt = load_checkpoint(path)
    model.eval()
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    figures = {"model": path}
    for name, (x, y, group) in sets.items():
        with torch.no_grad():
            right = model(((x - mean) / std).unsqueeze(1)).argmax(1).numpy() == y
        if name == "world_val":
            world = ~np.char.startswith(group.astype(str), "plain")
            figures |= {"world": right[world].mean(), "control": right[~world].mean(),
                        "worst_world_digit": min(right[world & (y == d)].mean() for d in np.unique(y[world]))}
            figures |= {shape: right[group == shape].mean() for shape in np.unique(group[world])}
        elif name == "writers_val":
            figures |= {f"w_{s}": right[group == s].mean() for s in np.unique(group)}
        else:
            figures[name] = right.mean()
    return {k: v if isinstance(v, str) else round(float(v) * 100, 2) for k, v in figures.items()}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/score_writers.py CHECKPOINT [CHECKPOINT ...]")
    sets = build()
    for path in sys.argv[1:]:
        print(json.dumps(score(path, sets)), flush=True)
