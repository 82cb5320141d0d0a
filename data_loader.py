"""The data: MNIST on disk, train/val/test tensors on the device, batches with augmentation.

MNIST ships with the project in data/MNIST/raw/ as four .gz files with their SHA256SUMS. On first use each is
checked and unpacked next to itself; later runs read the unpacked IDX files (read_idx), which is three times
faster than unpacking every time. Nothing is ever downloaded. Each split then lives on the training device as
one uint8 tensor; batches are drawn from a shuffled index and normalised and augmented there, batched, so the
training loop never waits on per-sample Python work.
"""
import gzip
import hashlib
import struct
from contextlib import nullcontext
from pathlib import Path

import torch

import augment as augment_module
from common import PROJECT_DIR, atomic_write, memory_format

DEFAULT_DATA_DIR = PROJECT_DIR / "data"

# The one place the normalisation constants live (mean and std of the MNIST training pixels in [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NORMALIZATION = {"mean": MNIST_MEAN, "std": MNIST_STD}  # as a checkpoint records it

# The IDX files and their sizes in bytes: a 16-byte header (8 for labels), then one byte per pixel or label.
RAW_SIZES = {"train-images-idx3-ubyte": 16 + 60_000 * 784, "train-labels-idx1-ubyte": 8 + 60_000,
             "t10k-images-idx3-ubyte": 16 + 10_000 * 784, "t10k-labels-idx1-ubyte": 8 + 10_000}


class DataError(Exception):
    """A problem with the dataset on disk, phrased for the person who has to fix it."""


def _restore_hint(name):
    return f"restore it with `git checkout -- data/MNIST/raw/{name}`"


def check_mnist(data_dir=DEFAULT_DATA_DIR, full=False):
    """The raw folder, with every IDX file unpacked from its checked .gz where it is missing or the wrong size.

    full=True checks every .gz against SHA256SUMS even where its IDX file is fine (demo.py: a damaged copy
    in git). DataError names the file and the fix.
    """
    raw = Path(data_dir) / "MNIST" / "raw"
    sums_file = raw / "SHA256SUMS"
    lines = sums_file.read_text().split("\n") if sums_file.is_file() else []
    sums = {name.lstrip("*"): digest for digest, name in (line.split() for line in lines if line.strip())}
    missing = [f"{name}.gz" for name in RAW_SIZES if not (raw / f"{name}.gz").is_file()
               and not (raw / name).is_file()]
    if missing:
        raise DataError(f"MNIST is incomplete: {', '.join(missing)} missing from {raw}; restore them with "
                        f"`git checkout -- data/MNIST/raw` (they ship with the project)")
    for name, size in RAW_SIZES.items():
        path, gz = raw / name, raw / f"{name}.gz"
        unpacked = path.is_file() and path.stat().st_size == size
        if unpacked and not full:
            continue
        data = gz.read_bytes() if gz.is_file() else None
        if data is not None and gz.name in sums and hashlib.sha256(data).hexdigest() != sums[gz.name]:
            raise DataError(f"{gz} is corrupted (sha256 differs from SHA256SUMS); {_restore_hint(gz.name)}")
        if not unpacked:
            try:
                content = gzip.decompress(data)
            except (OSError, EOFError) as err:
                raise DataError(f"{gz} is damaged ({err}); {_restore_hint(gz.name)}") from err
            if len(content) != size:
                raise DataError(f"{gz} does not unpack to the MNIST file ({len(content):,} bytes, not "
                                f"{size:,}); {_restore_hint(gz.name)}")
            with atomic_write(path) as tmp:  # an interrupted unpack never leaves half a file
                tmp.write_bytes(content)
    return raw


