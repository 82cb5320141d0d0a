"""The model table and the checkpoint: every model runs, and a checkpoint rebuilds exactly what was saved."""
import os
import pickle
import zipfile

import pytest
import torch

from calibration import fold_temperature
from cnn_pytorch import MODELS, build_model

from checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from data_loader import NORMALIZATION

PARAM_RANGE = {"simple": (1.1e6, 1.3e6), "improved": (2.3e6, 2.7e6), "tiny": (2e4, 4e4)}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_folded_temperature_divides_the_logits_exactly(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        fold_temperature(model, 0.6)
        assert torch.allclose(model(x), before / 0.6, atol=1e-5)


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
    assert not any(".tmp" in name for name in zipfile.ZipFile(path).namelist())  # nor is its name inside the file


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


# Arguments other than the defaults, as a user (or train_pytorch's --dropout) would pass them.
OTHER_ARGS = {"simple": {"channels": [8, 16], "hidden": 64, "dropout": 0.3},
              "improved": {"channels": [8, 16, 24], "hidden": [64, 32], "dropout": 0.5, "conv_dropout": 0.0},
              "tiny": {"channels": [4, 8, 12]}}


def test_every_model_argument_has_a_rule_for_checkpoints():
    """read_checkpoint accepts only arguments with a rule: a new constructor parameter needs one in MODEL_ARG_RULES."""
    import inspect

    from checkpoint import MODEL_ARG_RULES
    assert set(OTHER_ARGS) == set(MODELS)
    for name, cls in MODELS.items():
        params = [p for p in inspect.signature(cls).parameters]
        assert set(params) <= set(MODEL_ARG_RULES), f"{name}: no rule for {set(params) - set(MODEL_ARG_RULES)}"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("args", ["defaults", "other"])
def test_a_model_built_on_the_meta_device_has_the_real_models_shapes(name, args):
    """read_checkpoint learns the shapes from a meta-device model; they must be the real model's, to the key."""
    model_args = OTHER_ARGS[name] if args == "other" else {}
    with torch.device("meta"):
        meta = build_model(name, **model_args)
    real = build_model(name, **model_args)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert count_parameters(meta) == count_parameters(real)
    assert all(p.is_meta for p in meta.parameters()) and not any(p.is_meta for p in real.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_a_checkpoint_with_other_arguments_loads_exactly(tmp_path, name):
    torch.manual_seed(2)
    model = build_model(name, **OTHER_ARGS[name]).eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, name, NORMALIZATION, model_args=OTHER_ARGS[name])
    loaded, ckpt = load_checkpoint(path, expected_model=name)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x)) and ckpt["model_args"] == OTHER_ARGS[name]
    assert count_parameters(loaded) == count_parameters(model)


def test_read_checkpoint_returns_tensors_in_memory_not_mapped_from_the_file(tmp_path):
    """The file is mapped while it is checked; what comes back must not depend on it (resume replaces it)."""
    path = tmp_path / "m.pth"
    save_checkpoint(path, build_model("tiny"), "tiny", NORMALIZATION)
    ckpt = read_checkpoint(path)
    before = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    path.write_bytes(b"replaced")
    path.unlink()
    assert all(torch.equal(before[k], v) for k, v in ckpt["state_dict"].items())
