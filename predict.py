"""Read the digit in your own pictures: python predict.py --image_path examples/ [photo.jpg scans/ "drawings/*.png"]

With --number it reads every digit of a number instead (several lines: one number per line), e.g.
`number.jpg: 2026 (99.1%)`, the confidence being the product of the digits'; see docs/numbers.md.

Any common picture works (PNG, JPEG, BMP, GIF, TIFF, WebP; photos, scans, drawing-app exports with a
transparent background): preprocess.image_to_mnist() turns each one into the 28x28 white-on-black digit the
model was trained on. One line per picture, e.g. `digit.png: 7 (98.6%)`; a picture that cannot be read gets
one line saying why and the others are still predicted. Exit code: 0 all predicted, 1 some pictures failed
(or held no digit), 2 bad flags or an unusable checkpoint.
"""
import glob
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

import preprocess
from cnn_pytorch import MODELS
from checkpoint import CheckpointError, check_model_type, load_checkpoint, model_path_or_default
from onnx_model import load_onnx_model
from common import PROJECT_DIR, OneLineParser, atomic_write, shown_path

EXAMPLES_DIR = PROJECT_DIR / "examples"  # five shipped pictures of digits to try (see examples/README.md)
GLOB_CHARS = set("*?[")
BAR_WIDTH = 30
LOW_CONFIDENCE = 0.6


def parse_args(argv=None):
    p = OneLineParser(prog="predict.py", description=__doc__.splitlines()[0])
    p.add_argument("--image_path", nargs="+", metavar="PATH", default=None,
                   help="one or more pictures, folders (every picture in them) or quoted globs like 'scans/*.jpg'; "
                        "examples/ holds five to try")
    p.add_argument("--model_path", default=None,
                   help="checkpoint to use; default: results/best_model_simple_pt.pth, else the newest "
                        "results/best_model_*.pth, else the shipped pretrained/best_model_improved_pt.pth")
    p.add_argument("--model_type", default=None, choices=list(MODELS),
                   help="the model the checkpoint must hold; the checkpoint says what it is, so this only guards "
                        "against using the wrong file (a mismatch is an error)")
    p.add_argument("--show_probabilities", action="store_true",
                   help="print all ten probabilities with a small bar each")
    p.add_argument("--top_k", type=int, default=1, help="also show the next most likely digits (1-10)")
    p.add_argument("--low_confidence", type=float, default=LOW_CONFIDENCE,
                   help="flag predictions whose probability is below this")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per picture and line: path, prediction, confidence, probabilities, error")
    p.add_argument("--save_preprocessed", metavar="DIR", default=None,
                   help="write the 28x28 picture the model saw for each input into DIR (as <name>.png)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, mps or auto. The rule of every command: those that read a person's "
                        "pictures default to cpu (a GPU's start-up costs more than a few pictures, and reading them "
                        "is most of the work), those that work through MNIST (train, evaluate, tune) to auto")
    p.add_argument("--batch_size", type=int, default=256, help="pictures per forward pass")
    p.add_argument("--number", action="store_true",
                   help="read every digit of a number, left to right (several lines: top to bottom)")
    p.add_argument("--digits", type=int, default=None, metavar="N",
                   help="with --number: the number has exactly N digits (all lines together); the reader cuts or "
                        "joins to find that many")
    p.add_argument("--judge", metavar="PATH", default=None,
                   help="with --number: the number judge that tells whole digits from pieces of touching ones "
                        "(default: pretrained/number_judge.pth when it is there; none: read without one)")
    p.add_argument("--annotate", metavar="DIR", default=None,
                   help="with --number: write a copy of each picture into DIR with each digit's box and reading "
                        "drawn over it (low-confidence digits in orange)")
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
    if (args.digits is not None or args.annotate is not None or args.judge is not None) and not args.number:
        parser.error("--digits, --judge and --annotate go with --number")
    if args.digits is not None and not 1 <= args.digits <= preprocess.MAX_DIGITS:
        parser.error(f"--digits must be between 1 and {preprocess.MAX_DIGITS}, got {args.digits}")
    if args.number and (args.save_preprocessed is not None or args.top_k != 1):
        parser.error("--save_preprocessed and --top_k are for single digits, not with --number")
    for flag, folder in (("--annotate", args.annotate), ("--save_preprocessed", args.save_preprocessed)):
        if folder is None:
            continue
        out = Path(folder)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"cannot create {flag} folder {out} ({err.strerror})")
        if not os.access(out, os.W_OK):
            parser.error(f"cannot write to {flag} folder {out}")


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


# ---- numbers: --number ------------------------------------------------------------------------------------

def make_classifier(model, device, mean, std):
    """What preprocess.read_number asks for: pixels (N, 28, 28) in [0, 1] -> (N, 10) probabilities."""
    def classify(pixels):
        x = (torch.from_numpy(pixels).to(device) - mean) / std
        return model(x.unsqueeze(1)).float().softmax(1).cpu().numpy()
    return classify


