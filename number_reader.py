"""A whole number, read by a small learned line reader: python number_reader.py trains it (docs/numbers.md).

This file owns the number reader end to end: the network (LineReader: a few conv blocks over a line of digits
normalised to HEIGHT pixels, a small bidirectional GRU, CTC over a blank, ten digits, '.' and '-'), the
synthetic lines it learns from (make_line: MNIST *training* digits and other writers' digits written in a row),
its training (main), and the reading of a picture (read_number: the lines preprocess.number_lines finds, each
normalised, read, decoded into characters with boxes and probabilities; `digits` as count-constrained decoding).

There are no segmentation rules: where one digit ends and the next begins, what a speck, an underline or a
decimal point is, is learned from the synthetic lines. The only image processing is preprocess's (ink, polarity,
splitting lines) and normalise_line (crop to the ink, scale to HEIGHT), the same for training and reading.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from scipy import ndimage

import preprocess
from checkpoint import CheckpointError, _load, _refuse, atomic_save  # the checks every model file gets
from common import PROJECT_DIR, OneLineParser, at_least, positive

PROG = "number_reader.py"
DEFAULT_PATH = PROJECT_DIR / "pretrained" / "number_reader.pth"
FORMAT = "mnist-line-reader/2"  # /1 pooled in its first block: same weights, other meaning
ALPHABET = "0123456789.-"  # CTC class k + 1 is ALPHABET[k]; class 0 is the blank
HEIGHT = 32                # a line is read at this height ...
INK_HEIGHT = 24            # ... its ink spanning this many rows of it
PAD = 8                    # blank columns added at each end of a line
STRIDE = 4                 # line columns per output frame (a stride of 2, then a 2x2 pooling)
MAX_WIDTH = 4096           # longest normalised line (128 digits' worth): anything longer is squeezed
INK = 0.2                  # cover above this is ink, for cropping a line and a digit's box
# A digit that stands apart is also read by the digit CNN (predict.py's model), mixed geometrically with this
# share; and each line is also read squeezed and stretched by these factors, the reading the reader (with the
# CNN's check) is surest of kept (the product of its characters' probabilities): a gap or a digit width at the
# edge of what it learned at one width is an everyday one at another. Both chosen on pictures of numbers made
# from the validation digits (docs/numbers.md#the-choices-made-on-validation).
CNN_WEIGHT = 0.5
STRETCHES = (1.0, 0.8, 1.25)
WIDTHS, HIDDEN = (16, 32, 64, 96), 64  # the conv blocks' channels and the GRU's size (LineReader)


# ---- the network --------------------------------------------------------------------------------------

class LineReader(nn.Module):
    """(N, 1, HEIGHT, W) ink in [0, 1] -> (N, W // STRIDE, classes) log-probabilities, one frame per 4 columns."""

    def __init__(self, widths=WIDTHS, hidden=HIDDEN, classes=len(ALPHABET) + 1):
        super().__init__()
        layers, last = [], 1
        for n, width in enumerate(widths):  # height 32 -> 16 -> 8 -> 4 -> 2; width / 2 twice
            # The first block strides instead of pooling: at full size a 16-channel layer's batch norm, ReLU and
            # pooling were a quarter of a training step, and the pooled block read no better (docs/numbers.md).
            conv = nn.Conv2d(last, width, 3, stride=2 if n == 0 else 1, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU()] + ([nn.MaxPool2d(2 if n < 2 else (2, 1))] if n else [])
            last = width
        self.features = nn.Sequential(*layers)
        self.rnn = nn.GRU(2 * last, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        f = self.features(x)                  # (N, C, 2, T)
        f = f.flatten(1, 2).transpose(1, 2)   # (N, T, 2C): each frame sees its whole column of the line
        f, _ = self.rnn(f)
        return self.out(f).log_softmax(-1)


def load_reader(path=DEFAULT_PATH):
    """The reader in `path` (weights-only loading, arguments checked), in eval mode. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no number reader there (train one with `python number_reader.py`, or "
                              f"restore the shipped one with `git checkout -- pretrained/number_reader.pth`)")
    ckpt = _load(path)
    if isinstance(ckpt, dict) and str(ckpt.get("format")).startswith("mnist-line-reader/") and ckpt["format"] != FORMAT:
        raise _refuse(path, f"it is a number reader of another layout ({ckpt['format']}, this code reads {FORMAT}): "
                            f"train one with `python number_reader.py`")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise _refuse(path, f"it is not a number reader (format {FORMAT})")
    args = ckpt.get("model_args", {})
    widths, hidden = args.get("widths"), args.get("hidden")
    if not (isinstance(widths, list) and len(widths) == 4 and all(isinstance(w, int) and 1 <= w <= 512 for w in widths)
            and isinstance(hidden, int) and 1 <= hidden <= 512) or ckpt.get("alphabet") != ALPHABET:
        raise _refuse(path, f"its model arguments {args!r} are not a number reader's")
    model = LineReader(tuple(widths), hidden)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise _refuse(path, f"its weights do not fit the number reader ({str(err).splitlines()[0][:100]})") from None
    return model.eval()


# ---- a line: normalising, and synthetic lines to learn from -------------------------------------------

def normalise_line(cover, stretch=1.0):
    """Ink cover (h, w) in [0, 1] -> (line (HEIGHT, W) float32, scale, y0, x0), or None without ink: the line
    cropped to its ink, scaled so that the ink is INK_HEIGHT rows tall (and its width by `stretch` more), padded,
    its contrast stretched (a thin pen, reduced, is faint). Line column c lies over cover column
    x0 + (c - PAD) / scale."""
    rows, cols = np.flatnonzero(cover.max(1) > INK), np.flatnonzero(cover.max(0) > INK)
    if not rows.size:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    scale = INK_HEIGHT / (y1 - y0)
    width = int(np.clip(round((x1 - x0) * scale * stretch), 1, MAX_WIDTH))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR  # reducing: average the area
    crop = Image.fromarray(np.ascontiguousarray(cover[y0:y1, x0:x1], np.float32), "F")
    small = np.asarray(crop.resize((width, INK_HEIGHT), resample), np.float32)
    inked = small[small > 0.05]
    small = np.clip(small / max(float(np.percentile(inked, 90)) if inked.size else 1.0, 0.05), 0, 1)
    line = np.zeros((HEIGHT, width + 2 * PAD), np.float32)
    top = (HEIGHT - INK_HEIGHT) // 2
    line[top:top + INK_HEIGHT, PAD:PAD + width] = small
    return line, width / (x1 - x0), y0, x0


# The ranges the synthetic lines are drawn from (tests/make_user_images.py's shifted kinds lie outside them).
GAPS = {"spaced": (0.1, 1.0), "touching": (-0.12, 0.06), "overlapping": (-0.3, -0.1)}  # share of the height
SLANT = 0.3      # shear of a line's digits (tan of the angle), either way
SIZE = (0.8, 1.15)


def _digit(image, rng, slant):
    """A 28x28 uint8 digit -> ink in [0, 1] on a 44x44 field: scaled, slanted, turned a little, then cut to its
    ink columns (rows kept, so that every digit of a line shares the field's middle)."""
    s = rng.uniform(*SIZE)
    a = np.deg2rad(rng.uniform(-5, 5))
    shear = slant + rng.uniform(-0.05, 0.05)
    forward = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, 0], [-shear, 1]])
    back = np.linalg.inv(forward)  # ndimage maps output pixels to input pixels
    out = ndimage.affine_transform(image.astype(np.float32) / 255, back, offset=13.5 - back @ [21.5, 21.5],
                                   output_shape=(44, 44), order=1)
    cols = np.flatnonzero(out.max(0) > 0.05)
    return out[:, cols[0]:cols[-1] + 1] if cols.size else out[:, 18:26]


