"""Export a trained checkpoint for deployment: python export.py --model_path results/best_model_simple_pt.pth

Writes to results/export/, each artifact checked against the PyTorch model on the MNIST test set, and prints a
comparison table that is also saved as results/export/report.md:

  <model>.pt2        a torch.export program (torch.export.save): loads with `torch.export.load(path).module()`,
                     no code of ours needed. It replaces TorchScript, which torch deprecates (torch.jit.trace and
                     torch.jit.save raise FutureWarnings in torch 2.14): --format torchscript is refused with one
                     line that says so, rather than writing a file of another kind than asked for.
  <model>.onnx       ONNX with a dynamic batch dimension (torch's dynamo exporter), checked with onnx's checker,
                     run with ONNX Runtime: same prediction for every image, logits within 1e-4.
  <model>_int8.onnx  post-training static 8-bit quantisation of that ONNX model by ONNX Runtime: every Conv and
                     Gemm (the Linear layers) gets 8-bit weights (per channel) and 8-bit activations whose ranges
                     were calibrated on training images, the ReLUs and max-pools between them run on 8 bits too,
                     and only the logits stay float so that they are never clipped. About 25% of the fp32 size.
                     Weights and activations are both unsigned (U8U8), so every CPU computes the same integers
                     (see quantize_int8). ONNX Runtime runs it with integer kernels on any CPU, unlike torch's own
                     paths: the eager/FX torch.ao.quantization is deprecated, and PT2E (now in torchao) only runs
                     int8 kernels after torch.compile, which needs a C++ compiler where the model runs.

Both ONNX files say how to feed them in their metadata (normalisation mean and std, classes), and
onnx_model.load_onnx_model() is the one way this project runs them (predict.py uses it for .onnx files).
"""
import contextlib
import functools
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data_loader
from checkpoint import CheckpointError, load_checkpoint, model_path_or_default
from onnx_model import INPUT_NAME, OUTPUT_NAME, load_onnx_model
from common import PROJECT_DIR, OneLineParser, atomic_write, cpu_name, print_error


# What each artifact must meet; the export fails (exit code 1) when one does not.
LOGIT_TOLERANCE = 1e-4          # fp32 exports against the PyTorch model, every logit of every image
INT8_MAX_SIZE_RATIO = 0.30      # int8 file size / fp32 ONNX file size
INT8_MAX_ACCURACY_DROP = 0.001  # 0.1 percentage point of test accuracy below the PyTorch model

FORMATS = ("pt2", "onnx", "int8")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # exporter, its ONNX writer, the runtime and quantiser
NEEDS = {"pt2": (), "onnx": ONNX_PACKAGES, "int8": ONNX_PACKAGES}
ONNX_OPSET = 18  # runs on ONNX Runtime 1.14+ (and its web and mobile builds); torch's default, 20, needs 1.17+


class ExportError(Exception):
    """An export that cannot be made or loaded, phrased for a person."""


