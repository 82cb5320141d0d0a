"""Model files: the one place a checkpoint is made, written, read and checked, and where the model file a
command uses by default is chosen.

A checkpoint is one plain dict (tensors, numbers, strings, lists, dicts), written with torch.save through an
atomic rename. A model file may come from a stranger, so reading one is careful: PyTorch's weights-only loader
runs no code, and the model arguments and the weights' shapes are checked against the model they describe,
built on the meta device (which allocates nothing), before the weights go anywhere. Every refusal is one
CheckpointError line. This module knows the models only through cnn_pytorch's table; it does not train.
"""
import copy
import inspect
import math
from pathlib import Path

import torch

from cnn_pytorch import CLASSES, MODELS, build_model
from common import PROJECT_DIR, atomic_write

DEFAULT_MODEL = PROJECT_DIR / "results" / "best_model_simple_pt.pth"
PRETRAINED_MODEL = PROJECT_DIR / "pretrained" / "best_model_improved_pt.pth"  # shipped: works on a fresh clone
CHECKPOINT_FORMAT = "mnist-cnn/1"
# The largest file of ours is a training state of the improved CNN (about 30 MB, with Adam's moments).
MAX_MODEL_FILE_BYTES = 128 * 2**20

# What a checkpoint's model_args may hold, by constructor parameter name: (type, lowest, highest). A tuple
# argument keeps the length of its default. Channels stop at 512 and dense layers at 4096: far above anything
# that helps on MNIST, and low enough that no accepted argument allocates gigabytes.
MODEL_ARG_RULES = {
    "channels": (int, 1, 512),
    "hidden": (int, 1, 4096),
    "dropout": (float, 0.0, 1.0),       # [0, 1): nn.Dropout(1.0) would zero every activation
    "conv_dropout": (float, 0.0, 1.0),
    "num_classes": (int, 10, 10),       # the ten digits
}
_NUMBER_INFO = ("val_accuracy", "test_accuracy", "test_loss", "training_seconds", "epoch", "epochs_run")


class CheckpointError(Exception):
    """A file that is not a checkpoint of ours, or is damaged, phrased for a person in one line."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------------------------- writing

def atomic_save(obj, path):
    """torch.save through common.atomic_write: a crash never leaves half a checkpoint. Saved through a file
    object, so the archive's root folder is not named after the temporary file."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


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


def make_checkpoint(model, model_name, normalization, model_args=None, classes=CLASSES, **info):
    """The checkpoint dict: everything needed to rebuild and use the model without flags. normalization is
    data_loader.NORMALIZATION, handed in: the data is the data module's business."""
    return {"format": CHECKPOINT_FORMAT, "model": model_name, "model_args": _plain(model_args or {}),
            "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "normalization": {"mean": float(normalization["mean"]), "std": float(normalization["std"])},
            "classes": list(classes), "torch_version": torch.__version__.split("+")[0], **_plain(info)}


def save_checkpoint(path, model, model_name, normalization, model_args=None, classes=CLASSES, **info):
    atomic_save(make_checkpoint(model, model_name, normalization, model_args, classes, **info), path)


# ---------------------------------------------------------------------------------------------- reading

def _show(value, limit=60):
    """A stranger's value, short and on one line, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse(path, reason):
    return CheckpointError(f"{path}: refused, {reason}")


def _load(path):
    """torch.load(weights_only=True): no code runs, only tensors and plain values are built. mmap=True maps the
    file instead of reading it, so a tensor costs memory only when something uses it, and PyTorch's zip
    reader refuses an archive whose entries claim more than the file holds, or are compressed (as zip bombs
    are; torch.save never compresses)."""
    size = path.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise _refuse(path, f"it is {size / 2**20:,.1f} MB, more than the {MAX_MODEL_FILE_BYTES / 2**20:,.1f} MB "
                            f"a model file of this project may be")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle errors, damaged archives, unsafe globals: all "not a file we can use"
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise _refuse(path, "it contains pickled code or objects that weights-only loading refuses") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _refuse(path, f"it is not a readable PyTorch checkpoint ({first[:120]})") from None


def _is_number(value, kind=float):
    return isinstance(value, (int,) if kind is int else (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_model_args(path, name, model_args):
    """Only the model constructor's own parameters, each of the type, length and range MODEL_ARG_RULES allows."""
    if not isinstance(model_args, dict):
        raise _refuse(path, f"its model_args is a {type(model_args).__name__}, not a dict")
    params = {k: v for k, v in inspect.signature(MODELS[name]).parameters.items() if k in MODEL_ARG_RULES}
    for key, value in model_args.items():
        if key not in params:
            raise _refuse(path, f"model_args {_show(key)} is not an argument of the {name!r} model (it takes "
                                f"{', '.join(params)})")
        default, (kind, low, high) = params[key].default, MODEL_ARG_RULES[key]
        if isinstance(default, tuple) and (not isinstance(value, (list, tuple)) or len(value) != len(default)):
            raise _refuse(path, f"model_args {key}={_show(value)} for the {name!r} model: expected a list of "
                                f"{len(default)} values")
        for item in value if isinstance(default, tuple) else [value]:
            if kind is int and not (_is_number(item, int) and low <= item <= high):
                raise _refuse(path, f"model_args {key}={_show(value)} for the {name!r} model: expected an "
                                    f"integer from {low} to {high}")
            if kind is float and not (_is_number(item) and low <= item < high):
                raise _refuse(path, f"model_args {key}={_show(value)} for the {name!r} model: expected a number "
                                    f"from {low} up to (not including) {high}")


