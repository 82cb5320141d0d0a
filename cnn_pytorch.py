"""The models, the model table, and the checkpoint: the one place a .pth file is written or read.

Models return raw logits; the loss belongs to the training script. Each model works out its own flatten size
from a dummy input, so changing a layer never means recomputing a magic number by hand.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from common import atomic_write

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PROJECT_DIR / "results" / "best_model_simple_pt.pth"
PRETRAINED_MODEL = PROJECT_DIR / "pretrained" / "best_model_simple_pt.pth"  # shipped: works on a fresh clone
CHECKPOINT_FORMAT = "mnist-cnn/1"
INPUT_NAME, OUTPUT_NAME = "input", "logits"  # the names of an exported ONNX model's input and output
CLASSES = [str(d) for d in range(10)]


def _flat_size(features, in_shape=(1, 1, 28, 28)):
    with torch.no_grad():
        return features(torch.zeros(in_shape)).flatten(1).shape[1]


class SimpleCNN(nn.Module):
    """Two conv blocks (conv3x3 -> ReLU -> maxpool) and a dense layer with dropout: about 1.2M parameters.

    Padding keeps 28x28 through the first conv, so the second conv runs at 14x14: about half the
    multiply-adds of the pytorch/examples net (whose second conv runs at 24x24) for the same size,
    which is what makes one epoch on a 2-core CPU fit in seconds rather than minutes.
    """

    def __init__(self, channels=(32, 64), hidden=384, dropout=0.1, num_classes=10):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(_flat_size(self.features), hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ImprovedCNN(nn.Module):
    """Three conv blocks (two conv-BN-ReLU each, then maxpool and dropout) and two dense layers with dropout.

    About 2.5M parameters; batch norm lets it train at higher learning rates and reach 99.5%+.
    """

    def __init__(self, channels=(32, 64, 128), hidden=(1536, 256), dropout=(0.1, 0.4), num_classes=10):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += _conv_bn(c_in, c) + _conv_bn(c, c) + [nn.MaxPool2d(2), nn.Dropout2d(dropout[0])]
            c_in = c
        self.features = nn.Sequential(*layers)
        h1, h2 = hidden
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_size(self.features), h1, bias=False), nn.BatchNorm1d(h1), nn.ReLU(inplace=True),
            nn.Dropout(dropout[1]),
            nn.Linear(h1, h2, bias=False), nn.BatchNorm1d(h2), nn.ReLU(inplace=True), nn.Dropout(dropout[1]),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (16, 32, 64 channels) and one linear layer: about 29k parameters.

    Built for time to 99%: on a 2-core CPU the cost is the memory traffic of the 28x28 layers, so the first
    block has only 16 channels; batch norm lets one epoch at a high peak rate (--max_lr 0.01) reach 99%.
    """

    def __init__(self, channels=(16, 32, 64), num_classes=10):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += _conv_bn(c_in, c) + [nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(self.features), num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"simple": SimpleCNN, "improved": ImprovedCNN, "tiny": TinyCNN}


def build_model(name, **model_args):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](**model_args)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


class CheckpointError(Exception):
    """A file that is not a checkpoint of ours, or is damaged, phrased for a person."""


def atomic_save(obj, path):
    """torch.save through common.atomic_write: a crash never leaves half a checkpoint."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _plain(value):
    """Numbers, strings, lists and dicts only, so the file loads with weights_only=True."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):  # numpy scalars
        return value.item()
    return value


