"""The number judge: is a cut of a number's ink one whole digit, or a piece of one, or two touching digits?

preprocess.read_number cuts a number's ink every plausible way and keeps the chain of cuts the classifier reads
best (over-segment and recognise). The digit classifier was only ever shown whole digits, so it reads half a 0,
the hook of a 2 or two touching digits as a digit with 99% and more, and the wrong chain wins. The judge is a
second small CNN that has seen those cuts: eleven classes, the ten digits and "not one digit", trained on the
reader's own candidates from numbers it writes out of MNIST *training* digits, where it knows where each digit
lies. read_number adds the log-probability that a candidate is one whole digit to the classifier's score.

    python number_judge.py                                  # -> pretrained/number_judge.pth (a few minutes, CPU)
    python predict.py --image_path number.png --number      # uses it when the file is there (--judge none: not)

This file owns the judge's training data, its training and its use as a classify() wrapper. The candidates
are preprocess.number_candidates'; the model is cnn_pytorch's TinyCNN with an eleventh output; the file is
written and read by checkpoint.py like every other model file.
"""
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

import preprocess
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnn_pytorch import CLASSES, build_model
from common import PROJECT_DIR, OneLineParser, fail
from data_loader import MNIST_MEAN, MNIST_STD, NORMALIZATION, load_mnist, split_train_val
from train_pytorch import train_step  # the project's one training step

JUDGE_CLASSES = CLASSES + ["not one digit"]
NOT_A_DIGIT = len(CLASSES)  # the eleventh output
PRETRAINED_JUDGE = PROJECT_DIR / "pretrained" / "number_judge.pth"
JUDGE_ARGS = {"num_classes": len(JUDGE_CLASSES), "in_channels": 2}  # TinyCNN's: the candidate and its context


# ---------------------------------------------------------------------------------------------------------------
# Training data: numbers written out of MNIST training digits, white on black, where each digit's columns are known.
# ---------------------------------------------------------------------------------------------------------------

def _ink_at(digit, height, rng):
    """An MNIST digit (28x28 uint8) as ink coverage [0, 1] at `height` pixels, cropped to its ink columns."""
    img = Image.fromarray(digit, "L").rotate(rng.uniform(-6, 6), resample=Image.Resampling.BICUBIC)
    cover = np.asarray(img.resize((height, height), Image.Resampling.BICUBIC), np.float32) / 255.0
    cover = np.clip((cover - 0.35) * 4.0, 0.0, 1.0)  # a pen's crisp edge, not bicubic blur
    cols = np.nonzero(cover.max(0) > 0.05)[0]
    return cover[:, cols[0]:cols[-1] + 1] if cols.size else cover


def write_number(digits, gaps, height, rng):
    """Digits (28x28 uint8 each) written in a row with gaps (shares of the height; negative: they overlap) ->
    (white-on-black uint8 picture, owner map: which digit's ink each pixel is, -1 for none). Heights vary +-10%
    on a wavy baseline."""
    pieces = [_ink_at(d, max(8, int(height * rng.uniform(0.9, 1.1))), rng) for d in digits]
    margin = height // 2
    xs, x = [], margin
    for n, piece in enumerate(pieces):
        xs.append(x)
        x += piece.shape[1] + (int(round(gaps[n] * height)) if n < len(gaps) else 0)
    width = max(x0 + p.shape[1] for x0, p in zip(xs, pieces)) + margin
    wave, phase = rng.uniform(0, 0.08) * height, rng.uniform(0, 2 * np.pi)
    layers = np.zeros((len(pieces), int(1.2 * height + 2 * wave) + 2 * margin, width), np.float32)
    for n, (x0, piece) in enumerate(zip(xs, pieces)):
        y0 = margin + int(round(wave * (1 + np.sin(x0 / height + phase)))) + (height - piece.shape[0]) // 2
        region = layers[n, y0:y0 + piece.shape[0], x0:x0 + piece.shape[1]]
        region[...] = piece[:region.shape[0], :region.shape[1]]
    cover = layers.max(0)
    owner = np.where(cover > 0.3, layers.argmax(0), -1)
    return (cover * 255).round().astype(np.uint8), owner