def annotate(path, reading, out_dir, used, low):
    """A copy of the picture with each digit's box and reading drawn over it, through common.atomic_write."""
    from PIL import ImageDraw, ImageFont
    img = preprocess.open_image(path).convert("RGB")
    sx, sy = img.width / reading.size[0], img.height / reading.size[1]
    draw = ImageDraw.Draw(img)
    heights = [d.box[3] - d.box[1] for line in reading.lines for d in line]
    size = max(12, int(0.35 * sy * (sorted(heights)[len(heights) // 2] if heights else 40)))
    try:
        font, small = ImageFont.load_default(size), ImageFont.load_default(max(10, size * 2 // 3))
    except TypeError:  # Pillow before 10.1 has one small bitmap font
        font = small = ImageFont.load_default()
    width = max(2, size // 8)
    for line in reading.lines:
        for d in line:
            colour = (0, 160, 0) if d.probability >= low else (255, 140, 0)
            x0, y0, x1, y1 = d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy
            draw.rectangle([x0 - width, y0 - width, x1 + width, y1 + width], outline=colour, width=width)
            draw.text((x0, max(0, y0 - size - 2 * width)), d.digit, fill=colour, font=font)  # the reading above,
            draw.text((x0, y1 + 2 * width), f"{d.probability * 100:.0f}", fill=colour, font=small)  # % below
    with atomic_write(out_dir / unique_name(path, used)) as tmp:
        img.save(tmp, "PNG")


def print_number(path, reading, error, args):
    low = args.low_confidence
    if args.json:
        if reading is None:
            print(json.dumps({"path": str(path), "number": None, "confidence": None, "digits": None, "lines": None,
                              "error": error}))
            return
        def item(d):
            return {"digit": d.digit, "probability": round(d.probability, 6), "box": list(d.box),
                    "low_confidence": d.probability < low}
        lines = [{"number": n, "confidence": round(float(np.prod([d.probability for d in line])), 6),
                  "digits": [item(d) for d in line]} for n, line in zip(reading.numbers, reading.lines)]
        print(json.dumps({"path": str(path), "number": reading.number, "confidence": round(reading.confidence, 6),
                          "digits": [item(d) for line in reading.lines for d in line], "lines": lines,
                          "error": None}))
        return
    if error is not None:
        print(f"{path}: {error}", file=sys.stderr)
        return
    for n, (number, line) in enumerate(zip(reading.numbers, reading.lines)):
        conf = float(np.prod([d.probability for d in line]))
        shown = f"{path}: {number}" if len(reading.lines) == 1 else f"{path} line {n + 1}: {number}"
        text = f"{shown} ({conf * 100:.1f}%)"
        weak = [d.digit for d in line if d.probability < low]
        if weak:
            text += f"  [low confidence: {', '.join(weak)} below {low * 100:.0f}%]"
        print(text)
        if args.show_probabilities:
            for d in line:
                print(f"    {d.digit} {d.probability * 100:5.1f}%  box {d.box[0]},{d.box[1]} - {d.box[2]},{d.box[3]}"
                      f"{'  [low confidence]' if d.probability < low else ''}")


def read_numbers(inputs, classify, judge, args):
    """Read each picture's number, print it; returns how many pictures failed."""
    out_dir = Path(args.annotate) if args.annotate else None
    used, failed = set(), 0
    for path, error in inputs:
        reading = None
        if error is None:
            try:
                reading = preprocess.read_number(path, classify, digits=args.digits, judge=judge)
            except preprocess.NoDigitError:
                error = "no digits found"
            except preprocess.ImageError as err:
                error = str(err)
            if reading is not None and out_dir is not None:
                try:
                    annotate(path, reading, out_dir, used, args.low_confidence)
                except OSError as err:
                    error = f"could not write its annotated picture to {out_dir} ({err.strerror or err})"
        failed += error is not None
        print_number(path, reading if error is None else None, error, args)
        sys.stdout.flush()
    return failed


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
    if args.number:
        import number_judge  # only --number needs it
        try:
            judge = number_judge.judge_for(args.judge, device)
        except CheckpointError as err:
            print(f"predict.py: error: --judge: {err}", file=sys.stderr)
            return 2
    if not args.model_path and not args.json:
        acc = ckpt.get("test_accuracy")
        print(f"model: {model_path} ({ckpt['model']}"
              f"{f', test accuracy {acc * 100:.2f}%' if isinstance(acc, float) else ''})", file=sys.stderr)

    inputs = collect_inputs(args.image_path, preprocess.IMAGE_SUFFIXES)
    out_dir = Path(args.save_preprocessed) if args.save_preprocessed else None
    used_names, failed = set(), 0
    with torch.inference_mode():
        if args.number:
            failed = read_numbers(inputs, make_classifier(model, device, mean, std), judge, args)
        for start in range(0, 0 if args.number else len(inputs), args.batch_size):
            chunk = inputs[start:start + args.batch_size]
            for path, probs, error in predict_chunk(model, device, chunk, mean, std, out_dir, used_names):
                failed += error is not None
                print_result(path, probs, error, args)
            sys.stdout.flush()  # results stream out a batch at a time, in input order
    if failed and not args.json:
        print(f"predict.py: {failed} of {len(inputs)} picture(s) could not be "
              f"{'read' if args.number else 'predicted'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
