"""number_reader.py: the decoding a user's --digits relies on, the lines it learns from, its training command and
the refusal of files that are not a reader. Reading real pictures through predict.py: tests/test_numbers.py."""
import itertools

import numpy as np
import pytest
import torch

import number_reader as nr
from checkpoint import CheckpointError


def frames(*classes, sure=0.9):
    """Log-probabilities (T, 13) whose best path is `classes` (0 blank, k + 1 the k-th of nr.ALPHABET)."""
    logp = np.full((len(classes), len(nr.ALPHABET) + 1), np.log((1 - sure) / len(nr.ALPHABET)))
    logp[np.arange(len(classes)), classes] = np.log(sure)
    return logp


def test_best_path_merges_repeats_and_needs_a_blank_between_two_of_a_kind():
    logp = frames(0, 2, 2, 0, 2, 0, 8, 8, 0)  # "1", "1" (a blank between), "7"
    assert [e.char for e in nr.decode([logp])[0]] == ["1", "1", "7"]
    assert nr.decode([logp])[0][2].first == 6 and nr.decode([logp])[0][2].last == 7


def test_digits_n_gives_exactly_n_digits_and_the_best_path_when_it_already_has_n():
    logp = frames(0, 4, 0, 0, 6, 0)  # "35"
    assert "".join(e.char for e in nr.decode([logp], digits=2)[0]) == "35"
    logp[2, 1 + 9] = np.log(0.45)  # a doubtful 9 between them: the unconstrained reading leaves it out ...
    assert "".join(e.char for e in nr.decode([logp])[0]) == "35"
    assert "".join(e.char for e in nr.decode([logp], digits=3)[0]) == "395"  # ... three digits must take it
    one = "".join(e.char for e in nr.decode([logp], digits=1)[0])
    assert one in ("3", "5")
    dotted = frames(0, 4, 0, 11, 0, 6, 0)  # "3.5": the point is not a digit
    assert "".join(e.char for e in nr.decode([dotted], digits=2)[0]) == "3.5"


def test_count_paths_finds_the_best_path_for_each_count_as_trying_every_path_does():
    """The Viterbi search over frames and counts against all 13**4 paths of a 4-frame line, one where a 7 is
    likely everywhere (two 7s need a blank between them) and one at random."""
    x = np.random.default_rng(3).normal(0, 2, (2, 4, len(nr.ALPHABET) + 1))
    x[0, :, 1 + 7] += 5
    for logp in x - np.log(np.exp(x).sum(2, keepdims=True)):
        check_count_paths(logp)


def check_count_paths(logp):
    best = {}
    for path in itertools.product(range(logp.shape[1]), repeat=4):
        emitted = [c for t, c in enumerate(path) if c and (t == 0 or path[t - 1] != c)]
        k = sum(nr.ALPHABET[c - 1].isdigit() for c in emitted)
        best[k] = max(best.get(k, -np.inf), logp[np.arange(4), path].sum())
    found = nr.count_paths(logp, 3)
    assert sorted(found) == [k for k in sorted(best) if k <= 3]
    assert all(np.isclose(found[k][0], best[k]) and np.isclose(logp[np.arange(4), found[k][1]].sum(), best[k]) for k in found)


def test_digits_over_lines_add_up_to_n():
    lines = [frames(0, 2, 0, 3, 0), frames(0, 4, 0)]  # "12" and "3"
    assert ["".join(e.char for e in line) for line in nr.decode(lines, digits=3)] == ["12", "3"]


def test_a_line_is_normalised_to_the_reader_height_with_its_ink_inside():
    cover = np.zeros((300, 500), np.float32)
    cover[100:220, 50:60] = 1.0   # a 1, 120 px tall
    cover[100:220, 200:290] = 0.5  # a grey block
    line, scale, y0, x0 = nr.normalise_line(cover)
    assert line.shape[0] == nr.HEIGHT and (y0, x0) == (100, 50)
    rows = np.flatnonzero(line.max(1) > nr.INK)
    assert rows[0] >= (nr.HEIGHT - nr.INK_HEIGHT) // 2 - 1 and rows[-1] - rows[0] + 1 <= nr.INK_HEIGHT
    assert np.isclose(scale, nr.INK_HEIGHT / 120, rtol=0.05) and line.max() == 1.0
    assert nr.normalise_line(np.zeros((20, 20), np.float32)) is None
    wide, wide_scale, _, _ = nr.normalise_line(cover, stretch=1.25)  # read wider: the grey block still maps back
    assert wide.shape[0] == nr.HEIGHT and wide.shape[1] - 2 * nr.PAD == round(240 * scale * 1.25)
    block = np.flatnonzero(wide.max(0) > 0.3)
    block = block[block > nr.PAD + 20 * wide_scale]
    assert abs(x0 + (block[0] - nr.PAD) / wide_scale - 200) <= 2 and abs(x0 + (block[-1] + 1 - nr.PAD) / wide_scale - 290) <= 2


def test_synthetic_lines_hold_their_text_and_never_the_test_digits():
    images, labels = nr.digit_pools("train")
    assert len(images) == 55_000 + 21_086  # MNIST's training split of seed 0 and the writers' training part
    rng = np.random.default_rng(0)
    made = [nr.make_line(images[:200], labels[:200], rng) for _ in range(50)]
    assert all(set(text) <= set(nr.ALPHABET) and 1 <= sum(c.isdigit() for c in text) <= 12 for _, text in made)
    assert any("." in text for _, text in made) or any(len(text) > 6 for _, text in made)
    x, targets, lengths, texts = nr.as_batch(made[:8], rng)
    assert x.shape[:3] == (8, 1, nr.HEIGHT) and lengths.tolist() == [len(t) for t in texts]
    assert targets.tolist() == [nr.ALPHABET.index(c) + 1 for t in texts for c in t]


def test_the_training_command_writes_a_reader_that_reads(tmp_path, capsys):
    out = tmp_path / "reader.pth"
    assert nr.main(["--steps", "3", "--batch_size", "8", "--val_lines", "64", "--eval_every", "2",
                    "--out", str(out)]) == 0
    assert "validation lines read whole" in capsys.readouterr().out
    reader = nr.load_reader(out)
    assert sum(p.numel() for p in reader.parameters()) == 179_645
    with torch.inference_mode():
        assert reader(torch.zeros(1, 1, nr.HEIGHT, 64)).shape == (1, 16, len(nr.ALPHABET) + 1)


def test_a_file_that_is_not_a_reader_is_refused_in_one_line(tmp_path):
    torch.save({"format": "mnist-cnn/1", "state_dict": {}}, tmp_path / "cnn.pth")
    with pytest.raises(CheckpointError, match="not a number reader"):
        nr.load_reader(tmp_path / "cnn.pth")
    old = {"format": "mnist-line-reader/1", "model_args": {"widths": [16, 32, 64, 96], "hidden": 64},
           "alphabet": nr.ALPHABET, "state_dict": nr.LineReader().state_dict()}  # pooled where /2 strides
    torch.save(old, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="another layout .*mnist-line-reader/1.*python number_reader.py"):
        nr.load_reader(tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="no number reader there"):
        nr.load_reader(tmp_path / "missing.pth")
    good = nr.load_reader()  # the shipped one
    bad = {"format": nr.FORMAT, "model_args": {"widths": [16, 32, 64, 96], "hidden": 64}, "alphabet": nr.ALPHABET,
           "state_dict": {k: v[:1] if v.dim() else v for k, v in good.state_dict().items()}}
    torch.save(bad, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        nr.load_reader(tmp_path / "cut.pth")
