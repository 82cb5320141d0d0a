"""image_to_mnist() and predict.py: real picture formats, pictures as people send them, bad input, the CLI, the
shipped example pictures."""
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
import preprocess
import checkpoint
import predict
from checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_user_images as mk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ROOT / "pretrained" / "best_model_improved_pt.pth"
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def mnist_test():
    x, y = data_loader.load_mnist()["test"]
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def pretrained():
    assert PRETRAINED.is_file(), f"the shipped model {PRETRAINED} is missing"
    return load_checkpoint(PRETRAINED)


def predict_pixels(model_ckpt, pixels):
    model, ckpt = model_ckpt
    x = (torch.from_numpy(np.stack(pixels)) - ckpt["normalization"]["mean"]) / ckpt["normalization"]["std"]
    with torch.no_grad():
        return model(x.unsqueeze(1)).argmax(1).tolist()


def on_paper(digit, size=240, seed=0):
    """A digit in dark ink on white, as a float coverage (size, size) and an 8-bit greyscale picture."""
    cover = mk._upscale(digit, size, np.random.default_rng(seed))
    return cover, Image.fromarray((255 * (1 - cover)).round().astype(np.uint8), "L")


def run(argv, capsys):
    """predict.main in-process: (exit code, stdout lines, stderr lines)."""
    try:
        code = predict.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


# ---------------------------------------------------------------------------------------------------------
# image_to_mnist
# ---------------------------------------------------------------------------------------------------------

def test_mnist_digits_come_out_unchanged(mnist_test):
    """A 28x28 MNIST digit is already what the model wants: the pipeline must give it back essentially as is."""
    images = mnist_test[0][:300]
    worst = []
    for digit in images:
        ours = preprocess.image_to_mnist(digit)
        reference = data_loader.normalize(torch.from_numpy(digit)[None])[0]
        worst.append(((ours - reference).abs().max() * data_loader.MNIST_STD).item())  # in pixel units [0, 1]
    worst = np.array(worst)
    assert np.median(worst) < 0.01
    assert (worst <= 0.05).mean() >= 0.97  # the rest: faint digits brightened, or a 1-px centring difference


def test_uses_the_given_normalisation(mnist_test):
    digit = mnist_test[0][0]
    pixels = torch.from_numpy(preprocess.image_to_mnist_pixels(digit))
    assert torch.allclose(preprocess.image_to_mnist(digit, mean=0.5, std=0.25)[0], (pixels - 0.5) / 0.25)
    assert preprocess.image_to_mnist(digit).shape == (1, 28, 28)


