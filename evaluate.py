"""Score saved checkpoints on the MNIST test set: python evaluate.py [--model_path results/best_model_simple_pt.pth]

Writes the same report the end of training writes (metrics_<model>.txt and .json, confusion_matrix.png,
sample_predictions.png, misclassified.png, per_class_metrics.png) without training anything. Several
--model_path values are scored one by one and then as an ensemble (their softmax outputs averaged).
"""
import sys
from contextlib import nullcontext

import torch

import data_loader
import metrics
from checkpoint import CheckpointError, load_checkpoint, model_path_or_default
from common import PROJECT_DIR, OneLineParser, memory_format, pick_device, print_error, shown_path, writable_dir
from data_loader import predict_probs

PROG = "evaluate.py"


class InputError(Exception):
    """Bad input from the user, phrased as one line for them."""


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model_path", nargs="+", default=None,
                   help="one or more checkpoints written by train_pytorch.py; several are also scored as an "
                        "ensemble (relative paths are looked up here, then in the project folder); default: "
                        "results/best_model_simple_pt.pth, else the newest results/best_model_*.pth, else the "
                        "shipped pretrained/best_model_improved_pt.pth")
    p.add_argument("--save_dir", default="results/evaluate",
                   help="where the reports go (relative paths are taken from the project folder); not results/ "
                        "itself, where the training report of the same names would be overwritten")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--data_dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    p.add_argument("--batch_size", type=int, default=None,
                   help="test images per forward pass (default: 5000 on CUDA, 256 on a CPU, 1000 on MPS)")
    return p


def report_names(checkpoints):
    """The model name of each checkpoint, with _2, _3 ... where two share one, so no report overwrites another."""
    names, seen = [], {}
    for ckpt in checkpoints:
        seen[ckpt["model"]] = seen.get(ckpt["model"], 0) + 1
        names.append(ckpt["model"] if seen[ckpt["model"]] == 1 else f"{ckpt['model']}_{seen[ckpt['model']]}")
    return names


def autocast_for(ckpt, device):
    """Score as training scored its test set (bf16 autocast when it used it on CUDA), so the stored accuracy
    is reproduced exactly on the same kind of device."""
    if device.type == "cuda" and ckpt.get("args", {}).get("amp"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def load(path, device):
    """Rebuild one checkpoint's model on the device: (model, checkpoint dict). Raises CheckpointError."""
    model, ckpt = load_checkpoint(path, device)
    return model.to(memory_format=memory_format(device)), ckpt  # as in training: same kernels, same numbers


def checkpoint_info(path, ckpt, params, device):
    """Run facts for the report, from the checkpoint; what the checkpoint does not hold stays unknown (None)."""
    args = ckpt.get("args", {})
    return {"model": ckpt["model"], "parameters": params, "checkpoint": str(path), "best_epoch": ckpt.get("epoch"),
            "epochs_run": ckpt.get("epochs_run"), "training_seconds": ckpt.get("training_seconds"),
            "val_accuracy": ckpt.get("val_accuracy"), "stored_test_accuracy": ckpt.get("test_accuracy"),
            "seed": args.get("seed"), "device": str(device), "torch": torch.__version__}


def check_reproduced(path, ckpt, accuracy):
    """Say so when a checkpoint scores differently from what training stored in it."""
    stored = ckpt.get("test_accuracy")
    if stored is not None and abs(stored - accuracy) > 1e-9:
        print(f"note: {path} says {stored * 100:.2f}% but scores {accuracy * 100:.2f}% here "
              f"(training used another device or precision)", file=sys.stderr)


def print_table(rows):
    """rows: (name, parameters, accuracy, checkpoint) -> an aligned table, the ensemble last."""
    width = max(len("model"), *(len(r[0]) for r in rows))
    print(f"{'model':<{width}}  {'parameters':>11}  {'test accuracy':>13}  checkpoint")
    for name, params, accuracy, checkpoint in rows:
        print(f"{name:<{width}}  {params:>11,}  {accuracy * 100:>12.2f}%  {checkpoint}")


def run(args):
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")
    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise InputError(str(err)) from None
    # Every checkpoint is loaded before the test set is read: a typo fails in a second, before anything is written.
    typed_paths = args.model_path or [None]  # none given: the model predict.py would use
    paths = [model_path_or_default(p) for p in typed_paths]
    loaded = [load(path, device) for path in paths]
    try:
        save_dir = writable_dir(args.save_dir)
    except OSError as err:
        raise InputError(str(err)) from None
    test_x, test_y = data_loader.load_mnist(args.data_dir)["test"]
    test_x_device, several = test_x.to(device), len(paths) > 1

    rows, all_probs = [], []
    names = report_names([ckpt for _, ckpt in loaded])
    for typed, path, name, (model, ckpt) in zip(typed_paths, paths, names, loaded):
        probs = predict_probs(model, test_x_device, autocast_for(ckpt, device), batch_size=args.batch_size).cpu()
        params = sum(p.numel() for p in model.parameters())
        # Several models: figures go to a folder per model, since their file names are fixed.
        report = metrics.write_test_report(save_dir, name, checkpoint_info(path, ckpt, params, device), test_x,
                                            test_y, probs, save_dir / name if several else save_dir)
        check_reproduced(path, ckpt, report["accuracy"])
        rows.append((name, params, report["accuracy"], typed or shown_path(path)))
        all_probs.append(probs)
    if several:
        info = {"model": "ensemble", "parameters": sum(r[1] for r in rows), "device": str(device),
                "members": ", ".join(f"{r[0]} ({r[3]})" for r in rows)}
        report = metrics.write_test_report(save_dir, "ensemble", info, test_x, test_y, torch.stack(all_probs).mean(0),
                                           save_dir / "ensemble")
        rows.append(("ensemble", info["parameters"], report["accuracy"], "softmax outputs above, averaged"))
    print_table(rows)
    print(f"reports written to {save_dir}")
    return 0


def main(argv=None):
    args = parse_args(argv).parse_args(argv)
    try:
        return run(args)
    except (InputError, CheckpointError, data_loader.DataError) as err:
        # One line whatever the message holds (PyTorch's load_state_dict errors span several).
        print_error(PROG, err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
