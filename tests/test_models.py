"""The model table and the checkpoint: every model runs, and a checkpoint rebuilds exactly what was saved."""
import os
import pickle

import pytest
import torch

from cnn_pytorch import (MODELS, CheckpointError, build_model, count_parameters, load_checkpoint, read_checkpoint,
                         save_checkpoint)
from data_loader import NORMALIZATION

PARAM_RANGE = {"simple": (1.1e6, 1.3e6), "improved": (2.3e6, 2.7e6), "tiny": (2e4, 4e4)}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_finite_logits_and_has_its_documented_size(name):
    model = build_model(name).eval()
    logits = model(torch.randn(5, 1, 28, 28))
    assert logits.shape == (5, 10)
    assert torch.isfinite(logits).all()
    low, high = PARAM_RANGE[name]
    assert low <= count_parameters(model) <= high


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_learns_a_batch(name):
    """A few steps on one fixed batch must drive its loss down: gradients reach every layer."""
    torch.manual_seed(0)
    model = build_model(name).train()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("resnet152")


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, name):
    torch.manual_seed(1)
    model = build_model(name).eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, name, NORMALIZATION, epoch=3, val_accuracy=0.99)
    loaded, ckpt = load_checkpoint(path)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert ckpt["format"] == "mnist-cnn/1" and ckpt["model"] == name and ckpt["epoch"] == 3
    assert ckpt["classes"] == [str(d) for d in range(10)]
    assert set(ckpt["normalization"]) == {"mean", "std"}
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file of the atomic write was left behind"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_pickled_code_is_refused_and_never_runs(tmp_path):
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"format": "mnist-cnn/1", "model": "simple", "payload": evil}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not evil.marker.exists()


def test_torch_saved_object_with_code_is_refused(tmp_path):
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format": "mnist-cnn/1", "model": "simple", "state_dict": evil}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not evil.marker.exists()


def test_foreign_truncated_and_missing_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        read_checkpoint(foreign)
    good = tmp_path / "good.pth"
    save_checkpoint(good, build_model("simple"), "simple", NORMALIZATION)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "absent.pth")


def test_model_type_mismatch_is_an_error(tmp_path):
    path = tmp_path / "s.pth"
    save_checkpoint(path, build_model("simple"), "simple", NORMALIZATION)
    with pytest.raises(CheckpointError, match="not 'improved'"):
        load_checkpoint(path, expected_model="improved")