def test_output_looks_like_mnist(mnist_test):
    """Dark ink on paper becomes white on black, fits 20x20, centre of mass on the middle pixel."""
    _, img = on_paper(mnist_test[0][3])
    px = preprocess.image_to_mnist_pixels(img)
    assert px.shape == (28, 28) and px.dtype == np.float32
    assert px.min() == 0.0 and px.max() > 0.9 and px[0].sum() == 0 and px[:, 0].sum() == 0
    rows, cols = np.nonzero(px.any(1))[0], np.nonzero(px.any(0))[0]
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20
    cy = (px.sum(1) * np.arange(28)).sum() / px.sum()
    cx = (px.sum(0) * np.arange(28)).sum() / px.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def _formats(cover, grey, tmp_path):
    """The same digit saved in every mode and format people send: {name: path}."""
    h, w = cover.shape
    ink = (cover * 255).round().astype(np.uint8)
    paths = {}

    def save(name, img, suffix, **kw):
        paths[name] = tmp_path / f"{name}{suffix}"
        img.save(paths[name], **kw)

    save("png_L", grey, ".png")
    rgb = Image.merge("RGB", [grey.point(lambda v: v * 0.6 + 80), grey.point(lambda v: v * 0.8 + 40), grey])
    save("jpeg_rgb", rgb, ".jpg", quality=80)
    save("bmp", rgb, ".bmp")
    save("tiff", grey, ".tif")
    save("palette_P", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), ".png")
    # Drawing-app exports: black strokes whose coverage is the alpha; the transparent pixels hold black too,
    # so dropping the alpha would leave a black square.
    black = np.zeros((h, w), np.uint8)
    save("rgba_transparent", Image.fromarray(np.dstack([black, black, black, ink]), "RGBA"), ".png")
    save("la_transparent", Image.fromarray(np.dstack([black, ink]), "LA"), ".png")
    # A GIF with a transparent background colour, and a second frame that must be ignored.
    pal = Image.fromarray(np.where(cover > 0.5, 1, 0).astype(np.uint8), "P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    other = Image.fromarray(np.zeros((h, w), np.uint8), "P")
    other.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    save("gif_transparent", pal, ".gif", transparency=0, save_all=True, append_images=[other])
    save("i16", Image.fromarray((65535 - cover * 60000).astype(np.uint16)), ".png")
    # A phone photo stored sideways with an orientation tag: only EXIF makes it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("jpeg_exif_rotated", rgb.transpose(Image.Transpose.ROTATE_90), ".jpg", quality=90, exif=exif.tobytes())
    return paths


def test_every_format_gives_the_same_digit(mnist_test, pretrained, tmp_path):
    digit, label = mnist_test[0][0], int(mnist_test[1][0])
    cover, grey = on_paper(digit)
    paths = _formats(cover, grey, tmp_path)
    assert Image.open(paths["i16"]).mode == "I;16" and Image.open(paths["palette_P"]).mode == "P"
    reference = preprocess.image_to_mnist_pixels(paths["png_L"]).ravel()
    pixels = {}
    for name, path in paths.items():
        pixels[name] = preprocess.image_to_mnist_pixels(path)
        assert np.corrcoef(reference, pixels[name].ravel())[0, 1] > 0.95, name
    assert predict_pixels(pretrained, list(pixels.values())) == [label] * len(pixels)
    # without its orientation tag the sideways photo is a different picture: the tag was really used
    sideways = Image.fromarray(np.asarray(Image.open(paths["jpeg_exif_rotated"]).convert("L")))  # tag dropped
    assert np.corrcoef(reference, preprocess.image_to_mnist_pixels(sideways).ravel())[0, 1] < 0.8


@pytest.mark.parametrize("picture", ["white", "black", "grey", "noise"])
def test_no_ink_is_no_digit(picture):
    rng = np.random.default_rng(0)
    arr = {"white": np.full((80, 80), 255), "black": np.zeros((80, 80)), "grey": np.full((80, 80), 128),
           "noise": np.clip(rng.normal(200, 12, (80, 80)), 0, 255)}[picture]
    with pytest.raises(preprocess.NoDigitError, match="no digit found"):
        preprocess.image_to_mnist(arr.astype(np.uint8))


@pytest.mark.slow
def test_pictures_as_people_send_them(mnist_test, pretrained, tmp_path):
    """A small set of each kind, made from MNIST test digits: plain resizing is near chance, ours is not."""
    made = mk.make_set(tmp_path, *mnist_test, kinds=mk.KINDS, per_kind=30, seed=1)
    results = mk.accuracy_by_kind(made, PRETRAINED)
    for path, _, _ in made:  # none is taken for a dot, a speck or several digits
        preprocess.image_to_mnist_pixels(path)
    for kind, (ours, naive, n) in results.items():
        assert ours >= 0.9, f"{kind}: {ours:.0%} of {n} right"
        if kind != "mnist28":
            assert naive <= 0.4, f"{kind}: the naive resize got {naive:.0%}: the kind is too easy to prove anything"


def test_digits_by_other_writers(pretrained):
    """scikit-learn's UCI digits (43 writers, 8x8 upscaled and blurred, filling the whole picture): not MNIST."""
    (ours, naive, n), = mk.accuracy_by_kind(mk.other_writers(300), PRETRAINED).values()
    assert ours >= 0.9 and naive <= 0.3, (ours, naive, n)


# ---------------------------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def pictures(mnist_test, tmp_path):
    """Three digits on paper in a folder: ([paths], [labels])."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    paths, labels = [], []
    for i in range(3):
        _, img = on_paper(mnist_test[0][i], size=120, seed=i)
        paths.append(folder / f"digit{i}.png")
        img.save(paths[-1])
        labels.append(int(mnist_test[1][i]))
    return paths, labels


def test_predicts_files_folders_and_globs(pictures, small_checkpoint, capsys, tmp_path):
    paths, labels = pictures
    code, out, _ = run(["--image_path", paths[0], paths[0].parent, str(paths[0].parent / "digit[12].png"),
                        "--model_path", small_checkpoint], capsys)
    assert code == 0
    assert len(out) == 1 + 3 + 2
    expected = [paths[0]] + paths + paths[1:]
    for line, path in zip(out, expected):
        assert line.startswith(f"{path}: ") and line.endswith("%)")
    assert [int(line.split(": ")[1][0]) for line in out[1:4]] == labels


def test_bad_inputs_get_one_line_each_and_the_rest_is_predicted(pictures, small_checkpoint, capsys, tmp_path,
                                                               monkeypatch):
    paths, _ = pictures
    folder = paths[0].parent
    (folder / "notes.png").write_text("not a picture, just text\n")
    (folder / "empty.png").write_bytes(b"")
    whole = (tmp_path / "whole.jpg")
    Image.open(paths[0]).convert("RGB").save(whole, quality=90)
    (folder / "truncated.jpg").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    (folder / "readme.txt").write_text("skipped: not a picture suffix")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # root can read any folder, so the refusal is simulated where the OS would give it
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(predict.os, "scandir", scandir)
    missing = tmp_path / "missing.png"
    code, out, err = run(["--image_path", folder, missing, locked, "--model_path", small_checkpoint], capsys)
    assert code == 1
    assert len(out) == 3 and all(line.split(": ")[0] in map(str, paths) for line in out)
    problems = {line.split(": ")[0]: line for line in err if not line.startswith("predict.py:")}
    assert set(problems) == {str(folder / "notes.png"), str(folder / "empty.png"), str(folder / "truncated.jpg"),
                             str(missing), str(locked)}
    assert "not an image" in problems[str(folder / "notes.png")]
    assert "empty" in problems[str(folder / "empty.png")]
    assert "truncated" in problems[str(folder / "truncated.jpg")]
    assert "no such file" in problems[str(missing)]
    assert "permission denied" in problems[str(locked)].lower()
    assert err[-1] == "predict.py: 5 of 8 picture(s) could not be predicted"


def test_blank_picture_says_no_digit_found(small_checkpoint, capsys, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (250, 250, 245)).save(blank)
    code, out, err = run(["--image_path", blank, "--model_path", small_checkpoint], capsys)
    assert code == 1 and out == []
    assert err[0].startswith(f"{blank}: no digit found")


def too_many_pixels(path):
    """A PNG that declares 30,000 x 30,000 pixels in a few dozen bytes: Pillow refuses it as it opens it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("number", [False, True], ids=["digit", "number"])
def test_a_picture_over_pillows_pixel_limit_is_one_line_and_the_rest_is_read(number, capsys, tmp_path):
    bomb, good = too_many_pixels(tmp_path / "bomb.png"), [EXAMPLES / "photo_7.jpg", EXAMPLES / "scan_2.jpg"]
    code, out, err = run(["--image_path", good[0], bomb, good[1], "--model_path", PRETRAINED]
                         + (["--number"] if number else []), capsys)
    assert code == 1
    assert [line.split(" (")[0] for line in out] == [f"{good[0]}: 7", f"{good[1]}: 2"]
    about = [line for line in err if line.startswith(f"{bomb}: ")]
    assert len(about) == 1 and "too large" in about[0], err
    assert err[-1].startswith("predict.py: 1 of 3 picture(s)")


def a_dot(path, radius, size=200):
    """A round blot of dark ink on white paper, off the centre: no digit."""
    yy, xx = np.mgrid[:size, :size]
    ink = (yy - 0.4 * size) ** 2 + (xx - 0.55 * size) ** 2 <= radius ** 2
    Image.fromarray(np.where(ink, 25, 245).astype(np.uint8), "L").save(path)
    return path


def four_digits(mnist_test, path):
    """2026 written with MNIST test digits, a third to a half of their height apart, on paper."""
    images, labels = mnist_test
    digits = [images[int(np.flatnonzero(labels == d)[0])] for d in (2, 0, 2, 6)]
    cover = np.pad(mk.number_strip(digits, 60, [0.5, 0.35, 0.45], np.random.default_rng(0)), 30)
    paper = mk._paper(*cover.shape, np.random.default_rng(1))
    Image.fromarray(mk._compose(paper, cover, [30, 30, 60]), "RGB").save(path)
    return path


def test_a_dot_a_speck_and_several_digits_are_said_so(mnist_test, capsys, tmp_path):
    """Not read as a confident 0 (a dot) or as the first digit of a number: each says why, and where to go."""
    dot, speck = a_dot(tmp_path / "dot.png", 12), a_dot(tmp_path / "speck.png", 3)
    number = four_digits(mnist_test, tmp_path / "2026.png")
    code, out, err = run(["--image_path", dot, speck, number, EXAMPLES / "pen_8.png", "--model_path", PRETRAINED],
                         capsys)
    assert code == 1 and [line.split(" (")[0] for line in out] == [f"{EXAMPLES / 'pen_8.png'}: 8"]
    assert f"{dot}: no digit found (a dot: too round and solid to be a digit)" in err
    assert f"{speck}: no digit found (the mark found is too small to be a digit)" in err
    assert f"{number}: several digits side by side, not one (to read them as a number, add --number)" in err
    code, out, _ = run(["--image_path", dot, number, "--json", "--model_path", PRETRAINED], capsys)
    rows = [json.loads(line) for line in out]
    assert [r["prediction"] for r in rows] == [None, None] and "dot" in rows[0]["error"]
    assert "--number" in rows[1]["error"]
    code, out, _ = run(["--image_path", number, "--number", "--model_path", PRETRAINED], capsys)
    assert code == 0 and out[0].startswith(f"{number}: 2026 ("), out


def test_json_lines(pictures, small_checkpoint, capsys, tmp_path):
    paths, labels = pictures
    code, out, err = run(["--image_path", *paths[:2], tmp_path / "missing.png", "--json",
                          "--model_path", small_checkpoint], capsys)
    assert code == 1 and err == []
    rows = [json.loads(line) for line in out]
    assert [r["path"] for r in rows] == [str(paths[0]), str(paths[1]), str(tmp_path / "missing.png")]
    for row, label in zip(rows[:2], labels):
        assert row["prediction"] == label and row["error"] is None
        assert len(row["probabilities"]) == 10 and abs(sum(row["probabilities"]) - 1) < 1e-4
        assert row["confidence"] == max(row["probabilities"])
    assert rows[2]["prediction"] is None and rows[2]["probabilities"] is None and "no such file" in rows[2]["error"]


def test_probabilities_top_k_and_low_confidence():
    args = predict.parse_args().parse_args(["--image_path", "x", "--top_k", "3", "--show_probabilities"])
    probs = [0.02, 0.5, 0.3, 0.1, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01]
    lines = predict.format_result("d.png", probs, args)
    assert lines[0] == "d.png: 1 (50.0%)  next: 2 (30.0%), 3 (10.0%)  [low confidence: below 60%]"
    assert len(lines) == 11 and lines[2].startswith("    1  50.0% |" + "#" * 15 + " ")
    sure = [0.0] * 10
    sure[7] = 1.0
    assert predict.format_result("d.png", sure, args)[0].startswith("d.png: 7 (100.0%)  next:")
    assert "low confidence" not in predict.format_result("d.png", sure, args)[0]


def test_save_preprocessed(pictures, small_checkpoint, capsys, tmp_path):
    paths, _ = pictures
    out_dir = tmp_path / "seen"
    code, _, _ = run(["--image_path", paths[0], paths[0], "--save_preprocessed", out_dir,
                      "--model_path", small_checkpoint], capsys)
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["digit0.png", "digit0_2.png"]
    seen = np.asarray(Image.open(out_dir / "digit0.png"), np.float32) / 255
    assert seen.shape == (28, 28)
    assert np.abs(seen - preprocess.image_to_mnist_pixels(paths[0])).max() <= 1 / 255 + 1e-6


def test_model_type_must_match(pictures, small_checkpoint, capsys):
    paths, _ = pictures
    code, out, _ = run(["--image_path", paths[0], "--model_path", small_checkpoint, "--model_type", "simple"], capsys)
    assert code == 0 and len(out) == 1
    code, out, err = run(["--image_path", paths[0], "--model_path", small_checkpoint, "--model_type", "improved"],
                         capsys)
    assert code == 2 and out == [] and len(err) == 1 and "'simple' model, not 'improved'" in err[0]


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_are_refused_and_never_run(pictures, small_checkpoint, capsys, tmp_path):
    paths, _ = pictures
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "mnist-cnn/1", "model": "simple", "payload": _RunsCode(marker)}, evil)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(small_checkpoint.read_bytes()[:5000])
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    for bad, words in ((evil, "pickled code"), (truncated, "not a readable"), (foreign, "not a checkpoint"),
                       (tmp_path / "nothing.pth", "no such checkpoint")):
        code, out, err = run(["--image_path", paths[0], "--model_path", bad], capsys)
        assert code == 2 and out == [] and len(err) == 1 and words in err[0], (bad, err)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["--image_path", "x", "--top_k", "0"], ["--image_path", "x", "--frobnicate"],
                                  [], ["--image_path", "x", "--model_type", "resnet"],
                                  ["--image_path", "x", "--device", "tpu"]])
