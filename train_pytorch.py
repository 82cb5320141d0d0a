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
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from cnn_pytorch import MODELS, CheckpointError, atomic_save, build_model, count_parameters, make_checkpoint, unwrap
from common import OneLineParser, atomic_write
from data_loader import predict_probs

PROJECT_DIR = Path(__file__).resolve().parent

# Named sets of defaults; flags given on the command line still win over them.
PRESETS = {
    # Time to 99%: the ~29k-parameter tiny CNN, one epoch, a high peak rate, no augmentation (it slows one epoch).
    "fast": {"model": "tiny", "epochs": 1, "max_lr": 0.01, "augment": False},
    # Best accuracy: the improved CNN over a longer schedule with elastic + wider affine augmentation and label
    # smoothing; no early stopping, since one-cycle does its best work in the last, low-rate epochs.
    "accurate": {"model": "improved", "epochs": 20, "strong_augment": True, "label_smoothing": 0.1, "patience": 0},
}

# Settings that define a run: restored from the last checkpoint on --resume so it ends as it would have.
RUN_SETTINGS = ("model", "epochs", "batch_size", "learning_rate", "max_lr", "optimizer", "scheduler", "patience",
                "weight_decay", "seed", "val_size", "augment", "strong_augment", "label_smoothing", "train_subset")


def parse_args(argv=None):
    p = OneLineParser(prog="train_pytorch.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named set of defaults: fast = --model tiny --epochs 1 --max_lr 0.01 --no_augment "
                        "(99.1%% in about 8 s on a 2-core CPU); accurate = --model improved --epochs 20 "
                        "--strong_augment --label_smoothing 0.1 --patience 0; other flags still override it")
    p.add_argument("--model", default="simple", help=f"which network: {', '.join(MODELS)}")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (early stopping may end sooner)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=128, help="images per training step, per process under torchrun")
    p.add_argument("--learning_rate", "--learning-rate", "--lr", type=float, default=0.001,
                   help="base learning rate: the constant rate with --scheduler none, the start of the warm-up "
                        "with onecycle, the start of cosine and step (under torchrun both rates are multiplied "
                        "by the square root of the number of processes)")
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
    p.add_argument("--no_augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                   help="same as --no-augment")
    p.add_argument("--strong_augment", "--strong-augment", action=argparse.BooleanOptionalAction, default=False,
                   help="with --augment: elastic distortion (alpha 34, sigma 6 px) and 12 deg rotation instead; "
                        "for long schedules")
    p.add_argument("--label_smoothing", "--label-smoothing", type=float, default=0.0,
                   help="share of the target spread over all classes in the training loss (0 to <1)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, off elsewhere)%(default).0s")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model; it is compiled before the clock starts and the compile time is "
                        "reported apart from the training time")
    p.add_argument("--compile_mode", "--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode: reduce-overhead replays CUDA graphs (for small models on a GPU, where "
                        "kernel launches dominate)")
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
    p.add_argument("--dist_timeout", "--dist-timeout", type=int, default=180,
                   help="under torchrun: seconds a process waits for the others before giving up with an error")
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
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.patience < 0 or (args.train_subset is not None and args.train_subset < 1):
        parser.error("--patience must be >= 0 and --train_subset >= 1")
    args.device = str(parser.device(args.device))
    args.save_dir = str(parser.output_dir(args.save_dir))
    if args.amp is None:
        args.amp = args.device.startswith("cuda")


def make_optimizer(args, model, lr_scale=1.0):
    fused = {"fused": True} if args.device.startswith("cuda") else {}
    lr = args.learning_rate * lr_scale
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay, **fused)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay, **fused)
    return torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=args.weight_decay)


def make_scheduler(args, optimizer, steps_per_epoch, lr_scale=1.0):
    """Returns (scheduler or None, whether it steps every batch)."""
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        base = args.learning_rate * lr_scale
        peak = max(args.max_lr * lr_scale, base)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peak, total_steps=total, pct_start=0.15, div_factor=peak / base, final_div_factor=1e3,
            cycle_momentum=args.optimizer == "sgd"), True
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.epochs // 3), gamma=0.1), False
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1), False
    return None, False


