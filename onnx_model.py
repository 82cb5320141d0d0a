"""Exported ONNX files: the one way this project opens and runs one (predict.py for .onnx files, export.py to check
what it wrote). export.py writes them; this module only reads.

Like a checkpoint, an .onnx file may come from a stranger: its size is capped before it is read, it is parsed and
checked (our metadata, input (N, 1, 28, 28), no weights in other files) before ONNX Runtime builds it, and ONNX
Runtime gets the checked bytes, not the path, so it cannot read any other file. Refusals are one
checkpoint.CheckpointError line, as for checkpoints.
"""
import json
import math
from pathlib import Path

import numpy as np

from checkpoint import MAX_MODEL_FILE_BYTES, CheckpointError
from cnn_pytorch import CLASSES
from common import first_line

INPUT_NAME, OUTPUT_NAME = "input", "logits"  # the names of an exported model's input and output


class OnnxModel:
    """An exported ONNX model run by ONNX Runtime: call it on normalised float32 (N, 1, 28, 28), get logits (N, C).

    `normalization` ({"mean", "std"}) and `classes` come from the file's own metadata, so the file is all that a
    deployment needs.
    """

    def __init__(self, session, metadata):
        self.session = session
        self.normalization = {"mean": float(metadata["mnist.normalization_mean"]),
                              "std": float(metadata["mnist.normalization_std"])}
        self.classes = json.loads(metadata["mnist.classes"])
        self.model_name = metadata.get("mnist.model", "unknown")

    def __call__(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"expected a float32 batch of shape (N, 1, 28, 28), got {x.shape}")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


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
        raise CheckpointError(not_ours.format(f"mnist.classes {repr(classes)[:60]} is not {len(CLASSES)} names"))
    declared = inputs[0].type.tensor_type  # its shape, e.g. ("N", 1, 28, 28): a name or "?" where dynamic
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in declared.shape.dim)
    if declared.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or dims[1:] != (1, 28, 28) \
            or (isinstance(dims[0], int) and dims[0] < 1):
        shape = "(" + ", ".join(str(d) for d in dims) + ")"
        try:
            kind = onnx.TensorProto.DataType.Name(declared.elem_type).lower()
        except ValueError:
            kind = f"type {declared.elem_type}"
        raise CheckpointError(f"{path}: refused, its input is {kind} {shape}, not float (N, 1, 28, 28): not a "
                              f"model for 28x28 MNIST digits")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _onnx_tensors(graph)):
        raise CheckpointError(f"{path}: refused, it keeps weights in other files (ONNX external data); "
                              f"export.py writes everything into one file")


def load_onnx_model(path, threads=None):
    """Open an ONNX file written by export.py with ONNX Runtime (CPU); CheckpointError (one line) when it cannot."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as err:
        raise CheckpointError(f"{err.name} is not installed (it checks and runs .onnx models): pip install -r "
                              f"requirements.txt") from err
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    size = path.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise CheckpointError(f"{path}: refused, it is {size / 2**20:,.1f} MB, more than the "
                              f"{MAX_MODEL_FILE_BYTES / 2**20:,.1f} MB a model file of this project may be")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf's DecodeError, and whatever else a garbled file raises
        raise CheckpointError(f"{path}: not an ONNX model, ONNX Runtime cannot load it ({first_line(err, 120)})") \
            from None
    _check_onnx(path, proto, onnx)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's graph-optimisation notes are not for the user
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for every kind of bad file
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({first_line(err, 160)})") from err
    return OnnxModel(session, session.get_modelmeta().custom_metadata_map)
