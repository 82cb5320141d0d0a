"""Model files: the one place a checkpoint is made, written, read and checked, an ONNX file is loaded, and the
model file a command uses by default is chosen.

A model file is data from a stranger, so reading one is careful: torch.load(weights_only=True) stops code from
running, and the archive, the model arguments and the weights' shapes are checked before anything large is
allocated. Every refusal is one CheckpointError line, phrased for a person. This module knows the models only
through cnn_pytorch's table; it does not train, and it knows nothing of the data but the normalisation that
the caller hands in.
"""
import copy
import inspect
import json
import math
import struct
import zipfile
from pathlib import Path

import torch

from cnn_pytorch import CLASSES, MODELS, build_model
from common import PROJECT_DIR, atomic_write

DEFAULT_MODEL = PROJECT_DIR / "results" / "best_model_simple_pt.pth"
PRETRAINED_MODEL = PROJECT_DIR / "pretrained" / "best_model_improved_pt.pth"  # shipped: works on a fresh clone
CHECKPOINT_FORMAT = "mnist-cnn/1"
INPUT_NAME, OUTPUT_NAME = "input", "logits"  # the names of an exported ONNX model's input and output


# What a checkpoint's model_args may hold, by constructor parameter name: (type, lowest, highest). The keys a
# model accepts are its constructor's parameters and a tuple argument keeps the length of its default, so a new
# model only needs a rule here for a parameter name not seen before. Widths stop at 4096: far above anything
# that helps on MNIST, and low enough that no accepted argument allocates gigabytes.
MODEL_ARG_RULES = {
    "channels": (int, 1, 4096),
    "hidden": (int, 1, 4096),
    "dropout": (float, 0.0, 1.0),  # [0, 1): nn.Dropout(1.0) would zero every activation
    "num_classes": (int, 10, 11),  # the ten digits; number_judge.py's judge adds "not one digit"
    "in_channels": (int, 1, 2),    # a grey picture; the judge also sees the ink around a candidate
}



class CheckpointError(Exception):
    """A file that is not a checkpoint of ours, or is damaged, phrased for a person in one line."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


def atomic_save(obj, path):
    """torch.save through common.atomic_write: a crash never leaves half a checkpoint.

    Saved through a file object: given a path, torch.save names the archive's root folder after the file, which
    here is the temporary name (with the writer's pid) rather than anything the file should carry.
    """
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
    """The checkpoint dict: everything needed to rebuild and use the model without flags.

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
        "classes": list(classes),
        "torch_version": torch.__version__.split("+")[0],
        **_plain(info),
    }


def save_checkpoint(path, model, model_name, normalization, model_args=None, classes=CLASSES, **info):
    """Write a model checkpoint atomically; info (epoch, val_accuracy, args, ...) is stored alongside."""
    atomic_save(make_checkpoint(model, model_name, normalization, model_args, classes, **info), path)


# A model file is data from a stranger. weights_only=True stops code; the checks below stop the rest before
# anything large is allocated: the zip archive is measured before torch.load reads it (and torch.load maps the
# file rather than reading it), and the weights' shapes are compared with those of the model the arguments
# describe, built on the meta device, which allocates nothing.
MAX_MODEL_FILE_BYTES = 512 * 2**20  # a .pth or .onnx file; the shipped model is 5 MB, the largest default 30 MB
MAX_PICKLE_BYTES = 16 * 2**20       # the checkpoint's dict without its tensors: a few kilobytes
MAX_ARCHIVE_ENTRIES = 4096          # one per tensor; a training state of the improved model has about 150
MAX_ARCHIVE_DIRECTORY_BYTES = 4 * 2**20  # zipfile makes an object per entry it finds there: bound the reading
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_REAL_INFO = ("val_accuracy", "test_accuracy", "test_loss", "training_seconds")  # numbers commands print
_INT_INFO = ("epoch", "epochs_run")


