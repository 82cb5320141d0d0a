"""Pictures of digits "as people send them", made from MNIST *test* digits (labels known, never trained on).

Each kind imitates one way a real picture differs from MNIST:

  paper_jpeg   dark ink on off-white or tinted noisy paper, random size and position, JPEG (quality 60-90)
  paper_png    the same, saved as PNG
  rgba         a drawing-app export: strokes on a transparent canvas whose hidden colour is black, white or junk
  big_canvas   a big white-on-black canvas (400-1000 px) with a small off-centre digit
  thin_stroke  a drawing-app canvas with a thin pen (2-5 px strokes on a 250-600 px digit)
  photo        a phone photo: uneven light, a soft shadow, blur, specks of dust, sometimes the table along one
               side, JPEG, stored sideways with an EXIF orientation tag
  scan         a large high-resolution scan (1700x2200 grey page, scanner noise, JPEG)
  mnist28      the MNIST digit itself, 28x28 PNG (must come through unchanged)

and, not made from MNIST, other_writers(): scikit-learn's bundled UCI digits by 43 other people.

Used by tests/test_predict.py (a few dozen per kind, in tmp_path) and, run as a script, to measure accuracy
per kind with a checkpoint, against a naive resize-to-28x28:

    python tests/make_user_images.py --per_kind 500 --model_path pretrained/best_model_improved_pt.pth

Numbers (several digits in one picture, NUMBER_KINDS below) for evaluate_numbers.py:

    python tests/make_user_images.py --numbers results/numbers_test --per_kind 200            # MNIST test digits
    python tests/make_user_images.py --numbers results/numbers_dev --per_kind 40 --split train --seed 101

It also made the example pictures that ship in examples/ (EXAMPLES below: one picture per kind a newcomer is
likely to have, each from a fixed MNIST test digit, shrunk to a few KB), and makes them again with

    python tests/make_user_images.py --examples examples
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("paper_jpeg", "paper_png", "rgba", "big_canvas", "thin_stroke", "photo", "scan", "mnist28")


def _upscale(digit, height, rng, tilt=True):
    """An MNIST digit (28x28 uint8) as ink coverage in [0, 1] at `height` pixels, crisp anti-aliased edges.

    Bicubic upscaling gives soft blurry strokes; a steep ramp around mid-grey turns them into the sharp
    edge a marker or pen leaves (and drops the faint grey a blurry source has), and a small random rotation
    stands in for a tilted page (tilt=False: none, and rng is not drawn from).
    """
    img = Image.fromarray(digit, "L")
    if tilt:
        img = img.rotate(rng.uniform(-6, 6), resample=Image.Resampling.BICUBIC)
    up = img.resize((height, height), Image.Resampling.BICUBIC)
    a = np.asarray(up, dtype=np.float32) / 255.0
    return np.clip((a - 0.35) * 4.0, 0.0, 1.0)


def thin(binary):
    """Zhang-Suen thinning to a one-pixel skeleton, vectorised: the thin-stroke kind here, the pen strokes of
    tests/test_app.py there (scikit-image would do it too, but is not worth a dependency for two test helpers)."""
    b = binary.astype(np.int32)
    while True:
        changed = False
        for step in (0, 1):
            p = np.pad(b, 1)
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            count = sum(n)
            turns = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).astype(np.int32) for i in range(8))
            if step == 0:
                side = (n[0] * n[2] * n[4] == 0) & (n[2] * n[4] * n[6] == 0)
            else:
                side = (n[0] * n[2] * n[6] == 0) & (n[0] * n[4] * n[6] == 0)
            remove = (b == 1) & (count >= 2) & (count <= 6) & (turns == 1) & side
            if remove.any():
                b[remove] = 0
                changed = True
        if not changed:
            return b.astype(bool)


def _paste(canvas_hw, ink, rng):
    """Place ink coverage at a random position on a zero canvas of shape canvas_hw."""
    h, w = canvas_hw
    out = np.zeros((h, w), np.float32)
    ih, iw = ink.shape
    top, left = rng.integers(0, h - ih + 1), rng.integers(0, w - iw + 1)
    out[top:top + ih, left:left + iw] = ink
    return out


def _paper(h, w, rng, tinted=True):
    base = np.array([rng.uniform(225, 252), rng.uniform(215, 250), rng.uniform(190, 245)]) if tinted \
        else np.full(3, rng.uniform(220, 250))
    noise = rng.normal(0, rng.uniform(4, 14), (h, w, 1))
    return base[None, None, :] + noise


def _compose(paper, coverage, ink_rgb):
    c = coverage[..., None]
    return np.clip(paper * (1 - c) + np.asarray(ink_rgb, np.float32)[None, None, :] * c, 0, 255).astype(np.uint8)


def _dark_ink(rng):
    return [rng.uniform(10, 70), rng.uniform(10, 70), rng.uniform(10, 140)]  # black, grey, blue-black pens


def make_one(kind, digit, rng):
    """One picture of `kind` from an MNIST digit: (PIL image, file suffix, extra save kwargs)."""
    if kind in ("paper_jpeg", "paper_png"):
        h, w = int(rng.integers(100, 420)), int(rng.integers(100, 420))
        size = int(min(h, w) * rng.uniform(0.3, 0.8))
        cover = _paste((h, w), _upscale(digit, size, rng), rng)
        img = Image.fromarray(_compose(_paper(h, w, rng), cover, _dark_ink(rng)), "RGB")
        if kind == "paper_jpeg":
            return img, ".jpg", {"quality": int(rng.integers(60, 91))}
        return img, ".png", {"compress_level": 1}
    if kind == "rgba":
        h, w = int(rng.integers(200, 520)), int(rng.integers(200, 520))
        size = int(min(h, w) * rng.uniform(0.4, 0.85))
        cover = _paste((h, w), _upscale(digit, size, rng), rng)
        hidden = rng.integers(0, 3)  # what the transparent pixels hold: black, white or junk
        rgb = np.zeros((h, w, 3)) if hidden == 0 else np.full((h, w, 3), 255.0) if hidden == 1 \
            else rng.uniform(0, 255, (h, w, 3))
        pen = np.array([rng.uniform(0, 255) for _ in range(3)]) if rng.random() < 0.3 else np.array(_dark_ink(rng))
        c = (cover > 0)[..., None]
        rgb = np.where(c, pen[None, None, :], rgb)
        rgba = np.dstack([rgb, cover * 255]).round().astype(np.uint8)
        return Image.fromarray(rgba, "RGBA"), ".png", {"compress_level": 1}
    if kind == "big_canvas":
        h, w = int(rng.integers(400, 1001)), int(rng.integers(400, 1001))
        size = int(min(h, w) * rng.uniform(0.08, 0.2))
        cover = _paste((h, w), _upscale(digit, size, rng), rng)
        bg, fg = rng.uniform(0, 25), rng.uniform(200, 255)
        return Image.fromarray((bg + (fg - bg) * cover).round().astype(np.uint8), "L"), ".png", {"compress_level": 1}
    if kind == "thin_stroke":
        side = int(rng.integers(280, 620))
        size = int(side * rng.uniform(0.45, 0.9))
        skeleton = thin(_upscale(digit, size // 2, rng) > 0.5)  # thin at half size, draw at full size
        pen = int(rng.integers(2, 6))
        stroke = Image.fromarray((skeleton * 255).astype(np.uint8), "L").resize((size, size),
                                                                              Image.Resampling.NEAREST)
        stroke = stroke.filter(ImageFilter.MaxFilter(pen if pen % 2 else pen + 1))
        stroke = stroke.filter(ImageFilter.GaussianBlur(0.6))  # the app's anti-aliasing
        cover = _paste((side, side), np.asarray(stroke, np.float32) / 255.0, rng)
        img = Image.fromarray((255 * (1 - cover)).round().astype(np.uint8), "L")
        return (img.convert("RGB") if rng.random() < 0.5 else img), ".png", {}
    if kind == "photo":
        h, w = 480, 640
        size = int(h * rng.uniform(0.25, 0.6))
        cover = _paste((h, w), _upscale(digit, size, rng), rng)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        light = 1 - rng.uniform(0.1, 0.35) * (xx / w if rng.random() < 0.5 else 1 - xx / w)
        light *= 1 - rng.uniform(0.1, 0.3) * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2) * 2
        edge = rng.uniform(0.2, 0.8) * w  # the soft shadow of a hand or a phone over part of the page
        light *= 1 - rng.uniform(0.1, 0.3) / (1 + np.exp(-(xx - edge) / 30.0)) * (rng.random() < 0.6)
        paper = _paper(h, w, rng) * light[..., None]
        for _ in range(int(rng.integers(0, 12))):  # dust: dark specks of 1-3 px radius
            y, x, r = int(rng.integers(3, h - 3)), int(rng.integers(3, w - 3)), rng.uniform(1, 3)
            dy, dx = np.mgrid[-3:4, -3:4]
            paper[y - 3:y + 4, x - 3:x + 4][dy * dy + dx * dx <= r * r] *= 0.4
        rgb = _compose(paper, cover, [v * light.mean() for v in _dark_ink(rng)])
        band = int(rng.integers(30, 90))
        side = slice(0, band) if rng.random() < 0.5 else slice(w - band, w)
        if rng.random() < 0.3 and not cover[:, side].any():  # the table shows along one side of the page
            rgb[:, side] = np.clip(rng.uniform(30, 90, 3)[None, None, :] + rng.normal(0, 6, (h, band, 1)), 0, 255)
        img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: "rotate 90 clockwise to view"; the pixels are stored turned left
        return img.transpose(Image.Transpose.ROTATE_90), ".jpg", {"quality": int(rng.integers(70, 91)),
                                                                  "exif": exif.tobytes()}
    if kind == "scan":
        h, w = 2200, 1700
        size = int(rng.integers(200, 700))
        ink = _upscale(digit, size, rng)
        page = rng.uniform(200, 240) + rng.standard_normal((h, w), np.float32) * 5  # paper with scanner noise
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        window = page[top:top + size, left:left + size]
        window[:] = window * (1 - ink) + rng.uniform(20, 80) * ink
        return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8), "L"), ".jpg", {"quality": 85}
    if kind == "mnist28":
        return Image.fromarray(digit, "L"), ".png", {}
    raise ValueError(f"unknown kind {kind!r}: choose from {', '.join(KINDS)}")


def make_set(out_dir, images, labels, kinds=KINDS, per_kind=50, seed=0):
    """Write per_kind pictures of each kind under out_dir/<kind>/; returns [(path, label, kind), ...].

    Digits are drawn from `images` (MNIST test digits, uint8 (N, 28, 28)) in a fixed random order.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    made = []
    for k, kind in enumerate(kinds):
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            idx = int(order[(k * per_kind + i) % len(order)])
            img, suffix, kwargs = make_one(kind, np.asarray(images[idx], np.uint8), rng)
            path = folder / f"{i:04d}_{int(labels[idx])}{suffix}"
            img.save(path, **kwargs)
            made.append((path, int(labels[idx]), kind))
    return made


