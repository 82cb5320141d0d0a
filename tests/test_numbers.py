"""predict.py --number: whole numbers read from real picture files through the real command.

Every picture is built here from MNIST *test* digits (tests/make_user_images.py's number strips), written to
tmp_path and read by predict.main (in-process) or `python predict.py` (a subprocess), with the shipped model.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_loader
import number_reader as nr
import preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_user_images as mk  # noqa: E402
from test_predict import run  # noqa: E402  (predict.main in-process: exit code, stdout and stderr lines)

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ROOT / "pretrained" / "best_model_improved_pt.pth"
BROKEN_FIVE = 8  # MNIST test image 8 is a 5 whose top bar is apart from its body (two parts at any size)


@pytest.fixture(scope="module")
def mnist_test():
    x, y = data_loader.load_mnist()["test"]
    return x.numpy(), y.numpy()


def first_of(mnist_test, digit, skip=0):
    """The index of the first MNIST test image of `digit` (after `skip` of them)."""
    return int(np.flatnonzero(mnist_test[1] == digit)[skip])


def on_paper(cover, path, seed=0, quality=None):
    """Ink coverage -> dark ink on lightly noisy paper with a margin, saved to path."""
    rng = np.random.default_rng(seed)
    h, w = cover.shape
    m = 30
    page = np.zeros((h + 2 * m, w + 2 * m), np.float32)
    page[m:m + h, m:m + w] = cover
    img = Image.fromarray(mk._compose(mk._paper(*page.shape, rng), page, [30, 30, 60]), "RGB")
    img.save(path, **({"quality": quality} if quality else {}))
    return path


def strip(mnist_test, indices, gaps, height=60, seed=0):
    images = mnist_test[0]
    return mk.number_strip([images[i] for i in indices], height, gaps, np.random.default_rng(seed))


@pytest.mark.slow
def test_a_spaced_number_through_the_command(mnist_test, tmp_path):
    indices = [first_of(mnist_test, d) for d in (2, 0, 2, 6)]
    path = on_paper(strip(mnist_test, indices, [0.4, 0.3, 0.5]), tmp_path / "number.jpg", quality=85)
    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--image_path", str(path), "--number"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"{path}: 2026 ("), line
    assert line.endswith("%)")


def test_show_probabilities_gives_each_digit_and_box(mnist_test, tmp_path, capsys):
    indices = [first_of(mnist_test, d) for d in (7, 3, 9)]
    path = on_paper(strip(mnist_test, indices, [0.4, 0.4]), tmp_path / "739.png")
    code, out, _ = run(["--image_path", path, "--number", "--show_probabilities"], capsys)
    assert code == 0
    assert out[0].startswith(f"{path}: 739 (")
    assert [line.split()[0] for line in out[1:]] == ["7", "3", "9"]
    assert all("box" in line for line in out[1:])


def test_a_broken_five_is_one_digit(mnist_test, tmp_path, capsys):
    cover = mk._upscale(mnist_test[0][BROKEN_FIVE], 100, np.random.default_rng(0)) > 0.5
    labels = preprocess._label_components(cover)
    assert len(np.unique(labels[labels > 0])) >= 2, "the 5 should come in two parts"
    indices = [first_of(mnist_test, 3), BROKEN_FIVE, first_of(mnist_test, 1)]
    path = on_paper(strip(mnist_test, indices, [0.5, 0.5], height=80), tmp_path / "351.png")
    code, out, _ = run(["--image_path", path, "--number"], capsys)
    assert code == 0
    assert out == [f"{path}: 351 ({out[0].rsplit('(', 1)[1]}"], out


FLAGGED_FIVES = (1087, 3552, 5624)  # MNIST test 5s whose top bar is apart and reaches well past the body


@pytest.mark.parametrize("five", FLAGGED_FIVES)
def test_a_five_whose_bar_reaches_past_its_body_keeps_its_bar(mnist_test, tmp_path, capsys, five):
    """The bar of these 5s is a mark of its own beside the body, not over it: a reader that dropped it as a speck
    read the body as a 3 ("13")."""
    cover = strip(mnist_test, [first_of(mnist_test, 1), five], [0.4], height=60)
    labels = preprocess._label_components(cover > 0.45)
    assert len(np.unique(labels[labels > 0])) >= 3, "the 5's bar should be apart from its body"
    path = on_paper(cover, tmp_path / "15.png")
    code, out, _ = run(["--image_path", path, "--number"], capsys)
    assert code == 0
    assert out[0].startswith(f"{path}: 15 ("), out


def test_touching_digits_are_split_with_digits(mnist_test, tmp_path, capsys):
    indices = [first_of(mnist_test, d) for d in (4, 7, 0)]
    cover = strip(mnist_test, indices, [-0.06, -0.06])
    labels = preprocess._label_components(cover > 0.5)
    assert len(np.unique(labels[labels > 0])) < 3, "the digits should touch"
    path = on_paper(cover, tmp_path / "470.png")
    code, out, _ = run(["--image_path", path, "--number", "--digits", "3"], capsys)
    assert code == 0
    assert out[0].startswith(f"{path}: 470 ("), out


def test_touching_digits_are_read_without_their_count(mnist_test, tmp_path, capsys):
    """Seams that go around ink a long way read this 679 as 1581 (pieces of the 6 and the 7 taken by their
    neighbours); the straighter seams of a cluster of several touching digits cut at the junctions."""
    indices = [first_of(mnist_test, d) for d in (6, 7, 9)]
    cover = strip(mnist_test, indices, [-0.06, -0.06])
    labels = preprocess._label_components(cover > 0.5)
    assert len(np.unique(labels[labels > 0])) < 3, "the digits should touch"
    path = on_paper(cover, tmp_path / "679.png")
    code, out, _ = run(["--image_path", path, "--number"], capsys)
    assert code == 0
    assert out[0].startswith(f"{path}: 679 ("), out


def test_two_lines_are_read_top_to_bottom(mnist_test, tmp_path, capsys):
    top = strip(mnist_test, [first_of(mnist_test, d) for d in (1, 2)], [0.5])
    bottom = strip(mnist_test, [first_of(mnist_test, d) for d in (3, 4, 5)], [0.5, 0.5])
    width = max(top.shape[1], bottom.shape[1])
    cover = np.zeros((top.shape[0] + 40 + bottom.shape[0], width), np.float32)
    cover[:top.shape[0], :top.shape[1]] = top
    cover[top.shape[0] + 40:, :bottom.shape[1]] = bottom
    path = on_paper(cover, tmp_path / "lines.png")
    code, out, _ = run(["--image_path", path, "--number"], capsys)
    assert code == 0
    assert [line.split(": ")[1].split()[0] for line in out] == ["12", "345"], out
    code, out, _ = run(["--image_path", path, "--number", "--json"], capsys)
    answer = json.loads(out[0])
    assert answer["number"] == "12\n345"
    assert [line["number"] for line in answer["lines"]] == ["12", "345"]


def _pi_with_a_dot(mnist_test, tmp_path, share):
    """3 1 4 on paper with a round dot (radius 4 px, digits 60 px tall) on the baseline after the 3: its left
    edge `share` of the way into the gap (0: against the 3's ink, as the broken-off end of a stroke lies)."""
    cover = strip(mnist_test, [first_of(mnist_test, d) for d in (3, 1, 4)], [0.6, 0.4])
    cols = np.nonzero(cover.max(0) > 0.5)[0]
    gap = [c for c in range(cols[0], cols[-1]) if cover[:, c].max() == 0]
    x = gap[int(len(gap) * share)] + 4
    y = int(np.nonzero(cover.max(1) > 0.5)[0][-1]) - 4
    yy, xx = np.mgrid[0:cover.shape[0], 0:cover.shape[1]]
    cover[(yy - y) ** 2 + (xx - x) ** 2 <= 16] = 1.0
    return on_paper(cover, tmp_path / f"pi_{share}.png")


def test_a_decimal_point_is_read_as_a_point_not_a_zero(mnist_test, tmp_path, capsys):
    code, out, _ = run(["--image_path", _pi_with_a_dot(mnist_test, tmp_path, 0.2), "--number"], capsys)
    assert code == 0
    assert out[0].split(": ")[1].split()[0] == "3.14", out


def test_a_crumb_against_a_digit_is_not_a_point(mnist_test, tmp_path, capsys):
    # the same dot moved against the 3 is the piece of a broken stroke: left out (the reader's synthetic lines
    # have decimal points only apart from both neighbours, and crumbs against a digit's side that are not text)
    code, out, _ = run(["--image_path", _pi_with_a_dot(mnist_test, tmp_path, 0.0), "--number"], capsys)
    assert code == 0
    assert out[0].split(": ")[1].split()[0] == "314", out


def test_a_digit_in_short_pieces_is_read_not_dropped(mnist_test, tmp_path, capsys):
    # the 8 of 383 cut by blank rows into short pieces: together they stand as tall as the digits beside it
    cover = strip(mnist_test, [first_of(mnist_test, d) for d in (3, 8, 3)], [0.5, 0.5])
    inked = cover.max(0) > 0
    starts = np.flatnonzero(inked[1:] & ~inked[:-1]) + 1  # where the 8 and the last 3 begin
    x0, x1 = starts[0], starts[1]
    rows = np.flatnonzero(cover[:, x0:x1].max(1) > 0)
    step = int(0.25 * (rows[-1] - rows[0] + 1))
    cover[rows[0] + step:rows[-1]:step, x0:x1] = 0.0  # one blank row parts them
    code, out, _ = run(["--image_path", on_paper(cover, tmp_path / "383.png"), "--number"], capsys)
    assert code == 0
    assert out[0].split(": ")[1].split()[0] == "383", out


def test_json_has_number_confidence_digits_and_boxes(mnist_test, tmp_path, capsys):
    indices = [first_of(mnist_test, d) for d in (8, 6)]
    path = on_paper(strip(mnist_test, indices, [0.5]), tmp_path / "86.png")
    code, out, _ = run(["--image_path", path, "--number", "--json"], capsys)
    assert code == 0 and len(out) == 1
    answer = json.loads(out[0])
    assert answer["path"] == str(path) and answer["number"] == "86" and answer["error"] is None
    assert 0 < answer["confidence"] <= 1
    assert [d["digit"] for d in answer["digits"]] == ["8", "6"]
    assert np.isclose(answer["confidence"], np.prod([d["probability"] for d in answer["digits"]]), atol=1e-5)
    w, h = Image.open(path).size
    (a0, ay0, a1, ay1), (b0, by0, b1, by1) = (d["box"] for d in answer["digits"])
    assert 0 <= a0 < a1 <= b0 < b1 <= w and 0 <= ay0 < ay1 <= h and 0 <= by0 < by1 <= h


def test_the_surest_of_the_widths_read_is_kept_with_boxes_on_its_digits(mnist_test, tmp_path):
    """read_number reads the line at several widths (number_reader.STRETCHES) and keeps its surest reading; the
    boxes of that reading, stretched or not, lie on the digits' ink in the picture."""
    cover = strip(mnist_test, [first_of(mnist_test, d) for d in (4, 1, 7)], [0.02, 0.4])
    path = on_paper(cover, tmp_path / "417.png")
    reader = nr.load_reader()
    each = [nr.read_number(path, reader, stretches=(s,)) for s in nr.STRETCHES]
    kept = nr.read_number(path, reader)
    assert len(nr.STRETCHES) > 1 and kept.number == "417"
    assert kept.confidence == max(r.confidence for r in each)
    dark = np.asarray(Image.open(path).convert("L")) < 100
    boxes = [d.box for d in kept.lines[0]]
    assert all(dark[y0:y1, x0:x1].sum() > 20 for x0, y0, x1, y1 in boxes)
    assert boxes[0][0] < boxes[1][0] < boxes[2][0] and boxes[1][2] <= boxes[2][0]  # the 1 ends before the 7


def test_annotated_picture_is_written(mnist_test, tmp_path, capsys):
    indices = [first_of(mnist_test, d) for d in (5, 9)]
    path = on_paper(strip(mnist_test, indices, [0.5]), tmp_path / "59.png")
    out_dir = tmp_path / "seen"
    code, out, _ = run(["--image_path", path, "--number", "--annotate", out_dir], capsys)
    assert code == 0
    written = out_dir / "59.png"
    assert written.is_file() and not list(out_dir.glob(".*"))  # no temporary file left behind
    original, drawn = np.asarray(Image.open(path).convert("RGB")), np.asarray(Image.open(written).convert("RGB"))
    assert drawn.shape == original.shape
    green = (drawn[..., 1] > 120) & (drawn[..., 0] < 60) & (drawn[..., 2] < 60)
    assert green.sum() > 100  # boxes were drawn (in green: both digits are confident)


def test_empty_page_says_no_digits_and_the_rest_is_read(mnist_test, tmp_path, capsys):
    blank = on_paper(np.zeros((200, 300), np.float32), tmp_path / "blank.png")
    good = on_paper(strip(mnist_test, [first_of(mnist_test, d) for d in (4, 2)], [0.5]), tmp_path / "42.png")
    code, out, err = run(["--image_path", blank, good, "--number"], capsys)
    assert code == 1
    assert out[0].startswith(f"{good}: 42 (")
    assert f"{blank}: no digits found" in err
    assert not any("Traceback" in line for line in err)


def test_specks_and_bad_files_get_one_line_each(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cover = np.zeros((600, 800), np.float32)
    for _ in range(200):
        y, x = rng.integers(5, 595), rng.integers(5, 795)
        cover[y - 3:y + 4, x - 3:x + 4] = 1.0
    specks = on_paper(cover, tmp_path / "specks.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = run(["--image_path", specks, broken, tmp_path / "missing.png", "--number"], capsys)
    assert code == 1 and out == []
    lines = [line for line in err if not line.startswith("model:")]
    assert len(lines) == 4, lines  # three pictures, one summary
    assert "more than 64 digits" in lines[0]
    assert not any("Traceback" in line for line in err)


def test_flags_that_need_number_are_refused(capsys):
    code, _, err = run(["--image_path", "x.png", "--digits", "3"], capsys)
    assert code == 2 and "--number" in err[-1]


SMALL_SET_FLOORS = {"spaced_paper_jpeg": 0.9, "spaced_canvas": 0.9, "long": 0.9, "touching": 0.85}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SMALL_SET_FLOORS))
def test_string_accuracy_on_a_small_generated_set(kind, mnist_test, tmp_path):
    """A regression floor: 20 pictures each of spaced numbers on paper and on a canvas, of long numbers and of
    touching digits, read with the shipped number reader and model; one test per kind, so that the workers share them.
    With the reader shipped on 2026-12-07 and the improved CNN: 19, 20, 19 and 19 of 20 spaced on paper, on a
    canvas, long and touching right; the floors leave room for 1-2 more misreads (on the 400-picture test set it
    reads 90-97% of these kinds, docs/numbers.md)."""
    import evaluate_numbers
    from checkpoint import load_checkpoint
    # the same 80 pictures for every kind's test (one random stream); this test reads its own kind's 20
    mk.make_number_set(tmp_path / "all", mnist_test[0], mnist_test[1], tuple(SMALL_SET_FLOORS), per_kind=20, seed=7)
    (tmp_path / "one").mkdir()
    (tmp_path / "all" / kind).rename(tmp_path / "one" / kind)
    model, ckpt = load_checkpoint(PRETRAINED)
    classify = nr.cnn_check(model, ckpt["normalization"])
    table = evaluate_numbers.score(tmp_path / "one", "reader", nr.load_reader(), classify)
    assert list(table) == [kind] and table[kind]["n"] == 20
    assert table[kind]["string_accuracy"] >= SMALL_SET_FLOORS[kind], table[kind]
