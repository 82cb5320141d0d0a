"""The data: MNIST on disk, train/val/test tensors on the device, batches with augmentation.

MNIST ships with the project in data/MNIST/raw/ as four .gz files. On first use they are unpacked next to
themselves, checked against the canonical md5 sums, and read as the IDX files they are (read_idx). Each split
then lives on the training device as one uint8 tensor; batches are drawn from a shuffled index and are
normalised and augmented there, batched, so the training loop never waits on per-sample Python work.
"""
import gzip
import hashlib
import shutil
import struct
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common import PROJECT_DIR, atomic_write, memory_format

DEFAULT_DATA_DIR = PROJECT_DIR / "data"

# The one place the normalisation constants live (mean and std of the MNIST training pixels in [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NORMALIZATION = {"mean": MNIST_MEAN, "std": MNIST_STD}  # as a checkpoint records it

# md5 of the uncompressed IDX files: the same sums torchvision pins for the canonical files.
RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000


class DataError(Exception):
    """A problem with the dataset on disk, phrased for the person who has to fix it."""


def _digest(path, algorithm):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _md5(path):
    return _digest(path, "md5")


def _sha256(path):
    return _digest(path, "sha256")


def _read_sha256sums(raw_dir):
    sums_file = raw_dir / "SHA256SUMS"
    if not sums_file.is_file():
        return {}
    sums = {}
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def _unpack(gz_path, raw_path):
    """Unpack through atomic_write, so that an interrupted unpack never leaves half a file."""
    try:
        with atomic_write(raw_path) as tmp, gzip.open(gz_path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{gz_path} is damaged ({err}); restore it with `git checkout -- {gz_path.name}` "
                        f"in {gz_path.parent}") from err


def check_mnist(data_dir=DEFAULT_DATA_DIR):
    """Make sure the four raw IDX files are in data_dir/MNIST/raw and carry the canonical md5 sums.

    Unpacks the shipped .gz files where a raw file is missing or wrong. Returns the raw folder.
    Raises DataError naming the bad file and the fix; returns None when nothing is shipped at all
    (the caller may then try torchvision's download).
    """
    raw_dir = Path(data_dir) / "MNIST" / "raw"
    shipped_sums = _read_sha256sums(raw_dir)
    missing = []
    for name, md5 in RAW_MD5.items():
        raw_path, gz_path = raw_dir / name, raw_dir / f"{name}.gz"
        if raw_path.is_file() and _md5(raw_path) == md5:
            continue
        if not gz_path.is_file():
            if raw_path.is_file():
                raise DataError(f"{raw_path} is corrupted (md5 mismatch) and {gz_path.name} is not there to "
                                f"restore it: delete it and put the shipped {gz_path.name} in {raw_dir}")
            missing.append(gz_path.name)
            continue
        expected_sha = shipped_sums.get(gz_path.name)
        if expected_sha and _sha256(gz_path) != expected_sha:
            raise DataError(f"{gz_path} is corrupted (sha256 differs from SHA256SUMS); restore it with "
                            f"`git checkout -- data/MNIST/raw/{gz_path.name}`")
        _unpack(gz_path, raw_path)
        if _md5(raw_path) != md5:
            raw_path.unlink(missing_ok=True)
            raise DataError(f"{gz_path} does not unpack to the canonical MNIST file (md5 mismatch); restore "
                            f"it with `git checkout -- data/MNIST/raw/{gz_path.name}`")
    if len(missing) == len(RAW_MD5):
        return None
    if missing:
        raise DataError(f"MNIST is incomplete: {', '.join(missing)} missing from {raw_dir}; restore them with "
                        f"`git checkout -- data/MNIST/raw`")
    return raw_dir


def verify_shipped(data_dir=DEFAULT_DATA_DIR):
    """The shipped .gz files against SHA256SUMS, even when the unpacked files are fine (a damaged copy in git).

    check_mnist() only reads a .gz when it has to unpack it; this reads them all. Raises DataError naming the file.
    """
    raw_dir = Path(data_dir) / "MNIST" / "raw"
    for name, expected in _read_sha256sums(raw_dir).items():
        path = raw_dir / name
        if path.is_file() and _sha256(path) != expected:
            raise DataError(f"{path} is corrupted (sha256 differs from SHA256SUMS); restore it with "
                            f"`git checkout -- data/MNIST/raw/{name}`")


