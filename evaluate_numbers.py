"""Score the number reader on pictures whose true number is in the file name: python evaluate_numbers.py FOLDER

A picture's true number is the last part of its name after an underscore (`0007_2026.png` holds 2026; a line
break in a multi-line picture is written `-`, `0003_12-345.png`). Its kind is the subfolder it lies in
(`FOLDER/touching/0007_2026.png` is of kind `touching`); pictures directly in FOLDER are of kind `.`. For each
kind it prints the string accuracy (the whole number right), the digit accuracy (digits right at their place,
over the true digits, when the count is right; a wrong count scores none of that number's digits), and the
segmentation errors (pictures read with the wrong number of digits). `--recipe plain` scores the recipe most
tutorials use instead (threshold, components, sort by x, the digit CNN on each), as a baseline; `--time PICTURE`
times the reader on one picture (docs/numbers.md).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import number_reader
import preprocess
from checkpoint import CheckpointError, load_checkpoint, model_path_or_default
from common import OneLineParser, at_least, fail, first_line

PROG = "evaluate_numbers.py"


def parse_args():
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", help="pictures of numbers, in one subfolder per kind")
    p.add_argument("--reader", metavar="PATH", default=str(number_reader.DEFAULT_PATH),
                   help="the number reader (python number_reader.py trains one)")
    p.add_argument("--recipe", choices=("reader", "plain"), default="reader",
                   help="reader: number_reader.read_number (predict.py --number); plain: threshold, components, "
                        "sort by x, classify each with the digit CNN of --model_path")
    p.add_argument("--model_path", default=None,
                   help="the digit CNN (it checks the digits that stand apart, and reads every digit of the plain "
                        "recipe); default: the one predict.py uses")
    p.add_argument("--reader_only", action="store_true", help="the reader alone, without the digit CNN's check")
    p.add_argument("--digits_known", action="store_true",
                   help="tell the reader how many digits each number has (predict.py --digits)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")
    p.add_argument("--errors", type=at_least(0), default=0, help="also list up to this many misread pictures per kind")
    p.add_argument("--time", metavar="PICTURE", default=None,
                   help="instead: read PICTURE --repeat times and print the seconds each read took")
    p.add_argument("--repeat", type=at_least(1), default=5, help="reads for --time (the first is reported apart)")
    return p


def truth_of(path):
    """`0007_2026.png` -> "2026"; `-` in the name stands for a line break."""
    return Path(path).stem.rsplit("_", 1)[-1].replace("-", "\n")


def _otsu(values):
    """Otsu's threshold of values in [0, 1] (256 bins)."""
    hist = np.bincount(np.clip((values * 255).astype(np.int64), 0, 255).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    cum, cum_mean = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    w0, w1 = cum, total - cum
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (cum_mean[-1] * w0 / total - cum_mean) ** 2 / (w0 * w1)
    return (int(np.nanargmax(between)) + 0.5) / 255.0


def plain_recipe(source, classify):
    """The tutorial recipe: greyscale, Otsu threshold (the minority side is ink), connected components,
    components under 0.1% of the picture dropped, sorted by x, each classified. -> the number string.

    Each digit is fitted and centred as our reader does it, so the comparison is about finding the digits, not
    about framing them."""
    img = preprocess.open_image(source)
    grey, _ = preprocess._reduce_to(img.convert("L"), preprocess.NUMBER_MAX)
    grey = np.asarray(grey, np.float32) / 255.0
    t = _otsu(grey)
    dark = grey < t
    ink, value = (dark, 1.0 - grey) if dark.mean() < 0.5 else (grey > t, grey)
    labels, count = ndimage.label(ink, preprocess.EIGHT)
    sizes = ndimage.sum_labels(ink, labels, range(1, count + 1))
    boxes = sorted((box[1].start, label, box) for label, box in enumerate(ndimage.find_objects(labels), 1)
                   if sizes[label - 1] >= 0.001 * ink.size)
    if not boxes or len(boxes) > preprocess.MAX_DIGITS:
        return ""
    pixels = []
    for _, label, box in boxes:
        crop = np.where(labels[box] == label, value[box], 0.0).astype(np.float32)
        pixels.append(preprocess.fit_and_centre(crop / max(float(crop.max()), 1e-6)))
    probs = np.asarray(classify(np.stack(pixels)))
    return "".join(str(int(d)) for d in probs.argmax(1))


def read(path, recipe, reader, classify, digits=None):
    """The number string a recipe reads in one picture ("" when it finds nothing): the number reader with the
    digit classifier (number_reader.cnn_check) as its check, or the plain recipe with the classifier alone."""
    if recipe == "plain":
        return plain_recipe(path, classify)
    try:
        return number_reader.read_number(path, reader, digits, classify).number
    except preprocess.ImageError:
        return ""


def score(folder, recipe, reader, classify=None, digits_known=False, keep_errors=0):
    """{kind: {"n", "string_accuracy", "digit_accuracy", "segmentation_errors", "errors": [...]}}."""
    folder = Path(folder)
    pictures = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in preprocess.IMAGE_SUFFIXES)
    table = {}
    for path in pictures:
        truth = truth_of(path)
        flat_truth = truth.replace("\n", "")
        got = read(path, recipe, reader, classify, len(flat_truth) if digits_known else None)
        flat_got = got.replace("\n", "").replace(".", "").replace("-", "")
        row = table.setdefault(path.parent.relative_to(folder).as_posix(), {
            "n": 0, "right": 0, "digits": 0, "digits_right": 0, "count_wrong": 0, "errors": []})
        row["n"] += 1
        row["digits"] += len(flat_truth)
        if got == truth:
            row["right"] += 1
        elif len(row["errors"]) < keep_errors:
            row["errors"].append(f"{path.name}: read {got!r}")
        if len(flat_got) == len(flat_truth):
            row["digits_right"] += sum(a == b for a, b in zip(flat_got, flat_truth))
        else:
            row["count_wrong"] += 1
    return {kind: {"n": r["n"], "string_accuracy": r["right"] / r["n"],
                   "digit_accuracy": r["digits_right"] / r["digits"],
                   "segmentation_errors": r["count_wrong"], "errors": r["errors"]} for kind, r in table.items()}