def read_idx(path):
    """One IDX file (MNIST's format) as a uint8 tensor of the shape its header gives.

    By hand rather than through torchvision.datasets.MNIST: importing any part of torchvision loads its models and
    ops, which pull in torch's compiler, seconds at the start of every command that reads MNIST without training
    (evaluate.py, export.py), to read what is a 4-byte magic number (0x08: unsigned bytes, then the number of
    dimensions), the sizes as big-endian int32, then the bytes.
    """
    data = Path(path).read_bytes()
    kind, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or kind != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; restore it with "
                        f"`git checkout -- data/MNIST/raw`")
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_mnist(data_dir=DEFAULT_DATA_DIR):
    """All of MNIST as uint8 images (N, 28, 28) and int64 labels: {"train": (x, y), "test": (x, y)}."""
    raw_dir = check_mnist(data_dir)
    return {split: (read_idx(raw_dir / f"{prefix}-images-idx3-ubyte"),
                    read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte").long())
            for split, prefix in (("train", "train"), ("test", "t10k"))}


def split_train_val(images, labels, val_size=5000, seed=0):
    """Carve a validation split from the training set, fixed by the seed: (train_x, train_y), (val_x, val_y)."""
    if not 0 < val_size < len(images):
        raise ValueError(f"val_size must be between 1 and {len(images) - 1}, got {val_size}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def get_splits(data_dir=DEFAULT_DATA_DIR, val_size=5000, seed=0, device="cpu", train_subset=None):
    """train/val/test as uint8 image tensors and label tensors on `device`.

    train_subset keeps only the first N training images (after the split): for quick checks and tests.
    """
    data = load_mnist(data_dir)
    train, val = split_train_val(*data["train"], val_size=val_size, seed=seed)
    if train_subset:
        train = (train[0][:train_subset], train[1][:train_subset])
    return {name: (x.to(device), y.to(device)) for name, (x, y) in
            (("train", train), ("val", val), ("test", data["test"]))}


def normalize(images_uint8_or_unit):
    """uint8 (N, 28, 28) or float in [0, 1] (N, 1, 28, 28) -> normalised float (N, 1, 28, 28)."""
    x = images_uint8_or_unit
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x - MNIST_MEAN) / MNIST_STD


def gather(images, labels, idx, augment=None, layout=torch.contiguous_format):
    """The batch at indices idx of a uint8 split: (normalised float images (B, 1, 28, 28), labels (B,)).

    augment: None or a dict from AUGMENTATIONS (augment_batch's arguments). layout: the memory format the model
    takes (common.memory_format).
    """
    x = images.index_select(0, idx).unsqueeze(1).float().div_(255.0)
    if augment:
        x = augment_module.augment_batch(x, **augment)
    return normalize(x).contiguous(memory_format=layout), labels.index_select(0, idx)


class TrainBatches:
    """The training split as fixed-shape batches that a captured CUDA graph can draw on its own.

    new_epoch() draws a shuffled order on the host generator (reproducible, and saved for --resume) and copies
    it into one device buffer of shape (steps, batch); batch(i) then gathers and augments batch i, where i is a
    device tensor, so nothing is read back to the host and a graph captured once replays every step. A graph
    needs one shape, so every batch is full: the remainder of each shuffled epoch (a different one every epoch)
    waits for the next. Under torchrun every rank draws the same order and keeps every world_size-th image from
    its rank on, so the ranks' batches together are the single-process batch of world_size x batch_size.
    """

    def __init__(self, images, labels, batch_size, augment=False, generator=None, rank=0, world_size=1,
                 memory_format=torch.contiguous_format):
        per_rank = len(images) // world_size
        if per_rank < 1:
            raise ValueError(f"{len(images)} training images cannot be shared by {world_size} processes")
        self.images, self.labels, self.augment = images, labels, augment_module.level(augment)
        self.batch_size = min(batch_size, per_rank)  # a training set smaller than one batch is one batch
        self.steps = per_rank // self.batch_size
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.layout = memory_format
        # Before the first new_epoch() (the warm-up runs then) the order is simply the first images.
        self.order = torch.arange(self.steps * self.batch_size, device=images.device).view(self.steps, -1)

    def __len__(self):
        return self.steps

    def new_epoch(self):
        order = torch.randperm(len(self.images), generator=self.generator)[self.rank::self.world_size]
        self.order.copy_(order[:self.order.numel()].view_as(self.order))

    def batch(self, i):
        """Batch i of this epoch: i is a Python int (the plain loop) or a 0-dim integer tensor on the device (a
        step that must not read its position back to the host: fast_step)."""
        idx = self.order[i] if isinstance(i, int) else self.order.index_select(0, i.view(1)).view(-1)
        return gather(self.images, self.labels, idx, self.augment, self.layout)


def eval_batch_size(device):
    """Images per forward pass when scoring: large on CUDA; 256 on a CPU, where a batch that fits in the caches
    is faster than a big one (docs/train.md has the figures); 1,000 elsewhere (Apple's MPS: not measured)."""
    return {"cuda": 5000, "cpu": 256}.get(torch.device(device).type, 1000)


@torch.no_grad()
def predict_probs(model, images, ctx=None, batch_size=None, max_batches=None):
    """Softmax outputs (N, 10) as float32 for uint8 images (N, 28, 28) on the model's device, in eval mode.

    model: any callable module that takes normalised (B, 1, 28, 28) batches and returns logits.
    ctx: the precision context (e.g. torch.autocast for bf16); None runs in full precision.
    batch_size: images per forward pass; None: eval_batch_size of the images' device.
    """
    batch_size = batch_size or eval_batch_size(images.device)
    model.eval()
    ctx = ctx if ctx is not None else nullcontext()
    layout = memory_format(images.device)
    out = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        with ctx:
            x = normalize(images[start:start + batch_size]).contiguous(memory_format=layout)
            out.append(model(x).float().softmax(1))
    return torch.cat(out)