def _blob(h, w, rng):
    """A round mark (a decimal point, a crumb) or a flat one (a dash) of h x w, anti-aliased."""
    yy, xx = np.mgrid[0:h + 2, 0:w + 2]
    r = ((yy - (h + 1) / 2) / (h / 2)) ** 2 + ((xx - (w + 1) / 2) / (w / 2)) ** 2
    return np.clip((1.2 - r) * 2, 0, 1).astype(np.float32)


def make_line(images, labels, rng):
    """One synthetic line: (ink cover (h, w) float32, its text). 1-12 digits drawn from images/labels (uint8
    (N, 28, 28), MNIST-framed), spaced, touching or overlapping, slanted, on a wavy baseline; now and then a
    decimal point or a minus sign, crumbs against a digit and specks (neither is text), an underline."""
    n = int(rng.choice(np.arange(1, 13), p=np.r_[4, 8, 10, 10, 10, 9, 8, 7, 6, 5, 4, 3] / 84))
    idx = rng.integers(0, len(images), n)
    slant = rng.uniform(-SLANT, SLANT)
    pieces = [(_digit(images[i], rng, slant), str(int(labels[i]))) for i in idx]
    style = rng.choice(list(GAPS), p=[0.5, 0.35, 0.15])
    height = 20.0  # an MNIST digit's box
    gaps = list(rng.uniform(*GAPS[style], n) if rng.random() < 0.8 else
                rng.uniform(GAPS["overlapping"][0], GAPS["spaced"][1], n))
    if n > 1 and rng.random() < 0.12:  # a decimal point on the baseline, apart from both neighbours
        k = int(rng.integers(1, n))
        d = int(rng.uniform(0.12, 0.25) * height)
        pieces.insert(k, (_blob(d, d, rng), "."))
        gaps[k - 1] = max(gaps[k - 1], 0.0) + rng.uniform(0.1, 0.4)
        gaps.insert(k, rng.uniform(0.1, 0.5))
    if rng.random() < 0.05:  # a minus sign in front
        pieces.insert(0, (_blob(int(rng.uniform(0.08, 0.15) * height), int(rng.uniform(0.3, 0.7) * height), rng), "-"))
        gaps.insert(0, rng.uniform(0.15, 0.5))
    wave, phase, period = rng.uniform(0, 0.08) * height, rng.uniform(0, 2 * np.pi), rng.uniform(3, 8) * height
    placed, x = [], 4
    for (ink, char), gap in zip(pieces, gaps):
        if char in ".-":
            y = 22 + 0.45 * height - ink.shape[0] if char == "." else 22 - ink.shape[0] / 2 + rng.uniform(-2, 2)
        else:
            y = 22 - ink.shape[0] / 2 + rng.normal(0, 0.8)
        placed.append((ink, x, y + wave * np.sin(2 * np.pi * x / period + phase)))
        x += ink.shape[1] + int(round(gap * height))
    width = max(px + ink.shape[1] for ink, px, _ in placed) + 8
    cover = np.zeros((64, width), np.float32)
    for ink, px, py in placed:
        y = int(round(py)) + 10
        np.maximum(cover[y:y + ink.shape[0], px:px + ink.shape[1]], ink, out=cover[y:y + ink.shape[0], px:px + ink.shape[1]])
    text = "".join(char for _, char in pieces)
    for _ in range(int(rng.random() < 0.15) + int(rng.random() < 0.1)):  # a crumb against a digit's side, a
        # little above its middle (not at its foot, where a point would be: the offsets put it there)
        d = int(rng.uniform(0.1, 0.2) * height)
        ink, px, py = placed[int(rng.integers(0, len(placed)))]
        side = px - d - 1 if rng.random() < 0.5 else px + ink.shape[1] - 1
        y = int(py) + 10 + int(0.45 * height) + 10 - d
        if 0 <= side and side + d + 2 <= width:
            np.maximum(cover[y:y + d + 2, side:side + d + 2], _blob(d, d, rng), out=cover[y:y + d + 2, side:side + d + 2])
    for _ in range(int(rng.poisson(0.6))):  # specks: a pixel or two of dirt anywhere
        y, x = int(rng.integers(8, 56)), int(rng.integers(0, width - 2))
        cover[y:y + int(rng.integers(1, 3)), x:x + int(rng.integers(1, 3))] = rng.uniform(0.3, 1)
    if rng.random() < 0.06:  # an underline
        y = int(32 + 0.5 * height + rng.uniform(1, 6))
        cover[y:y + int(rng.integers(1, 3)), max(0, int(rng.uniform(-5, 5))):width - int(rng.uniform(0, 8))] = 1
    return _pen_and_paper(cover, rng), text


