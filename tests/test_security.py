"""A model file is data from a stranger: every hostile or damaged one is refused in one line, fast, small.

Each case starts from a real checkpoint written by our own save_checkpoint (or a real ONNX graph) and changes
one thing, the way an attacker or a broken disk would. Each is refused by the library (CheckpointError, one
line, well under a second) and by predict.py's command line (one line on stderr, exit 2); evaluate.py,
export.py and app.py refuse a hostile file the same way. The oversized layer, the case that once allocated
5.4 GB, is also run in a fresh process that measures its own peak memory.
"""
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import checkpoint
import cnn_pytorch
from cnn_pytorch import build_model
from checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from onnx_model import load_onnx_model
from data_loader import NORMALIZATION

ROOT = Path(__file__).resolve().parent.parent
FAST = 1.0  # seconds: the bound for a refusal


# ---- crafting files ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real simple-model checkpoint (5 MB), written by save_checkpoint; the crafted files start from it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "good.pth"
    save_checkpoint(path, build_model("simple"), "simple", NORMALIZATION, epoch=1, val_accuracy=0.9)
    return path


def tampered(good, folder, change, name="hostile.pth"):
    """A copy of the good checkpoint's dict after change(ckpt), saved with torch.save as an attacker would."""
    ckpt = torch.load(good, weights_only=True)
    change(ckpt)
    path = folder / name
    torch.save(ckpt, path)
    return path


def set_in(*keys_and_value):
    *keys, value = keys_and_value

    def change(ckpt):
        target = ckpt
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return change


def with_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[7] = float("nan")
    return tensor


def central_directory(data):
    """[(offset of the entry's central directory record, its ZipInfo)], read from the archive's own structures."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = {i.filename: i for i in archive.infolist()}
        start = archive.start_dir
    records, at = [], start
    while data[at:at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[at + 28:at + 34])
        name = data[at + 46:at + 46 + name_len].decode()
        records.append((at, infos[name]))
        at += 46 + name_len + extra_len + comment_len
    return records


def zip_bomb(good, folder, claimed=3 * 2**30):
    """The good archive with its largest entry claiming `claimed` bytes (3 GB): the headers say so, the file is 5 MB.

    The sizes are patched in both places a reader looks: the central directory and the entry's local header.
    """
    data = bytearray(good.read_bytes())
    at, info = max(central_directory(bytes(data)), key=lambda r: r[1].file_size)
    struct.pack_into("<LL", data, at + 20, claimed, claimed)               # compressed, uncompressed size
    struct.pack_into("<LL", data, info.header_offset + 18, claimed, claimed)
    path = folder / "bomb.pth"
    path.write_bytes(bytes(data))
    return path


def deflated(good, folder):
    """The good archive with its entries compressed, as zip bombs are: torch.save never compresses."""
    path = folder / "deflated.pth"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info))
    return path


def many_entries(good, folder):
    """The good archive whose end records claim ten million entries (zipfile would build an object for each)."""
    data = bytearray(good.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 0xFFFF, 0xFFFF)
    zip64 = data.rfind(b"PK\x06\x06")
    if zip64 >= 0:
        struct.pack_into("<QQ", data, zip64 + 24, 10**7, 10**7)
    path = folder / "entries.pth"
    path.write_bytes(bytes(data))
    return path


def truncated(good, folder):
    path = folder / "truncated.pth"
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    return path


def legacy_pickle(good, folder):
    """The old non-zip format (a bare pickle): refused rather than read without the archive's size checks."""
    path = folder / "legacy.pth"
    with open(path, "wb") as f:
        pickle.dump({"format": "mnist-cnn/1", "model": "simple", "model_args": {}}, f)
    return path


