"""number_judge.py: the judge's training data is labelled by ink, its file is written and read by checkpoint.py,
the digit commands refuse it, and predict.py --number uses it (or not, with --judge none)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import number_judge as nj
import preprocess
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnn_pytorch import build_model
from data_loader import NORMALIZATION, load_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_predict import run  # noqa: E402  (predict.main in-process: exit code, stdout and stderr lines)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mnist_train():
    x, y = load_mnist()["train"]
    return x.numpy(), y.numpy()


def first_of(mnist, digit):
    return int(np.flatnonzero(mnist[1] == digit)[0])


def labelled(mnist, digits, gaps, seed=0):
    """Write digits as a number, find the reader's candidates and label them: (candidates, labels)."""
    rng = np.random.default_rng(seed)
    picture, owner = nj.write_number([mnist[0][first_of(mnist, d)] for d in digits], gaps, 50, rng)
    cands = preprocess.number_candidates(picture)
    return cands, nj.label_candidates(cands, owner, list(digits))


def test_each_digit_of_a_spaced_number_is_a_whole_digit(mnist_train):
    cands, labels = labelled(mnist_train, (3, 5), [0.6])
    per_cluster = {}
    for (c, i, j), label in zip(cands.keys, labels):
        if i == 0 and j == len(cands.problems[c][2][1]) - 1:  # the whole cluster: one digit each
            per_cluster[c] = int(label)
    assert per_cluster == {0: 3, 1: 5}


def test_two_touching_digits_as_one_candidate_are_not_one_digit(mnist_train):
    cands, labels = labelled(mnist_train, (4, 7), [-0.06])
    assert len(cands.problems) == 1, "the digits should touch"
    whole = [k for k, (c, i, j) in enumerate(cands.keys) if i == 0 and j == len(cands.problems[c][2][1]) - 1]
    assert labels[whole[0]] == nj.NOT_A_DIGIT
    assert {4, 7} <= set(labels.tolist()), "some cut between them gives each digit whole"


def test_trained_judge_is_a_checkpoint_the_digit_commands_refuse(tmp_path, capsys):
    out = tmp_path / "judge.pth"
    nj.main(["--pictures", "12", "--val_pictures", "10", "--epochs", "1", "--out", str(out)])
    judge, ckpt = nj.load_judge(out)
    assert ckpt["classes"][-1] == "not one digit" and judge(torch.zeros(2, 2, 28, 28)).shape == (2, 11)
    code, _, err = run(["--image_path", str(ROOT / "examples"), "--model_path", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "classes" in err[0], err
    with pytest.raises(CheckpointError, match="classes"):
        nj.load_judge(ROOT / "pretrained" / "best_model_improved_pt.pth")


def test_outputs_and_inputs_must_match_the_classes(tmp_path):
    """A file whose model has eleven outputs but names ten classes, or takes two channels, is refused: it is not
    read as a digit classifier."""
    path = tmp_path / "odd.pth"
    save_checkpoint(path, build_model("tiny", num_classes=11), "tiny", NORMALIZATION, {"num_classes": 11})
    with pytest.raises(CheckpointError, match="11 outputs"):
        load_checkpoint(path)
    two = tmp_path / "two.pth"
    save_checkpoint(two, build_model("tiny", in_channels=2), "tiny", NORMALIZATION, {"in_channels": 2})
    with pytest.raises(CheckpointError, match="2 input channels"):
        load_checkpoint(two)


def test_judge_for_gives_a_probability_per_candidate():
    judge = nj.judge_for()  # the shipped judge
    pixels = np.zeros((3, 28, 28), np.float32)
    pixels[:, 4:24, 13:15] = 1.0  # a 1
    out = judge(pixels, pixels)
    assert out.shape == (3, 11) and np.allclose(out.sum(1), 1, atol=1e-5)
    assert nj.judge_for("none") is None and nj.judge_for("NONE") is None


def test_predict_judge_flag(tmp_path, capsys):
    code, _, err = run(["--image_path", str(ROOT / "examples" / "photo_7.jpg"), "--number", "--judge",
                        str(tmp_path / "missing.pth")], capsys)
    assert code == 2 and len(err) == 1 and "--judge" in err[0] and "no such checkpoint" in err[0], err
    code, out, _ = run(["--image_path", str(ROOT / "examples" / "photo_7.jpg"), "--number", "--judge", "none"],
                       capsys)
    assert code == 0 and out[0].split(": ")[1].startswith("7 ("), out
    code, _, err = run(["--image_path", "x.png", "--judge", "none"], capsys)
    assert code == 2 and "--number" in err[-1]


def test_context_shows_the_candidate_white_and_its_neighbour_grey(mnist_train):
    """The judge's second channel: the 4 of a touching 47, cut from the 7, at the line's scale; the 7's ink is
    there in grey, to the right of the 4 (so the judge sees the cut went through a stroke)."""
    cands, labels = labelled(mnist_train, (4, 7), [-0.06])
    k = int(np.flatnonzero(labels == 4)[0])
    ctx = cands.context[k]
    assert ctx.shape == (28, 28) and ctx.max() > 0.9
    grey = np.nonzero((ctx > 0.3) & (ctx < 0.6))
    white = np.nonzero(ctx > 0.9)
    assert grey[1].size > 10 and grey[1].mean() > white[1].mean() + 4, (grey[1].mean(), white[1].mean())