def _pen_and_paper(cover, rng):
    """A thicker or thinner pen, blur, and now and then a coarse scan (an 8x8 grid upscaled, as UCI's digits)."""
    pen = rng.random()
    if pen < 0.2:
        cover = ndimage.grey_dilation(cover, size=(2, 2))
    elif pen < 0.4:
        cover = ndimage.grey_erosion(cover, size=(2, 2)) if rng.random() < 0.5 else np.clip((cover - 0.5) * 3, 0, 1)
    if rng.random() < 0.15:
        f = rng.uniform(0.3, 0.55)
        small = ndimage.zoom(cover, f, order=1)
        cover = np.clip(ndimage.zoom(small, (cover.shape[0] / small.shape[0], cover.shape[1] / small.shape[1]),
                                     order=int(rng.choice([1, 3]))), 0, 1)
    elif rng.random() < 0.3:
        cover = ndimage.gaussian_filter(cover, rng.uniform(0.3, 1.0))
    return cover


def make_batch(images, labels, rng, size):
    """`size` synthetic lines, normalised and padded to one width: (x (N, 1, HEIGHT, W), targets, lengths, texts)."""
    return as_batch([make_line(images, labels, rng) for _ in range(size)], rng)


def as_batch(made, rng):
    """[(cover, text)] -> the lines normalised, a little noise on some, padded to one width: (x (N, 1, HEIGHT,
    W), targets, lengths, texts)."""
    lines, texts = [], []
    for cover, text in made:
        got = normalise_line(cover)
        if got is None:
            continue
        line = got[0]
        if rng.random() < 0.3:  # what is left of the paper's noise after the ink is found
            line = np.clip(line + rng.normal(0, rng.uniform(0.02, 0.08), line.shape).astype(np.float32), 0, 1)
        lines.append(line)
        texts.append(text)
    x = torch.zeros(len(lines), 1, HEIGHT, max(line.shape[1] for line in lines) + STRIDE)
    for i, line in enumerate(lines):
        x[i, 0, :, :line.shape[1]] = torch.from_numpy(line)
    targets = torch.tensor([ALPHABET.index(c) + 1 for t in texts for c in t])
    return x, targets, torch.tensor([len(t) for t in texts]), texts