def test_bad_flags_are_one_line_and_exit_2(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("predict.py: error:")


def test_default_model_order(tmp_path, monkeypatch):
    results, shipped = tmp_path / "results", tmp_path / "pretrained" / "best_model_improved_pt.pth"
    results.mkdir()
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", results / "best_model_simple_pt.pth")
    monkeypatch.setattr(checkpoint, "PRETRAINED_MODEL", shipped)
    assert checkpoint.default_model_path() == shipped
    (results / "best_model_improved_pt.pth").write_bytes(b"x")
    os.utime(results / "best_model_improved_pt.pth", (1, 1))
    (results / "best_model_wide_pt.pth").write_bytes(b"x")
    assert checkpoint.default_model_path() == results / "best_model_wide_pt.pth"
    (results / "best_model_simple_pt.pth").write_bytes(b"x")
    assert checkpoint.default_model_path() == results / "best_model_simple_pt.pth"


def test_command_line_from_another_folder(pictures, tmp_path, python):
    """Defaults come from the script's folder, the user's paths from the current one: a fresh-clone run."""
    paths, _ = pictures
    done = subprocess.run([python, str(ROOT / "predict.py"), "--image_path", paths[0].name],
                          cwd=paths[0].parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("digit0.png: ") and done.stderr.startswith("model: ")


# ---------------------------------------------------------------------------------------------------------
# The shipped example pictures, and what a newcomer is told
# ---------------------------------------------------------------------------------------------------------



def test_examples_are_read_right_by_the_shipped_model(capsys):
    """Every shipped example, through predict.py with the shipped model: the digit its name says."""
    code, out, err = run(["--image_path", EXAMPLES, "--model_path", PRETRAINED], capsys)
    assert code == 0, err
    names = sorted(name for name, *_ in mk.EXAMPLES)
    assert [line.split(": ")[0] for line in out] == [str(EXAMPLES / name) for name in names]
    for line, name in zip(out, names):
        digit, confidence = line.split(": ")[1].split(" ")
        assert digit == name.split(".")[0][-1] and float(confidence.strip("(%)")) >= 99.0, line


def test_examples_are_small_described_and_what_the_generator_makes(mnist_test, tmp_path):
    shipped = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix != ".md")
    assert shipped == sorted(name for name, *_ in mk.EXAMPLES)
    assert sum((EXAMPLES / name).stat().st_size for name in shipped) < 60_000  # tens of KB in all
    assert Image.open(EXAMPLES / "drawing_3.png").mode == "RGBA"  # the transparent drawing-app export
    assert Image.open(EXAMPLES / "photo_7.jpg").getexif().get(0x0112) == 6  # stored sideways, as phones do
    readme = (EXAMPLES / "README.md").read_text()
    assert "Attribution-Share Alike 3.0" in readme and "python tests/make_user_images.py --examples examples" in readme
    for name, kind, index, *_ in mk.EXAMPLES:
        assert re.search(rf"`{re.escape(name)}` \| [^|]+ \| {index} \|", readme), name
    made = mk.make_examples(tmp_path, *mnist_test)
    for path, label in made:
        again = np.asarray(Image.open(path), np.float32)
        shipped_pixels = np.asarray(Image.open(EXAMPLES / path.name), np.float32)
        assert again.shape == shipped_pixels.shape and np.abs(again - shipped_pixels).mean() < 1.0, path.name


@pytest.mark.slow
def test_no_picture_says_what_to_pass_and_the_command_works(tmp_path, python):
    """`python predict.py` alone: one line, exit 2, naming a command on the shipped examples that works as printed."""
    done = subprocess.run([python, str(ROOT / "predict.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "--image_path" in done.stderr and "examples" in done.stderr
    command = re.search(r"`(python [^`]+)`", done.stderr).group(1)
    tried = subprocess.run(command.replace("python", shlex.quote(python), 1), shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert tried.returncode == 0, tried.stderr
    assert len(tried.stdout.splitlines()) == len(mk.EXAMPLES)


def test_no_picture_from_the_project_folder_is_the_short_command(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run([], capsys)
    assert code == 2 and out == [] and len(err) == 1
    assert "`python predict.py --image_path examples/`" in err[0]