def _show(value, limit=60):
    """A stranger's value, short and on one line, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _mb(size):
    return f"{size / 2**20:,.1f} MB"


def _refuse(path, reason):
    return CheckpointError(f"{path}: refused, {reason}")


def _zip_directory_size(path, size):
    """(entries, bytes) the zip central directory claims, from the end records, before zipfile reads any of it.

    None when there is no end record (not a zip archive, or one cut short). Where a zip64 record can sit in two
    places (where the locator points, and just before the locator, where zipfile looks), the larger claim counts.
    """
    with open(path, "rb") as f:
        tail_start = max(0, size - (22 + 65535))  # the end record: 22 bytes and a comment of up to 64 kB
        f.seek(tail_start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        claims = [struct.unpack("<10xHL6x", tail[at:at + 22])]
        locator = tail_start + at - 20
        if locator >= 0:
            f.seek(locator)
            found = f.read(20)
            if found[:4] == b"PK\x06\x07":
                for offset in {struct.unpack("<8xQ4x", found)[0], locator - 56}:
                    if 0 <= offset <= size - 56:
                        f.seek(offset)
                        record = f.read(56)
                        if record[:4] == b"PK\x06\x06":
                            claims.append(struct.unpack("<32xQQ8x", record))
    return max(c[0] for c in claims), max(c[1] for c in claims)


def _check_archive(path):
    """torch.save writes a zip archive of uncompressed entries: measure it before torch.load reads any of it.

    A "zip bomb" (a small file whose entries claim gigabytes) or a directory of millions of entries is refused
    here, from the sizes the archive declares, which are checked against the file's own size.
    """
    size = path.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise _refuse(path, f"it is {_mb(size)}, more than the {_mb(MAX_MODEL_FILE_BYTES)} a model file of this "
                            f"project may be")
    counts = _zip_directory_size(path, size)
    if counts is None:
        raise _refuse(path, "it is not a readable PyTorch checkpoint (torch.save writes a zip archive; this is "
                            "not one, or it was cut short)")
    entries, directory = counts
    if entries > MAX_ARCHIVE_ENTRIES or directory > min(size, MAX_ARCHIVE_DIRECTORY_BYTES):
        raise _refuse(path, f"its archive claims {entries:,} entries in a {_mb(directory)} directory, more than a "
                            f"checkpoint holds or the file has room for")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
        if len(infos) > MAX_ARCHIVE_ENTRIES:
            raise zipfile.BadZipFile(f"{len(infos):,} entries")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as err:
        raise _refuse(path, f"it is not a readable PyTorch checkpoint (damaged archive: "
                            f"{' '.join(str(err).split())[:100]})") from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise _refuse(path, f"its archive entry {_show(info.filename)} is compressed, which torch.save never "
                                f"does (a zip bomb unpacks from such entries)")
        if info.compress_size != info.file_size or info.header_offset + info.file_size > size:
            raise _refuse(path, f"its archive entry {_show(info.filename)} claims {_mb(info.file_size)}, but the "
                                f"whole file is {_mb(size)}")
        if info.filename.endswith("/data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise _refuse(path, f"its data.pkl is {_mb(info.file_size)}; a checkpoint's is a few kilobytes")
        total += info.file_size
    if total > MAX_MODEL_FILE_BYTES:
        raise _refuse(path, f"its archive claims {_mb(total)}, more than the {_mb(MAX_MODEL_FILE_BYTES)} a model "
                            f"file of this project may hold")


def _load_weights_only(path):
    """torch.load with weights_only=True, mapped rather than read: tensors stay on disk until something uses them."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle errors, truncation, unsafe globals: all mean "not a file we can use"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it contains pickled code or objects that weights-only loading refuses"
        else:
            reason = f"it is not a readable PyTorch checkpoint ({first[:120]})"
        raise _refuse(path, reason) from None


def _check_arg(path, name, key, value, rule):
    kind, low, high = rule
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        expected = f"an integer from {low} to {high}" if low < high else f"{low}"
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and low <= value < high)
        expected = f"a number from {low} up to (not including) {high}"
    if not ok:
        raise _refuse(path, f"model_args {key}={_show(value)} for the {name!r} model: expected {expected}")


def check_model_args(path, name, model_args):
    """Only the model constructor's own parameters, each of the type, length and range MODEL_ARG_RULES allows."""
    if not isinstance(model_args, dict):
        raise _refuse(path, f"its model_args is a {type(model_args).__name__}, not a dict")
    params = {k: v for k, v in inspect.signature(MODELS[name]).parameters.items() if k in MODEL_ARG_RULES}
    for key, value in model_args.items():
        if key not in params:
            raise _refuse(path, f"model_args {_show(key)} is not an argument of the {name!r} model (it takes "
                                f"{', '.join(params)})")
        default = params[key].default
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise _refuse(path, f"model_args {key}={_show(value)} for the {name!r} model: expected a list of "
                                    f"{len(default)} values")
            for item in value:
                _check_arg(path, name, key, item, MODEL_ARG_RULES[key])
        else:
            _check_arg(path, name, key, value, MODEL_ARG_RULES[key])