# The pictures in examples/: (file name with the true digit, kind, MNIST test index, longest side in pixels,
# JPEG quality). The indices are the first test digits of each class whose picture the shipped model reads
# right with over 99% confidence; the sides and qualities keep all five under 30 KB together.
EXAMPLES = (
    ("photo_7.jpg", "photo", 0, 320, 80),        # phone photo of ink on paper, stored sideways + EXIF tag
    ("scan_2.jpg", "scan", 1, 700, 75),          # a whole letter-size page scanned, one digit on it
    ("drawing_3.png", "rgba", 30, None, None),   # drawing-app export: strokes on a transparent background
    ("canvas_5.png", "big_canvas", 15, None, None),  # white-on-black canvas, small digit off the centre
    ("pen_8.png", "thin_stroke", 61, None, None),   # thin pen on a large white canvas
)


def make_example(kind, digit, index, max_side=None):
    """One example picture: (PIL image, suffix, save kwargs); its randomness is seeded by the test index alone."""
    img, suffix, kwargs = make_one(kind, digit, np.random.default_rng([0, index]))
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS,
                         reducing_gap=3.0)
    return img, suffix, kwargs


def make_examples(out_dir, images, labels):
    """Write the EXAMPLES into out_dir; returns [(path, label)]. A name whose digit is not the label is a bug."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for name, kind, index, max_side, quality in EXAMPLES:
        label = int(labels[index])
        if name.rsplit(".", 1)[0][-1] != str(label):
            raise ValueError(f"{name}: MNIST test image {index} is a {label}")
        img, suffix, kwargs = make_example(kind, np.asarray(images[index], np.uint8), index, max_side)
        if suffix == ".jpg":
            kwargs = dict(kwargs, quality=quality or kwargs.get("quality", 85))
        else:
            kwargs = {"optimize": True}
        img.save(out_dir / name, **kwargs)
        made.append((out_dir / name, label))
    return made


def other_writers(count=None):
    """Digits written by other people: scikit-learn's bundled UCI set (1,797 digits by 43 writers, 8x8, 0-16).

    Not MNIST, so no 97% target applies; each is drawn as dark ink on white at 80x80 (bicubic, so blurred).
    Returns [(PIL image, label, "other_writers")], for accuracy_by_kind.
    """
    from sklearn.datasets import load_digits
    images, labels = load_digits(return_X_y=True)
    return [(grid_picture(row.reshape(8, 8)), int(label), "other_writers")
            for row, label in list(zip(images, labels))[:count]]


def grid_picture(grid):
    """An 8x8 grid of ink counts 0-16 (a UCI digit, or tests/score_writers.py's coarse scan) as a picture: dark
    ink on white at 80x80, upscaled bicubic, so blurred."""
    small = Image.fromarray((grid * 255 / 16).astype(np.uint8), "L")
    return Image.fromarray(255 - np.asarray(small.resize((80, 80), Image.Resampling.BICUBIC)), "L")


# ---- numbers: several digits in one picture ------------------------------------------------------------------
#
#   spaced_paper_jpeg  2-6 digits, gaps from 0.08 to 0.6 of the digit height, dark ink on tinted noisy paper, JPEG
#   spaced_paper_png   the same as PNG
#   spaced_canvas      2-6 spaced digits, white on a black canvas (a drawing app), PNG
#   long               7-10 spaced digits on paper, JPEG or PNG
#   touching           2-6 digits whose boxes overlap (gaps -0.1 to -0.01 of the height): strokes touch or cross
#   uci                2-6 spaced digits by other writers (scikit-learn's 8x8 UCI digits, upscaled), on paper
#
# In every kind the digits differ in size by +-10%, sit on a wavy baseline and lean a little; broken digits
# come as MNIST has them (a 5 with its bar apart, a thin 4 in two pieces). The true number is in the file
# name, after the index: 0007_2026.png. Made from MNIST *test* digits for the figures we report, from *train*
# digits (split="train", another seed) for the development set the reader's thresholds were chosen on.

NUMBER_KINDS = ("spaced_paper_jpeg", "spaced_paper_png", "spaced_canvas", "long", "touching", "uci")
# ... and a shifted set, each kind outside the ranges number_reader.py's synthetic lines are drawn from (gaps
# -0.3 to 1.0 of the height, slant up to 0.3, MNIST's pen thickened or thinned by a pixel at 20 px): a reader
# tuned to its own generator shows it here. On paper, 2-6 digits.
SHIFTED_KINDS = ("shifted_gaps", "shifted_slant", "shifted_pen")
NUMBER_LENGTHS = {"long": (7, 10)}  # digits per number; the rest: 2-6


def _uci_as_mnist():
    """scikit-learn's UCI digits as MNIST-like 28x28 uint8 (the 8x8 grid stretched to 20x20, a 4-pixel margin)."""
    from sklearn.datasets import load_digits
    images, labels = load_digits(return_X_y=True)
    out = np.zeros((len(images), 28, 28), np.uint8)
    for n, row in enumerate(images):
        small = Image.fromarray((row.reshape(8, 8) * 255 / 16).astype(np.uint8), "L")
        out[n, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.Resampling.BICUBIC))
    return out, labels


