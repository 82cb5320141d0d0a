"""Read the digit in your own pictures: python predict.py --image_path examples/ [photo.jpg scans/ "drawings/*.png"]

Any common picture works (PNG, JPEG, BMP, GIF, TIFF, WebP; photos, scans, drawing-app exports with a
transparent background): preprocess.image_to_mnist() turns each one into the 28x28 white-on-black digit the
model was trained on. One line per picture, e.g. `digit.png: 7 (98.6%)`; a picture that cannot be read gets
one line saying why and the others are still predicted. Exit code: 0 all predicted, 1 some pictures failed
(or held no digit), 2 bad flags or an unusable checkpoint.
"""
import argparse
import glob
import json
import os
import shlex
import sys
from pathlib import Path

import torch

import preprocess
from cnn_pytorch import MODELS
from checkpoint import CheckpointError, check_model_type, load_checkpoint, load_onnx_model, model_path_or_default
from common import PROJECT_DIR, OneLineParser, shown_path

EXAMPLES_DIR = PROJECT_DIR / "examples"  # five shipped pictures of digits to try (see examples/README.md)
GLOB_CHARS = set("*?[")
BAR_WIDTH = 30
LOW_CONFIDENCE = 0.6


def parse_args(argv=None):
    p = OneLineParser(prog="predict.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_path", "--image-path", nargs="+", metavar="PATH", default=None,
                   help="one or more pictures, folders (every picture in them) or quoted globs like 'scans/*.jpg'; "
                        "examples/ holds five to try")
    p.add_argument("--model_path", "--model-path", default=None,
                   help="checkpoint to use; default: results/best_model_simple_pt.pth, else the newest "
                        "results/best_model_*.pth, else the shipped pretrained/best_model_simple_pt.pth")
    p.add_argument("--model_type", "--model-type", default=None, choices=list(MODELS),
                   help="the model the checkpoint must hold; the checkpoint says what it is, so this only guards "
                        "against using the wrong file (a mismatch is an error)")
    p.add_argument("--show_probabilities", "--show-probabilities", action="store_true",
                   help="print all ten probabilities with a small bar each")
    p.add_argument("--top_k", "--top-k", type=int, default=1, help="also show the next most likely digits (1-10)")
    p.add_argument("--low_confidence", "--low-confidence", type=float, default=LOW_CONFIDENCE,
                   help="flag predictions whose probability is below this")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per picture and line: path, prediction, confidence, probabilities, error")
    p.add_argument("--save_preprocessed", "--save-preprocessed", metavar="DIR", default=None,
                   help="write the 28x28 picture the model saw for each input into DIR (as <name>.png)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, mps or auto; the CPU is the quick choice for a few pictures (no GPU "
                        "start-up), and reading the pictures is most of the work for a whole folder")
    p.add_argument("--batch_size", "--batch-size", type=int, default=256, help="pictures per forward pass")
    return p


def check_args(parser, args):
    if args.image_path is None:
        parser.error(f"no picture given: pass --image_path with pictures or folders, e.g. `python "
                     f"{shlex.quote(shown_path(__file__))} --image_path {shlex.quote(shown_path(EXAMPLES_DIR))}` "
                     f"(five example digits ship with the project)")
    if not 1 <= args.top_k <= 10:
        parser.error(f"--top_k must be between 1 and 10, got {args.top_k}")
    if not 0 <= args.low_confidence <= 1:
        parser.error(f"--low_confidence must be between 0 and 1, got {args.low_confidence}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.save_preprocessed is not None:
        out = Path(args.save_preprocessed)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"cannot create --save_preprocessed folder {out} ({err.strerror})")
        if not os.access(out, os.W_OK):
            parser.error(f"cannot write to --save_preprocessed folder {out}")