def ensure_mnist(data_dir=DEFAULT_DATA_DIR):
    """The shipped copy if it is there, else torchvision's download, else a sentence saying what to do."""
    raw_dir = check_mnist(data_dir)
    if raw_dir is not None:
        return raw_dir
    from torchvision import datasets
    raw_dir = Path(data_dir) / "MNIST" / "raw"
    try:
        for train in (True, False):
            datasets.MNIST(str(data_dir), train=train, download=True)
    except Exception as err:  # any network or disk failure ends in the same advice
        names = ", ".join(f"{n}.gz" for n in RAW_MD5)
        raise DataError(f"MNIST is not in {raw_dir} and could not be downloaded ({type(err).__name__}); put "
                        f"{names} there (they ship with the project: `git checkout -- data/MNIST/raw`)") from err
    return check_mnist(data_dir)


def read_idx(path):
    """One IDX file (MNIST's format) as a uint8 tensor of the shape its header gives.

    By hand rather than through torchvision.datasets.MNIST: importing any part of torchvision loads its models and
    ops, which pull in torch's compiler (torch._dynamo), 2.5 s of the start of every command that reads MNIST
    without training (evaluate.py, export.py; on the 2-core CPU), to read what is a 4-byte magic number (0x08:
    unsigned bytes, then the number of dimensions), the sizes as big-endian int32, then the bytes. The files were
    checked against the canonical md5 sums first (check_mnist), so no other layout occurs.
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
    raw_dir = ensure_mnist(data_dir)
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


# Augmentation strengths for DeviceBatches(augment=...). "strong" adds elastic distortion (Simard et al. 2003:
# a random displacement field smoothed by a Gaussian; alpha 34 and sigma 6 move pixels by about 1.3 px RMS, which
# still looks like handwriting) and a wider rotation; it pays off only over longer schedules (--preset accurate).
# "writers" is the standard warp plus how other people's pens and pictures differ from MNIST's: strokes made
# thicker or thinner (a grey dilation or erosion, random_strokes) and softened by a blur (an upscaled or
# photographed digit); a level of its own, so the figures of the other two levels stay what they were.
AUGMENTATIONS = {
    "standard": {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1)},
    "strong": {"degrees": 12.0, "translate": 0.1, "scale": (0.9, 1.1), "elastic": 34.0, "elastic_sigma": 6.0},
    "writers": {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1), "thicker": 1.0, "thinner": 0.5,
                "blur": 1.0},
}


def random_strokes(x, thicker=1.0, thinner=0.5, blur=1.0, generator=None):
    """Thicker or thinner strokes and a blur, of a different strength for every image of a float batch (N, 1, H, W).

    Each image draws s in [-1, 1): s > 0 moves it a share s * thicker of the way to its grey dilation (the max
    over each 3x3 neighbourhood: about one pixel more ink on every side), s < 0 a share -s * thinner of the way
    to its grey erosion (the min: one pixel less; thinner stays under 1 by default, since a full erosion wipes
    out MNIST's thinnest strokes). Then it moves a share b in [0, blur) of the way to its Gaussian blur (3x3,
    sigma 1). Blending by a per-image share, chosen with torch.where rather than Python branches, keeps it one
    batched pass on the device with nothing read back, so a captured CUDA graph can replay it. Zero stays zero:
    apply it to [0, 1] images before normalising.
    """
    from torchvision.transforms.v2.functional import gaussian_blur
    share = torch.rand(x.shape[0], 2, 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype)
    s, b = share[:, 0] * 2 - 1, share[:, 1] * blur
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)  # padding counts as -inf there: the border does not erode
    target = torch.where(s > 0, dilated, eroded)
    x = torch.lerp(x, target, torch.where(s > 0, s * thicker, -s * thinner))
    return torch.lerp(x, gaussian_blur(x, [3, 3], [1.0, 1.0]), b)


def augment_batch(x, thicker=0.0, thinner=0.0, blur=0.0, generator=None, **affine):
    """One level of AUGMENTATIONS on a float batch in [0, 1]: random_strokes where the level has them, then
    random_affine. The levels without strokes draw exactly the random numbers they always drew."""
    if thicker or thinner or blur:
        x = random_strokes(x, thicker, thinner, blur, generator=generator)
    return random_affine(x, **affine, generator=generator)


def random_affine(x, degrees=10.0, translate=0.1, scale=(0.9, 1.1), elastic=0.0, elastic_sigma=6.0, generator=None):
    """A different random rotation, shift, scale (and elastic warp) for every image of a float batch (N, 1, H, W).

    Written with affine_grid/grid_sample rather than torchvision.transforms.v2.RandomAffine/ElasticTransform
    because those transforms draw one set of parameters per call, i.e. the same warp for the whole batch.
    elastic > 0 adds a per-image displacement field: uniform noise blurred with torchvision's gaussian_blur
    (sigma elastic_sigma pixels), scaled by elastic pixels. Zero stays zero, so apply it to [0, 1] images
    before normalising.
    """
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    rand = torch.rand(n, 4, device=x.device, generator=generator)
    angle = (rand[:, 0] * 2 - 1) * degrees * torch.pi / 180
    factor = scale[0] + rand[:, 1] * (scale[1] - scale[0])
    shift = (rand[:, 2:] * 2 - 1) * translate * 2  # affine_grid coordinates span [-1, 1], i.e. 2 units
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic:
        from torchvision.transforms.v2.functional import gaussian_blur
        noise = torch.rand(n, 2, h, w, device=x.device, generator=generator, dtype=x.dtype) * 2 - 1
        size = 2 * int(2 * elastic_sigma) + 1  # +-2 sigma: the rest of the kernel adds nothing visible
        field = gaussian_blur(noise, [size, size], [elastic_sigma, elastic_sigma]) * elastic
        # pixels -> grid units, with Python numbers: a tensor made from a list here would be a host-to-device
        # copy, which a CUDA graph capture cannot take
        grid = grid + torch.stack([field[:, 0] * (2.0 / w), field[:, 1] * (2.0 / h)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmentation(augment):
    """False/None -> None, True -> "standard", a name -> its augment_batch arguments from AUGMENTATIONS."""
    if augment is True:
        augment = "standard"
    if augment and augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[augment] if augment else None


class DeviceBatches:
    """Batches of one split that lives on the device as uint8: shuffled index, batched augmentation.

    augment: False, True (= "standard") or a name from AUGMENTATIONS. Iterating yields (normalised float images
    (B, 1, 28, 28), labels (B,)). len() is the number of batches.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, augment=False, drop_last=False, generator=None,
                 rank=0, world_size=1):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment = augmentation(augment)
        self.generator = generator
        # Distributed training: every rank draws the same shuffled order and keeps every world_size-th image
        # from its rank on, cut to the same length everywhere so all ranks take the same number of steps.
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        n = len(self.images) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n, device = len(self.images), self.images.device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(device)
        else:
            order = torch.arange(n, device=device)
        order = order[self.rank::self.world_size][:n // self.world_size]
        for i in range(len(self)):
            yield gather(self.images, self.labels, order[i * self.batch_size:(i + 1) * self.batch_size], self.augment)


def gather(images, labels, idx, augment=None, layout=torch.contiguous_format):
    """The batch at indices idx of a uint8 split: (normalised float images (B, 1, 28, 28), labels (B,)).

    augment: None or a dict from AUGMENTATIONS (augment_batch's arguments). layout: the memory format the model
    takes (common.memory_format).
    """
    x = images.index_select(0, idx).unsqueeze(1).float().div_(255.0)
    if augment:
        x = augment_batch(x, **augment)
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
        self.images, self.labels, self.augment = images, labels, augmentation(augment)
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
    is faster than a big one (measured on the 2-core CPU, 5,000 test images, channels_last: the simple CNN 0.47 s
    in batches of 256 against 1.28 s in batches of 1,000, the improved CNN 3.0 s against 4.3 s); 1,000 on other
    devices (Apple's MPS), where nothing else has been measured."""
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
    for i, (x, _) in enumerate(DeviceBatches(images, images.new_zeros(len(images)), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        with ctx:
            out.append(model(x.contiguous(memory_format=layout)).float().softmax(1))
    return torch.cat(out)
