"""Pictures of digits written the way much of the world writes them, a test set of our own (not MNIST, not UCI).

Each shape is a hand-written skeleton of pen strokes (SHAPES below: lines, quadratic Bezier curves and elliptic
arcs in a box one unit high), jittered point by point and as a whole (width, slant, tilt) for every picture:

  world    one_flag_foot (a 1 with a flag and a foot), one_flag (a flag, no foot), one_long_flag (the European 1:
           a flag down to half its height), seven_crossed, four_open (open top: the left stroke parallel to the
           stem), four_open_round (its corner rounded, like a u), four_open_short (the stem rising only a little
           above the bar), nine_straight (a 9 whose stem drops straight from the loop)
  control  plain_0 ... plain_9: the plain shapes of every digit, MNIST's usual ones

and each is drawn in two styles:

  page     white on a black canvas, a thick round pen (a drawing app)
  paper    dark ink on light, tinted, noisy paper with uneven light, a thinner pen, a slight blur (a photo of a page)

Not the training renderer (data/writers/make_writers.py): no pendigits, no fonts, no scipy spline, no PIL line
drawing; strokes here are stamped as a distance from a rasterised skeleton (scipy.ndimage's distance
transform), so what the model is scored on shares no code with what it may be trained on.

Pictures go to OUT/<style>/<shape>/NNNN_<digit>.png (the true digit last, as tests/make_user_images.py and
evaluate_numbers.py name theirs). --split val and --split test draw from different seeds, so a model chosen on
one is scored on the other. With --model_path the pictures are read like user pictures (preprocess.image_to_mnist)
and the share read right is printed per shape and style:

    python tests/make_world_shapes.py --out results/world_test --split test --per_shape 200 \
        --model_path pretrained/best_model_improved_pt.pth
"""
import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent  # the project's folder
SPLIT_SEEDS = {"val": 7101, "test": 7202}  # a split's pictures come from its own seed: val and test never repeat
STYLES = ("page", "paper")

# Skeletons: {shape: (digit, [stroke, ...])}; a stroke is a list of pieces, each ("line", p0, p1),
# ("bez", p0, control, p1) or ("arc", centre, (rx, ry), degrees from, degrees to); x right, y down, height 1.
# Angles run clockwise on the page (y is down): 270 is the top of an ellipse, 90 its bottom.
SEVEN = [("line", (0.0, 0.02), (0.6, 0.0)), ("line", (0.6, 0.0), (0.22, 1.0))]
LOOP_9 = ("arc", (0.32, 0.27), (0.28, 0.27), 0, 360)
SHAPES = {
    # the world's shapes
    "one_flag_foot": (1, [[("line", (0.1, 0.24), (0.32, 0.0)), ("line", (0.32, 0.0), (0.32, 1.0))],
                          [("line", (0.08, 1.0), (0.56, 1.0))]]),
    "one_flag": (1, [[("line", (0.1, 0.24), (0.32, 0.0)), ("line", (0.32, 0.0), (0.32, 1.0))]]),
    "one_long_flag": (1, [[("line", (0.0, 0.48), (0.38, 0.0)), ("line", (0.38, 0.0), (0.38, 1.0))]]),
    "seven_crossed": (7, [SEVEN, [("line", (0.14, 0.53), (0.56, 0.5))]]),
    "four_open": (4, [[("line", (0.04, 0.0), (0.02, 0.6)), ("line", (0.02, 0.6), (0.66, 0.6))],
                      [("line", (0.48, 0.0), (0.48, 1.0))]]),
    "four_open_round": (4, [[("bez", (0.04, 0.0), (0.0, 0.62), (0.3, 0.6)), ("line", (0.3, 0.6), (0.66, 0.6))],
                            [("line", (0.5, 0.0), (0.5, 1.0))]]),
    "four_open_short": (4, [[("line", (0.06, 0.0), (0.02, 0.6)), ("line", (0.02, 0.6), (0.7, 0.6))],
                            [("line", (0.5, 0.28), (0.5, 1.0))]]),
    "nine_straight": (9, [[LOOP_9, ("line", (0.6, 0.27), (0.6, 1.0))]]),
    # the control set: plain shapes
    "plain_0": (0, [[("arc", (0.3, 0.5), (0.3, 0.5), 270, 630)]]),
    "plain_1": (1, [[("line", (0.3, 0.0), (0.3, 1.0))]]),
    "plain_2": (2, [[("arc", (0.3, 0.28), (0.28, 0.27), 190, 380), ("line", (0.56, 0.37), (0.02, 1.0)),
                     ("line", (0.02, 1.0), (0.62, 1.0))]]),
    "plain_3": (3, [[("arc", (0.3, 0.25), (0.27, 0.25), 200, 450), ("arc", (0.3, 0.74), (0.3, 0.26), 270, 520)]]),
    "plain_4": (4, [[("line", (0.45, 0.0), (0.0, 0.65)), ("line", (0.0, 0.65), (0.62, 0.65))],
                    [("line", (0.45, 0.0), (0.45, 1.0))]]),
    "plain_5": (5, [[("line", (0.1, 0.0), (0.12, 0.47)), ("arc", (0.3, 0.7), (0.3, 0.28), 235, 505)],
                    [("line", (0.1, 0.0), (0.58, 0.0))]]),
    "plain_6": (6, [[("bez", (0.5, 0.0), (0.05, 0.12), (0.04, 0.72)), ("arc", (0.3, 0.72), (0.26, 0.27), 180, 540)]]),
    "plain_7": (7, [SEVEN]),
    "plain_8": (8, [[("arc", (0.3, 0.25), (0.23, 0.24), 0, 360)], [("arc", (0.3, 0.73), (0.29, 0.27), 0, 360)]]),
    "plain_9": (9, [[LOOP_9, ("bez", (0.6, 0.27), (0.62, 0.9), (0.28, 1.0))]]),
}
WORLD = tuple(name for name in SHAPES if not name.startswith("plain_"))
CONTROL = tuple(name for name in SHAPES if name.startswith("plain_"))