class Dist:
    """Where this process stands in a torchrun launch; a plain run is rank 0 of 1."""

    def __init__(self, device, rank=0, world=1, local_rank=0):
        self.device, self.rank, self.world, self.local_rank = device, rank, world, local_rank
        self.is_main = rank == 0
        self.enabled = world > 1

    def sum(self, *values):
        """Sum numbers over all ranks (one all_reduce); returns floats."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def agree(self, flag):
        """Rank 0 decides, every rank follows (early stopping must stop everyone at the same epoch)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())


def setup_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the process group (NCCL on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world <= 1:
        return Dist(device)
    from datetime import timedelta
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one process per GPU
        torch.cuda.set_device(device)
        args.device = str(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A finite timeout: if a rank dies, the others give up with a message instead of waiting forever.
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=args.dist_timeout))
    return Dist(device, rank, world, local_rank)


def train_one_epoch(model, batches, optimizer, scheduler, per_batch, ctx, bar, dist, max_steps=None,
                    label_smoothing=0.0):
    """One pass over the training batches; returns (mean loss, accuracy) over all ranks.

    The running sums stay on the device, so the loop never waits for the GPU but for an occasional NaN check.
    """
    model.train()
    loss_sum = torch.zeros((), device=batches.images.device)
    correct = torch.zeros((), device=batches.images.device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(batches):
        with ctx:
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
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
        if step % 100 == 99 and not dist.enabled and not torch.isfinite(loss_sum):  # stop a NaN run early
            break
        if max_steps is not None and step + 1 >= max_steps:
            break
    loss_total, correct_total, seen_total = dist.sum(loss_sum.item(), correct.item(), seen)
    return loss_total / seen_total, correct_total / seen_total


def compile_warm_up(step_model, model, batches, ctx, label_smoothing):
    """Compile before the clock starts; returns the seconds it took.

    Forward and backward three times on every batch shape training will see (CUDA graphs are recorded on a
    later call than the first), no optimiser step; then the weights, batch-norm statistics, gradients and random
    state are put back, so the run that follows is the run it would have been without the warm-up.
    """
    device = batches.images.device
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    n, size = len(batches.images) // batches.world_size, batches.batch_size
    sizes = {min(size, n)}
    if not batches.drop_last and n % size:
        sizes.add(n % size)  # the last, smaller batch: a new shape to compile
    t = time.perf_counter()
    model.train()
    for size in sorted(sizes):
        x = data_loader.normalize(batches.images[:size]).contiguous(memory_format=torch.channels_last)
        y = batches.labels[:size]
        for _ in range(3):
            with ctx:
                loss = F.cross_entropy(step_model(x), y, label_smoothing=label_smoothing)
            loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        model.load_state_dict(saved)  # copies in place: CUDA graphs keep pointing at the same parameters
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return seconds


def gather_probs(model, images, ctx, dist):
    """predict_probs over all ranks: each scores every world-th image, then all gather the whole (N, 10)."""
    if not dist.enabled:
        return predict_probs(unwrap(model), images, ctx)
    n, world = len(images), dist.world
    per_rank = -(-n // world)
    mine = predict_probs(unwrap(model), images[dist.rank::world], ctx)
    padded = torch.zeros(per_rank, mine.shape[1], device=mine.device)
    padded[:len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    probs = torch.empty(n, mine.shape[1], device=mine.device)
    for r, part in enumerate(parts):
        probs[r::world] = part[:len(range(r, n, world))]
    return probs


def evaluate(model, images, labels, ctx, dist=None, max_batches=None):
    """(mean cross-entropy, accuracy) of the model on one split, summed over ranks when distributed."""
    dist = dist or Dist(images.device)
    rank, world = dist.rank, dist.world
    probs = predict_probs(unwrap(model), images[rank::world], ctx, max_batches=max_batches)
    labels = labels[rank::world][:len(probs)]
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").item()
    correct = (probs.argmax(1) == labels).sum().item()
    nll, correct, count = dist.sum(nll, correct, len(labels))
    return nll / count, correct / count


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
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def fail(message, code=1):
    print(f"train_pytorch.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def device_label(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def main(argv=None):
    parser = parse_args(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        dist = setup_distributed(args)
    except Exception as err:  # a bad rendezvous address, a port in use, a peer that never came
        fail(f"could not join the torchrun process group ({str(err).splitlines()[0][:160]})", 2)
    try:
        return train(args, dist)
    except (RuntimeError, torch.distributed.DistError) as err:
        if not dist.enabled:
            raise
        fail(f"rank {dist.rank}: lost contact with the other training processes: one of them failed or timed out "
             f"(see its output); {str(err).splitlines()[0][:160]}")
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args, dist):
    save_dir = Path(args.save_dir)
    best_path = save_dir / f"best_model_{args.model}_pt.pth"
    last_path = save_dir / f"last_{args.model}_pt.pth"
    say = print if dist.is_main else (lambda *a, **k: None)  # only rank 0 talks and writes

    resume_state = None
    if args.resume:
        try:
            resume_state = load_resume_state(last_path)
        except CheckpointError as err:
            fail(str(err), 2)
        for key in RUN_SETTINGS:  # the run ends exactly as it would have without the interruption
            if key in resume_state["args"]:  # a state from an older version lacks the newer settings
                setattr(args, key, resume_state["args"][key])
    # Under torchrun --batch_size is per process, so one step sees world x batch_size images. Learning rates
    # grow with the square root of that (the usual rule for Adam; linear scaling overshoots it).
    scale = dist.world ** 0.5

    # Device and precision are decided once, here, and never looked at again in the loop.
    device = dist.device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    torch.manual_seed(args.seed)
    shuffle_gen = torch.Generator().manual_seed(args.seed)  # the same on every rank: each takes its own shard
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
    say(f"{args.model} CNN: {n_params:,} parameters | device {device_label(device)}"
        f"{f' x {dist.world} processes' if dist.enabled else ''} | amp {'bf16' if args.amp else 'off'} | "
        f"train {len(train_x):,} val {len(val_x):,} test {len(test_x):,} | data ready in {load_seconds:.1f}s")
    batches = data_loader.DeviceBatches(train_x, train_y, args.batch_size, shuffle=True,
                                        augment=args.augment and ("strong" if args.strong_augment else "standard"),
                                        drop_last=len(train_x) >= 2 * args.batch_size * dist.world,
                                        generator=shuffle_gen, rank=dist.rank, world_size=dist.world)
    step_model = model
    if dist.enabled:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + 1 + dist.rank)  # a different augmentation on every rank
    if scale != 1.0:
        say(f"distributed: {dist.world} processes x --batch_size {args.batch_size} = {dist.world * args.batch_size} "
            f"images per step; learning rates x {scale:.2f} (square-root rule)")
    optimizer = make_optimizer(args, step_model, scale)
    scheduler, per_batch = make_scheduler(args, optimizer, len(batches), scale)
    compile_seconds = 0.0
    if args.compile:
        step_model = torch.compile(step_model, mode=None if args.compile_mode == "default" else args.compile_mode)
        if not args.dry_run:
            compile_seconds = compile_warm_up(step_model, model, batches, ctx, args.label_smoothing)
            say(f"compiled ({args.compile_mode}) in {compile_seconds:.1f}s: not counted as training time")

    history, best_val, best_val_loss, best_epoch, stale, start_epoch, train_seconds = [], -1.0, math.inf, 0, 0, 0, 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"], shuffle_gen)
        if dist.enabled:
            torch.manual_seed(args.seed + 1 + dist.rank + 7919 * resume_state["epoch"])
        history, best_val, best_epoch = resume_state["history"], resume_state["best_val"], resume_state["best_epoch"]
        best_val_loss = resume_state.get("best_val_loss", math.inf)
        stale, start_epoch, train_seconds = resume_state["stale"], resume_state["epoch"], resume_state["train_seconds"]
        say(f"resuming after epoch {start_epoch} of {args.epochs} from {last_path}")

    if args.dry_run:
        t = time.perf_counter()
        loss, _ = train_one_epoch(step_model, batches, optimizer, scheduler, per_batch, ctx, None, dist, max_steps=1)
        val_loss, _ = evaluate(model, val_x, val_y, ctx, dist, max_batches=1)
        test_loss, _ = evaluate(model, test_x, test_y, ctx, dist, max_batches=1)
        say(f"dry run: one batch each through train (loss {loss:.3f}), validation (loss {val_loss:.3f}) and "
            f"test (loss {test_loss:.3f}) in {time.perf_counter() - t:.2f}s; nothing written. Setup works.")
        return 0

    epoch, bar = start_epoch, None
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            t = time.perf_counter()
            if dist.is_main and not args.no_progress:
                bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{args.epochs}", leave=False, unit="batch",
                           dynamic_ncols=True)
            train_loss, train_acc = train_one_epoch(step_model, batches, optimizer, scheduler, per_batch, ctx, bar,
                                                    dist, label_smoothing=args.label_smoothing)
            if bar is not None:
                bar.close()
            if not math.isfinite(train_loss):
                fail(f"training diverged at epoch {epoch} (loss is NaN/inf): try a lower --learning_rate or "
                     f"--max_lr; the last good state is in {last_path if epoch > 1 else 'no file yet'}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - t
            train_seconds += epoch_seconds
            val_loss, val_acc = evaluate(model, val_x, val_y, ctx, dist)
            if scheduler is not None and not per_batch:
                scheduler.step(val_loss) if args.scheduler == "plateau" else scheduler.step()
            lr = optimizer.param_groups[0]["lr"]
            history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                            "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "lr": lr,
                            "seconds": round(epoch_seconds, 3)})
            # Ties are common on 5,000 images (one image is 0.02%): then the lower validation loss wins.
            improved = val_acc > best_val or (val_acc == best_val and val_loss < best_val_loss)
            if improved:
                best_val, best_val_loss, best_epoch, stale = val_acc, val_loss, epoch, 0
            else:
                stale += 1
            if dist.is_main:
                if improved:
                    atomic_save(make_checkpoint(model, args.model, data_loader.NORMALIZATION, epoch=epoch, val_accuracy=val_acc,
                                                args=vars(args)), best_path)
                atomic_save({**make_checkpoint(model, args.model, data_loader.NORMALIZATION, epoch=epoch, val_accuracy=val_acc,
                                               args=vars(args)),
                             "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler is not None else None,
                             "rng": rng_state(shuffle_gen), "history": history, "best_val": best_val,
                             "best_val_loss": best_val_loss,
                             "best_epoch": best_epoch, "stale": stale, "train_seconds": train_seconds}, last_path)
            say(f"epoch {epoch:>3}/{args.epochs} | train loss {train_loss:.4f} acc {train_acc * 100:6.2f}% | "
                f"val loss {val_loss:.4f} acc {val_acc * 100:6.2f}%{' *' if improved else '  '} | "
                f"lr {lr:.2e} | {epoch_seconds:5.1f}s", flush=True)
            if dist.agree(bool(args.patience) and stale >= args.patience):
                say(f"early stop: no better validation accuracy for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if not dist.is_main:
            return 130
        if history:
            print(f"\ninterrupted in epoch {epoch}: the state after epoch {history[-1]['epoch']} is saved in "
                  f"{last_path}\nresume with: python train_pytorch.py --model {args.model} --save_dir "
                  f"{args.save_dir} --resume", file=sys.stderr)
        else:
            print(f"\ninterrupted in epoch {epoch}, before any epoch finished: nothing to resume, nothing "
                  f"written", file=sys.stderr)
        return 130

    # The test set is scored once, with the epoch chosen on validation.
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"])
    probs = gather_probs(model, test_x, ctx, dist)
    if not dist.is_main:
        return 0
    import metrics  # imported late: scikit-learn is only needed once training is done
    import visualization
    y_true = test_y.cpu().numpy()
    report = metrics.compute_metrics(y_true, probs.cpu().numpy())
    best.update(test_accuracy=report["accuracy"], test_loss=report["loss"], epochs_run=len(history),
                training_seconds=round(train_seconds, 2))
    atomic_save(best, best_path)
    info = {"model": args.model, "parameters": n_params, "best_epoch": best_epoch, "epochs_run": len(history),
            "val_accuracy": round(best_val, 6), "training_seconds": round(train_seconds, 2),
            "data_seconds": round(load_seconds, 2), "compile_seconds": round(compile_seconds, 2),
            "device": device_label(device),
            "processes": dist.world, "amp": "bf16" if args.amp else "off", "seed": args.seed,
            "torch": torch.__version__}
    metrics.write_metrics(report, save_dir, args.model, info)
    write_history_csv(history, save_dir / f"history_{args.model}.csv")
    visualization.plot_training_history(history, save_dir / "training_history.png", best_epoch)
    visualization.plot_test_report(save_dir, test_x.cpu().numpy(), y_true, probs.cpu().numpy(), report)
    print(f"test accuracy {report['accuracy'] * 100:.2f}% (loss {report['loss']:.4f}) with the epoch-{best_epoch} "
          f"model chosen on validation ({best_val * 100:.2f}%) | training {train_seconds:.1f}s | saved {best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