def list_folder(folder, suffixes):
    """Every picture directly in a folder, sorted by name; hidden files and other suffixes are left out."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file()
                       and os.path.splitext(e.name)[1].lower() in suffixes)
    return [os.path.join(folder, n) for n in names]


def collect_inputs(items, suffixes):
    """Expand files, folders and globs into [(path, error or None)], in the order given."""
    found = []
    for item in items:
        if not os.path.exists(item) and GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                found.append((item, "no files match this pattern"))
            for m in matches:
                found.extend(collect_inputs([m], suffixes) if os.path.isdir(m) else [(m, None)])
        elif os.path.isdir(item):
            try:
                pictures = list_folder(item, suffixes)
            except OSError as err:
                found.append((item, f"cannot read this folder ({err.strerror or type(err).__name__})"))
                continue
            if not pictures:
                found.append((item, "folder holds no pictures (" + ", ".join(suffixes[:5]) + ", ...)"))
            found.extend((p, None) for p in pictures)
        else:
            found.append((item, None))  # a missing file is reported by image_to_mnist, like any unreadable one
    return found


def unique_name(path, used):
    stem = Path(path).stem or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.png"
    used.add(name)
    return name


def format_result(path, probs, args):
    """The human-readable lines for one prediction."""
    order = sorted(range(10), key=lambda d: -probs[d])
    best = order[0]
    line = f"{path}: {best} ({probs[best] * 100:.1f}%)"
    if args.top_k > 1:
        line += "  next: " + ", ".join(f"{d} ({probs[d] * 100:.1f}%)" for d in order[1:args.top_k])
    if probs[best] < args.low_confidence:
        line += f"  [low confidence: below {args.low_confidence * 100:.0f}%]"
    lines = [line]
    if args.show_probabilities:
        for d in range(10):
            bar = "#" * round(probs[d] * BAR_WIDTH)
            lines.append(f"    {d} {probs[d] * 100:5.1f}% |{bar:<{BAR_WIDTH}}|")
    return lines


def load_model(path, device, expected_model):
    """A checkpoint of ours, or an .onnx file from export.py run by ONNX Runtime: (batch -> logits, info)."""
    if Path(path).suffix.lower() != ".onnx":
        return load_checkpoint(path, device, expected_model=expected_model)
    onnx_model = load_onnx_model(path)
    check_model_type(path, onnx_model.model_name, expected_model)
    info = {"model": onnx_model.model_name, "normalization": onnx_model.normalization}
    return (lambda batch: torch.from_numpy(onnx_model(batch.cpu().numpy()))), info


def predict_chunk(model, device, chunk, mean, std, out_dir, used_names):
    """[(path, error or None)] -> [(path, ten probabilities or None, error or None)], in the same order.

    Pictures are read one by one; the readable ones go through the model as one batch.
    """
    tensors, rows = [], []
    for path, error in chunk:
        if error is None:
            try:
                x = preprocess.image_to_mnist(path, mean, std)
                if out_dir is not None:
                    preprocess.mnist_to_image(x, mean, std).save(out_dir / unique_name(path, used_names))
            except preprocess.ImageError as err:
                error = str(err)
            except OSError as err:
                error = f"could not write its preprocessed picture to {out_dir} ({err.strerror or err})"
            else:
                tensors.append(x)
        rows.append([path, None, error])
    if tensors:
        probs = iter(model(torch.stack(tensors).to(device)).float().softmax(1).cpu().tolist())
        for row in rows:
            if row[2] is None:
                row[1] = next(probs)
    return rows


def print_result(path, probs, error, args):
    if args.json:
        best = None if probs is None else max(range(10), key=lambda d: probs[d])
        print(json.dumps({"path": str(path), "prediction": best,
                          "confidence": None if probs is None else round(probs[best], 6),
                          "probabilities": None if probs is None else [round(p, 6) for p in probs],
                          "low_confidence": None if probs is None else probs[best] < args.low_confidence,
                          "error": error}))
    elif error is not None:
        print(f"{path}: {error}", file=sys.stderr)
    else:
        print("\n".join(format_result(path, probs, args)))


def main(argv=None):
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = parser.device(args.device)
    try:
        model_path = model_path_or_default(args.model_path)
        model, ckpt = load_model(model_path, device, args.model_type)
    except CheckpointError as err:
        print(f"predict.py: error: {err}", file=sys.stderr)
        return 2
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    if not args.model_path and not args.json:
        acc = ckpt.get("test_accuracy")
        print(f"model: {model_path} ({ckpt['model']}"
              f"{f', test accuracy {acc * 100:.2f}%' if isinstance(acc, float) else ''})", file=sys.stderr)

    inputs = collect_inputs(args.image_path, preprocess.IMAGE_SUFFIXES)
    out_dir = Path(args.save_preprocessed) if args.save_preprocessed else None
    used_names, failed = set(), 0
    with torch.inference_mode():
        for start in range(0, len(inputs), args.batch_size):
            chunk = inputs[start:start + args.batch_size]
            for path, probs, error in predict_chunk(model, device, chunk, mean, std, out_dir, used_names):
                failed += error is not None
                print_result(path, probs, error, args)
            sys.stdout.flush()  # results stream out a batch at a time, in input order
    if failed and not args.json:
        print(f"predict.py: {failed} of {len(inputs)} picture(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