def _check_weights(path, name, model_args, state_dict):
    """Same keys and shapes as the model the arguments describe (built on the meta device: nothing allocated),
    float or integer tensors only, and no NaN or infinity."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise _refuse(path, "it holds no state_dict of weights")
    try:
        with torch.device("meta"):
            expected = build_model(name, **model_args).state_dict()
    except (ValueError, TypeError, RuntimeError) as err:
        raise _refuse(path, f"its model_args {_show(model_args)} do not make a {name!r} model "
                            f"({' '.join(str(err).split())[:100]})") from None
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        detail = "; ".join(f"{what} {', '.join(_show(k, 40) for k in keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise _refuse(path, f"its weights do not fit the {name!r} model ({detail})")
    for key, want in expected.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            raise _refuse(path, f"weight {key!r} is a {type(got).__name__}, not a tensor")
        if got.layout != torch.strided or not (got.dtype.is_floating_point or got.dtype in _INT_DTYPES):
            kind = got.dtype if got.layout == torch.strided else got.layout
            raise _refuse(path, f"weight {key!r} is a {kind} tensor; weights are dense floats or integers")
        if got.shape != want.shape:
            described = f" with model_args {_show(model_args)}" if model_args else ""
            raise _refuse(path, f"weight {key!r} has shape {list(got.shape)}, but the {name!r} model{described} "
                                f"has {list(want.shape)} there")
    for key, tensor in state_dict.items():
        if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
            raise _refuse(path, f"weight {key!r} holds NaN or infinite values (a damaged file or a run that "
                                f"diverged)")


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_info(path, ckpt, expected_classes=CLASSES, in_channels=1):
    """What the commands read besides the weights: the normalisation, the classes and the numbers they print."""
    norm = ckpt.get("normalization")
    if not (isinstance(norm, dict) and _is_real(norm.get("mean")) and _is_real(norm.get("std"))
            and norm["std"] > 0):
        raise _refuse(path, f"its normalization {_show(norm)} is not {{'mean': number, 'std': positive number}}")
    classes = ckpt.get("classes")
    if not (isinstance(classes, list) and len(classes) == len(expected_classes)
            and all(isinstance(c, str) for c in classes)):
        raise _refuse(path, f"its classes {_show(classes)} are not a list of {len(expected_classes)} names")
    outputs, inputs = ckpt["model_args"].get("num_classes", len(CLASSES)), ckpt["model_args"].get("in_channels", 1)
    if outputs != len(expected_classes):
        raise _refuse(path, f"its model has {outputs} outputs, not {len(expected_classes)} "
                            f"({', '.join(expected_classes[:2])}, ...)")
    if inputs != in_channels:
        raise _refuse(path, f"its model takes {inputs} input channels, not {in_channels}")
    for key in _REAL_INFO + _INT_INFO:
        value = ckpt.get(key)
        ok = value is None or (_is_real(value) and (key not in _INT_INFO or isinstance(value, int)))
        if not ok:
            raise _refuse(path, f"its {key} is {_show(value)}, not a number")
    args = ckpt.get("args", {})
    if not isinstance(args, dict):
        raise _refuse(path, f"its args is a {type(args).__name__}, not a dict")
    for key in ("val_size", "seed"):  # export.py rebuilds the data split from these
        value = args.get(key, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63):
            raise _refuse(path, f"its args {key}={_show(value)} is not a whole number")


def _in_memory(value):
    """The same structure with every tensor copied out of the mapped file: the file may be replaced (resume does
    replace it) and Windows cannot replace a file that is still mapped."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        value = copy.copy(value)  # keeps an OrderedDict's _metadata, which load_state_dict reads
        for key in value:
            value[key] = _in_memory(value[key])
    elif type(value) in (list, tuple):
        value = type(value)(_in_memory(v) for v in value)
    return value


def read_checkpoint(path, classes=CLASSES, in_channels=1):
    """Load a checkpoint dict safely and check it; CheckpointError (one line) for anything else. classes: what
    the model's outputs must mean (the ten digits; number_judge.py's judge has an eleventh); in_channels: what
    its input must be (one grey channel; the judge has two).

    Weights only (a file from a stranger can never run code), the archive measured before it is read, and the
    weights checked against the model their arguments describe before anything that size is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_archive(path)
    ckpt = _load_weights_only(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {CHECKPOINT_FORMAT!r}); "
                              f"train one with `python train_pytorch.py`")
    name = ckpt.get("model")
    if not isinstance(name, str) or name not in MODELS:
        raise CheckpointError(f"{path}: unknown model {_show(name)} (known: {', '.join(MODELS)})")
    model_args = ckpt.setdefault("model_args", {})
    check_model_args(path, name, model_args)
    _check_weights(path, name, model_args, ckpt.get("state_dict"))
    _check_info(path, ckpt, classes, in_channels)
    return _in_memory(ckpt)


def check_model_type(path, found, expected):
    """--model_type guards against the wrong file: a mismatch is an error, never a silent rebuild."""
    if expected is not None and expected != found:
        raise CheckpointError(f"{path}: holds a {found!r} model, not {expected!r}; drop --model_type or pass the "
                              f"matching one")


def load_checkpoint(path, device="cpu", expected_model=None, classes=CLASSES, in_channels=1):
    """Rebuild the model of a checkpoint in eval mode on `device`: returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path, classes, in_channels)
    check_model_type(path, ckpt["model"], expected_model)
    model = build_model(ckpt["model"], **ckpt["model_args"])  # checked: the weights fit, nothing oversized
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:  # read_checkpoint rules these out; kept as a last guard
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


_ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT
_ONNX_INPUT = ("N", 1, 28, 28)


def _onnx_tensors(graph):
    """Every tensor an ONNX graph stores (initializers and constants, subgraphs included)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _onnx_tensors(sub)


def _onnx_dims(value_info):
    """The declared shape of a graph input, e.g. ("N", 1, 28, 28): a name (or "?") where a dimension is dynamic."""
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def _check_onnx(path, proto, onnx):
    """One of ours: the mnist.* metadata export.py writes, and one float32 input of shape (N, 1, 28, 28)."""
    not_ours = (f"{path}: not an MNIST model exported by export.py ({{}}); export one with "
                f"`python export.py --format onnx`")
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if "mnist.normalization_mean" not in metadata or [i.name for i in inputs] != [INPUT_NAME] \
            or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise CheckpointError(not_ours.format("no mnist.* metadata or other inputs/outputs"))
    try:
        mean, std = float(metadata["mnist.normalization_mean"]), float(metadata["mnist.normalization_std"])
        classes = json.loads(metadata["mnist.classes"])
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(not_ours.format("its mnist.* metadata is incomplete or unreadable")) from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise CheckpointError(not_ours.format(f"normalization mean {mean}, std {std}"))
    if not (isinstance(classes, list) and len(classes) == len(CLASSES) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(not_ours.format(f"mnist.classes {_show(classes)} is not {len(CLASSES)} names"))
    declared = inputs[0].type.tensor_type
    dims = _onnx_dims(inputs[0])
    if declared.elem_type != _ONNX_FLOAT or len(dims) != 4 or dims[1:] != _ONNX_INPUT[1:] \
            or (isinstance(dims[0], int) and dims[0] < 1):
        shape = "(" + ", ".join(str(d) for d in dims) + ")"
        try:
            kind = onnx.TensorProto.DataType.Name(declared.elem_type).lower()
        except ValueError:
            kind = f"type {declared.elem_type}"
        raise CheckpointError(f"{path}: refused, its input is {kind} {shape}, not float (N, 1, 28, 28): not a "
                              f"model for 28x28 MNIST digits")
    if any(t.data_location == 1 for t in _onnx_tensors(graph)):  # onnx.TensorProto.EXTERNAL
        raise CheckpointError(f"{path}: refused, it keeps weights in other files (ONNX external data); "
                              f"export.py writes everything into one file")


def load_onnx_model(path, threads=None):
    """Open an ONNX file written by export.py with ONNX Runtime (CPU). CheckpointError (one line) when it cannot.

    Like a checkpoint, an .onnx file may come from a stranger: its size is capped before it is read, it is parsed
    and checked (our metadata, input (N, 1, 28, 28), no weights in other files) before ONNX Runtime builds it,
    and ONNX Runtime gets the checked bytes, not the path, so it cannot read any other file.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise CheckpointError("onnxruntime is not installed (it runs .onnx models): pip install -r "
                              "requirements.txt") from err
    try:
        import onnx
    except ImportError as err:
        raise CheckpointError("onnx is not installed (it checks .onnx files before they run): pip install -r "
                              "requirements.txt") from err
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    size = path.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise _refuse(path, f"it is {_mb(size)}, more than the {_mb(MAX_MODEL_FILE_BYTES)} a model file of this "
                            f"project may be")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf's DecodeError, and whatever else a garbled file raises
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not an ONNX model, ONNX Runtime cannot load it ({first[:120]})") from None
    _check_onnx(path, proto, onnx)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's graph-optimisation notes are not for the user
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for every kind of bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({first[:160]})") from err
    metadata = session.get_modelmeta().custom_metadata_map
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT_NAME], [OUTPUT_NAME]) or session.get_inputs()[0].shape[1:] != list(_ONNX_INPUT[1:]):
        raise CheckpointError(f"{path}: not an MNIST model exported by export.py (ONNX Runtime sees other "
                              f"inputs/outputs); export one with `python export.py --format onnx`")
    return OnnxModel(session, metadata, path)