def number_strip(digits, height, gaps, rng, pen=None):
    """Ink coverage of digits (28x28 uint8 each) written in a row: heights +-10% around `height`, a wavy
    baseline, and gaps[i] (a share of the height; negative overlaps) between the ink of neighbours. pen: a
    function that redraws each digit's cover (another pen)."""
    pieces = []
    for digit in digits:
        h = max(8, int(height * rng.uniform(0.9, 1.1)))
        cover = _upscale(digit, h, rng)
        cover = cover if pen is None else pen(cover)
        cols = np.nonzero(cover.max(0) > 0.05)[0]
        pieces.append(cover[:, cols[0]:cols[-1] + 1] if cols.size else cover)
    wave, phase = rng.uniform(0, 0.08) * height, rng.uniform(0, 2 * np.pi)
    period = rng.uniform(3, 8) * height
    xs, x = [], 0
    for n, piece in enumerate(pieces):
        xs.append(x)
        x += piece.shape[1] + (int(round(gaps[n] * height)) if n < len(gaps) else 0)
    width = max(x0 + p.shape[1] for x0, p in zip(xs, pieces))
    top = int(np.ceil(wave)) + 2
    strip = np.zeros((int(1.12 * height) + 2 * top + 2, width), np.float32)
    for x0, piece in zip(xs, pieces):
        y0 = top + int(round(wave * np.sin(2 * np.pi * x0 / period + phase))) + (strip.shape[0] - 2 * top - piece.shape[0]) // 2
        region = strip[y0:y0 + piece.shape[0], x0:x0 + piece.shape[1]]
        np.maximum(region, piece[:region.shape[0], :region.shape[1]], out=region)
    return strip


