"""Read the digit in your own pictures: python predict.py --image_path examples/ [photo.jpg scans/ "drawings/*.png"]

One line per picture, e.g. `digit.png: 7 (98.6%)`; a picture that cannot be read, holds no digit or holds
several gets one line saying so, and the others are still read. With --number it reads every digit of a
number instead (docs/numbers.md). Exit code: 0 all read, 1 some pictures failed, 2 bad flags or an unusable
model file. Flags, what happens to a picture and the figures: docs/predict.md.
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
from checkpoint import CheckpointError, check_model_type, load_checkpoint, model_path_or_default
from cnn_pytorch import MODELS
from common import PROJECT_DIR, OneLineParser, at_least, atomic_write, fail, first_line, shown_path
from onnx_model import load_onnx_model

EXAMPLES_DIR = PROJECT_DIR / "examples"  # five shipped pictures of digits to try (see examples/README.md)
BAR_WIDTH = 30


def parse_args(argv=None):
    p = OneLineParser(prog="predict.py", description=__doc__.splitlines()[0])
    p.add_argument("--image_path", nargs="+", metavar="PATH",
                   help="pictures, folders (every picture in them) or quoted globs like 'scans/*.jpg'; examples/ "
                        "holds five to try")
    p.add_argument("--model_path", help="a checkpoint, or an .onnx file from export.py; without it "
                   "results/best_model_simple_pt.pth, else the newest results/best_model_*.pth, else the shipped "
                   "pretrained/best_model_improved_pt.pth")
    p.add_argument("--model_type", choices=list(MODELS),
                   help="the model the checkpoint must hold: a guard against the wrong file (a mismatch is an error)")
    p.add_argument("--show_probabilities", action="store_true", help="all ten probabilities, with a small bar each")
    p.add_argument("--top_k", type=int, default=1, choices=range(1, 11), metavar="K",
                   help="also show the next most likely digits (1-10)")
    p.add_argument("--low_confidence", type=float, default=0.6, help="flag predictions whose probability is below this")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per picture and line: path, prediction, confidence, probabilities, error")
    p.add_argument("--save_preprocessed", metavar="DIR",
                   help="write the 28x28 picture the model saw for each input into DIR (as <name>.png)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto: for a person's pictures the CPU "
                   "is quickest (a GPU's start-up costs more than reading a few pictures)")
    p.add_argument("--batch_size", type=at_least(1), default=256, help="pictures per forward pass")
    p.add_argument("--number", action="store_true",
                   help="read every digit of a number, left to right (several lines: top to bottom)")
    p.add_argument("--digits", type=int, metavar="N",
                   help="with --number: the number has exactly N digits (all lines together); the reader gives its "
                        "most likely reading with that many")
    p.add_argument("--reader", metavar="PATH",
                   help="with --number: the number reader (default: the shipped pretrained/number_reader.pth; "
                        "python number_reader.py trains one)")
    p.add_argument("--annotate", metavar="DIR",
                   help="with --number: write a copy of each picture into DIR with each digit's box and reading "
                        "drawn over it (low-confidence digits in orange)")
    return p


def check_args(parser, args):
    if args.image_path is None:
        parser.error(f"no picture given: pass --image_path with pictures or folders, e.g. `python "
                     f"{shlex.quote(shown_path(__file__))} --image_path {shlex.quote(shown_path(EXAMPLES_DIR))}` "
                     f"(five example digits ship with the project)")
    if not 0 <= args.low_confidence <= 1:
        parser.error(f"--low_confidence must be between 0 and 1, got {args.low_confidence}")
    if (args.digits is not None or args.annotate or args.reader) and not args.number:
        parser.error("--digits, --reader and --annotate go with --number")
    if args.digits is not None and not 1 <= args.digits <= preprocess.MAX_DIGITS:
        parser.error(f"--digits must be between 1 and {preprocess.MAX_DIGITS}, got {args.digits}")
    if args.number and (args.save_preprocessed or args.top_k != 1):
        parser.error("--save_preprocessed and --top_k are for single digits, not with --number")
    for flag in ("annotate", "save_preprocessed"):  # the user's folder, from where they are (not the project's)
        if getattr(args, flag):
            setattr(args, flag, parser.output_dir(Path(getattr(args, flag)).resolve(), f"--{flag}"))


def main(argv=None):
    parser = parse_args()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = parser.device(args.device)
    try:
        model_path = model_path_or_default(args.model_path)
        model, ckpt = load_model(model_path, device, args.model_type)
    except CheckpointError as err:
        fail("predict.py", err, 2)
    if args.number:
        import number_reader  # only --number needs it
        try:
            args.reader = number_reader.load_reader(args.reader or number_reader.DEFAULT_PATH)
        except (CheckpointError, OSError) as err:
            fail("predict.py", f"--reader: {first_line(err)}", 2)
    if not args.model_path and not args.json:
        acc = ckpt.get("test_accuracy")
        print(f"model: {model_path} ({ckpt['model']}"
              f"{f', test accuracy {acc * 100:.2f}%' if isinstance(acc, float) else ''})", file=sys.stderr)
    inputs = collect_inputs(args.image_path)
    with torch.inference_mode():
        failed = (read_numbers if args.number else read_digits)(inputs, model, device, ckpt["normalization"], args)
    if failed and not args.json:
        print(f"predict.py: {failed} of {len(inputs)} picture(s) could not be "
              f"{'read' if args.number else 'predicted'}", file=sys.stderr)
    return 1 if failed else 0


def read_digits(inputs, model, device, norm, args):
    """Each picture's digit, printed a batch at a time in input order; returns how many pictures failed.

    Pictures are prepared one by one (a bad one gets its line, the rest go on); a batch's readable ones go
    through the model together.
    """
    used, failed = set(), 0
    for start in range(0, len(inputs), args.batch_size):
        rows = []
        for path, error in inputs[start:start + args.batch_size]:
            x = None
            if error is None:
                try:
                    x = preprocess.image_to_mnist(path, norm["mean"], norm["std"])
                    if args.save_preprocessed:
                        preprocess.mnist_to_image(x, **norm).save(args.save_preprocessed / unique_name(path, used))
                except preprocess.SeveralDigitsError as err:
                    x, error = None, f"{err} (to read them as a number, add --number)"
                except preprocess.ImageError as err:
                    x, error = None, str(err)
                except OSError as err:
                    x, error = None, f"could not write its preprocessed picture ({err.strerror or err})"
            rows.append((path, x, error))
        readable = [x for _, x, _ in rows if x is not None]
        probs = iter(model(torch.stack(readable).to(device)).float().softmax(1).cpu().tolist() if readable else [])
        for path, x, error in rows:
            failed += error is not None
            print_digit(path, None if x is None else next(probs), error, args)
        sys.stdout.flush()
    return failed


def format_result(path, probs, args):
    """The human-readable lines for one prediction."""
    order = sorted(range(10), key=lambda d: -probs[d])
    best = order[0]
    line = f"{path}: {best} ({probs[best] * 100:.1f}%)"
    if args.top_k > 1:
        line += "  next: " + ", ".join(f"{d} ({probs[d] * 100:.1f}%)" for d in order[1:args.top_k])
    if probs[best] < args.low_confidence:
        line += f"  [low confidence: below {args.low_confidence * 100:.0f}%]"
    bars = [f"    {d} {p * 100:5.1f}% |{'#' * round(p * BAR_WIDTH):<{BAR_WIDTH}}|" for d, p in enumerate(probs)]
    return [line] + (bars if args.show_probabilities else [])


def print_digit(path, probs, error, args):
    if args.json:
        best = None if probs is None else max(range(10), key=probs.__getitem__)
        print(json.dumps({"path": str(path), "prediction": best,
                          "confidence": None if probs is None else round(probs[best], 6),
                          "probabilities": None if probs is None else [round(p, 6) for p in probs],
                          "low_confidence": None if probs is None else probs[best] < args.low_confidence,
                          "error": error}))
    elif error is not None:
        print(f"{path}: {error}", file=sys.stderr)
    else:
        print("\n".join(format_result(path, probs, args)))


def collect_inputs(items):
    """Files, folders (the pictures directly in them, by name) and globs -> [(path, error or None)], in order."""
    found = []
    for item in items:
        if not os.path.exists(item) and set("*?[") & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            found += collect_inputs(matches) if matches else [(item, "no files match this pattern")]
        elif os.path.isdir(item):
            try:
                with os.scandir(item) as entries:
                    names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file()
                                   and os.path.splitext(e.name)[1].lower() in preprocess.IMAGE_SUFFIXES)
            except OSError as err:
                found.append((item, f"cannot read this folder ({err.strerror or type(err).__name__})"))
                continue
            found += [(os.path.join(item, n), None) for n in names] or \
                [(item, "folder holds no pictures (" + ", ".join(preprocess.IMAGE_SUFFIXES[:5]) + ", ...)")]
        else:
            found.append((item, None))  # a missing file is reported when it is read, like any unreadable one
    return found


def unique_name(path, used):
    """<name>.png for a picture's output file, numbered when two inputs share a name."""
    stem = Path(path).stem or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.png"
    used.add(name)
    return name


