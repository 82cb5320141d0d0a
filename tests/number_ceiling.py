"""What the model allows on a generated number set: python tests/number_ceiling.py

For each number of the test set that `make_user_images.py --numbers DIR` writes (seed 0, MNIST test digits), this
reads the digits three ways: the model on the untouched 28x28 source digits the picture was made from (what a
perfect reader that cuts, frames and centres every digit exactly as MNIST does would give this model); the model
on each digit as the generator's pen draws it (60 px tall, no tilt, then fitted and centred as the reader does:
the pen's steep ramp drops the faint grey of a blurry source, which no reader can get back, and for the UCI
digits, upscaled from 8x8, that is much of their ink); and the number reader on the picture itself. It prints
the string accuracy of each per kind, and the digits the reader gets wrong where the model reads the source digit
right (the reader's own losses, counted against the source). It makes the pictures again in
memory with the generator's random stream (the same numbers and files as the set on disk) and reads the ones
under --numbers, so the set must have been made with the same seed and --per_kind.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data_loader  # noqa: E402
import evaluate_numbers  # noqa: E402
import make_user_images as mk  # noqa: E402
import number_judge  # noqa: E402
import preprocess  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402


def as_drawn(digit):
    """A 28x28 uint8 source digit as the generator's pen draws it, 60 px tall and untilted, then cut to its ink,
    fitted and centred as the reader frames a digit: 28x28 float32 in [0, 1]."""
    cover = mk._upscale(np.asarray(digit, np.uint8), 60, None, tilt=False).astype(np.float32)
    ys, xs = np.nonzero(cover > 0)
    return preprocess.fit_and_centre(cover[ys.min():ys.max() + 1, xs.min():xs.max() + 1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numbers", default="results/numbers_test", help="the set written by make_user_images.py")
    p.add_argument("--per_kind", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model_path", default=str(ROOT / "pretrained" / "best_model_improved_pt.pth"))
    args = p.parse_args()
    x, y = data_loader.load_mnist()["test"]
    model, ckpt = load_checkpoint(args.model_path)
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    classify = evaluate_numbers.make_classifier(model, mean, std)
    judge = number_judge.judge_for()
    rng = np.random.default_rng(args.seed)  # replays make_number_set's stream, kind after kind
    print(f"{'kind':<20}{'n':>5}{'source digits':>15}{'as drawn':>10}{'reader':>9}{'reader-only digit errors':>26}")
    for kind in mk.NUMBER_KINDS:
        pool_x, pool_y = mk._uci_as_mnist() if kind == "uci" else (x.numpy(), y.numpy())
        low, high = mk.NUMBER_LENGTHS.get(kind, (2, 6))
        ceiling = drawn_right = read_right = own_losses = digits = 0
        for i in range(args.per_kind):
            idx = rng.integers(0, len(pool_x), int(rng.integers(low, high + 1)))
            number = "".join(str(int(pool_y[j])) for j in idx)
            _, suffix, _ = mk.make_number(kind, [np.asarray(pool_x[j], np.uint8) for j in idx], rng)
            path = Path(args.numbers) / kind / f"{i:04d}_{number}{suffix}"
            if not path.exists():
                sys.exit(f"number_ceiling.py: {path} is missing: make the set with the same --seed and --per_kind")
            source = (torch.from_numpy(pool_x[idx]).float().div(255) - mean).div(std).unsqueeze(1)
            drawn = torch.from_numpy(np.stack([as_drawn(pool_x[j]) for j in idx]))
            with torch.no_grad():
                on_source = "".join(str(int(d)) for d in model(source).argmax(1))
                on_drawn = "".join(str(int(d)) for d in model(((drawn - mean) / std).unsqueeze(1)).argmax(1))
            read = preprocess.read_number(str(path), classify, judge=judge).number
            ceiling += on_source == number
            drawn_right += on_drawn == number
            read_right += read == number
            if len(read) == len(number):
                digits += len(number)
                own_losses += sum(t == s != r for t, s, r in zip(number, on_source, read))
        n = args.per_kind
        print(f"{kind:<20}{n:>5}{ceiling / n:>14.1%} {drawn_right / n:>9.1%} {read_right / n:>8.1%}{own_losses:>12} "
              f"of {digits} digits",
              flush=True)


if __name__ == "__main__":
    main()