# ---- decoding: characters, their boxes and probabilities ----------------------------------------------

@dataclass
class Emission:
    """One character the reader emits: its class, the frames it spans, its probability (at its most sure
    frame, `peak`)."""
    char: str
    first: int
    last: int
    probability: float
    peak: int


def decode(logps, digits=None):
    """Each line's log-probabilities (T, classes) -> its [Emission] on the best path (each frame's most likely
    class, runs merged, blanks dropped). With digits, the best paths that emit exactly that many digits over all
    the lines together (_paths_for)."""
    return [_emissions(logp, path) for logp, path in zip(logps, _paths_for(logps, digits))]


def _emissions(logp, path):
    out = []
    for t, c in enumerate(path):
        p = float(np.exp(logp[t, c]))
        if c and (t == 0 or path[t - 1] != c):
            out.append(Emission(ALPHABET[c - 1], t, t, p, t))
        elif c:
            out[-1].last = t
            if p > out[-1].probability:
                out[-1].probability, out[-1].peak = p, t
    return out


def count_paths(logp, most):
    """{k: (log-probability, path)} for each count k <= most of digits: the best CTC path (Viterbi over frames;
    a repeated class needs a blank between) that emits exactly k digits ('.' and '-' are not counted)."""
    T, C = logp.shape
    counts = np.array([0] + [int(ch.isdigit()) for ch in ALPHABET])
    ks, cs = np.arange(most + 1), np.arange(C)
    score = np.full((most + 1, C), -np.inf)
    score[0, 0] = logp[0, 0]
    score[counts, cs] = np.maximum(score[counts, cs], logp[0])
    back = np.zeros((T, most + 1, C, 2), np.int32)  # (previous count, previous class)
    src = ks[:, None] - counts[None, :]              # the count a class c at count k comes from
    ok = src >= 0
    src = np.maximum(src, 0)
    for t in range(1, T):
        # Into class c either stay in c, or come from the best other class at count k - counts[c]: the best of
        # a row, or its second best where the best is c itself (one pass over all classes at once).
        top2 = np.argsort(-score, axis=1, kind="stable")[:, :2]
        other = np.where(top2[src, 0] == cs, top2[src, 1], top2[src, 0])
        moved = np.where(ok, score[src, other], -np.inf)
        stay = score >= moved
        score = np.where(stay, score, moved) + logp[t]
        back[t, :, :, 0] = np.where(stay, ks[:, None], src)
        back[t, :, :, 1] = np.where(stay, cs, other)
    result = {}
    for k in range(most + 1):
        c = int(score[k].argmax())
        if not np.isfinite(score[k, c]):
            continue
        path, kk = [c], k
        for t in range(T - 1, 0, -1):
            kk, c = back[t, kk, c]
            path.append(int(c))
        result[k] = (float(score[k].max()), np.array(path[::-1]))
    return result


