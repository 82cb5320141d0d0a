"""The shipped dataset, the validation split and the on-device batches with augmentation."""
import gzip
import shutil

import pytest
import torch

import augment
import data_loader
from augment import random_affine
from data_loader import DataError, TrainBatches, split_train_val


def test_shipped_mnist_has_the_documented_counts_and_labels(mnist_splits):
    data = data_loader.load_mnist()
    assert data["train"][0].shape == (60_000, 28, 28) and data["train"][0].dtype == torch.uint8
    assert data["test"][0].shape == (10_000, 28, 28)
    assert data["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data["test"][1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(data["train"][1]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert [len(mnist_splits[s][0]) for s in ("train", "val", "test")] == [55_000, 5_000, 10_000]


def test_the_idx_reader_reads_exactly_what_torchvision_reads():
    """data_loader reads the IDX files itself (importing torchvision costs evaluate.py 2.5 s); the same tensors."""
    from torchvision import datasets
    data = data_loader.load_mnist()
    for split, train in (("train", True), ("test", False)):
        reference = datasets.MNIST(str(data_loader.DEFAULT_DATA_DIR), train=train, download=False)
        assert torch.equal(data[split][0], reference.data) and torch.equal(data[split][1], reference.targets)


def test_a_file_that_is_not_idx_is_refused_with_its_fix(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file.*git checkout"):
        data_loader.read_idx(tmp_path / "bad")


def test_default_data_dir_is_beside_the_scripts_not_the_working_directory():
    assert data_loader.DEFAULT_DATA_DIR.is_absolute()
    assert data_loader.DEFAULT_DATA_DIR == data_loader.PROJECT_DIR / "data"


def test_validation_split_is_disjoint_complete_and_fixed_by_the_seed():
    idx = torch.arange(60_000)
    (train, _), (val, _) = split_train_val(idx, idx, val_size=5000, seed=0)
    assert len(train) == 55_000 and len(val) == 5_000
    assert len(set(train.tolist()) | set(val.tolist())) == 60_000
    (_, _), (val_again, _) = split_train_val(idx, idx, val_size=5000, seed=0)
    (_, _), (val_other, _) = split_train_val(idx, idx, val_size=5000, seed=1)
    assert torch.equal(val, val_again) and not torch.equal(val, val_other)


@pytest.mark.parametrize("strength, ink_change", [("standard", 0.35), ("strong", 0.5)])
def test_augmentation_differs_per_sample_and_keeps_the_shape(strength, ink_change):
    torch.manual_seed(0)
    digit = data_loader.load_mnist()["train"][0][0].float().div(255)
    batch = digit.expand(16, 1, 28, 28).clone()
    out = random_affine(batch, **augment.AUGMENTATIONS[strength])
    assert out.shape == batch.shape
    diffs = [(out[i] - out[0]).abs().sum().item() for i in range(1, 16)]
    assert min(diffs) > 1.0, "two samples got the same warp"
    # Small warps: the digit keeps most of its ink and stays in [0, 1].
    assert out.min() >= 0 and out.max() <= 1
    assert (out.sum(dim=(1, 2, 3)) / batch[0].sum()).sub(1).abs().max() < ink_change


def test_elastic_distortion_alone_bends_strokes_a_little_and_differently_per_image():
    torch.manual_seed(0)
    digit = data_loader.load_mnist()["train"][0][0].float().div(255)
    batch = digit.expand(8, 1, 28, 28).clone()
    out = random_affine(batch, degrees=0, translate=0, scale=(1, 1), elastic=34.0, elastic_sigma=6.0)
    moved = (out - batch).abs().mean(dim=(1, 2, 3))
    assert (moved > 0.01).all() and (moved < 0.15).all()  # every image changed, none beyond recognition
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_an_unknown_augmentation_name_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation 'heavy'"):
        TrainBatches(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4), 2, augment="heavy")


def test_identity_affine_leaves_images_unchanged():
    x = torch.rand(4, 1, 28, 28)
    out = random_affine(x, degrees=0, translate=0, scale=(1, 1))
    assert torch.allclose(out, x, atol=1e-5)


def test_batches_cover_every_image_once_per_epoch_and_are_normalised():
    images = torch.arange(1000).remainder(256).to(torch.uint8).reshape(1000, 1, 1).expand(1000, 28, 28)
    labels = torch.arange(1000)
    batches = TrainBatches(images.contiguous(), labels, 100, augment="none", generator=torch.Generator().manual_seed(0))
    batches.new_epoch()
    seen = torch.cat([batches.batch(i)[1] for i in range(len(batches))])
    assert len(batches) == 10 and sorted(seen.tolist()) == list(range(1000))
    assert seen.tolist() != list(range(1000)), "not shuffled"
    x, y = batches.batch(0)
    expected = (images[y].float() / 255 - data_loader.MNIST_MEAN) / data_loader.MNIST_STD
    assert x.shape == (100, 1, 28, 28) and torch.allclose(x[:, 0], expected)


@pytest.fixture()
def data_copy(tmp_path):
    """A copy of the shipped .gz files and SHA256SUMS, without the unpacked raw files."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in data_loader.DEFAULT_DATA_DIR.joinpath("MNIST", "raw").iterdir():
        if f.suffix == ".gz" or f.name == "SHA256SUMS":
            shutil.copy(f, raw / f.name)
    return tmp_path / "data"


def test_shipped_copy_is_unpacked_and_checked_on_first_use(data_copy):
    raw = data_loader.check_mnist(data_copy)
    assert sorted(p.name for p in raw.iterdir() if not p.suffix and p.name != "SHA256SUMS") == sorted(
        data_loader.RAW_SIZES)
    assert torch.equal(data_loader.load_mnist(data_copy)["test"][1], data_loader.load_mnist()["test"][1])


def test_corrupted_archive_is_named_with_the_fix(data_copy):
    gz = data_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(gz.read_bytes()))
    data[100] ^= 0xFF
    gz.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is corrupted.*git checkout"):
        data_loader.check_mnist(data_copy)


def test_a_cut_raw_file_is_unpacked_again_from_the_archive(data_copy):
    raw = data_loader.check_mnist(data_copy)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    data_loader.check_mnist(data_copy)
    assert (raw / "train-labels-idx1-ubyte").stat().st_size == data_loader.RAW_SIZES["train-labels-idx1-ubyte"]


def test_without_the_shipped_copy_the_error_says_what_to_restore_and_nothing_is_downloaded(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz.*missing.*git checkout"):
        data_loader.load_mnist(tmp_path / "empty")


def test_a_damaged_archive_is_found_by_the_full_check_even_after_unpacking(data_copy):
    data_loader.check_mnist(data_copy)
    gz = data_copy / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-10])
    data_loader.check_mnist(data_copy)  # the unpacked files are right: the .gz is read only to unpack it
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is corrupted.*git checkout"):
        data_loader.check_mnist(data_copy, full=True)