# A candidate is one whole digit when nearly all its ink is that digit's and it holds nearly all of that digit's
# ink; it is "not one digit" when it clearly fails either; the cases between are left out of training.
WHOLE_SHARE, WHOLE_COVER = 0.92, 0.88
PIECE_SHARE, PIECE_COVER = 0.80, 0.75


def label_candidates(cands, owner, classes):
    """Each candidate's class by ink (see WHOLE_SHARE): a digit, NOT_A_DIGIT, or -1 (in between: not used).
    The picture must be at the reader's own resolution (owner map = ink map)."""
    found = cands.found
    assert found.scale == 1.0, "write numbers no longer than preprocess.NUMBER_MAX"
    strong_owner = np.where(found.strong, owner, -1)
    totals = np.bincount(strong_owner[strong_owner >= 0], minlength=len(classes))
    out = np.full(len(cands.keys), -1, np.int64)
    for k, (c, i, j) in enumerate(cands.keys):
        _, cluster, (box, seams), _, _ = cands.problems[c]
        y0, y1, x0, x1 = box
        inside = strong_owner[y0:y1, x0:x1][preprocess.candidate_mask(found, cluster, box, seams[i], seams[j])]
        counts = np.bincount(inside[inside >= 0], minlength=len(classes))
        if counts.sum() == 0:
            out[k] = NOT_A_DIGIT
            continue
        d = int(counts.argmax())
        share, cover = counts[d] / counts.sum(), counts[d] / max(totals[d], 1)
        if share >= WHOLE_SHARE and cover >= WHOLE_COVER:
            out[k] = classes[d]
        elif share < PIECE_SHARE or cover < PIECE_COVER:
            out[k] = NOT_A_DIGIT
    return out