def read_number(source, model, digits=None, classify=None, weight=CNN_WEIGHT, stretches=STRETCHES):
    """A picture of a number (or several, one per line) -> preprocess.NumberReading, lines top to bottom, each
    character with its probability and its box in the picture's own pixels. digits: the number of digits of
    all lines together (count-constrained decoding; when no path reaches it, the nearest count). classify (the
    seam for the digit CNN): pixels (N, 28, 28) in [0, 1] -> (N, 10) probabilities; a digit that stands apart
    (blank columns on both sides) is then read by both, mixed with the CNN's share `weight`. stretches: the
    picture is read with its lines at each of these widths and the surest reading kept. Raises as
    preprocess.number_lines."""
    found = preprocess.number_lines(source)
    readings = [_read_at(found, model, digits, classify, weight, stretch) for stretch in stretches]
    reading = max(readings, key=lambda lines: (any(lines), _sureness(lines)))
    for line in reading:
        for d in line:
            d.box = found.picture_box(d.box)
    if not any(reading):
        raise preprocess.NoDigitError("no digits found (ink, but nothing the reader reads as a digit)")
    if sum(len(r) for r in reading) > preprocess.MAX_DIGITS:
        raise preprocess.TooManyDigitsError(f"more than {preprocess.MAX_DIGITS} digits: not a number, or a page of text")
    return preprocess.NumberReading([r for r in reading if r], found.size)


def _sureness(lines):
    """How sure the reader is of a reading: the product of its characters' probabilities."""
    return float(np.prod([d.probability for line in lines for d in line]))


def _read_at(found, model, digits, classify, weight, stretch):
    """The lines of preprocess.number_lines' `found`, read with their width stretched so: [[ReadDigit]] per
    line, boxes in found's cover pixels."""
    lines = [(cover, top, left, got) for cover, top, left in found.lines if (got := normalise_line(cover, stretch))]
    if not lines:
        raise preprocess.NoDigitError("no digits found")
    with torch.inference_mode():  # one line at a time: no padding, and lines differ a lot in width
        logps = [model(torch.from_numpy(line)[None, None])[0].double().numpy() for *_, (line, _, _, _) in lines]
    reading, apart = [], []
    for (cover, top, left, (_, scale, y0, x0)), logp, chars in zip(lines, logps, decode(logps, digits)):
        reading.append([])
        for e, (b0, b1, c0, c1) in zip(chars, _boxes(chars, cover, scale, y0, x0)):
            reading[-1].append(preprocess.ReadDigit(e.char, e.probability, (top + b0, top + b1, left + c0, left + c1)))
            if classify is not None and e.char.isdigit() and _stands_apart(cover, c0, c1):
                own = np.exp(logp[e.peak, 1:11])
                apart.append((reading[-1][-1], own / own.sum(), preprocess.fit_and_centre(cover[b0:b1, c0:c1])))
    if apart:
        cnn = np.asarray(classify(np.stack([a[2] for a in apart])), np.float64)
        for (d, own, _), theirs in zip(apart, cnn):
            mixed = np.exp((1 - weight) * np.log(own + 1e-12) + weight * np.log(theirs + 1e-12))
            mixed /= mixed.sum()
            d.digit, d.probability = str(int(mixed.argmax())), float(mixed.max())
    return reading