def _piece_points(piece, jitter, start=None):
    """Dense points (K, 2) along one piece, its defining numbers moved by `jitter` (a function of a shape); a
    line or curve that continues a stroke begins where the piece before it ended (`start`)."""
    kind = piece[0]
    t = np.linspace(0.0, 1.0, 120)[:, None]
    if kind in ("line", "bez"):
        p0 = jitter(piece[1]) if start is None else start
    if kind == "line":
        p1 = jitter(piece[2])
        return p0 + t * (p1 - p0)
    if kind == "bez":
        c, p1 = jitter(piece[2]), jitter(piece[3])
        return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p1
    centre, radii = jitter(piece[1]), np.abs(jitter(piece[2], 0.5)) + 0.05
    a = np.deg2rad(piece[3] + t[:, 0] * (piece[4] - piece[3]))
    return np.stack([centre[0] + radii[0] * np.cos(a), centre[1] + radii[1] * np.sin(a)], axis=1)


def skeleton(shape, rng):
    """The strokes of a shape for one writer: [(K, 2) points], in the unit-high box, before the whole-shape
    changes. Each point of the definition moves by about 4% of the height; a point named twice moves once (the
    memo), so the stem of a 4 and its diagonal still meet."""
    moved = {}

    def jitter(p, scale=1.0):
        key = (tuple(p), scale)
        if key not in moved:
            moved[key] = np.asarray(p, float) + rng.normal(0.0, 0.04 * scale, 2)
        return moved[key]

    strokes = []
    for stroke in SHAPES[shape][1]:
        pieces = []
        for piece in stroke:
            pieces.append(_piece_points(piece, jitter, pieces[-1][-1] if pieces else None))
        strokes.append(np.vstack(pieces))
    return strokes


