"""Train a CNN on MNIST: python train_pytorch.py --model simple

The whole dataset lives on the training device as uint8; batches are normalised and augmented there. The best
epoch on a validation split (never the test set) is kept as results/best_model_<model>_pt.pth; everything
needed to resume goes to results/last_<model>_pt.pth; the test set is scored once, at the end.
"""
import argparse
import csv
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from cnn_pytorch import MODELS, CheckpointError, atomic_save, build_model, count_parameters, make_checkpoint, unwrap

PROJECT_DIR = Path(__file__).resolve().parent

# Settings that define a run: restored from the last checkpoint on --resume so it ends as it would have.
RUN_SETTINGS = ("model", "epochs", "batch_size", "learning_rate", "max_lr", "optimizer", "scheduler", "patience",
                "weight_decay", "seed", "val_size", "augment", "train_subset")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, not usage plus the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(prog="train_pytorch.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="simple", help=f"which network: {', '.join(MODELS)}")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (early stopping may end sooner)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=128, help="images per training step")
    p.add_argument("--learning_rate", "--learning-rate", "--lr", type=float, default=0.001,
                   help="base learning rate: the constant rate with --scheduler none, the start of the warm-up "
                        "with onecycle, the start of cosine and step")
    p.add_argument("--max_lr", "--max-lr", type=float, default=0.005,
                   help="peak learning rate of the onecycle schedule (one epoch of Adam at a flat 0.001 reaches "
                        "only ~98.4%%; a short warm-up to 0.005 and a cosine decay reach 99%%+)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "rmsprop"], help="optimiser")
    p.add_argument("--weight_decay", "--weight-decay", type=float, default=0.0, help="L2 weight decay")
    p.add_argument("--scheduler", default="onecycle", choices=["onecycle", "cosine", "step", "plateau", "none"],
                   help="learning-rate schedule: onecycle warms up from --learning_rate to --max_lr over 15%% of "
                        "the steps then anneals to ~0; cosine anneals --learning_rate to 0; step divides it by "
                        "10 every third of the epochs; plateau halves it when validation loss stalls")
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better validation accuracy (0: never stop early)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation (10 deg), shift (10%%) and scale (0.9-1.1) per training image")
    p.add_argument("--no_augment", dest="augment", action="store_false", help="same as --no-augment")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; on by default on CUDA, off elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    p.add_argument("--seed", type=int, default=0, help="seed for the validation split, init, shuffling, augmentation")
    p.add_argument("--val_size", "--val-size", type=int, default=5000, help="validation images taken from training")
    p.add_argument("--train_subset", "--train-subset", type=int, default=None,
                   help="train on only the first N training images (quick checks)")
    p.add_argument("--data_dir", "--data-dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    p.add_argument("--save_dir", "--save-dir", default="results",
                   help="where checkpoints and reports go (relative paths are taken from the project folder)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <save_dir>/last_<model>_pt.pth with the settings it was started with")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="one batch through train, validation and test, then stop: checks the setup in seconds")
    p.add_argument("--no_progress", "--no-progress", action="store_true", help="no tqdm bars, summary lines only")
    return p


def check_args(parser, args):
    """Everything that can be wrong with the flags is caught here, before anything is written."""
    if args.model not in MODELS:
        parser.error(f"unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    for name in ("epochs", "batch_size", "val_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("learning_rate", "max_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.patience < 0 or (args.train_subset is not None and args.train_subset < 1):
        parser.error("--patience must be >= 0 and --train_subset >= 1")
    try:
        args.device = str(pick_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    save_dir = Path(args.save_dir)
    if not save_dir.is_absolute():
        save_dir = PROJECT_DIR / save_dir
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as err:
        parser.error(f"cannot write to --save_dir {save_dir} ({err.strerror}): pick a folder you can write to")
    args.save_dir = str(save_dir)
    if args.amp is None:
        args.amp = args.device.startswith("cuda")


def pick_device(name):
    """auto -> cuda, then mps, then cpu. Asking for a device that is not there is an error, not a fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but this PyTorch sees no CUDA GPU: use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps asked for, but MPS is not available: use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported --device {name!r}: use auto, cuda, mps or cpu")
    return device


def make_optimizer(args, model):
    fused = {"fused": True} if args.device.startswith("cuda") else {}
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, **fused)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay, **fused)
    return torch.optim.RMSprop(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)


def make_scheduler(args, optimizer, steps_per_epoch):
    """Returns (scheduler or None, whether it steps every batch)."""
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        peak = max(args.max_lr, args.learning_rate)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peak, total_steps=total, pct_start=0.15, div_factor=peak / args.learning_rate,
            final_div_factor=1e3, cycle_momentum=args.optimizer == "sgd"), True
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.epochs // 3), gamma=0.1), False
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1), False
    return None, False


def train_one_epoch(model, batches, optimizer, scheduler, per_batch, ctx, bar, max_steps=None):
    """One pass over the training batches; returns (mean loss, accuracy). Sums stay on the device (no sync)."""
    model.train()
    loss_sum = torch.zeros((), device=batches.images.device)
    correct = torch.zeros((), device=batches.images.device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(batches):
        with ctx:
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None and per_batch:
            scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(1)
        if step % 100 == 99 and not torch.isfinite(loss_sum):  # an occasional sync, to stop a NaN run early
            break
        if max_steps is not None and step + 1 >= max_steps:
            break
    return loss_sum.item() / seen, correct.item() / seen


@torch.no_grad()
def predict_probs(model, images, ctx, batch_size=1000, max_batches=None):
    """Softmax outputs (N, 10) as float32 for uint8 images (N, 28, 28), in eval mode."""
    model.eval()
    out = []
    for i, (x, _) in enumerate(data_loader.DeviceBatches(images, images.new_zeros(len(images)), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        with ctx:
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1))
    return torch.cat(out)


def evaluate(model, images, labels, ctx, max_batches=None):
    """(mean cross-entropy, accuracy) of the model on one split."""
    probs = predict_probs(model, images, ctx, max_batches=max_batches)
    labels = labels[:len(probs)]
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


def rng_state(shuffle_gen):
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, shuffle_gen):
    torch.set_rng_state(state["torch"])
    shuffle_gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(path):
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist (train without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read for --resume ({type(err).__name__})") from err
    if not isinstance(state, dict) or "optimizer" not in state or "args" not in state:
        raise CheckpointError(f"{path}: not a resumable training state of this project")
    return state


def write_history_csv(history, path):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def fail(message, code=1):
    print(f"train_pytorch.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    save_dir = Path(args.save_dir)
    best_path = save_dir / f"best_model_{args.model}_pt.pth"
    last_path = save_dir / f"last_{args.model}_pt.pth"

    resume_state = None
    if args.resume:
        try:
            resume_state = load_resume_state(last_path)
        except CheckpointError as err:
            fail(str(err), 2)
        for key in RUN_SETTINGS:  # the run ends exactly as it would have without the interruption
            setattr(args, key, resume_state["args"][key])

    # Device and precision are decided once, here, and never looked at again in the loop.
    device = torch.device(args.device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    torch.manual_seed(args.seed)
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    t0 = time.perf_counter()
    try:
        splits = data_loader.get_splits(args.data_dir, args.val_size, args.seed, device, args.train_subset)
    except (data_loader.DataError, ValueError) as err:
        fail(str(err), 2)
    load_seconds = time.perf_counter() - t0
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits["train"], splits["val"], splits["test"]

    model = build_model(args.model).to(device).to(memory_format=torch.channels_last)
    n_params = count_parameters(model)
    print(f"{args.model} CNN: {n_params:,} parameters | device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''} | "
          f"amp {'bf16' if args.amp else 'off'} | train {len(train_x):,} val {len(val_x):,} test {len(test_x):,} "
          f"| data ready in {load_seconds:.1f}s")
    batches = data_loader.DeviceBatches(train_x, train_y, args.batch_size, shuffle=True, augment=args.augment,
                                        drop_last=len(train_x) >= 2 * args.batch_size, generator=shuffle_gen)
    optimizer = make_optimizer(args, model)
    scheduler, per_batch = make_scheduler(args, optimizer, len(batches))
    step_model = torch.compile(model) if args.compile else model

    history, best_val, best_epoch, stale, start_epoch, train_seconds = [], -1.0, 0, 0, 0, 0.0
    if resume_state is not None:
        unwrap(model).load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"], shuffle_gen)
        history, best_val, best_epoch = resume_state["history"], resume_state["best_val"], resume_state["best_epoch"]
        stale, start_epoch, train_seconds = resume_state["stale"], resume_state["epoch"], resume_state["train_seconds"]
        print(f"resuming after epoch {start_epoch} of {args.epochs} from {last_path}")

    if args.dry_run:
        t = time.perf_counter()
        loss, acc = train_one_epoch(step_model, batches, optimizer, scheduler, per_batch, ctx, None, max_steps=1)
        val_loss, val_acc = evaluate(step_model, val_x, val_y, ctx, max_batches=1)
        test_loss, test_acc = evaluate(step_model, test_x, test_y, ctx, max_batches=1)
        print(f"dry run: one batch each through train (loss {loss:.3f}), validation (loss {val_loss:.3f}) and "
              f"test (loss {test_loss:.3f}) in {time.perf_counter() - t:.2f}s; nothing written. Setup works.")
        return 0

    interrupted = False
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            t = time.perf_counter()
            bar = None if args.no_progress else tqdm(total=len(batches), desc=f"epoch {epoch}/{args.epochs}",
                                                     leave=False, unit="batch", dynamic_ncols=True)
            train_loss, train_acc = train_one_epoch(step_model, batches, optimizer, scheduler, per_batch, ctx, bar)
            if bar is not None:
                bar.close()
            if not math.isfinite(train_loss):
                fail(f"training diverged at epoch {epoch} (loss is NaN/inf): try a lower --learning_rate or "
                     f"--max_lr; the last good state is in {last_path if epoch > 1 else 'no file yet'}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - t
            train_seconds += epoch_seconds
            val_loss, val_acc = evaluate(step_model, val_x, val_y, ctx)
            if scheduler is not None and not per_batch:
                scheduler.step(val_loss) if args.scheduler == "plateau" else scheduler.step()
            lr = optimizer.param_groups[0]["lr"]
            history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                            "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "lr": lr,
                            "seconds": round(epoch_seconds, 3)})
            improved = val_acc > best_val
            if improved:
                best_val, best_epoch, stale = val_acc, epoch, 0
                atomic_save(make_checkpoint(model, args.model, epoch=epoch, val_accuracy=val_acc,
                                            args=vars(args)), best_path)
            else:
                stale += 1
            atomic_save({**make_checkpoint(model, args.model, epoch=epoch, val_accuracy=val_acc, args=vars(args)),
                         "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "rng": rng_state(shuffle_gen), "history": history, "best_val": best_val,
                         "best_epoch": best_epoch, "stale": stale, "train_seconds": train_seconds}, last_path)
            print(f"epoch {epoch:>3}/{args.epochs} | train loss {train_loss:.4f} acc {train_acc * 100:6.2f}% | "
                  f"val loss {val_loss:.4f} acc {val_acc * 100:6.2f}%{' *' if improved else '  '} | "
                  f"lr {lr:.2e} | {epoch_seconds:5.1f}s", flush=True)
            if args.patience and stale >= args.patience:
                print(f"early stop: no better validation accuracy for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        if bar is not None:
            bar.close()
        if history:
            print(f"\ninterrupted in epoch {epoch}: the state after epoch {history[-1]['epoch']} is saved in "
                  f"{last_path}\nresume with: python train_pytorch.py --model {args.model} --save_dir "
                  f"{args.save_dir} --resume", file=sys.stderr)
        else:
            print(f"\ninterrupted in epoch {epoch}, before any epoch finished: nothing to resume, nothing "
                  f"written", file=sys.stderr)
        return 130

    # The test set is scored once, with the epoch chosen on validation.
    best_model = unwrap(model)
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    best_model.load_state_dict(best["state_dict"])
    probs = predict_probs(best_model, test_x, ctx)
    import metrics  # imported late: scikit-learn is only needed once training is done
    import visualization
    report = metrics.compute_metrics(test_y.cpu().numpy(), probs.cpu().numpy())
    best["test_accuracy"], best["test_loss"] = report["accuracy"], report["loss"]
    atomic_save(best, best_path)
    info = {"model": args.model, "parameters": n_params, "best_epoch": best_epoch, "epochs_run": len(history),
            "val_accuracy": round(best_val, 6), "training_seconds": round(train_seconds, 2),
            "data_seconds": round(load_seconds, 2), "device": str(device) + (
                f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"),
            "amp": "bf16" if args.amp else "off", "seed": args.seed, "torch": torch.__version__}
    metrics.write_metrics(report, save_dir, args.model, info)
    write_history_csv(history, save_dir / f"history_{args.model}.csv")
    visualization.plot_training_history(history, save_dir / "training_history.png", best_epoch)
    print(f"test accuracy {report['accuracy'] * 100:.2f}% (loss {report['loss']:.4f}) with the epoch-{best_epoch} "
          f"model chosen on validation ({best_val * 100:.2f}%) | training {train_seconds:.1f}s | "
          f"saved {best_path}")
    return 0 if not interrupted else 130


if __name__ == "__main__":
    sys.exit(main())