def cnn_check(model, normalization, device="cpu"):
    """A digit CNN (checkpoint.load_checkpoint's model and normalisation) as read_number's `classify`: pixels
    (N, 28, 28) in [0, 1] -> (N, 10) probabilities as a numpy array, one forward pass."""
    def classify(pixels):
        x = (torch.as_tensor(pixels, dtype=torch.float32) - normalization["mean"]) / normalization["std"]
        with torch.inference_mode():
            return model(x.unsqueeze(1).to(device)).float().softmax(1).cpu().numpy()
    return classify


def _stands_apart(cover, c0, c1):
    """No ink in the column just left of a digit's box nor just right of it: a digit the CNN can read alone."""
    return all(c < 0 or c >= cover.shape[1] or not (cover[:, c] > INK).any() for c in (c0 - 1, c1))


def _paths_for(logps, digits):
    """Each line's path: the best one, or with `digits` the best that adds up to that count over the lines (a
    knapsack over each line's best path per count; the nearest reachable count when it cannot be met)."""
    if digits is None:
        return [logp.argmax(1) for logp in logps]
    options = [count_paths(logp, digits) for logp in logps]
    reach = {0: (0.0, [])}
    for per_count in options:
        nxt = {}
        for have, (score, picks) in reach.items():
            for k, (s, _) in per_count.items():
                if have + k <= digits and (have + k not in nxt or score + s > nxt[have + k][0]):
                    nxt[have + k] = (score + s, picks + [k])
        reach = nxt or reach
    total = digits if digits in reach else min(reach, key=lambda c: (abs(c - digits), -reach[c][0]))
    return [per_count[k][1] for per_count, k in zip(options, reach[total][1])]


def _boxes(chars, cover, scale, y0, x0):
    """Each emission's box (y0, y1, x0, x1) on the line's cover: the ink between the midpoints to its
    neighbours' frames (or the frames' own columns when none is there)."""
    edges = [0] + [(a.last + b.first + 1) * STRIDE / 2 for a, b in zip(chars, chars[1:])] + [1e9]
    boxes = []
    for n, e in enumerate(chars):
        c0 = max(0, int(x0 + (edges[n] - PAD) / scale))
        c1 = min(cover.shape[1], int(np.ceil(x0 + (edges[n + 1] - PAD) / scale)))
        ink = cover[:, c0:c1] > INK
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        if rows.size:
            boxes.append((rows[0], rows[-1] + 1, c0 + cols[0], c0 + cols[-1] + 1))
        else:
            f0 = max(0, int(x0 + (e.first * STRIDE - PAD) / scale))
            boxes.append((y0, int(y0 + INK_HEIGHT / scale), f0, max(f0 + 1, int(x0 + ((e.last + 1) * STRIDE - PAD) / scale))))
    return boxes


# ---- training: python number_reader.py -----------------------------------------------------------------

def digit_pools(split):
    """The digits lines are made of: MNIST's of a split of seed 0's carve ("train" or "val"; never the test
    split) and the other writers' of the same split (writers.load refuses UCI's, the measure)."""
    import data_loader
    import writers
    mnist_x, mnist_y = data_loader.get_splits(seed=0)[split]
    other_x, other_y, _ = writers.load(split)
    return torch.cat([mnist_x, other_x]).numpy(), torch.cat([mnist_y, other_y]).numpy()


def text_of(logp):
    return "".join(e.char for e in decode([logp])[0])