def unwrap(model):
    """The plain model under torch.compile or DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def make_checkpoint(model, model_name, normalization, model_args=None, **info):
    """The checkpoint dict of ../DESIGN.md: everything needed to rebuild and use the model without flags.

    normalization: {"mean", "std"} of the inputs the model was trained on (data_loader.NORMALIZATION): the data
    is the data module's business, so it is handed in, not looked up here.
    """
    plain = unwrap(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "model_args": _plain(model_args or {}),
        "state_dict": {k: v.detach().cpu() for k, v in plain.state_dict().items()},
        "normalization": {"mean": float(normalization["mean"]), "std": float(normalization["std"])},
        "classes": list(CLASSES),
        "torch_version": torch.__version__.split("+")[0],
        **_plain(info),
    }


def save_checkpoint(path, model, model_name, normalization, model_args=None, **info):
    """Write a model checkpoint atomically; info (epoch, val_accuracy, args, ...) is stored alongside."""
    atomic_save(make_checkpoint(model, model_name, normalization, model_args, **info), path)


def read_checkpoint(path):
    """Load a checkpoint dict safely (weights only: a file from a stranger can never run code) and check it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncation, unsafe globals: all mean "not a file we can use"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it contains pickled code or objects that weights-only loading refuses"
        else:
            reason = f"it is not a readable PyTorch checkpoint ({first[:120]})"
        raise CheckpointError(f"{path}: refused, {reason}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {CHECKPOINT_FORMAT!r}); "
                              f"train one with `python train_pytorch.py`")
    if ckpt.get("model") not in MODELS:
        raise CheckpointError(f"{path}: unknown model {ckpt.get('model')!r} (known: {', '.join(MODELS)})")
    return ckpt


def check_model_type(path, found, expected):
    """--model_type guards against the wrong file: a mismatch is an error, never a silent rebuild."""
    if expected is not None and expected != found:
        raise CheckpointError(f"{path}: holds a {found!r} model, not {expected!r}; drop --model_type or pass the "
                              f"matching one")


def load_checkpoint(path, device="cpu", expected_model=None):
    """Rebuild the model of a checkpoint in eval mode on `device`: returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    check_model_type(path, ckpt["model"], expected_model)
    model = build_model(ckpt["model"], **ckpt.get("model_args", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:
        detail = " ".join(str(err).split())[:160]  # PyTorch's message spans lines; people get one
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['model']!r} model ({detail})") from err
    return model.to(device).eval(), ckpt


def default_model_path():
    """results/best_model_simple_pt.pth, else the newest results/best_model_*.pth, else the shipped model."""
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    trained = sorted(DEFAULT_MODEL.parent.glob("best_model_*.pth"), key=lambda p: p.stat().st_mtime)
    return trained[-1] if trained else PRETRAINED_MODEL


def model_path_or_default(path=None):
    """The model file a command should use: the one given, else default_model_path(), which must exist."""
    if path:
        return Path(path)
    found = default_model_path()
    if not found.is_file():
        raise CheckpointError(f"no trained model: neither {DEFAULT_MODEL} nor the shipped {PRETRAINED_MODEL} exists; "
                              f"train one with `python train_pytorch.py` or pass --model_path")
    return found


# Exported ONNX models (export.py writes them; predict.py and export.py run them through this loader).

class OnnxModel:
    """An exported ONNX model run by ONNX Runtime: call it on normalised float32 (N, 1, 28, 28), get logits (N, C).

    `normalization` ({"mean", "std"}) and `classes` come from the file's own metadata, so the file is all that a
    deployment needs; `normalize()` turns uint8 (N, 28, 28) or [0, 1] float (N, 1, 28, 28) images into the input.
    """

    def __init__(self, session, metadata, path):
        self.session, self.metadata, self.path = session, metadata, Path(path)
        self.normalization = {"mean": float(metadata["mnist.normalization_mean"]),
                              "std": float(metadata["mnist.normalization_std"])}
        self.classes = json.loads(metadata["mnist.classes"])
        self.model_name = metadata.get("mnist.model", "unknown")

    def normalize(self, images):
        import numpy as np
        x = np.asarray(images)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        if x.ndim == 3:
            x = x[:, None]
        return ((x - self.normalization["mean"]) / self.normalization["std"]).astype(np.float32)

    def __call__(self, x):
        import numpy as np
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"expected a float32 batch of shape (N, 1, 28, 28), got {x.shape}")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def load_onnx_model(path, threads=None):
    """Open an ONNX file written by export.py with ONNX Runtime (CPU). CheckpointError (one line) when it cannot."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise CheckpointError("onnxruntime is not installed (it runs .onnx models): pip install -r "
                              "requirements.txt") from err
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's graph-optimisation notes are not for the user
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for every kind of bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({first[:160]})") from err
    metadata = session.get_modelmeta().custom_metadata_map
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if "mnist.normalization_mean" not in metadata or names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise CheckpointError(f"{path}: not an MNIST model exported by export.py (no mnist.* metadata or other "
                          f"inputs/outputs); export one with `python export.py --format onnx`")
    return OnnxModel(session, metadata, path)
