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
from common import PROJECT_DIR, OneLineParser, at_least, fail, memory_format, shown_path
from data_loader import predict_probs

PROG = "evaluate.py"


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
    p.add_argument("--batch_size", type=at_least(1), default=None,
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


def main(argv=None):
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    device = parser.device(args.device)
    # Every checkpoint is loaded before the test set is read: a typo fails in a second, before anything is written.
    typed_paths = args.model_path or [None]  # none given: the model predict.py would use
    try:
        paths = [model_path_or_default(p) for p in typed_paths]
        loaded = [load_checkpoint(path, device) for path in paths]
        save_dir = parser.output_dir(args.save_dir)
        test_x, test_y = data_loader.load_mnist(args.data_dir)["test"]
    except (CheckpointError, data_loader.DataError) as err:
        fail(PROG, err, 2)  # one line whatever the message holds (load_state_dict's errors span several)
    test_x_device, several = test_x.to(device), len(paths) > 1

    rows, all_probs = [], []
    names = report_names([ckpt for _, ckpt in loaded])
    for typed, path, name, (model, ckpt) in zip(typed_paths, paths, names, loaded):
        model = model.to(memory_format=memory_format(device))  # as in training: same kernels, same numbers
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


if __name__ == "__main__":
    sys.exit(main())