def writer_transform(strokes, rng):
    """The whole shape as one writer makes it: wider or narrower, leaning (mostly forward), a little tilted."""
    width, lean, tilt = rng.uniform(0.8, 1.25), rng.uniform(-0.1, 0.3), np.deg2rad(rng.uniform(-6, 6))
    c, s = np.cos(tilt), np.sin(tilt)
    out = []
    for pts in strokes:
        x, y = pts[:, 0] * width + lean * (1.0 - pts[:, 1]), pts[:, 1]
        out.append(np.stack([c * x - s * y, s * x + c * y], axis=1))
    return out


def ink(strokes, height, pen):
    """Ink coverage in [0, 1] of the strokes drawn `height` pixels high with a round pen `pen` pixels wide: each
    pixel's distance to the rasterised skeleton, turned into coverage over one pixel (anti-aliased edges)."""
    every = np.vstack(strokes)
    low = every.min(axis=0)
    scale = height / max(np.ptp(every[:, 1]), 1e-6)
    margin = int(np.ceil(pen)) + 3
    size = np.ceil(np.ptp(every, axis=0) * scale).astype(int) + 2 * margin + 1
    line = np.ones((size[1], size[0]), bool)
    for pts in strokes:
        xy = (pts - low) * scale + margin
        dense = max(2, int(np.hypot(*np.diff(xy, axis=0).T).sum() * 3))  # a third of a pixel apart
        u = np.linspace(0, len(xy) - 1, dense)
        x = np.interp(u, np.arange(len(xy)), xy[:, 0])
        y = np.interp(u, np.arange(len(xy)), xy[:, 1])
        line[np.round(y).astype(int), np.round(x).astype(int)] = False
    distance = ndimage.distance_transform_edt(line)
    return np.clip(pen / 2.0 - distance + 0.5, 0.0, 1.0).astype(np.float32)


def _place(cover, canvas_hw, rng):
    h, w = canvas_hw
    out = np.zeros((h, w), np.float32)
    top, left = rng.integers(0, h - cover.shape[0] + 1), rng.integers(0, w - cover.shape[1] + 1)
    out[top:top + cover.shape[0], left:left + cover.shape[1]] = cover
    return out


def draw(shape, style, rng):
    """One picture of a shape in a style, as a PIL image."""
    strokes = writer_transform(skeleton(shape, rng), rng)
    if style == "page":  # a drawing app: white on black, a thick round pen, the digit anywhere on the canvas
        side = int(rng.integers(280, 641))
        height = int(side * rng.uniform(0.35, 0.75))
        cover = ink(strokes, height, height * rng.uniform(0.08, 0.14))
        field = _place(cover, (max(side, cover.shape[0]), max(side, cover.shape[1])), rng)
        bg, fg = rng.uniform(0, 20), rng.uniform(210, 255)
        return Image.fromarray((bg + (fg - bg) * field).round().astype(np.uint8), "L")
    if style == "paper":  # a photographed page: dark ink, thinner pen, tinted noisy paper, uneven light, blur
        h, w = int(rng.integers(200, 481)), int(rng.integers(200, 481))
        height = int(min(h, w) * rng.uniform(0.3, 0.7))
        cover = ink(strokes, height, max(1.5, height * rng.uniform(0.035, 0.07)))
        field = _place(cover, (max(h, cover.shape[0]), max(w, cover.shape[1])), rng)
        h, w = field.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        light = 1.0 - rng.uniform(0.0, 0.25) * (xx / w if rng.random() < 0.5 else yy / h)
        paper = np.array([rng.uniform(215, 250), rng.uniform(205, 245), rng.uniform(185, 240)], np.float32)
        ink_rgb = np.array([rng.uniform(10, 60), rng.uniform(10, 60), rng.uniform(10, 130)], np.float32)
        rgb = paper * (1 - field[..., None]) + ink_rgb * field[..., None]
        rgb = rgb * light[..., None]
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.3)))
        noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 10), (h, w, 1))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    raise ValueError(f"unknown style {style!r}: choose from {', '.join(STYLES)}")