def _check_weights(path, name, model_args, state_dict):
    """Dense float or integer tensors, which PyTorch's load_state_dict takes into the model the arguments
    describe (the same names and shapes; the model is built on the meta device, so nothing is allocated, and
    assign=True hands it the tensors rather than copying them), and no NaN or infinity."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise _refuse(path, "it holds no state_dict of weights")
    for key, value in state_dict.items():
        kind = value.dtype if isinstance(value, torch.Tensor) and value.layout == torch.strided else \
            getattr(value, "layout", type(value).__name__)
        if not isinstance(kind, torch.dtype) or kind.is_complex or kind == torch.bool:
            raise _refuse(path, f"weight {key!r} is a {kind}; weights are dense float or integer tensors")
    with torch.device("meta"):
        model = build_model(name, **model_args)
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as err:
        described = f" with model_args {_show(model_args)}" if model_args else ""
        raise _refuse(path, f"its weights do not fit the {name!r} model{described} ({str(err)[:300]})") from None
    for key, value in state_dict.items():
        if value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise _refuse(path, f"weight {key!r} holds NaN or infinite values (a damaged file or a run that "
                                f"diverged)")


def _check_info(path, ckpt):
    """What the commands read besides the weights: the normalisation, the classes and the numbers they print."""
    norm = ckpt.get("normalization")
    if not (isinstance(norm, dict) and _is_number(norm.get("mean")) and _is_number(norm.get("std"))
            and norm["std"] > 0):
        raise _refuse(path, f"its normalization {_show(norm)} is not {{'mean': number, 'std': positive number}}")
    found = ckpt.get("classes")
    if not (isinstance(found, list) and len(found) == len(CLASSES) and all(isinstance(c, str) for c in found)):
        raise _refuse(path, f"its classes {_show(found)} are not a list of {len(CLASSES)} names")
    for key in _NUMBER_INFO:
        if ckpt.get(key) is not None and not _is_number(ckpt[key], int if key.startswith("epoch") else float):
            raise _refuse(path, f"its {key} is {_show(ckpt[key])}, not a number")
    args = ckpt.get("args", {})
    if not isinstance(args, dict):
        raise _refuse(path, f"its args is a {type(args).__name__}, not a dict")
    for key in ("val_size", "seed"):  # export.py and evaluate.py rebuild the data split from these
        if not (_is_number(args.get(key, 0), int) and 0 <= args.get(key, 0) < 2**63):
            raise _refuse(path, f"its args {key}={_show(args[key])} is not a whole number")


def read_checkpoint(path):
    """A checkpoint dict, loaded safely and checked; CheckpointError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {CHECKPOINT_FORMAT!r}); "
                              f"train one with `python train_pytorch.py`")
    name = ckpt.get("model")
    if not isinstance(name, str) or name not in MODELS:
        raise CheckpointError(f"{path}: unknown model {_show(name)} (known: {', '.join(MODELS)})")
    check_model_args(path, name, ckpt.setdefault("model_args", {}))
    _check_weights(path, name, ckpt["model_args"], ckpt.get("state_dict"))
    _check_info(path, ckpt)
    return copy.deepcopy(ckpt)  # out of the mapped file: resume replaces it, and Windows cannot while mapped


def check_model_type(path, found, expected):
    """--model_type guards against the wrong file: a mismatch is an error, never a silent rebuild."""
    if expected is not None and expected != found:
        raise CheckpointError(f"{path}: holds a {found!r} model, not {expected!r}; drop --model_type or pass the "
                              f"matching one")


def load_checkpoint(path, device="cpu", expected_model=None):
    """Rebuild the model of a checkpoint in eval mode on `device`: returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    check_model_type(path, ckpt["model"], expected_model)
    model = build_model(ckpt["model"], **ckpt["model_args"])  # checked: the weights fit, nothing oversized
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------- which file

def default_model_path():
    """results/best_model_simple_pt.pth, else the newest results/best_model_*.pth, else the shipped model."""
    trained = sorted(DEFAULT_MODEL.parent.glob("best_model_*.pth"), key=lambda p: p.stat().st_mtime)
    return DEFAULT_MODEL if DEFAULT_MODEL.is_file() else trained[-1] if trained else PRETRAINED_MODEL


def model_path_or_default(path=None):
    """The model file a command uses, the same way for every command that takes one (predict, app, evaluate,
    export): the one given (as typed from the current folder, else from the project folder), else
    default_model_path(), which must exist."""
    if path:
        path = Path(path)
        if not path.exists() and not path.is_absolute() and (PROJECT_DIR / path).exists():
            return PROJECT_DIR / path
        return path
    found = default_model_path()
    if not found.is_file():
        raise CheckpointError(f"no trained model: neither {DEFAULT_MODEL} nor the shipped {PRETRAINED_MODEL} exists; "
                              f"train one with `python train_pytorch.py` or pass --model_path")
    return found