# name: (how to make it from the good file and a folder, words the one-line refusal must contain)
HOSTILE = {
    "unknown_key": (lambda g, d: tampered(g, d, set_in("model_args", {"bogus": 1})), "not an argument"),
    "wrong_type": (lambda g, d: tampered(g, d, set_in("model_args", {"hidden": "384"})), "expected an integer"),
    "wrong_length": (lambda g, d: tampered(g, d, set_in("model_args", {"channels": [32, 64, 128]})),
                     "expected a list of 2"),
    "bad_dropout": (lambda g, d: tampered(g, d, set_in("model_args", {"dropout": 1.0})), "up to (not including) 1"),
    "oversized_layer": (lambda g, d: tampered(g, d, set_in("model_args", {"hidden": 400000})),
                        "expected an integer from 1 to 4096"),
    "shape_mismatch": (lambda g, d: tampered(g, d, set_in("model_args", {"hidden": 4096})), "copying a param with shape torch.Size([384, 3136])"),
    "resized_weight": (lambda g, d: tampered(g, d, set_in("state_dict", "classifier.5.weight", torch.zeros(12, 384))),
                       "copying a param with shape torch.Size([12, 384])"),
    "missing_weight": (lambda g, d: tampered(g, d, lambda c: c["state_dict"].pop("features.0.bias")),
                       'Missing key(s) in state_dict: "features.0.bias"'),
    "non_tensor_weight": (lambda g, d: tampered(g, d, set_in("state_dict", "classifier.5.bias", [0.0] * 10)),
                          "is a list; weights are dense float or integer tensors"),
    "complex_weight": (lambda g, d: tampered(g, d, set_in("state_dict", "classifier.5.bias",
                                                          torch.zeros(10, dtype=torch.complex64))),
                       "is a torch.complex64; weights are dense float or integer tensors"),
    "nan_weight": (lambda g, d: tampered(g, d, set_in("state_dict", "classifier.2.weight", with_nan)),
                   "NaN or infinite"),
    "zero_std": (lambda g, d: tampered(g, d, set_in("normalization", {"mean": 0.1, "std": 0.0})), "normalization"),
    "truncated": (truncated, "not a readable PyTorch checkpoint"),
    "zip_bomb": (zip_bomb, "not a readable PyTorch checkpoint"),
    "deflated": (deflated, "not a readable PyTorch checkpoint"),
    "many_entries": (many_entries, "not a readable PyTorch checkpoint"),
    "legacy_pickle": (legacy_pickle, "not a readable PyTorch checkpoint"),
}


@pytest.fixture(params=list(HOSTILE))
def hostile(request, good, tmp_path):
    make, words = HOSTILE[request.param]
    return make(good, tmp_path), words


def refusal(call):
    """(the CheckpointError's message, seconds) of call(), which must raise it."""
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        call()
    return str(err.value), time.perf_counter() - started


# ---- checkpoints: the library and the command line -------------------------------------------------------

def test_the_good_file_loads(good):
    model, ckpt = load_checkpoint(good)
    assert ckpt["model"] == "simple" and not model.training


def test_hostile_checkpoint_is_refused_in_one_line_fast(hostile):
    path, words = hostile
    message, seconds = refusal(lambda: load_checkpoint(path))
    assert words in message and str(path) in message and "\n" not in message, message
    assert seconds < FAST, f"{seconds:.2f} s to refuse {path.name}"
    assert refusal(lambda: read_checkpoint(path))[0] == message  # what --resume calls


def one_line_exit_2(capsys, main, argv):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err, (code, err)
    return err


def test_predict_refuses_a_hostile_checkpoint_in_one_line(hostile, capsys):
    import predict
    path, words = hostile
    err = one_line_exit_2(capsys, predict.main, ["--image_path", "digit.png", "--model_path", str(path)])
    assert err.startswith("predict.py: error: ") and words in err


@pytest.mark.parametrize("command", ["evaluate", "export", "app"])
def test_every_command_refuses_a_hostile_checkpoint_in_one_line(command, good, tmp_path, capsys):
    import importlib
    path = tampered(good, tmp_path, set_in("model_args", {"hidden": 400000}))
    # export: pt2, since --format onnx first imports the ONNX packages (2 s), which is not the refusal's time
    argv = {"evaluate": ["--model_path", str(path), "--save_dir", str(tmp_path / "out"), "--device", "cpu"],
            "export": ["--model_path", str(path), "--save_dir", str(tmp_path / "out"), "--format", "pt2"],
            "app": ["--model_path", str(path), "--port", "0"]}[command]
    main = importlib.import_module(command).main  # the import (matplotlib, onnx, ...) is not the refusal's time
    started = time.perf_counter()
    err = one_line_exit_2(capsys, main, argv)
    assert "from 1 to 4096" in err and time.perf_counter() - started < FAST, err