def make_set(out_dir, split="test", per_shape=50, shapes=tuple(SHAPES), styles=STYLES, seed=0):
    """Write per_shape pictures of each shape in each style: [(path, digit, style, shape)]."""
    out_dir, made = Path(out_dir), []
    for style in styles:
        for shape in shapes:
            folder = out_dir / style / shape
            folder.mkdir(parents=True, exist_ok=True)
            digit = SHAPES[shape][0]
            for i in range(per_shape):
                # seeded by the names, so a shape added later changes no other shape's pictures
                rng = np.random.default_rng([SPLIT_SEEDS[split], seed, zlib.crc32(f"{style}/{shape}".encode()), i])
                path = folder / f"{i:04d}_{digit}.png"
                draw(shape, style, rng).save(path, compress_level=1)
                made.append((path, digit, style, shape))
    return made


def score(made, model_path):
    """{(style, shape): (right, n, {digit read: count})} of a checkpoint on the pictures, read as user pictures."""
    import torch
    sys.path.insert(0, str(ROOT))
    import preprocess
    from checkpoint import load_checkpoint
    model, ckpt = load_checkpoint(model_path)
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    model.eval()
    results = {}
    for key in dict.fromkeys((style, shape) for _, _, style, shape in made):
        rows = [(p, d) for p, d, style, shape in made if (style, shape) == key]
        x = torch.stack([preprocess.image_to_mnist(p, mean, std) for p, _ in rows])
        with torch.no_grad():
            read = model(x).argmax(1).tolist()
        right = sum(r == d for r, (_, d) in zip(read, rows))
        results[key] = (right, len(rows), {r: read.count(r) for r in sorted(set(read))})
    return results


def table(results):
    """A Markdown table: one row per shape, a column per style, then the world and control totals."""
    styles = list(dict.fromkeys(style for style, _ in results))
    lines = ["| shape | digit | " + " | ".join(styles) + " | most read as (all styles) |",
             "|---|---|" + "---|" * len(styles) + "---|"]
    for shape in dict.fromkeys(shape for _, shape in results):
        cells, reads = [], {}
        for style in styles:
            right, n, got = results[(style, shape)]
            cells.append(f"{100 * right / n:.1f}%")
            for d, k in got.items():
                reads[d] = reads.get(d, 0) + k
        wrong = {d: k for d, k in reads.items() if d != SHAPES[shape][0]}
        common = ", ".join(f"{d} ({k})" for d, k in sorted(wrong.items(), key=lambda kv: -kv[1])[:2]) or "-"
        lines.append(f"| {shape} | {SHAPES[shape][0]} | " + " | ".join(cells) + f" | {common} |")
    for name, group in (("all world shapes", WORLD), ("all control shapes", CONTROL)):
        cells = []
        for style in styles:
            hits = [results[(style, s)] for s in group if (style, s) in results]
            if hits:
                cells.append(f"{100 * sum(h[0] for h in hits) / sum(h[1] for h in hits):.1f}%")
        if len(cells) == len(styles):
            lines.append(f"| **{name}** | | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "world_shapes"),
                   help="folder to write OUT/<style>/<shape>/ into (default: results/world_shapes of the project)")
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="test",
                   help="val: for choosing models; test: for the figures reported (another seed)")
    p.add_argument("--per_shape", type=int, default=50, help="pictures of each shape in each style")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="SHAPE",
                   help="which shapes (default: all: " + ", ".join(SHAPES) + ")")
    p.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES))
    p.add_argument("--seed", type=int, default=0, help="added to the split's seed, for another set of the same split")
    p.add_argument("--model_path", help="also read the pictures with this checkpoint and print the table")
    p.add_argument("--json", action="store_true", help="with --model_path: print the figures as JSON too")
    args = p.parse_args(argv)
    made = make_set(args.out, args.split, args.per_shape, args.shapes, args.styles, args.seed)
    print(f"{len(made)} pictures in {args.out} ({args.split} split)")
    if args.model_path:
        results = score(made, args.model_path)
        print(table(results))
        if args.json:
            print(json.dumps({f"{style}/{shape}": {"right": r, "n": n, "read": {str(d): k for d, k in got.items()}}
                              for (style, shape), (r, n, got) in results.items()}))


if __name__ == "__main__":
    main()