def parse_args(argv=None):
    p = OneLineParser(prog="export.py", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=None,
                   help="checkpoint written by train_pytorch.py (a relative path is looked up from the current "
                        "folder, then from the project folder); default: results/best_model_simple_pt.pth, else "
                        "the newest results/best_model_*.pth, else the shipped pretrained/best_model_improved_pt.pth")
    p.add_argument("--format", default="all", choices=["all", *FORMATS, "torchscript"],
                   help="what to write: all, pt2 (torch.export program, which replaces TorchScript), onnx, "
                        "int8 (also writes the fp32 .onnx it is quantised from)")
    p.add_argument("--save_dir", default="results/export",
                   help="where the artifacts and report.md go (relative paths are taken from the project folder)")
    p.add_argument("--eval_images", type=int, default=None,
                   help="check on the first N test images (default: all 10,000)")
    p.add_argument("--calibration_images", type=int, default=1000,
                   help="training images (never validation or test) that calibrate the int8 activation ranges")
    p.add_argument("--bench_seconds", type=float, default=2.0,
                   help="seconds spent timing each artifact at batch 1 and again at batch 256")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads for PyTorch and ONNX Runtime alike in the throughput column (latency is "
                        "timed on one thread for all)")
    p.add_argument("--data_dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    return p


def check_args(parser, args):
    """Everything that can be wrong with the flags is caught here, before anything is loaded or written."""
    if args.format == "torchscript":
        parser.error("TorchScript is deprecated in torch (torch.jit.trace/save warn FutureWarning): use --format "
                     "pt2, a torch.export program that loads with torch.export.load(path).module()")
    args.formats = list(FORMATS) if args.format == "all" else [args.format]
    if "int8" in args.formats and "onnx" not in args.formats:
        args.formats.insert(0, "onnx")  # int8 is quantised from the fp32 ONNX model, which is kept alongside
    if args.eval_images is not None and args.eval_images < 1:
        parser.error(f"--eval_images must be at least 1, got {args.eval_images}")
    if args.calibration_images < 1 or args.threads < 1 or args.bench_seconds < 0:
        parser.error("--calibration_images and --threads must be at least 1, --bench_seconds at least 0")
    args.save_dir = parser.output_dir(args.save_dir)
    try:
        args.model_path = model_path_or_default(args.model_path)
    except CheckpointError as err:
        parser.error(str(err))


def require(module, purpose):
    """Import an optional dependency, or say in one line what is missing and how to get it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExportError(f"{module} is not installed ({purpose}): pip install -r requirements.txt "
                          f"(or pip install {' '.join(ONNX_PACKAGES)})") from err


# ---------------------------------------------------------------------------------------------- the metadata

def artifact_metadata(ckpt, source):
    """What a deployment needs to feed the model, stored in the file itself (ONNX metadata_props, .pt2 extra file)."""
    norm = ckpt["normalization"]
    return {
        "mnist.model": ckpt["model"],
        "mnist.normalization_mean": repr(float(norm["mean"])),
        "mnist.normalization_std": repr(float(norm["std"])),
        "mnist.classes": json.dumps(ckpt["classes"]),
        "mnist.input": f"{INPUT_NAME}: float32 (N, 1, 28, 28), white digit on black, pixels / 255, then "
                       f"(x - normalization_mean) / normalization_std",
        "mnist.output": f"{OUTPUT_NAME}: float32 (N, {len(ckpt['classes'])}) raw logits; softmax gives probabilities",
        "mnist.source": Path(source).name,
    }


def check_normalization(ckpt, path):
    """The test images are normalised by data_loader: a checkpoint trained otherwise would be scored unfairly."""
    norm = ckpt.get("normalization") or {}
    if (norm.get("mean"), norm.get("std")) != (data_loader.MNIST_MEAN, data_loader.MNIST_STD):
        raise CheckpointError(f"{path}: trained with normalisation {norm or 'unknown'}, not data_loader's "
                              f"(mean {data_loader.MNIST_MEAN}, std {data_loader.MNIST_STD})")


# ---------------------------------------------------------------------------------------------- writing

def _replace_atomically(write, path):
    """write(tmp_path) through common.atomic_write: an interrupted export never leaves half a file."""
    with atomic_write(path) as tmp:  # the temporary name keeps the suffix torch.export checks
        write(tmp)
    return Path(path)


def _example_and_batch_dim(model):
    # A batch of 2 as the example: torch.export specialises a dimension it sees as 1.
    return (torch.zeros(2, 1, 28, 28),), ({0: torch.export.Dim("batch", min=1)},)


def export_program(model, path, metadata):
    """torch.export program with a dynamic batch dimension, saved with torch.export.save."""
    example, dynamic = _example_and_batch_dim(model)
    program = torch.export.export(model, example, dynamic_shapes=dynamic)
    extra = {"mnist.json": json.dumps(metadata)}
    return _replace_atomically(lambda tmp: torch.export.save(program, tmp, extra_files=extra), path)


def export_onnx(model, path, metadata):
    """fp32 ONNX through torch's dynamo exporter, batch dimension dynamic, metadata added, checked by onnx."""
    onnx = require("onnx", "needed to write ONNX files")
    require("onnxscript", "torch's ONNX exporter writes with it")
    example, dynamic = _example_and_batch_dim(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress notes; errors still raise
        program = torch.onnx.export(model, example, None, dynamo=True, dynamic_shapes=dynamic,
                                    opset_version=ONNX_OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    verbose=False)
    proto = program.model_proto
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return _replace_atomically(lambda tmp: onnx.save(proto, str(tmp)), path)


def set_metadata(proto, metadata):
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "MNIST digit classifier exported by export.py; see the mnist.* metadata for its input"


def quantize_int8(onnx_path, path, calibration_images, metadata, batch_size=100):
    """Post-training static quantisation of an fp32 ONNX model by ONNX Runtime, QDQ format.

    Conv and Gemm get uint8 weights per output channel and uint8 activations, with ranges from min/max
    calibration over `calibration_images` (normalised float32, (N, 1, 28, 28), from the training split). The ops
    between them (ReLU, MaxPool, Reshape) are left to the quantiser too, so ORT fuses the graph into QLinearConv,
    uint8 MaxPool and QGemm with no float round trips. The final logits stay float: quantising them would clip
    any logit beyond the calibration range (the last Gemm then returns float, still with 8-bit weights and input).

    Why unsigned weights (U8U8) and not ONNX Runtime's usual signed ones (U8S8): on x86 CPUs without VNNI (AVX2
    only) ORT multiplies uint8 by int8 with VPMADDUBSW, which adds each pair of products into a saturating int16,
    so large activations against large weights are clipped; with VNNI (and on ARM) the same file is exact. That
    made the int8 file lose 0.2-0.6 points on AVX2-only machines only. U8U8 widens to int16 before multiplying and
    never saturates, so the integers are the same on every CPU, at the full 8 bits (reduce_range, the other
    documented cure, keeps U8S8's kernel but gives up a bit of every weight). docs/export.md has the figures.
    """
    onnx = require("onnx", "needed to write ONNX files")
    require("onnxruntime", "it does the int8 quantisation")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration_images[i:i + batch_size]
                                for i in range(0, len(calibration_images), batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ORT's advised preparation: ONNX shape inference and graph fusions. Its symbolic shape inference is for
        # models with symbolic sizes inside (transformers); here only the batch is, and ORT 1.20's fails on it.
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        proto = onnx.load(str(quantized))
        set_metadata(proto, {**metadata, "mnist.quantization": (
            f"8-bit static (ONNX Runtime QDQ, U8U8): Conv/Gemm weights uint8 per channel, activations uint8, min/max "
            f"calibrated on {len(calibration_images)} training images; logits float")})
        onnx.checker.check_model(proto, full_check=True)
        return _replace_atomically(lambda t: onnx.save(proto, str(t)), path)


# ---------------------------------------------------------------------------------------------- loading

def load_program(path):
    """A .pt2 from export_program as a callable on float32 numpy batches: what a deployment without our code does."""
    module = torch.export.load(str(path)).module()

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


# ---------------------------------------------------------------------------------------------- measuring

def predict_logits(run, images, batch_size=500):
    return np.concatenate([run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def time_per_call(run, x, seconds, min_calls):
    """Median seconds per call after a warm-up, calling for about `seconds` (and at least `min_calls` times)."""
    for _ in range(3):
        run(x)
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def file_size(path):
    size = Path(path).stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


@contextlib.contextmanager
def torch_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(name, path, load, images, labels, reference, bench_seconds, threads):
    """One row of the report: size, accuracy, latency, throughput, agreement with the PyTorch logits.

    load(n) gives the artifact as a callable on n CPU threads. Latency (one picture) is timed on one thread for
    every artifact alike: a 28x28 picture is too little work to share, and PyTorch handing it to two threads
    was 20 times slower than one on a busy 2-core machine. Throughput (256 pictures) uses `threads`.
    """
    with torch_threads(1):
        latency = time_per_call(load(1), images[:1], bench_seconds, 10)
    run = load(threads)
    logits = predict_logits(run, images)
    return {"artifact": name, "path": Path(path), "size": Path(path).stat().st_size,
            "accuracy": float((logits.argmax(1) == labels).mean()), "latency_ms": 1e3 * latency,
            "throughput": 256 / time_per_call(run, images[:256], bench_seconds, 2),
            "max_diff": float(np.abs(logits - reference).max()),
            "same_predictions": int((logits.argmax(1) == reference.argmax(1)).sum())}


def report_table(rows, threads):
    lines = [f"| artifact | file size | test accuracy | CPU latency, batch 1, 1 thread | CPU throughput, batch 256, "
             f"{threads} thread(s) | max logit diff vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        diff = "0 (reference)" if r["artifact"].startswith("PyTorch") else f"{r['max_diff']:.2g}"
        lines.append(f"| {r['artifact']} (`{r['path'].name}`) | {file_size(r['path'])} | {r['accuracy'] * 100:.2f}% | "
                     f"{r['latency_ms']:.2f} ms | {r['throughput']:,.0f} images/s | {diff} |")
    return lines


def verify(rows, n_images):
    """The checks of the module docstring, as (passed, sentence) pairs."""
    by_name = {r["key"]: r for r in rows}
    ref = by_name["pytorch"]
    checks = []
    for key in ("pt2", "onnx"):
        if key in by_name:
            r = by_name[key]
            ok = r["same_predictions"] == n_images and r["max_diff"] <= LOGIT_TOLERANCE
            checks.append((ok, f"{r['path'].name}: same prediction as PyTorch for {r['same_predictions']:,} of "
                               f"{n_images:,} test images, max logit difference {r['max_diff']:.2g} "
                               f"(limits: all, {LOGIT_TOLERANCE:g})"))
    if "int8" in by_name:
        r, fp32 = by_name["int8"], by_name["onnx"]
        ratio, drop = r["size"] / fp32["size"], ref["accuracy"] - r["accuracy"]
        checks.append((ratio <= INT8_MAX_SIZE_RATIO, f"{r['path'].name}: {ratio * 100:.1f}% of the fp32 ONNX size "
                                                     f"(limit {INT8_MAX_SIZE_RATIO * 100:.0f}%)"))
        checks.append((drop <= INT8_MAX_ACCURACY_DROP + 1e-12,
                       f"{r['path'].name}: test accuracy {r['accuracy'] * 100:.2f}% vs {ref['accuracy'] * 100:.2f}% "
                       f"fp32, {-drop * 100:+.2f} points (limit -{INT8_MAX_ACCURACY_DROP * 100:.1f}); "
                       f"{r['same_predictions']:,} of {n_images:,} predictions the same as fp32"))
    return checks


def write_report(path, rows, checks, args, argv, n_images):
    """report.md: how the figures were made, the table, and each check with its result."""
    versions = [f"torch {torch.__version__}"]
    for module in ONNX_PACKAGES:  # the ones this export used are imported by now
        version = getattr(sys.modules.get(module), "__version__", None)
        if version:
            versions.append(f"{module} {version}")
    command = shlex.join(["python", "export.py", *argv])
    lines = [f"# Export report: {args.model_path.name}", "",
             f"Made by `{command}` on {cpu_name()} with {args.threads} CPU thread(s) ({', '.join(versions)}). "
             f"Accuracy and logit differences over the first {n_images:,} MNIST test images; latency is the median "
             f"of one-image calls on one thread, throughput is 256 over the median time of one 256-image call on "
             f"{args.threads} thread(s).", "", *report_table(rows, args.threads), "", "Checks:", "",
             *[f"- {'ok' if ok else '**FAIL**'}: {sentence}" for ok, sentence in checks], ""]
    return _replace_atomically(lambda tmp: tmp.write_text("\n".join(lines)), path)


def fail(message, code=2):
    print_error("export.py", message)
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        for fmt in args.formats:
            for module in NEEDS[fmt]:
                require(module, f"needed for --format {fmt}")
        model, ckpt = load_checkpoint(args.model_path, "cpu")
        check_normalization(ckpt, args.model_path)
        splits = data_loader.get_splits(args.data_dir, **{k: ckpt.get("args", {}).get(k, d) for k, d in
                                                          (("val_size", 5000), ("seed", 0))})
    except (ExportError, CheckpointError, data_loader.DataError, ValueError) as err:
        return fail(str(err), 2)

    torch.set_num_threads(args.threads)
    test_x, test_y = splits["test"]
    n = min(args.eval_images or len(test_x), len(test_x))
    images, labels = data_loader.normalize(test_x[:n]).numpy(), test_y[:n].numpy()
    metadata = artifact_metadata(ckpt, args.model_path)
    name, out = ckpt["model"], args.save_dir

    def run_pytorch(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    print(f"{args.model_path.name}: {name} model | checking on {n:,} test images | {args.threads} CPU thread(s)")
    reference = predict_logits(run_pytorch, images)
    bench = (images, labels, reference, args.bench_seconds, args.threads)
    rows = [{"key": "pytorch", **measure("PyTorch fp32", args.model_path, lambda threads: run_pytorch, *bench)}]
    try:
        if "pt2" in args.formats:
            path = export_program(model, out / f"{name}.pt2", metadata)
            program = load_program(path)
            rows.append({"key": "pt2", **measure("torch.export program", path, lambda threads: program, *bench)})
            print(f"wrote {path}")
        if "onnx" in args.formats:
            path = export_onnx(model, out / f"{name}.onnx", metadata)
            rows.append({"key": "onnx", **measure("ONNX fp32, ONNX Runtime", path,
                                                  functools.partial(load_onnx_model, path), *bench)})
            print(f"wrote {path}")
        if "int8" in args.formats:
            train_x = splits["train"][0][:args.calibration_images]
            path = quantize_int8(out / f"{name}.onnx", out / f"{name}_int8.onnx",
                                 data_loader.normalize(train_x).numpy(), metadata)
            rows.append({"key": "int8", **measure("ONNX int8, ONNX Runtime", path,
                                                  functools.partial(load_onnx_model, path), *bench)})
            print(f"wrote {path}")
    except (ExportError, CheckpointError) as err:
        return fail(str(err), 1)

    checks = verify(rows, n)
    report = write_report(out / "report.md", rows, checks, args, argv, n)
    print("\n".join(report_table(rows, args.threads)))
    for ok, sentence in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {sentence}")
    print(f"report: {report}")
    failed = [sentence for ok, sentence in checks if not ok]
    if failed:
        return fail(f"{len(failed)} check(s) failed, first: {failed[0]}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
