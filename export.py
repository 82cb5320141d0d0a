"""Export a trained checkpoint for deployment: python export.py --model_path results/best_model_simple_pt.pth

Writes a torch.export program (<model>.pt2, which replaces TorchScript), ONNX with a dynamic batch (<model>.onnx)
and ONNX Runtime's static 8-bit quantisation of it (<model>_int8.onnx) to results/export/, checks each against the
PyTorch model on the MNIST test set (the limits below), and prints the comparison, also saved as report.md. Both
ONNX files say in their metadata how to feed them; onnx_model.py is the one way this project runs them.
What each file is, and why the int8 weights are unsigned: docs/export.md.
"""
import contextlib
import functools
import importlib
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
from common import PROJECT_DIR, OneLineParser, at_least, atomic_write, cpu_name, fail

PROG = "export.py"
# What each artifact must meet; the export fails (exit code 1) when one does not.
LOGIT_TOLERANCE = 1e-4          # fp32 exports against the PyTorch model, every logit of every image
INT8_MAX_SIZE_RATIO = 0.30      # int8 file size / fp32 ONNX file size
INT8_MAX_ACCURACY_DROP = 0.001  # 0.1 percentage point of test accuracy below the PyTorch model

LABELS = {"pytorch": "PyTorch fp32", "pt2": "torch.export program", "onnx": "ONNX fp32, ONNX Runtime",
          "int8": "ONNX int8, ONNX Runtime"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # exporter, its ONNX writer, the runtime and quantiser
ONNX_OPSET = 18  # runs on ONNX Runtime 1.14+ (and its web and mobile builds); torch's default, 20, needs 1.17+


class ExportError(Exception):
    """An export that cannot be made, phrased for a person."""


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=None,
                   help="checkpoint written by train_pytorch.py (a relative path is looked up from the current "
                        "folder, then from the project folder); default: results/best_model_simple_pt.pth, else "
                        "the newest results/best_model_*.pth, else the shipped pretrained/best_model_improved_pt.pth")
    p.add_argument("--format", default="all", choices=["all", "pt2", "onnx", "int8", "torchscript"],
                   help="what to write: all, pt2 (torch.export program, which replaces TorchScript), onnx, "
                        "int8 (also writes the fp32 .onnx it is quantised from)")
    p.add_argument("--save_dir", default="results/export",
                   help="where the artifacts and report.md go (relative paths are taken from the project folder)")
    p.add_argument("--eval_images", type=at_least(1), default=None,
                   help="check on the first N test images (default: all 10,000)")
    p.add_argument("--calibration_images", type=at_least(1), default=1000,
                   help="training images (never validation or test) that calibrate the int8 activation ranges")
    p.add_argument("--bench_seconds", type=at_least(0.0, float), default=2.0,
                   help="seconds spent timing each artifact at batch 1 and again at batch 256")
    p.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                   help="CPU threads for PyTorch and ONNX Runtime alike in the throughput column (latency is "
                        "timed on one thread for all)")
    p.add_argument("--data_dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    return p


def check_args(parser, args):
    """What argparse cannot check, before anything is loaded or written."""
    if args.format == "torchscript":
        parser.error("TorchScript is deprecated in torch (torch.jit.trace/save warn FutureWarning): use --format "
                     "pt2, a torch.export program that loads with torch.export.load(path).module()")
    args.formats = ["pt2", "onnx", "int8"] if args.format == "all" else [args.format]
    if args.formats == ["int8"]:
        args.formats.insert(0, "onnx")  # int8 is quantised from the fp32 ONNX model, which is kept alongside
    args.save_dir = parser.output_dir(args.save_dir)
    try:
        args.model_path = model_path_or_default(args.model_path)
    except CheckpointError as err:
        parser.error(str(err))


def require(module):
    """Import an optional dependency, or say in one line what is missing and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExportError(f"{module} is not installed (--format onnx and int8 need it): pip install -r "
                          f"requirements.txt (or pip install {' '.join(ONNX_PACKAGES)})") from err


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


def _example_batch():
    # A batch of 2 as the example, the batch dimension dynamic: torch.export specialises a dimension it sees as 1.
    return (torch.zeros(2, 1, 28, 28),), ({0: torch.export.Dim("batch", min=1)},)


def export_program(model, path, metadata):
    """torch.export program with a dynamic batch dimension, saved with torch.export.save."""
    example, dynamic = _example_batch()
    program = torch.export.export(model, example, dynamic_shapes=dynamic)
    with atomic_write(path) as tmp:  # the temporary name keeps the suffix torch.export checks
        torch.export.save(program, tmp, extra_files={"mnist.json": json.dumps(metadata)})
    return path


def save_onnx(proto, path, metadata):
    """Our metadata into the model, onnx's full check, then the file, written whole or not at all."""
    import onnx
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "MNIST digit classifier exported by export.py; see the mnist.* metadata for its input"
    onnx.checker.check_model(proto, full_check=True)
    with atomic_write(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def export_onnx(model, path, metadata):
    """fp32 ONNX through torch's dynamo exporter, batch dimension dynamic."""
    example, dynamic = _example_batch()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress notes; errors still raise
        program = torch.onnx.export(model, example, None, dynamo=True, dynamic_shapes=dynamic,
                                    opset_version=ONNX_OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    verbose=False)
    return save_onnx(program.model_proto, path, metadata)


def quantize_int8(onnx_path, path, calibration_images, metadata, batch_size=100):
    """Post-training static quantisation of an fp32 ONNX model by ONNX Runtime, QDQ format.

    Conv and Gemm get uint8 weights per output channel and uint8 activations, with ranges from min/max
    calibration over `calibration_images` (normalised float32 (N, 1, 28, 28) from the training split). The ops
    between them are quantised too, so ORT fuses the graph into QLinearConv, uint8 MaxPool and QGemm with no float
    round trips. The logits stay float: quantising them would clip any logit beyond the calibration range.

    Unsigned weights (U8U8), not ORT's usual signed ones (U8S8): on x86 CPUs without VNNI, U8S8 adds pairs of
    products into a saturating int16, so the same file reads differently on different CPUs; U8U8 never
    saturates, at the full 8 bits (docs/export.md, "Why unsigned weights").
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration_images), batch_size))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {INPUT_NAME: calibration_images[start:start + batch_size]}

    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # ORT's advised preparation: ONNX shape inference and graph fusions. Its symbolic shape inference is for
        # models with symbolic sizes inside (transformers); here only the batch is, and ORT 1.20's fails on it.
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        return save_onnx(onnx.load(str(quantized)), path, {**metadata, "mnist.quantization": (
            f"8-bit static (ONNX Runtime QDQ, U8U8): Conv/Gemm weights uint8 per channel, activations uint8, min/max "
            f"calibrated on {len(calibration_images)} training images; logits float")})


def numpy_runner(module):
    """A torch module as a callable on float32 numpy batches, as the ONNX models are."""
    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


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


def measure(key, path, load, images, labels, reference, bench_seconds, threads):
    """One row of the report: size, accuracy, latency, throughput, agreement with the PyTorch logits.

    load(n) gives the artifact as a callable on n CPU threads. Latency (one picture) is timed on one thread for
    every artifact alike, since one 28x28 picture is too little work to share; throughput (256) uses `threads`.
    """
    torch.set_num_threads(1)
    latency = time_per_call(load(1), images[:1], bench_seconds, 10)
    torch.set_num_threads(threads)
    run = load(threads)
    logits = predict_logits(run, images)
    return {"key": key, "path": Path(path), "size": Path(path).stat().st_size,
            "accuracy": float((logits.argmax(1) == labels).mean()), "latency_ms": 1e3 * latency,
            "throughput": 256 / time_per_call(run, images[:256], bench_seconds, 2),
            "max_diff": float(np.abs(logits - reference).max()),
            "same_predictions": int((logits.argmax(1) == reference.argmax(1)).sum())}


def file_size(path):
    size = Path(path).stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def report_table(rows, threads):
    lines = [f"| artifact | file size | test accuracy | CPU latency, batch 1, 1 thread | CPU throughput, batch 256, "
             f"{threads} thread(s) | max logit diff vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        diff = "0 (reference)" if r["key"] == "pytorch" else f"{r['max_diff']:.2g}"
        lines.append(f"| {LABELS[r['key']]} (`{r['path'].name}`) | {file_size(r['path'])} | "
                     f"{r['accuracy'] * 100:.2f}% | {r['latency_ms']:.2f} ms | {r['throughput']:,.0f} images/s | "
                     f"{diff} |")
    return lines


def verify(rows, n_images):
    """The checks of LOGIT_TOLERANCE and the INT8 limits, as (passed, sentence) pairs."""
    by_key = {r["key"]: r for r in rows}
    ref = by_key["pytorch"]
    checks = []
    for r in (by_key[key] for key in ("pt2", "onnx") if key in by_key):
        ok = r["same_predictions"] == n_images and r["max_diff"] <= LOGIT_TOLERANCE
        checks.append((ok, f"{r['path'].name}: same prediction as PyTorch for {r['same_predictions']:,} of "
                           f"{n_images:,} test images, max logit difference {r['max_diff']:.2g} "
                           f"(limits: all, {LOGIT_TOLERANCE:g})"))
    if "int8" in by_key:
        r, fp32 = by_key["int8"], by_key["onnx"]
        ratio, drop = r["size"] / fp32["size"], ref["accuracy"] - r["accuracy"]
        checks.append((ratio <= INT8_MAX_SIZE_RATIO, f"{r['path'].name}: {ratio * 100:.1f}% of the fp32 ONNX size "
                                                     f"(limit {INT8_MAX_SIZE_RATIO * 100:.0f}%)"))
        # on fewer than 1,000 images (--eval_images) one image is more than 0.1 points: then the limit is one image
        limit = max(INT8_MAX_ACCURACY_DROP, 1 / n_images)
        checks.append((drop <= limit + 1e-12,
                       f"{r['path'].name}: test accuracy {r['accuracy'] * 100:.2f}% vs {ref['accuracy'] * 100:.2f}% "
                       f"fp32, {-drop * 100:+.2f} points (limit -{limit * 100:.1f}); "
                       f"{r['same_predictions']:,} of {n_images:,} predictions the same as fp32"))
    return checks


def write_report(path, rows, checks, args, argv, n_images):
    """report.md: how the figures were made, the table, and each check with its result."""
    versions = [f"{module} {sys.modules[module].__version__}" for module in ("torch", *ONNX_PACKAGES)
                if hasattr(sys.modules.get(module), "__version__")]  # the ONNX ones this export used are imported
    lines = [f"# Export report: {args.model_path.name}", "",
             f"Made by `{shlex.join(['python', PROG, *argv])}` on {cpu_name()} with {args.threads} CPU thread(s) "
             f"({', '.join(versions)}). Accuracy and logit differences over the first {n_images:,} MNIST test "
             f"images; latency is the median of one-image calls on one thread, throughput is 256 over the median "
             f"time of one 256-image call on {args.threads} thread(s).", "", *report_table(rows, args.threads), "",
             "Checks:", "", *[f"- {'ok' if ok else '**FAIL**'}: {sentence}" for ok, sentence in checks], ""]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if "onnx" in args.formats:
            for module in ONNX_PACKAGES:
                require(module)
        model, ckpt = load_checkpoint(args.model_path, "cpu")
        check_normalization(ckpt, args.model_path)
        trained = ckpt.get("args", {})  # the split training made, so calibration never sees validation images
        splits = data_loader.get_splits(args.data_dir, val_size=trained.get("val_size", 5000),
                                        seed=trained.get("seed", 0))
    except (ExportError, CheckpointError, data_loader.DataError, ValueError) as err:
        fail(PROG, err, 2)

    torch.set_num_threads(args.threads)
    test_x, test_y = splits["test"]
    n = min(args.eval_images or len(test_x), len(test_x))
    images, labels = data_loader.normalize(test_x[:n]).numpy(), test_y[:n].numpy()
    metadata = artifact_metadata(ckpt, args.model_path)
    name, out = ckpt["model"], args.save_dir
    print(f"{args.model_path.name}: {name} model | checking on {n:,} test images | {args.threads} CPU thread(s)")
    run_pytorch = numpy_runner(model)
    reference = predict_logits(run_pytorch, images)
    bench = (images, labels, reference, args.bench_seconds, args.threads)
    rows = [measure("pytorch", args.model_path, lambda threads: run_pytorch, *bench)]
    try:
        if "pt2" in args.formats:
            path = export_program(model, out / f"{name}.pt2", metadata)
            program = numpy_runner(torch.export.load(str(path)).module())  # as a deployment without our code loads it
            rows.append(measure("pt2", path, lambda threads: program, *bench))
        if "onnx" in args.formats:
            onnx_files = {"onnx": export_onnx(model, out / f"{name}.onnx", metadata)}
            if "int8" in args.formats:
                calibration = data_loader.normalize(splits["train"][0][:args.calibration_images]).numpy()
                onnx_files["int8"] = quantize_int8(onnx_files["onnx"], out / f"{name}_int8.onnx", calibration,
                                                   metadata)
            for key, path in onnx_files.items():
                rows.append(measure(key, path, functools.partial(load_onnx_model, path), *bench))
    except CheckpointError as err:  # ONNX Runtime cannot load what was written
        fail(PROG, err, 1)

    checks = verify(rows, n)
    report = write_report(out / "report.md", rows, checks, args, argv, n)
    print("\n".join([*(f"wrote {r['path']}" for r in rows[1:]), *report_table(rows, args.threads)]))
    for ok, sentence in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {sentence}")
    print(f"report: {report}")
    failed = [sentence for ok, sentence in checks if not ok]
    if failed:
        fail(PROG, f"{len(failed)} check(s) failed, first: {failed[0]}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
