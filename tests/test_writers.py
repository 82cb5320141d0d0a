"""writers.py and data/writers/: the shipped arrays, their checks, the guard that keeps the UCI digits out of
training, the make script that drew them, and tests/make_world_shapes.py (the world-shapes test set)."""
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import preprocess
import writers

ROOT = Path(__file__).resolve().parent.parent
WRITERS_DIR = ROOT / "data" / "writers"
sys.path.insert(0, str(WRITERS_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_world_shapes  # noqa: E402
import make_writers  # noqa: E402


@pytest.fixture(scope="module")
def arrays():
    with np.load(WRITERS_DIR / writers.FILE, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def copy_of_writers(tmp_path, name=writers.FILE, data=None):
    """A data folder holding `data` (bytes; default the shipped file) as `name`, with a matching SHA256SUMS."""
    import hashlib
    data = (WRITERS_DIR / writers.FILE).read_bytes() if data is None else data
    (tmp_path / name).write_bytes(data)
    (tmp_path / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    return tmp_path


def uci_framed_as_mnist(count=None):
    """scikit-learn's UCI digits turned into a training array the way one would: upscaled (bicubic) and framed as
    MNIST by preprocess.fit_and_centre, uint8 white on black."""
    from sklearn.datasets import load_digits
    out = []
    for digit in load_digits().images[:count]:
        big = np.asarray(Image.fromarray((digit * 255 / 16).astype(np.uint8)).resize((80, 80), Image.BICUBIC))
        out.append(make_writers.to_uint8(preprocess.fit_and_centre(make_writers.crop_ink(big / 255.0))))
    return np.stack(out)


def test_the_splits_hold_every_digit_of_both_sources_and_add_up():
    images, labels, sources = writers.load("all")
    assert images.dtype.is_floating_point is False and tuple(images.shape[1:]) == (28, 28)
    assert labels.dtype.is_floating_point is False and len(labels) == len(images) == len(sources)
    counts = {}
    for split in ("train", "val"):
        x, y, s = writers.load(split)
        counts[split] = len(y)
        for source in ("pendigits", "font"):
            assert sorted(set(y[s == source].tolist())) == list(range(10)), (split, source)
    assert counts["train"] + counts["val"] == len(labels)
    assert 0.1 < counts["val"] / len(labels) < 0.25
    fonts = writers.load("train", sources=["font"])[2]
    assert len(fonts) and set(fonts) == {"font"}


def test_validation_holds_out_whole_pendigits_rows_and_whole_font_packages(arrays):
    pen, font = arrays["source"] == 0, arrays["source"] == 1
    val = arrays["split"] == 1
    assert not set(arrays["row"][pen & val]) & set(arrays["row"][pen & ~val])
    package = np.array([name.split("(")[-1] for name in arrays["face_names"]])[arrays["face"][font]]
    assert not set(package[val[font]]) & set(package[~val[font]])
    assert (arrays["row"][font] == -1).all() and (arrays["face"][pen] == -1).all()


def test_the_digits_are_framed_like_mnist():
    images = writers.load("all")[0].numpy().astype(np.float64)
    mass = images.sum(axis=(1, 2))
    assert (mass > 0).all()
    rows = (images.sum(axis=2) * np.arange(28)).sum(axis=1) / mass
    cols = (images.sum(axis=1) * np.arange(28)).sum(axis=1) / mass
    assert np.abs(rows - 14).max() < 1.0 and np.abs(cols - 14).max() < 1.0
    ink = images > 0
    rows_used, cols_used = ink.any(axis=2), ink.any(axis=1)
    tall = 28 - rows_used.argmax(1) - rows_used[:, ::-1].argmax(1)
    wide = 28 - cols_used.argmax(1) - cols_used[:, ::-1].argmax(1)
    assert (np.maximum(tall, wide) == 20).all()  # fitted into the 20x20 box, its longer side filling it


def test_a_damaged_or_missing_file_is_one_line_naming_the_file_and_the_fix(tmp_path):
    folder = copy_of_writers(tmp_path)
    data = bytearray((folder / writers.FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / writers.FILE).write_bytes(bytes(data))
    with pytest.raises(writers.WritersError) as err:
        writers.load("train", data_dir=folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / writers.FILE) in message and "corrupted" in message
    assert "git checkout -- data/writers/writers.npz" in message and "make_writers.py" in message
    (folder / writers.FILE).unlink()
    with pytest.raises(writers.WritersError, match="missing"):
        writers.load("train", data_dir=folder)
    with pytest.raises(ValueError, match="split"):
        writers.load("test")


def test_the_guard_refuses_a_file_built_from_load_digits(tmp_path, arrays):
    uci = uci_framed_as_mnist()
    fake = dict(arrays, images=uci, labels=arrays["labels"][:len(uci)], source=arrays["source"][:len(uci)],
                split=arrays["split"][:len(uci)])
    import io
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **fake)
    folder = copy_of_writers(tmp_path, data=buffer.getvalue())
    with pytest.raises(writers.WritersError) as err:
        writers.load("train", data_dir=folder)
    assert "\n" not in str(err.value) and "refused" in str(err.value) and "UCI" in str(err.value)
    # mixed into genuine digits, a few hundred are enough; plainly resized to 28x28 they are caught too
    mixed = np.concatenate([arrays["images"][:5000], uci[:300]])
    with pytest.raises(writers.WritersError, match="refused"):
        writers.refuse_uci(mixed, "mixed")
    from sklearn.datasets import load_digits
    plain = np.stack([np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BICUBIC))
                      for d in load_digits().images])
    assert writers.uci_copies(plain) > 1500


def test_the_guard_refuses_a_file_named_optdigits(tmp_path):
    folder = copy_of_writers(tmp_path, name="optdigits_28.npz")
    with pytest.raises(writers.WritersError, match="optdigits"):
        writers.check_file(folder / "optdigits_28.npz")


def test_the_guard_lets_genuine_digits_through(arrays):
    """The shipped arrays and MNIST's test digits are nowhere near the refusal mark: the guard costs nothing."""
    import data_loader
    assert writers.uci_copies(arrays["images"]) < writers.UCI_COPIES // 4
    assert writers.uci_copies(data_loader.load_mnist()["test"][0].numpy()) < writers.UCI_COPIES // 4


def test_the_guard_fingerprints_exactly_what_load_digits_returns():
    from sklearn.datasets import load_digits
    assert np.allclose(writers._uci_fingerprints().numpy(), writers.fingerprint(load_digits().images).numpy())


def test_the_make_script_draws_the_shipped_pendigits_again(arrays):
    """The first rows drawn again by make_writers equal the shipped ones, up to the rounding other library
    versions may do (the pendigits file ships beside them, so this needs no font)."""
    points, labels = make_writers.read_pendigits()
    for n in range(12):
        i, r = divmod(n, make_writers.RENDERINGS)
        rng = np.random.default_rng([make_writers.SEED, 2, i, r])
        again = make_writers.render_pendigit(points[i], labels[i], r, rng)
        shipped = arrays["images"][n]
        assert arrays["row"][n] == i and arrays["labels"][n] == labels[i]
        assert np.abs(again.astype(int) - shipped).mean() < 1.0, n


def test_pen_lifts_are_cut_where_the_file_joins_strokes():
    """A 5 whose bar came last, a 7 crossed last, a 1 whose foot came last: two strokes each; a 0, one."""
    five = np.array([[13, 11], [12, 50], [72, 62], [56, 100], [4, 83], [0, 39], [32, 6], [100, 0]], float)
    seven = np.array([[0, 15], [38, 0], [81, 12], [87, 50], [84, 88], [58, 100], [53, 78], [100, 76]], float)
    one = np.array([[0, 48], [32, 17], [59, 0], [55, 45], [51, 90], [13, 100], [13, 93], [61, 93]], float)
    assert make_writers.pen_strokes(five, 5) == [slice(0, 5), slice(6, 8)]
    assert make_writers.pen_strokes(seven, 7) == [slice(0, 6), slice(6, 8)]
    assert make_writers.pen_strokes(one, 1) == [slice(0, 5), slice(5, 8)]
    assert make_writers.pen_strokes(five, 0) == [slice(0, 8)]


def test_world_shapes_are_named_by_their_digit_and_differ_between_splits(tmp_path):
    shapes = ["one_long_flag", "four_open", "plain_8"]
    val = make_world_shapes.make_set(tmp_path / "val", "val", per_shape=2, shapes=shapes)
    test = make_world_shapes.make_set(tmp_path / "test", "test", per_shape=2, shapes=shapes)
    assert len(val) == len(test) == 2 * 3 * 2
    for (path, digit, style, shape), (other, _, _, _) in zip(val, test):
        assert path.parent.name == shape and path.parent.parent.name == style
        assert path.stem.rsplit("_", 1)[-1] == str(digit) == str(make_world_shapes.SHAPES[shape][0])
        assert not np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))
        pixels = preprocess.image_to_mnist_pixels(path)
        assert pixels.shape == (28, 28) and pixels.max() > 0.5


def test_mix_gives_training_the_share_asked_and_validation_every_held_out_digit():
    """train_pytorch --writers SHARE: that share of each epoch's digits are other writers'; their held-out digits
    join the validation split (the best epoch is chosen on every source); the test split stays MNIST's."""
    mnist = {split: (torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
             for split, n in (("train", 30_000), ("val", 500), ("test", 700))}
    assert writers.mix(mnist, 0.0) is mnist
    held_out = len(writers.load("val")[1])
    for share in (0.1, 0.6):  # less than all of them once; more than all of them once
        mixed = writers.mix(mnist, share, seed=3)
        train_x, train_y = mixed["train"]
        assert (len(train_x) - 30_000) / len(train_x) == pytest.approx(share, abs=0.001)
        assert (train_y[30_000:] != 0).any() and train_x[30_000:].float().mean() > 10  # real digits, not MNIST's zeros
        assert len(mixed["val"][0]) == 500 + held_out and mixed["test"] is mnist["test"]
