"""Other writers' digits for training: the one place data/writers/ is read (load), their mixing into MNIST's
splits for train_pytorch.py --writers SHARE (mix), and the guard that keeps the UCI optical digits, the project's
measure of other writers, out of training (refuse_uci).

data/writers/writers.npz: pendigits drawn as pen strokes and handwriting-font digits, framed as MNIST's, with their
source and split (how and under which licences: data/writers/README.md). Nothing is rendered here; scikit-learn's
digits are read only to fingerprint them for the guard: measured on, never trained on.
"""
import gzip
import hashlib
import importlib.util
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import PROJECT_DIR, fraction

DEFAULT_DATA_DIR = PROJECT_DIR / "data" / "writers"
FILE = "writers.npz"
SPLITS = ("train", "val", "all")
UCI_MATCH = 0.99   # fingerprints this alike (cosine) make a digit a copy of a UCI digit ...
UCI_COPIES = 20    # ... and this many UCI digits with a copy make an array UCI's (MNIST's 60,000 have 0)
_PASSED = set()    # sha256 of the files the guard passed in this process: it runs once a file


def add_args(parser):
    group = parser.add_argument_group("other writers' digits (writers.py)")
    group.add_argument("--writers", type=fraction, default=0.0, metavar="SHARE",
                       help="share of each epoch's training digits drawn from other writers (pendigits and "
                            "handwriting fonts; 0: MNIST only); their held-out part joins the validation split")


def mix(splits, share, seed=0, data_dir=DEFAULT_DATA_DIR):
    """MNIST's splits with the other writers' digits added (share > 0): to training, each epoch's share of its
    digits (every writers' digit repeated, plus a fixed random part for the fraction of a repeat), and to
    validation, all of their held-out digits, so the best epoch is chosen on every source. The test split stays
    MNIST's: other writers are measured apart, on sets never trained or chosen on (docs/writers.md)."""
    if not share:
        return splits
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    device, (x, y, _), (vx, vy, _) = train_x.device, load("train", data_dir), load("val", data_dir)
    copies = share / (1 - share) * len(train_x) / len(x)  # writers' digits per epoch, in multiples of them all
    extra = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:round(copies % 1 * len(x))]
    pick = torch.cat([torch.arange(len(x)).repeat(int(copies)), extra])
    return {**splits, "train": (torch.cat([train_x, x[pick].to(device)]), torch.cat([train_y, y[pick].to(device)])),
            "val": (torch.cat([val_x, vx.to(device)]), torch.cat([val_y, vy.to(device)]))}


class WritersError(Exception):
    """A problem with the writers' digits on disk, or an array the guard refuses, phrased for the one who fixes it."""


def check_file(path):
    """A data file's name and sha256 (against the SHA256SUMS beside it), checked: its sha256, or WritersError."""
    path = Path(path)
    fix = f"restore it with `git checkout -- data/writers/{path.name}` or make it again with " \
          f"`python data/writers/make_writers.py`"
    if "optdigits" in path.name.lower():
        raise WritersError(f"{path} is refused: the UCI optical digits (optdigits) are the project's measure of "
                           f"other writers and never train a model; train on data/writers/{FILE}")
    if not path.is_file():
        raise WritersError(f"{path} is missing; {fix}")
    sums = path.parent / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.is_file() else []
    listed = {name.lstrip("*"): digest for digest, name in (line.split() for line in lines if line.strip())}
    if hashlib.sha256(path.read_bytes()).hexdigest() != listed.get(path.name):
        raise WritersError(f"{path} is corrupted (its sha256 is not the one in {sums}); {fix}")
    return listed[path.name]


def load(split="train", data_dir=DEFAULT_DATA_DIR, sources=None):
    """The other writers' digits of a split ("train", "val" or "all"), only of `sources` if given ("pendigits",
    "font"): uint8 images (N, 28, 28) and int64 labels as tensors, and each digit's source (a numpy array of str).
    The file is checked (check_file) and refused if it holds UCI digits (refuse_uci)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    path = Path(data_dir) / FILE
    digest = check_file(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            a = {key: arrays[key] for key in arrays.files}
        names = a["source_names"][a["source"]]
        keep = np.ones(len(names), bool) if split == "all" else a["split_names"][a["split"]] == split
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise WritersError(f"{path} does not hold the writers' arrays ({err}); restore it with "
                           f"`git checkout -- data/writers/{FILE}`") from err
    if digest not in _PASSED:
        refuse_uci(a["images"], path)
        _PASSED.add(digest)
    keep &= np.ones(len(names), bool) if sources is None else np.isin(names, list(sources))
    return torch.from_numpy(a["images"][keep]), torch.from_numpy(a["labels"][keep].astype(np.int64)), names[keep]


def fingerprint(images, cells=8, sub=4, spread=2.0):
    """(N, cells^2) unit vectors that an 8x8 UCI digit and any upscaling or MNIST-style framing of it share: each
    digit (N, H, W, any size and scale) sampled over its centre of mass +- `spread` standard deviations of its ink
    each way (so size, place and a blur barely matter), averaged per cell, less the mean."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n, h, w = x.shape
    x = x / x.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
    mass = x.sum((1, 2)).clamp_min(1e-6)[:, None]
    t = ((torch.arange(cells * sub) + 0.5) / (cells * sub) * 2 - 1) * spread
    axes = []
    for share, size in ((x.sum(2) / mass, h), (x.sum(1) / mass, w)):  # the ink's share in each row, then column
        at = torch.arange(size) + 0.5
        centre = share @ at
        sd = (share * (at - centre[:, None]) ** 2).sum(1).sqrt().clamp_min(0.5)
        axes.append((centre[:, None] + t * sd[:, None]) / size * 2 - 1)  # grid_sample's -1 and 1: the outer edges
    gy, gx = axes
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    f = F.avg_pool2d(F.grid_sample(x[:, None], grid, align_corners=False), sub).flatten(1)
    f = f - f.mean(1, keepdim=True)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)


@lru_cache(maxsize=1)
def _uci_fingerprints():
    """load_digits()'s 1,797 digits, fingerprinted, read from its file: importing sklearn.datasets takes seconds."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise WritersError("the guard against UCI digits needs scikit-learn: `pip install scikit-learn`")
    with gzip.open(path) as f:
        rows = np.loadtxt(f, delimiter=",")
    return fingerprint(rows[:, :-1].reshape(-1, 8, 8))


def uci_copies(images, chunk=8192):
    """How many of the UCI digits have a copy among `images` (fingerprints at least UCI_MATCH alike)."""
    uci = _uci_fingerprints()
    copied = torch.zeros(len(uci), dtype=torch.bool)
    for start in range(0, len(images), chunk):
        copied |= (fingerprint(images[start:start + chunk]) @ uci.T).amax(0) >= UCI_MATCH
    return int(copied.sum())


def refuse_uci(images, name="these images"):
    """WritersError if `images` hold copies of UCI_COPIES or more UCI digits: call it on any digits to train on."""
    found = uci_copies(images)
    if found >= UCI_COPIES:
        raise WritersError(f"{name} is refused: it holds copies of {found} of scikit-learn's UCI digits "
                           f"(load_digits), the project's measure of other writers, which never train a model")