def time_reads(path, reader, classify, repeat):
    """Seconds per read of one picture by read_number: [first, then the others]."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        reading = number_reader.read_number(path, reader, classify=classify)
        times.append(time.perf_counter() - started)
    return times, reading


def main(argv=None):
    parser = parse_args()
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.time is None):
        parser.error("give a FOLDER of pictures to score, or --time PICTURE")
    if args.time and args.recipe == "plain":
        parser.error("--time times the reader, not the plain recipe")
    try:
        reader = number_reader.load_reader(args.reader) if args.recipe == "reader" else None
        classify = model_path = None
        if args.recipe == "plain" or not args.reader_only:
            model_path = model_path_or_default(args.model_path)
            cnn, ckpt = load_checkpoint(model_path)
            classify = number_reader.cnn_check(cnn, ckpt["normalization"])
    except (CheckpointError, OSError) as err:
        fail(PROG, first_line(err), 2)
    torch.set_grad_enabled(False)
    if args.time:
        try:
            times, reading = time_reads(args.time, reader, classify, args.repeat)
        except preprocess.ImageError as err:
            fail(PROG, f"{args.time}: {first_line(err)}", 1)
        later = sorted(times[1:]) or times
        print(f"{args.time}: read {reading.number!r} ({reading.size[0]}x{reading.size[1]} pixels); first read "
              f"{times[0]:.3f} s, then median {later[len(later) // 2]:.3f} s over {len(later)} reads "
              f"(torch threads: {torch.get_num_threads()})")
        return 0
    if not Path(args.folder).is_dir():
        parser.error(f"{args.folder} is not a folder")
    started = time.perf_counter()
    table = score(args.folder, args.recipe, reader, classify, args.digits_known, args.errors)
    if not table:
        fail(PROG, f"no pictures in {args.folder}", 1)
    if args.json:
        print(json.dumps({"folder": str(args.folder), "recipe": args.recipe, "reader": args.reader,
                          "model": model_path and str(model_path),
                          "kinds": table}))
        return 0
    used = ([f"reader {args.reader}"] if reader else []) + ([f"digit CNN {model_path}"] if classify else [])
    print(f"{args.recipe} recipe, {', '.join(used)}, {args.folder} "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"{'kind':<20} {'n':>5} {'string acc':>11} {'digit acc':>10} {'wrong count':>12}")
    for kind, r in table.items():
        print(f"{kind:<20} {r['n']:>5} {r['string_accuracy'] * 100:>10.1f}% {r['digit_accuracy'] * 100:>9.1f}% "
              f"{r['segmentation_errors']:>12}")
        for line in r["errors"]:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