def make_number(kind, digits, rng):
    """One picture of a number of `kind` from digit images (28x28 uint8): (PIL image, suffix, save kwargs)."""
    n = len(digits)
    if kind == "touching":
        gaps = rng.uniform(-0.1, -0.01, n - 1)
    elif kind == "shifted_gaps":  # wider than any training line's (overlapping deeper made digits no one reads)
        gaps = rng.uniform(1.2, 2.5, n - 1)
    else:
        gaps = rng.uniform(0.08, 0.6, n - 1)
    height = int(rng.integers(40, 100)) if kind != "long" else int(rng.integers(36, 70))
    pen = None
    if kind == "shifted_pen":  # a 1-pixel hairline, or a marker a seventh of the digit's height wide
        thick = max(3, height // 7)
        pen = ((lambda c: thin(c > 0.5).astype(np.float32)) if rng.random() < 0.5 else
               (lambda c: np.asarray(Image.fromarray((c * 255).astype(np.uint8)).filter(
                   ImageFilter.MaxFilter(thick | 1)), np.float32) / 255))
    strip = number_strip(digits, height, gaps, rng, pen)
    if kind == "shifted_slant":  # slanted 22-31 degrees either way (tan 0.4-0.6)
        shear = rng.uniform(0.4, 0.6) * rng.choice([-1, 1])
        h, w = strip.shape
        extra = int(abs(shear) * h) + 2
        img = Image.fromarray(np.pad(strip, ((0, 0), (extra, extra))), "F")
        strip = np.asarray(img.transform(img.size, Image.Transform.AFFINE, (1, shear, -shear * h / 2, 0, 1, 0),
                                         Image.Resampling.BILINEAR), np.float32)
    mh, mw = int(rng.uniform(0.3, 1.5) * height), int(rng.uniform(0.3, 1.5) * height)
    if kind == "spaced_canvas":
        mh, mw = mh + int(rng.integers(0, 200)), mw + int(rng.integers(0, 200))
    h, w = strip.shape[0] + 2 * mh, strip.shape[1] + 2 * mw
    cover = np.zeros((h, w), np.float32)
    top, left = int(rng.integers(0, 2 * mh + 1)), int(rng.integers(0, 2 * mw + 1))
    cover[top:top + strip.shape[0], left:left + strip.shape[1]] = strip
    if kind == "spaced_canvas":
        bg, fg = rng.uniform(0, 25), rng.uniform(200, 255)
        return Image.fromarray((bg + (fg - bg) * cover).round().astype(np.uint8), "L"), ".png", {"compress_level": 1}
    img = Image.fromarray(_compose(_paper(h, w, rng), cover, _dark_ink(rng)), "RGB")
    if kind == "spaced_paper_jpeg" or (kind in ("long", "uci") and rng.random() < 0.5):
        return img, ".jpg", {"quality": int(rng.integers(60, 91))}
    return img, ".png", {"compress_level": 1}


def make_number_set(out_dir, images, labels, kinds=NUMBER_KINDS, per_kind=50, seed=0):
    """Write per_kind pictures of numbers of each kind under out_dir/<kind>/NNNN_<number>.<ext>; returns
    [(path, number string, kind)]. Digits come from images/labels (MNIST uint8 (N, 28, 28)); the uci kind
    takes scikit-learn's UCI digits instead."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    made = []
    for kind in kinds:
        pool_x, pool_y = _uci_as_mnist() if kind == "uci" else (images, labels)
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        low, high = NUMBER_LENGTHS.get(kind, (2, 6))
        for i in range(per_kind):
            idx = rng.integers(0, len(pool_x), int(rng.integers(low, high + 1)))
            number = "".join(str(int(pool_y[j])) for j in idx)
            img, suffix, kwargs = make_number(kind, [np.asarray(pool_x[j], np.uint8) for j in idx], rng)
            path = folder / f"{i:04d}_{number}{suffix}"
            img.save(path, **kwargs)
            made.append((path, number, kind))
    return made


def number_photo(digits, rng, size=(4000, 3000)):
    """A 12-megapixel phone photo of a number written on a page: uneven light, blur, JPEG (PIL image)."""
    w, h = size
    strip = number_strip(digits, int(h * 0.12), rng.uniform(0.15, 0.5, len(digits) - 1), rng)
    cover = np.zeros((h, w), np.float32)
    top, left = (h - strip.shape[0]) // 2, (w - strip.shape[1]) // 2
    cover[top:top + strip.shape[0], left:left + strip.shape[1]] = strip[:, :w]
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    light = 1 - 0.25 * xx
    paper = _paper(h, w, rng) * light[..., None]
    img = Image.fromarray(_compose(paper, cover, _dark_ink(rng)), "RGB")
    return img.filter(ImageFilter.GaussianBlur(1.0))


def naive_28(picture):
    """The plain resize people try first: greyscale, resize to 28x28, no other change (float in [0, 1])."""
    img = picture if isinstance(picture, Image.Image) else Image.open(picture)
    return np.asarray(img.convert("L").resize((28, 28), Image.Resampling.BILINEAR), np.float32) / 255.0


def accuracy_by_kind(made, model_path):
    """{kind: (ours, naive, n)} accuracies of a checkpoint on [(path or PIL image, label, kind)]."""
    import torch
    import preprocess
    from checkpoint import load_checkpoint
    model, ckpt = load_checkpoint(model_path)
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    results = {}
    for kind in dict.fromkeys(k for _, _, k in made):
        rows = [(p, y) for p, y, k in made if k == kind]
        ours, naive = [], []
        for path, _ in rows:
            try:
                ours.append(preprocess.image_to_mnist(path, mean, std))
            except preprocess.ImageError:
                ours.append(torch.full((1, 28, 28), -mean / std))  # counted wrong: blank input
            naive.append((torch.from_numpy(naive_28(path)) - mean).div(std).unsqueeze(0))
        y = torch.tensor([label for _, label in rows])
        with torch.no_grad():
            acc = [(model(torch.stack(x)).argmax(1) == y).float().mean().item() for x in (ours, naive)]
        results[kind] = (acc[0], acc[1], len(rows))
    return results


def score_examples(made, model_path):
    """Print what the checkpoint reads in each example picture; 1 when any is misread (then pick other indices)."""
    import torch
    import preprocess
    from checkpoint import load_checkpoint
    model, ckpt = load_checkpoint(model_path)
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    wrong = 0
    for path, label in made:
        with torch.no_grad():
            probs = model(preprocess.image_to_mnist(path, mean, std).unsqueeze(0)).softmax(1)[0]
        wrong += int(probs.argmax()) != label
        print(f"{path} ({path.stat().st_size / 1024:.1f} KB): digit {label}, read as {int(probs.argmax())} "
              f"({float(probs.max()) * 100:.1f}%)")
    return 1 if wrong else 0


def main(argv=None):
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    p = argparse.ArgumentParser(description="make the 'as people send them' set and score a checkpoint on it")
    p.add_argument("--out", default=None, help="where to write the pictures (default: a temporary folder)")
    p.add_argument("--per_kind", type=int, default=500, help="pictures per kind")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="which kinds")
    p.add_argument("--seed", type=int, default=0, help="seed for digits and distortions")
    p.add_argument("--other_writers", action=argparse.BooleanOptionalAction, default=True,
                   help="also score scikit-learn's 1,797 UCI digits by 43 other writers (8x8, upscaled)")
    p.add_argument("--model_path", default=str(root / "pretrained" / "best_model_improved_pt.pth"),
                   help="checkpoint to score (default: the shipped pretrained model)")
    p.add_argument("--numbers", metavar="DIR", default=None,
                   help="instead: write --per_kind pictures of numbers of each kind in NUMBER_KINDS (and "
                        "SHIFTED_KINDS with --shifted) into DIR/<kind>/ "
                        "(score them with evaluate_numbers.py); --split train makes the development set")
    p.add_argument("--shifted", action="store_true",
                   help="with --numbers: the shifted kinds (SHIFTED_KINDS) instead of the usual ones")
    p.add_argument("--split", choices=("test", "train", "val"), default="test",
                   help="the MNIST digits to build pictures from: test (the figures we report), train (the "
                        "reader's development set) or val (the 5,000 validation digits of seed 0, held out from "
                        "every seed-0 run: for choosing between models)")
    p.add_argument("--photo", metavar="FILE.jpg", default=None,
                   help="instead: write a 12-megapixel photo of an 8-digit number (for evaluate_numbers.py --time)")
    p.add_argument("--examples", metavar="DIR", default=None,
                   help="instead: write the example pictures of EXAMPLES into DIR (the shipped ones: examples) "
                        "and score them with --model_path")
    args = p.parse_args(argv)
    import tempfile
    import data_loader
    # val: the validation split train_pytorch.py carves with --seed 0, which no seed-0 model trained on
    x, y = (data_loader.get_splits(seed=0)["val"] if args.split == "val" else data_loader.load_mnist()[args.split])
    if args.numbers or args.photo:
        if args.photo:
            rng = np.random.default_rng(args.seed)
            idx = rng.integers(0, len(x), 8)
            number = "".join(str(int(y[i])) for i in idx)
            path = Path(args.photo)
            path = path.with_name(f"{path.stem}_{number}{path.suffix}")
            number_photo([x[i].numpy() for i in idx], rng).save(path, quality=90)
            print(f"wrote {path}")
            return 0
        kinds = SHIFTED_KINDS if args.shifted else NUMBER_KINDS
        made = make_number_set(args.numbers, x.numpy(), y.numpy(), kinds, args.per_kind, args.seed)
        print(f"wrote {len(made)} pictures of numbers into {args.numbers}")
        return 0
    if args.examples:
        test_x, test_y = data_loader.load_mnist()["test"]
        made = make_examples(args.examples, test_x.numpy(), test_y.numpy())
        return score_examples(made, args.model_path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        made = make_set(out, x.numpy(), y.numpy(), args.kinds, args.per_kind, args.seed)
        results = accuracy_by_kind(made + (other_writers() if args.other_writers else []), args.model_path)
    print(f"{'kind':<12} {'n':>5} {'image_to_mnist':>15} {'naive resize':>13}")
    for kind, (ours, naive, n) in results.items():
        print(f"{kind:<12} {n:>5} {ours * 100:>14.1f}% {naive * 100:>12.1f}%")


if __name__ == "__main__":
    sys.exit(main())