def make_examples(images, labels, pictures, seed=0):
    """Candidates of `pictures` numbers of 2-5 digits drawn from images/labels -> (uint8 (N, 2, 28, 28): each
    candidate and its context, classes (N,)).

    Half the numbers touch (gaps -0.15 to 0 of the height: strokes touch or cross), a fifth nearly touch, the
    rest are spaced, so the judge sees the cuts of touching digits and those of wide single digits (a 0 or a 2
    that a cut at its thin column splits in two)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(pictures):
        n = int(rng.integers(2, 6))
        idx = rng.integers(0, len(images), n)
        kind = rng.random()
        low, high = (-0.15, 0.0) if kind < 0.5 else (0.0, 0.15) if kind < 0.7 else (0.15, 0.6)
        height = int(rng.integers(28, 80))  # 5 digits stay within NUMBER_MAX: the map is the picture
        picture, owner = write_number([images[i] for i in idx], rng.uniform(low, high, n - 1), height, rng)
        try:
            cands = preprocess.number_candidates(picture, straight=True)  # the reader's cuts with a judge
        except preprocess.ImageError:
            continue
        y = label_candidates(cands, owner, [int(labels[i]) for i in idx])
        both = np.stack([cands.pixels, cands.context], axis=1)[y >= 0]
        xs.append((both * 255).round().astype(np.uint8))
        ys.append(y[y >= 0])
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------------------------
# Training and use
# ---------------------------------------------------------------------------------------------------------------

def train_judge(x, y, epochs=4, batch_size=128, lr=0.003, seed=0):
    """TinyCNN with two input channels and eleven outputs on uint8 x (N, 2, 28, 28) and classes y: Adam, one-cycle
    rate."""
    torch.manual_seed(seed)
    model = build_model("tiny", **JUDGE_ARGS)
    images = _inputs(torch.from_numpy(x).float().div_(255))
    targets = torch.from_numpy(y)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss, _ = train_step(model, opt, images[idx], targets[idx], nullcontext(), label_smoothing=0.0)
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: training loss {total / len(x):.4f}", flush=True)
    return model.eval()


def _inputs(x):
    """(N, 2, 28, 28) in [0, 1] -> what the judge takes: both channels normalised like MNIST."""
    return (x - MNIST_MEAN) / MNIST_STD


def judge_scores(model, x):
    """The judge on uint8 x (N, 2, 28, 28): (predicted classes, P(not one digit))."""
    with torch.inference_mode():
        images = _inputs(torch.from_numpy(x).float().div_(255))
        probs = torch.cat([model(b).softmax(1) for b in images.split(1024)])
    return probs.argmax(1).numpy(), probs[:, NOT_A_DIGIT].numpy()


def load_judge(path=PRETRAINED_JUDGE, device="cpu"):
    """The judge in a file this script wrote: (model in eval mode, checkpoint). CheckpointError for anything else."""
    return load_checkpoint(path, device, classes=JUDGE_CLASSES, in_channels=JUDGE_ARGS["in_channels"])


def judge_for(choice=None, device="cpu"):
    """What preprocess.read_number's judge argument takes, for a command's --judge: None -> the shipped
    pretrained/number_judge.pth when it is there (else no judge); "none" -> no judge; a path -> that file's
    judge (CheckpointError when it is not one). Returns a function (pixels, context) -> (N, 11) probabilities
    (the ten digits, then "not one digit"), or None."""
    if choice is not None and str(choice).lower() == "none":
        return None
    if choice is None:
        if not PRETRAINED_JUDGE.is_file():
            return None
        choice = PRETRAINED_JUDGE
    model = load_judge(choice, device)[0]

    def judge(pixels, context):
        x = torch.from_numpy(np.ascontiguousarray(np.stack([pixels, context], axis=1), np.float32))
        with torch.inference_mode():
            return model(_inputs(x).to(device)).float().softmax(1).cpu().numpy()
    return judge


def parse_args():
    p = OneLineParser(prog="number_judge.py", description=__doc__.splitlines()[0])
    p.add_argument("--pictures", type=int, default=3000, help="numbers written to train on")
    p.add_argument("--val_pictures", type=int, default=300,
                   help="numbers written from the validation digits to score the judge on")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(PRETRAINED_JUDGE), help="where to write the judge")
    return p


def main(argv=None):
    args = parse_args().parse_args(argv)
    if args.pictures < 10 or args.epochs < 1:
        fail("number_judge.py", "--pictures must be at least 10 and --epochs at least 1", code=2)
    images, labels = load_mnist()["train"]
    (tr_x, tr_y), (va_x, va_y) = split_train_val(images, labels, seed=args.seed)
    t0 = time.perf_counter()
    x, y = make_examples(tr_x.numpy(), tr_y.numpy(), args.pictures, seed=args.seed)
    vx, vy = make_examples(va_x.numpy(), va_y.numpy(), args.val_pictures, seed=args.seed + 1)
    print(f"{len(x)} training candidates ({(y == NOT_A_DIGIT).mean():.0%} not one digit) from {args.pictures} "
          f"numbers, {len(vx)} validation candidates, in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    model = train_judge(x, y, epochs=args.epochs, seed=args.seed)
    pred, _ = judge_scores(model, vx)
    whole = vy != NOT_A_DIGIT
    val = {"accuracy": float((pred == vy).mean()),
           "not_one_digit_recall": float((pred[~whole] == NOT_A_DIGIT).mean()),
           "whole_digit_recall": float((pred[whole] != NOT_A_DIGIT).mean())}
    print(f"trained in {time.perf_counter() - t0:.0f} s; validation candidates: accuracy {val['accuracy']:.2%}, "
          f"pieces found {val['not_one_digit_recall']:.2%}, whole digits kept {val['whole_digit_recall']:.2%}")
    save_checkpoint(args.out, model, "tiny", NORMALIZATION, JUDGE_ARGS, classes=JUDGE_CLASSES, val=val,
                    args=vars(args), parameters=sum(p.numel() for p in model.parameters()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