def string_accuracy(model, batches):
    """Share of lines whose whole text the reader gets right (best path)."""
    model.eval()
    with torch.inference_mode():
        right = sum(text_of(lp) == text for x, _, _, texts in batches for lp, text in zip(model(x).numpy(), texts))
    model.train()
    return right / sum(len(b[3]) for b in batches)


class Lines(torch.utils.data.IterableDataset):
    """Endless batches of synthetic lines, made in a worker process while the network trains on the last."""

    def __init__(self, images, labels, batch_size, seed):
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed

    def __iter__(self):
        # Lines of similar width share a batch (made 8 batches at a time, sorted by width), so that little of
        # a batch is padding: with random lengths of 1-12 digits, half of it was.
        rng = np.random.default_rng(self.seed)
        while True:
            many = [make_line(self.images, self.labels, rng) for _ in range(8 * self.batch_size)]
            many.sort(key=lambda line: line[0].shape[1] / line[0].shape[0])
            for n in rng.permutation(8):
                yield as_batch(many[n * self.batch_size:(n + 1) * self.batch_size], rng)


def parse_args():
    p = OneLineParser(prog=PROG, description="train the number reader on synthetic lines of MNIST training "
                                             "digits and other writers' digits (docs/numbers.md)")
    p.add_argument("--steps", type=at_least(1), default=4000, help="batches to train on")
    p.add_argument("--batch_size", type=at_least(2), default=64, help="lines per batch")
    p.add_argument("--learning_rate", type=positive, default=3e-3, help="peak of the one-cycle schedule (AdamW)")
    p.add_argument("--seed", type=int, default=0, help="seed for the lines and the weights")
    p.add_argument("--val_lines", type=at_least(64), default=512, help="lines of validation digits to choose on")
    p.add_argument("--eval_every", type=at_least(1), default=500, help="steps between validations")
    p.add_argument("--out", default=str(PROJECT_DIR / "results" / "number_reader.pth"),
                   help="where the best reader on the validation lines is written")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's choice)")
    return p


def main(argv=None):
    args = parse_args().parse_args(argv)
    from common import writable_dir
    out = Path(args.out)
    writable_dir(out.parent, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = digit_pools("train")
    val_x, val_y = digit_pools("val")
    rng = np.random.default_rng(10_000 + args.seed)  # the validation lines: the same for every run of a seed
    val = [make_batch(val_x, val_y, rng, 64) for _ in range(args.val_lines // 64)]
    model = LineReader(WIDTHS, HIDDEN).to(memory_format=torch.channels_last)  # 20% faster convolutions on the CPU
    print(f"number reader: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_x):,} training "
          f"digits, {len(val) * 64} validation lines; {args.steps} steps of {args.batch_size} lines", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.learning_rate, total_steps=args.steps, pct_start=0.15)
    ctc = nn.CTCLoss(zero_infinity=True)
    batches = torch.utils.data.DataLoader(Lines(train_x, train_y, args.batch_size, args.seed), batch_size=None,
                                          num_workers=1, prefetch_factor=4)
    best, start, running = -1.0, time.time(), None
    for step, (x, targets, lengths, _) in enumerate(batches, 1):
        logp = model(x.to(memory_format=torch.channels_last))  # (N, T, classes)
        frames = torch.full((len(x),), logp.shape[1], dtype=torch.long)
        loss = ctc(logp.transpose(0, 1), targets, frames, lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            acc = string_accuracy(model, val)
            kept = acc > best
            if kept:
                best = acc
                atomic_save({"format": FORMAT, "model_args": {"widths": list(WIDTHS), "hidden": HIDDEN},
                             "alphabet": ALPHABET, "state_dict": model.state_dict(), "step": step,
                             "val_string_accuracy": acc, "torch_version": str(torch.__version__)}, out)
            print(f"step {step}: loss {running:.3f}, validation lines read whole {acc:.2%}"
                  f"{' (kept)' if kept else ''}, {time.time() - start:.0f} s", flush=True)
        if step == args.steps:
            break
    print(f"best: {best:.2%} of validation lines read whole -> {out} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