OVERSIZED_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    import predict
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        code = predict.main(["--image_path", "digit.png", "--model_path", sys.argv[2]])
    except SystemExit as stop:  # the one-line refusal exits with its code
        code = stop.code
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"code": code, "seconds": seconds, "rss_growth_mb": (after - before) / 1024}))
""")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux (bytes on macOS)")
def test_oversized_layer_costs_no_memory_in_a_fresh_process(good, tmp_path):
    """predict.py in its own process: the file that made it allocate 5.4 GB for 18 s is refused in a blink."""
    files = (tampered(good, tmp_path, set_in("model_args", {"hidden": 400000}), "hidden_400000.pth"),
             tampered(good, tmp_path, set_in("model_args", {"hidden": 4096}), "hidden_4096.pth"),  # in range, wrong
             zip_bomb(good, tmp_path))
    for hostile in files:
        done = subprocess.run([sys.executable, "-c", OVERSIZED_PROBE, str(ROOT), str(hostile)], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        assert probe["code"] == 2 and done.stderr.count("\n") == 1, done.stderr
        print(f"{hostile.name}: refused in {probe['seconds'] * 1000:.0f} ms, peak memory "
              f"+{probe['rss_growth_mb']:.1f} MB: {done.stderr.strip()}")
        assert probe["seconds"] < FAST and probe["rss_growth_mb"] < 100, probe


def test_size_caps_apply_before_anything_is_read(good, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_MODEL_FILE_BYTES", 2**20)
    message, _ = refusal(lambda: read_checkpoint(good))
    assert "more than the 1.0 MB a model file of this project may be" in message


# ---- ONNX files ------------------------------------------------------------------------------------------

def onnx_file(path, shape=("N", 1, 28, 28), metadata=True, external=False):
    """A real ONNX graph (flatten, one matrix product: logits) with export.py's names and metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    features = int(np.prod(shape[1:]))
    weight = numpy_helper.from_array(np.full((features, 10), 0.01, np.float32), "weight")
    if external:  # the weights "in another file": a path an attacker picks
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../../../../etc/passwd"), ("length", "4096")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "weight"], ["logits"])],
        "mnist", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 10])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        for key, value in {"mnist.model": "simple", "mnist.normalization_mean": "0.1307",
                           "mnist.normalization_std": "0.3081", "mnist.classes": json.dumps(list("0123456789"))}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


def test_an_onnx_file_like_ours_runs(tmp_path):
    import numpy as np
    model = load_onnx_model(onnx_file(tmp_path / "ours.onnx"))
    assert model(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)


def a_picture(path):
    """A PNG named .onnx."""
    from PIL import Image
    Image.new("L", (28, 28)).save(path, "PNG")
    return path


HOSTILE_ONNX = {
    "input_3x32x32": (lambda d: onnx_file(d / "cifar.onnx", shape=("N", 3, 32, 32)), "its input is float (N, 3, 32, 32)"),
    "fixed_batch_0": (lambda d: onnx_file(d / "empty.onnx", shape=(0, 1, 28, 28)), "its input is float (0, 1, 28, 28)"),
    "not_ours": (lambda d: onnx_file(d / "foreign.onnx", metadata=False), "not an MNIST model exported by export.py"),
    "not_onnx": (lambda d: a_picture(d / "picture.onnx"), "not an ONNX model"),
    "external_data": (lambda d: onnx_file(d / "external.onnx", external=True), "keeps weights in other files"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ONNX))
def test_hostile_onnx_is_refused_by_the_library_and_predict(case, tmp_path, capsys):
    import predict
    make, words = HOSTILE_ONNX[case]
    path = make(tmp_path)
    message, seconds = refusal(lambda: load_onnx_model(path))
    assert words in message and "\n" not in message and seconds < FAST, message
    err = one_line_exit_2(capsys, predict.main, ["--image_path", "digit.png", "--model_path", str(path)])
    assert words in err


def test_onnx_size_cap_applies_before_it_is_read(tmp_path, monkeypatch):
    path = onnx_file(tmp_path / "ours.onnx")
    import onnx_model
    monkeypatch.setattr(onnx_model, "MAX_MODEL_FILE_BYTES", 1000)
    assert "more than the" in refusal(lambda: load_onnx_model(path))[0]