def load_model(path, device, expected_model):
    """A checkpoint of ours, or an .onnx file from export.py run by ONNX Runtime: (batch -> logits, info)."""
    if Path(path).suffix.lower() != ".onnx":
        return load_checkpoint(path, device, expected_model=expected_model)
    onnx_model = load_onnx_model(path)
    check_model_type(path, onnx_model.model_name, expected_model)
    info = {"model": onnx_model.model_name, "normalization": onnx_model.normalization}
    return (lambda batch: torch.from_numpy(onnx_model(batch.cpu().numpy()))), info


# ---- numbers: --number ------------------------------------------------------------------------------------

def read_numbers(inputs, model, device, norm, args):
    """Read each picture's number with the number reader (args.reader), the digits that stand apart checked by
    the digit CNN (model), and print it; returns how many pictures failed."""
    import number_reader

    classify = number_reader.cnn_check(model, norm, device)
    used, failed = set(), 0
    for path, error in inputs:
        reading = None
        if error is None:
            try:
                reading = number_reader.read_number(path, args.reader, args.digits, classify)
                if args.annotate:
                    annotate(path, reading, args.annotate / unique_name(path, used), args.low_confidence)
            except preprocess.NoDigitError:
                error = "no digits found"
            except preprocess.ImageError as err:
                error = str(err)
            except OSError as err:
                error = f"could not write its annotated picture ({err.strerror or err})"
        failed += error is not None
        print_number(path, None if error else reading, error, args)
        sys.stdout.flush()
    return failed


def print_number(path, reading, error, args):
    low = args.low_confidence
    lines = [] if reading is None else [(n, line, float(np.prod([d.probability for d in line])))
                                        for n, line in zip(reading.numbers, reading.lines)]
    if args.json:
        def item(d):
            return {"digit": d.digit, "probability": round(d.probability, 6), "box": list(d.box),
                    "low_confidence": d.probability < low}
        lines = [{"number": n, "confidence": round(c, 6), "digits": [item(d) for d in line]} for n, line, c in lines]
        print(json.dumps({"path": str(path), "number": reading and reading.number,
                          "confidence": reading and round(reading.confidence, 6),
                          "digits": reading and [d for line in lines for d in line["digits"]],
                          "lines": reading and lines, "error": error}))
        return
    if error is not None:
        print(f"{path}: {error}", file=sys.stderr)
    for i, (number, line, conf) in enumerate(lines, 1):
        weak = [d.digit for d in line if d.probability < low]
        print(f"{path}{f' line {i}' if len(lines) > 1 else ''}: {number} ({conf * 100:.1f}%)"
              + (f"  [low confidence: {', '.join(weak)} below {low * 100:.0f}%]" if weak else ""))
        for d in line if args.show_probabilities else []:
            print(f"    {d.digit} {d.probability * 100:5.1f}%  box {d.box[0]},{d.box[1]} - {d.box[2]},{d.box[3]}"
                  + ("  [low confidence]" if d.probability < low else ""))


def annotate(path, reading, out, low):
    """A copy of the picture with each digit's box, its reading above and its probability (%) below."""
    from PIL import ImageDraw, ImageFont
    img = preprocess.open_image(path).convert("RGB")
    sx, sy = img.width / reading.size[0], img.height / reading.size[1]
    draw = ImageDraw.Draw(img)
    heights = sorted(d.box[3] - d.box[1] for line in reading.lines for d in line)
    size = max(12, int(0.35 * sy * (heights[len(heights) // 2] if heights else 40)))
    try:
        font, small = ImageFont.load_default(size), ImageFont.load_default(max(10, size * 2 // 3))
    except TypeError:  # Pillow before 10.1 has one small bitmap font
        font = small = ImageFont.load_default()
    width = max(2, size // 8)
    for d in (d for line in reading.lines for d in line):
        colour = (0, 160, 0) if d.probability >= low else (255, 140, 0)
        x0, y0, x1, y1 = d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy
        draw.rectangle([x0 - width, y0 - width, x1 + width, y1 + width], outline=colour, width=width)
        draw.text((x0, max(0, y0 - size - 2 * width)), d.digit, fill=colour, font=font)
        draw.text((x0, y1 + 2 * width), f"{d.probability * 100:.0f}", fill=colour, font=small)
    with atomic_write(out) as tmp:
        img.save(tmp, "PNG")


if __name__ == "__main__":
    sys.exit(main())
