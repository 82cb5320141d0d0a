"""Train a CNN on MNIST: python train_pytorch.py --model simple

Read it top to bottom, as a story:
  1. the settings: presets and flags;
  2. the step: train_step() is one optimiser step (forward, loss, backward, update), and the optimiser and
     learning-rate schedule it uses;
  3. scoring a split, and the run's state that --resume restores;
  4. the run: set_up, then the epoch loop (train_epoch), validate_and_keep_best after every epoch, finish
     (the kept epoch's probabilities calibrated on validation, then the test set scored once).

The whole dataset lives on the training device as uint8; batches are gathered, augmented and normalised there
(data_loader.TrainBatches). The best epoch on a validation split (never the test set) is kept as
results/best_model_<model>_pt.pth; everything needed to resume goes to results/last_<model>_pt.pth; the test set
is scored once, at the end. Two things sit behind seams of their own: torchrun (distributed.py) and, on one
CUDA GPU, the same train_step captured and replayed as a CUDA graph (fast_step.py, switched on in set_up).
"""
import argparse
import csv
import inspect
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import data_loader
import distributed
import fast_step
from checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint, read_checkpoint, unwrap
from cnn_pytorch import MODELS, build_model, count_parameters, fold_temperature
from common import (PROJECT_DIR, OneLineParser, atomic_write, fail as _fail, memory_format, random_state,
                    set_random_state, synchronize)
from data_loader import predict_probs

PROG = "train_pytorch.py"

# ------------------------------------------------------------------------------------------------------------
# 1. The settings
# ------------------------------------------------------------------------------------------------------------

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
                "weight_decay", "seed", "val_size", "augment", "strong_augment", "label_smoothing", "train_subset",
                "dropout", "lr_scaling", "deterministic", "augment_level", "ema")
# torch.compile modes that replay CUDA graphs of their own: the project's whole-step graph stays out of their way.
COMPILE_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def parse_args(argv=None):
    p = OneLineParser(prog="train_pytorch.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named set of defaults: fast = --model tiny --epochs 1 --max_lr 0.01 --no_augment "
                        "(time to 99%%); accurate = --model improved --epochs 20 "
                        "--strong_augment --label_smoothing 0.1 --patience 0; other flags still override it")
    p.add_argument("--model", default="simple", help=f"which network: {', '.join(MODELS)}")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (early stopping may end sooner)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=128,
                   help="images per training step, per process under torchrun; every step is a full batch (the "
                        "few images left over by each shuffled epoch wait for the next one)")
    p.add_argument("--learning_rate", "--learning-rate", "--lr", type=float, default=0.001,
                   help="base learning rate: the constant rate with --scheduler none, the start of the warm-up "
                        "with onecycle, the start of cosine and step (under torchrun see --lr_scaling)")
    p.add_argument("--max_lr", "--max-lr", type=float, default=0.005,
                   help="peak learning rate of the onecycle schedule (one epoch of Adam at a flat 0.001 reaches "
                        "only ~98.4%%; a short warm-up to 0.005 and a cosine decay reach 99%%+)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "rmsprop"], help="optimiser")
    p.add_argument("--weight_decay", "--weight-decay", type=float, default=0.0, help="L2 weight decay")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout before the dense layers of simple and improved (default: the model's own, "
                        "0.1 and 0.4); tiny has none")
    p.add_argument("--scheduler", default="onecycle", choices=["onecycle", "cosine", "step", "plateau", "none"],
                   help="learning-rate schedule: onecycle warms up from --learning_rate to --max_lr over 15%% of "
                        "the steps then anneals to ~0 (momentum is not cycled); cosine anneals --learning_rate to 0; "
                        "step divides it by 10 every third of the epochs; plateau halves it when validation loss "
                        "stalls")
    p.add_argument("--lr_scaling", "--lr-scaling", default="sqrt", choices=["none", "sqrt", "linear"],
                   help="under torchrun one step sees processes x --batch_size images: multiply the learning rates "
                        "by the square root of the number of processes (the usual rule for Adam), by that number, "
                        "or not at all")
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better validation accuracy (0: never stop early)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation (10 deg), shift (10%%) and scale (0.9-1.1) per training image")
    p.add_argument("--no_augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                   help="same as --no-augment")
    p.add_argument("--strong_augment", "--strong-augment", action=argparse.BooleanOptionalAction, default=False,
                   help="with --augment: elastic distortion (alpha 34, sigma 6 px) and 12 deg rotation instead; "
                        "for long schedules")
    p.add_argument("--augment_level", "--augment-level", choices=list(data_loader.AUGMENTATIONS), default=None,
                   help="with --augment: the augmentation by name (default: standard, or strong with "
                        "--strong_augment; a level given here wins over it); writers = standard plus thicker or "
                        "thinner strokes and a blur, for pictures by other people")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights and batch-norm statistics beside the "
                        "model (decay per step, e.g. 0.999; 0: off); each epoch validation scores both, and the "
                        "better one is kept as the best checkpoint")
    p.add_argument("--label_smoothing", "--label-smoothing", type=float, default=0.1,
                   help="share of the target spread over all classes in the training loss (0 to <1); it also "
                        "puts a floor of about 0.5 under the training loss (measured effect: docs/train.md)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, off elsewhere)%(default).0s")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model; it is compiled before the clock starts and the compile time is "
                        "reported apart from the training time")
    p.add_argument("--compile_mode", "--compile-mode", default="default",
                   choices=["default", *COMPILE_GRAPH_MODES],
                   help="torch.compile mode: reduce-overhead and max-autotune replay CUDA graphs of the model "
                        "(then --cuda_graphs auto leaves the whole-step graph off)")
    p.add_argument("--cuda_graphs", "--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="capture the whole training step (batch, augmentation, forward, backward, optimiser, "
                        "learning rate) as one CUDA graph and replay it, so the GPU never waits on Python; auto: on "
                        "for single-process CUDA training; a capture that CUDA refuses stops the run with one line "
                        "(rerun with --cuda_graphs off)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (cuDNN and torch.use_deterministic_algorithms): two GPU runs "
                        "with one seed give the same weights; costs speed on a GPU (no cuDNN autotune), nothing on "
                        "the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed for the validation split, init, shuffling, augmentation")
    p.add_argument("--val_size", "--val-size", type=int, default=5000, help="validation images taken from training")
    p.add_argument("--train_subset", "--train-subset", type=int, default=None,
                   help="train on only the first N training images (quick checks)")
    p.add_argument("--data_dir", "--data-dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    p.add_argument("--save_dir", "--save-dir", default="results",
                   help="where checkpoints and reports go (relative paths are taken from the project folder)")
    p.add_argument("--init_from", "--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from the weights of a model file written by this script (its model "
                        "type and arguments; --model must match), with a fresh optimiser and schedule")
    p.add_argument("--resume", action="store_true",
                   help="continue from <save_dir>/last_<model>_pt.pth with the settings it was started with")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="one batch through train, validation and test, then stop: checks the setup in seconds")
    p.add_argument("--no_test", "--no-test", action="store_true",
                   help="do not score the test set at the end (tune.py: choose on validation only); the best "
                        "checkpoint and the history are still written")
    p.add_argument("--no_plots", "--no-plots", action="store_true",
                   help="score the test set and write metrics_<model>.txt/.json, but none of the PNG figures "
                        "(a few seconds less per run: sweeps, benchmarks, tests)")
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
    if args.weight_decay < 0:
        parser.error(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must be in [0, 1) (0: off, 0.999 typical), got {args.ema}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dropout is not None and args.model not in DROPOUT_ARGS:
        parser.error(f"--dropout: the {args.model} model has no dropout; drop the flag or pick "
                     f"{' or '.join(DROPOUT_ARGS)}")
    if args.init_from is not None and args.resume:
        parser.error("--init_from starts a new run from a model file, --resume continues one: pass one of them")
    if args.patience < 0 or (args.train_subset is not None and args.train_subset < 1):
        parser.error("--patience must be >= 0 and --train_subset >= 1")
    args.device = str(parser.device(args.device))
    if args.cuda_graphs == "on":
        if not args.device.startswith("cuda"):
            parser.error("--cuda_graphs on needs a CUDA device: use --device cuda, or --cuda_graphs auto")
        if distributed.under_torchrun():
            parser.error("--cuda_graphs on is for single-process training; under torchrun use auto or off")
        if args.compile and args.compile_mode in COMPILE_GRAPH_MODES:
            parser.error(f"--compile_mode {args.compile_mode} replays CUDA graphs of its own: use --cuda_graphs "
                         f"off (or auto), or --compile_mode default")
    if args.compile and compile_problem(torch.device(args.device).type, torch.__version__):
        parser.error(compile_problem(torch.device(args.device).type, torch.__version__))
    args.save_dir = str(parser.output_dir(args.save_dir))
    if args.amp is None:
        args.amp = args.device.startswith("cuda")


def compile_problem(device_type, torch_version):
    """Why --compile cannot work here, or None: torch.compile has no MPS backend before torch 2.8."""
    if device_type == "mps" and Version(torch_version.split("+")[0]) < Version("2.8"):
        return f"--compile on MPS needs torch 2.8 or newer (this is {torch_version}): upgrade torch or drop --compile"
    return None


def augment_level(args):
    """The name of the augmentation in data_loader.AUGMENTATIONS (used with --augment)."""
    return args.augment_level or ("strong" if args.strong_augment else "standard")


def model_args_for(args):
    """The constructor arguments that differ from the model's defaults (stored in the checkpoint)."""
    return DROPOUT_ARGS[args.model](args.dropout) if args.dropout is not None else {}


def _dense_dropout_of_improved(p):
    conv_dropout = inspect.signature(MODELS["improved"]).parameters["dropout"].default[0]
    return {"dropout": [conv_dropout, p]}


# --dropout sets the dropout before the dense layers; the convolutional dropout of improved keeps its default.
DROPOUT_ARGS = {"simple": lambda p: {"dropout": p}, "improved": _dense_dropout_of_improved}


# ------------------------------------------------------------------------------------------------------------
# 2. The step: one optimiser step on one batch, and what drives it
# ------------------------------------------------------------------------------------------------------------

def train_step(model, optimizer, x, y, ctx, label_smoothing):
    """One optimiser step on the batch (x, y): forward, loss, backward, update.

    Returns the loss and the logits, detached and still on the device: reading them back here (loss.item())
    would make the GPU wait for Python at every step, so the epoch sums them on the device instead.
    """
    with ctx:  # bf16 autocast on CUDA, nothing elsewhere (decided once, in set_up)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def make_optimizer(args, model, lr, device_type, capturable=False):
    """Adam, SGD with Nesterov momentum, or RMSprop. lr is a float, or a 0-dim tensor on the device for
    fast_step (which writes each step's rate into it on the device); fast_step.optimizer_flags picks PyTorch's
    implementation for the device (fused kernels on a GPU, the plain loop on the CPU)."""
    flags = fast_step.optimizer_flags(args.optimizer, device_type, capturable)
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay, **flags)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay, **flags)
    return torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=args.weight_decay, **flags)


def make_scheduler(args, optimizer, steps_per_epoch, scale=1.0):
    """PyTorch's schedulers: returns (scheduler or None, whether it steps after every batch)."""
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        base = args.learning_rate * scale
        peak = max(args.max_lr * scale, base)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peak, total_steps=total, pct_start=0.15, div_factor=peak / base, final_div_factor=1e3,
            cycle_momentum=False), True
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.epochs // 3), gamma=0.1), False
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1), False
    return None, False


# ------------------------------------------------------------------------------------------------------------
# 3. Scoring a split (outside the training clock, in batches sized for the device), and the run's state
# ------------------------------------------------------------------------------------------------------------

def evaluate(model, images, labels, ctx, dist=None, max_batches=None):
    """(mean cross-entropy, accuracy) of the model on one split, summed over ranks when distributed."""
    dist = dist or distributed.Dist(images.device)
    rank, world = dist.rank, dist.world
    probs = predict_probs(unwrap(model), images[rank::world], ctx, max_batches=max_batches)
    labels = labels[rank::world][:len(probs)]
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
    correct = (probs.argmax(1) == labels).sum()
    nll, correct, count = dist.sum(nll, correct, len(labels))
    return nll / count, correct / count


@dataclass
class RunState:
    """Everything about the run so far that is not a tensor; last_<model>_pt.pth holds it beside the tensors."""
    epoch: int = 0                    # epochs finished
    history: list = field(default_factory=list)
    best_val: float = -1.0            # the best validation accuracy so far ...
    best_val_loss: float = math.inf   # ... its validation loss (breaks ties) ...
    best_epoch: int = 0               # ... and the epoch that reached it
    stale: int = 0                    # epochs since the last improvement (early stopping)
    train_seconds: float = 0.0

    @classmethod
    def from_dict(cls, saved):
        """From a saved state; one written before a field existed keeps that field's default."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def load_resume_state(path):
    """The last_<model>_pt.pth of an earlier run, checked like any model file before anything is built."""
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist (train without --resume first)")
    state = read_checkpoint(path)
    if not all(key in state for key in ("optimizer", "args", "rng", "history")):
        raise CheckpointError(f"{path}: not a resumable training state of this project (a best_model file?)")
    return state


# How this run's optimiser was built for its device (fused kernels, capturable for a CUDA graph, ...): a state
# saved on another device or path must not bring its own, or a resumed GPU run would lose its graph.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, saved):
    """optimizer.load_state_dict(saved), but each group keeps this run's learning rate and implementation
    flags: PyTorch's load replaces the groups with the saved ones, and places Adam's step counts by the
    flags it finds, so the saved groups are given this run's flags first."""
    saved = {**saved, "param_groups": [{**g, **{k: mine[k] for k in IMPLEMENTATION_FLAGS if k in mine}}
                                       for g, mine in zip(saved["param_groups"], optimizer.param_groups)]}
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def resume_schedule(scheduler, per_batch, saved, steps_done, optimizer):
    """Bring a fresh scheduler to where the interrupted run's was. A per-batch schedule is a function of the
    step alone: it is stepped forward. A per-epoch one (step, plateau) depends on validation losses: its saved
    state is loaded, and the rate it had reached put back into the optimiser."""
    if scheduler is None:
        return
    if per_batch:
        with warnings.catch_warnings():  # no optimiser step in between: PyTorch's "step order" warning is moot
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
            for _ in range(steps_done):
                scheduler.step()
    elif saved:
        scheduler.load_state_dict(saved)
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr


def write_history_csv(history, path):
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def fail(message, code=1):
    _fail(PROG, message, code)


def device_label(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------------------
# 4. The run: set_up, the epoch loop (train_epoch), validate_and_keep_best, finish
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What set_up builds and the other phases use."""
    args: argparse.Namespace
    dist: distributed.Dist
    say: Any
    save_dir: Path
    best_path: Path
    last_path: Path
    device: torch.device = None
    ctx: Any = None                 # the precision: bf16 autocast, or nullcontext()
    shuffle_gen: torch.Generator = None
    data_seconds: float = 0.0
    val: tuple = None               # (images, labels) on the device
    test: tuple = None
    batches: data_loader.TrainBatches = None
    model_args: dict = None
    model: torch.nn.Module = None   # the plain model (its weights are what the checkpoints hold)
    step_model: torch.nn.Module = None  # what the step calls: the model, compiled and/or in DDP
    n_params: int = 0
    optimizer: torch.optim.Optimizer = None
    scheduler: Any = None           # the plain loop's PyTorch scheduler (None with --scheduler none)
    per_batch: bool = False         # whether it steps after every batch (onecycle, cosine) or every epoch
    fast: fast_step.FastStep = None  # the step on the device and its CUDA graph, on one CUDA GPU
    ema: AveragedModel = None       # --ema: the moving average of the weights (ema.module is a model like model)
    lr_used: float = 0.0            # the rate of the plain loop's last step (for the history)
    warmup_seconds: float = 0.0
    state: RunState = field(default_factory=RunState)


def step_path(args, device, dist):
    """(use fast_step, capture its CUDA graph, torch.compile replays graphs of its own), decided once.

    fast_step on one CUDA GPU, for the whole-step graph (unless torch.compile's reduce-overhead/max-autotune
    replay graphs of their own, which also want fast_step's device-side step); the plain loop everywhere else.
    """
    one_gpu = device.type == "cuda" and not dist.enabled
    compile_graphs = args.compile and args.compile_mode in COMPILE_GRAPH_MODES
    capture = one_gpu and args.cuda_graphs != "off" and not compile_graphs and not args.dry_run
    return capture or (one_gpu and compile_graphs), capture, compile_graphs


def set_up(args, dist, say):
    run = Run(args, dist, say, Path(args.save_dir), Path(args.save_dir) / f"best_model_{args.model}_pt.pth",
              Path(args.save_dir) / f"last_{args.model}_pt.pth")
    resume = None
    if args.resume:
        try:
            resume = load_resume_state(run.last_path)
        except CheckpointError as err:
            fail(str(err), 2)
        for key in RUN_SETTINGS:  # the run ends exactly as it would have without the interruption
            if key in resume["args"]:  # a state from an older version lacks the newer settings
                setattr(args, key, resume["args"][key])

    # Device and precision are decided once, here, and never looked at again in the loop.
    device = run.device = dist.device
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable sums
    torch.use_deterministic_algorithms(args.deterministic)  # both ways: main() may run twice in one process
    torch.backends.cudnn.deterministic = args.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not args.deterministic
    # The autocast cache is off: it cannot live inside a captured graph, and each weight is cast once anyway.
    run.ctx = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if args.amp
               else nullcontext())
    layout = memory_format(device)  # channels_last, but the standard layout on MPS
    torch.manual_seed(args.seed)
    run.shuffle_gen = torch.Generator().manual_seed(args.seed)  # the same on every rank: each takes its own shard

    # The data: all of MNIST on the device as uint8.
    t0 = time.perf_counter()
    try:
        splits = data_loader.get_splits(args.data_dir, args.val_size, args.seed, device, args.train_subset)
    except (data_loader.DataError, ValueError) as err:
        fail(str(err), 2)
    run.data_seconds = time.perf_counter() - t0
    (train_x, train_y), run.val, run.test = splits["train"], splits["val"], splits["test"]
    try:
        run.batches = data_loader.TrainBatches(
            train_x, train_y, args.batch_size, augment=args.augment and augment_level(args),
            generator=run.shuffle_gen, rank=dist.rank, world_size=dist.world, memory_format=layout)
    except ValueError as err:
        fail(str(err), 2)

    # The model: new, or (--init_from) a saved one's weights to fine-tune, built with that file's arguments.
    run.model_args = model_args_for(args)
    start = None
    if args.init_from is not None:  # never with --resume (check_args)
        try:
            start, saved = load_checkpoint(args.init_from, expected_model=args.model)
        except CheckpointError as err:
            fail(str(err), 2)
        run.model_args = {**saved["model_args"], **run.model_args}  # --dropout still overrides
    elif resume is not None:
        run.model_args = resume.get("model_args", run.model_args)  # as the run was built (a fine-tune's: its file's)
    model = run.model = build_model(args.model, **run.model_args).to(device).to(memory_format=layout)
    if start is not None:
        model.load_state_dict(start.state_dict())
    run.n_params = count_parameters(model)
    if args.ema:
        # swa_utils' moving average: a copy of the model whose weights and batch-norm buffers (use_buffers) follow
        # the model's by ema <- decay * ema + (1 - decay) * model after every step, starting from the first step's.
        run.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    say(f"{args.model} CNN: {run.n_params:,} parameters | device {device_label(device)}"
        f"{f' x {dist.world} processes' if dist.enabled else ''} | amp {'bf16' if args.amp else 'off'} | "
        f"train {len(train_x):,} val {len(run.val[0]):,} test {len(run.test[0]):,} | data ready in "
        f"{run.data_seconds:.1f}s")
    step_model = distributed.wrap(model, dist)
    scale = distributed.lr_scale(args.lr_scaling, dist.world)
    if dist.enabled:
        torch.manual_seed(args.seed + 1 + dist.rank)  # a different augmentation on every rank
        say(f"distributed: {dist.world} process{'es' if dist.world > 1 else ''} ({dist.backend}, "
            f"DistributedDataParallel) x --batch_size {run.batches.batch_size} = "
            f"{dist.world * run.batches.batch_size} images per step; learning rates x {scale:.2f} "
            f"(--lr_scaling {args.lr_scaling})")

    # The step's machinery. The plain loop (CPU, MPS, torchrun, --cuda_graphs off) steps PyTorch's scheduler
    # after each batch. On one CUDA GPU fast_step runs the same train_step with the rate in a device table.
    use_fast, capture, compile_graphs = step_path(args, device, dist)
    base_lr = args.learning_rate * scale
    steps_per_epoch, total_steps = len(run.batches), args.epochs * len(run.batches)
    if use_fast:
        lrs = fast_step.LearningRates(lambda opt: make_scheduler(args, opt, steps_per_epoch, scale), base_lr,
                                      total_steps, steps_per_epoch, device)
        run.optimizer = make_optimizer(args, step_model, lrs.table[0].clone(), device.type, capturable=capture)
    else:
        run.optimizer = make_optimizer(args, step_model, base_lr, device.type)
        run.scheduler, run.per_batch = make_scheduler(args, run.optimizer, steps_per_epoch, scale)
    if args.compile:
        step_model = torch.compile(step_model, mode=None if args.compile_mode == "default" else args.compile_mode)
    run.step_model = step_model

    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        if run.ema is not None and "ema" in resume:  # a state saved without --ema: the average starts afresh
            try:
                run.ema.load_state_dict(resume["ema"])
            except (RuntimeError, KeyError) as err:
                fail(f"{run.last_path}: its --ema average does not fit the model ({str(err).splitlines()[0][:120]})", 2)
        load_optimizer_state(run.optimizer, resume["optimizer"])
        schedule = (resume.get("lr_schedule") or {"scheduler": resume.get("scheduler")}).get("scheduler")
        if use_fast:
            lrs.load_state_dict({"scheduler": schedule}, resume["epoch"])
        else:
            resume_schedule(run.scheduler, run.per_batch, schedule, resume["epoch"] * steps_per_epoch, run.optimizer)
        run.shuffle_gen.set_state(resume["rng"]["shuffle"])
        set_random_state(resume["rng"], device)
        if dist.enabled:
            torch.manual_seed(args.seed + 1 + dist.rank + 7919 * resume["epoch"])
        run.state = RunState.from_dict(resume)
        say(f"resuming after epoch {run.state.epoch} of {args.epochs} from {run.last_path}")

    # Warm-up before the clock: cuDNN autotuning and torch.compile, and on one GPU the capture of the graph.
    model.train()
    if use_fast:
        try:
            run.fast, run.warmup_seconds = fast_step.enable(
                train_step, step_model, run.optimizer, run.batches, lrs, run.ctx, args.label_smoothing,
                capture_graph=capture, mark_cudagraph_step=compile_graphs, ema=run.ema,
                ema_decay=args.ema)
        except fast_step.CaptureFailed as err:
            fail(str(err))
    elif not args.dry_run and (device.type == "cuda" or args.compile):
        # The batch is drawn inside each warm-up step, so its augmentation's random draws are put back too.
        _, run.warmup_seconds = fast_step.warm_up(
            lambda: train_step(step_model, run.optimizer, *run.batches.batch(0), run.ctx, args.label_smoothing),
            model, run.optimizer)
    if run.warmup_seconds:
        what = ", ".join(w for w in (args.compile and f"compiled ({args.compile_mode})",
                                     run.fast is not None and run.fast.graph is not None
                                     and "step captured as a CUDA graph") if w) or "warmed up"
        say(f"{what} in {run.warmup_seconds:.1f}s: not counted as training time")
    return run


def train_epoch(run, epoch, bar=None, max_steps=None):
    """One pass over the training batches; returns (mean loss, accuracy, seconds) over all ranks.

    The clock runs from the first step to the end of the last (synchronised); validation is not in it.
    """
    args = run.args
    run.model.train()
    run.batches.new_epoch()  # a new shuffled order
    steps = len(run.batches) if max_steps is None else min(max_steps, len(run.batches))
    synchronize(run.device)
    t = time.perf_counter()
    if run.fast is not None:  # one CUDA GPU: the same step, replayed from its graph (fast_step.py)
        loss_sum, correct = run.fast.run_epoch(epoch, steps, bar)
    else:  # the plain loop
        loss_sum = torch.zeros((), device=run.device)
        correct = torch.zeros((), dtype=torch.long, device=run.device)
        for i in range(steps):
            x, y = run.batches.batch(i)
            loss, logits = train_step(run.step_model, run.optimizer, x, y, run.ctx, args.label_smoothing)
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            run.lr_used = run.optimizer.param_groups[0]["lr"]
            if run.per_batch:
                run.scheduler.step()
            loss_sum += loss.float() * len(y)  # summed on the device: no loss.item(), no wait for the GPU
            correct += (logits.argmax(1) == y).sum()
            if bar is not None:
                bar.update(1)
    synchronize(run.device)
    seconds = time.perf_counter() - t
    loss_sum, correct, seen = run.dist.sum(loss_sum, correct, steps * run.batches.batch_size)
    return loss_sum / seen, correct / seen, seconds


def end_epoch_schedule(run, epoch, val_loss):
    """The rate the epoch's last step used (for the history), and the per-epoch schedules' step."""
    if run.fast is not None:
        used = run.fast.lrs.used_in(epoch)
        run.fast.lrs.end_epoch(epoch, val_loss)
        return used
    used = float(run.lr_used)
    if run.scheduler is not None and not run.per_batch:
        run.scheduler.step(val_loss) if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) \
            else run.scheduler.step()
    return used


def schedule_state(run):
    """What --resume needs of the schedule: the per-epoch scheduler's state (a per-batch one is rebuilt)."""
    if run.fast is not None:
        return run.fast.lrs.state_dict()
    return {"scheduler": run.scheduler.state_dict() if run.scheduler is not None and not run.per_batch else None}


def better(acc, loss, than_acc, than_loss):
    """Whether a validation score beats another: the higher accuracy, and on a tie the lower loss (ties are common
    on 5,000 images, where one image is 0.02%)."""
    return acc > than_acc or (acc == than_acc and loss < than_loss)


def validate_and_keep_best(run, epoch, train_loss, train_acc, seconds):
    """Score the validation split (with --ema the moving average too), log the epoch, save the best and the
    resumable state; returns the row and whether it improved."""
    args, state = run.args, run.state
    val_loss, val_acc = evaluate(run.model, *run.val, run.ctx, run.dist)
    row = {"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
           "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "lr": end_epoch_schedule(run, epoch, val_loss),
           "seconds": round(seconds, 3)}
    # This epoch's candidate: the model, or with --ema whichever of the model and its average validates better.
    kept, weights, kept_loss, kept_acc, ema_note = run.model, "model", val_loss, val_acc, ""
    if run.ema is not None:
        ema_loss, ema_acc = evaluate(run.ema.module, *run.val, run.ctx, run.dist)
        if better(ema_acc, ema_loss, val_acc, val_loss):
            kept, weights, kept_loss, kept_acc = run.ema.module, "ema", ema_loss, ema_acc
        row.update(ema_val_loss=round(ema_loss, 6), ema_val_acc=round(ema_acc, 6), weights=weights)
        ema_note = f" | ema loss {ema_loss:.4f} acc {ema_acc * 100:6.2f}% -> {weights:<5}"
    improved = better(kept_acc, kept_loss, state.best_val, state.best_val_loss)
    if improved:
        state.best_val, state.best_val_loss, state.best_epoch, state.stale = kept_acc, kept_loss, epoch, 0
    else:
        state.stale += 1
    state.epoch, state.train_seconds = epoch, state.train_seconds + seconds
    state.history.append(row)
    if run.dist.is_main:
        if improved:  # "weights" says which of the two the best checkpoint holds
            atomic_save(make_checkpoint(kept, args.model, data_loader.NORMALIZATION, run.model_args, epoch=epoch,
                                        val_accuracy=kept_acc, weights=weights, args=vars(args)), run.best_path)
        # The resumable state holds the model itself, and with --ema the average beside it.
        ckpt = make_checkpoint(run.model, args.model, data_loader.NORMALIZATION, run.model_args, epoch=epoch,
                               val_accuracy=val_acc, weights="model", args=vars(args))
        ema = {} if run.ema is None else {"ema": {k: v.detach().cpu() for k, v in run.ema.state_dict().items()}}
        atomic_save({**ckpt, **asdict(state), **ema, "optimizer": run.optimizer.state_dict(),
                     "lr_schedule": schedule_state(run),
                     "rng": {**random_state(run.device), "shuffle": run.shuffle_gen.get_state()}},
                    run.last_path)
    run.say(f"epoch {epoch:>3}/{args.epochs} | train loss {train_loss:.4f} acc {train_acc * 100:6.2f}% | "
            f"val loss {val_loss:.4f} acc {val_acc * 100:6.2f}%{ema_note}{' *' if improved else '  '} | "
            f"lr {row['lr']:.2e} | {seconds:5.2f}s", flush=True)
    return row, improved


def calibrate(run, best):
    """Temperature scaling: fit one number on the validation split so that the kept model's probabilities mean
    what they say, and fold it into its last layer (the best checkpoint then reads like any other). Label
    smoothing, the default, trains a model to say about 91% even where it is almost always right; a person
    reading predict.py's percentages, and the number reader multiplying them, need them true. The predicted
    digit never changes. Every rank fits the same number on the same gathered probabilities."""
    import metrics
    probs = distributed.gather_probs(run.model, run.val[0], run.ctx, run.dist)
    t = metrics.fit_temperature(run.val[1].cpu().numpy(), probs.cpu().numpy())
    fold_temperature(unwrap(run.model), t)
    best["state_dict"] = {k: v.detach().cpu() for k, v in unwrap(run.model).state_dict().items()}
    best["temperature"] = best.get("temperature", 1.0) * t  # a finished run resumed again folds in another ~1.0


def finish(run, wall_start):
    """Calibrate the epoch chosen on validation, score the test set once with it, and write the report."""
    args, state, dist = run.args, run.state, run.dist
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    best = torch.load(run.best_path, map_location="cpu", weights_only=True)
    run.model.load_state_dict(best["state_dict"])
    calibrate(run, best)
    if not args.no_test:
        probs = distributed.gather_probs(run.model, run.test[0], run.ctx, dist)
    if not dist.is_main:
        return 0
    write_history_csv(state.history, run.save_dir / f"history_{args.model}.csv")
    if args.no_test:
        atomic_save(best, run.best_path)
        print(f"best validation accuracy {state.best_val * 100:.2f}% at epoch {state.best_epoch} | training "
              f"{state.train_seconds:.1f}s | test set not scored (--no_test) | saved {run.best_path}")
        return 0
    import metrics  # imported late: scikit-learn is only needed once training is done
    test_x, test_y = run.test
    y_true = test_y.cpu().numpy()
    report = metrics.compute_metrics(y_true, probs.cpu().numpy())
    best.update(test_accuracy=report["accuracy"], test_loss=report["loss"], epochs_run=len(state.history),
                training_seconds=round(state.train_seconds, 2))
    atomic_save(best, run.best_path)
    info = {"model": args.model, "parameters": run.n_params, "best_epoch": state.best_epoch,
            "epochs_run": len(state.history), "val_accuracy": round(state.best_val, 6),
            "training_seconds": round(state.train_seconds, 2), "data_seconds": round(run.data_seconds, 2),
            "warmup_seconds": round(run.warmup_seconds, 2),
            "compile_seconds": round(run.warmup_seconds, 2) if args.compile else 0.0,
            "cuda_graphs": run.fast is not None and run.fast.graph is not None,
            "wall_seconds": round(time.perf_counter() - wall_start, 2),
            "device": device_label(run.device), "processes": dist.world, "amp": "bf16" if args.amp else "off",
            "seed": args.seed, "torch": torch.__version__, "weights": best.get("weights", "model"),
            "temperature": round(best["temperature"], 4)}
    metrics.write_metrics(report, run.save_dir, args.model, info)
    if not args.no_plots:
        import visualization  # imported late, and only here: matplotlib and seaborn take seconds to load
        visualization.plot_training_history(state.history, run.save_dir / "training_history.png", state.best_epoch)
        visualization.plot_test_report(run.save_dir, test_x.cpu().numpy(), y_true, probs.cpu().numpy(), report)
    kept = "model's moving average (--ema)" if best.get("weights") == "ema" else "model"
    print(f"test accuracy {report['accuracy'] * 100:.2f}% (loss {report['loss']:.4f}) with the epoch-"
          f"{state.best_epoch} {kept} chosen on validation ({state.best_val * 100:.2f}%) | training "
          f"{state.train_seconds:.1f}s | saved {run.best_path}")
    return 0


def dry_run(run):
    t = time.perf_counter()
    loss, _, _ = train_epoch(run, 1, max_steps=1)
    val_loss, _ = evaluate(run.model, *run.val, run.ctx, run.dist, max_batches=1)
    test_loss, _ = evaluate(run.model, *run.test, run.ctx, run.dist, max_batches=1)
    run.say(f"dry run: one batch each through train (loss {loss:.3f}), validation (loss {val_loss:.3f}) and "
            f"test (loss {test_loss:.3f}) in {time.perf_counter() - t:.2f}s; nothing written. Setup works.")
    return 0


def train(args, dist, on_epoch=None):
    wall_start = time.perf_counter()
    say = print if dist.is_main else (lambda *a, **k: None)  # only rank 0 talks and writes
    run = set_up(args, dist, say)
    if args.dry_run:
        return dry_run(run)
    epoch, bar = run.state.epoch, None
    try:
        for epoch in range(run.state.epoch + 1, args.epochs + 1):
            if dist.is_main and not args.no_progress:
                bar = tqdm(total=len(run.batches), desc=f"epoch {epoch}/{args.epochs}", leave=False, unit="batch",
                           dynamic_ncols=True)
            train_loss, train_acc, seconds = train_epoch(run, epoch, bar)
            if bar is not None:
                bar.close()
            if not math.isfinite(train_loss):
                fail(f"training diverged at epoch {epoch} (loss is NaN/inf): try a lower --learning_rate or "
                     f"--max_lr; the last good state is in {run.last_path if epoch > 1 else 'no file yet'}")
            row, _ = validate_and_keep_best(run, epoch, train_loss, train_acc, seconds)
            if on_epoch is not None and dist.is_main:
                on_epoch(row)
            if dist.agree(bool(args.patience) and run.state.stale >= args.patience):
                say(f"early stop: no better validation accuracy for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if not dist.is_main:
            return 130
        if run.state.history:
            print(f"\ninterrupted in epoch {epoch}: the state after epoch {run.state.epoch} is saved in "
                  f"{run.last_path}\nresume with: python train_pytorch.py --model {args.model} --save_dir "
                  f"{args.save_dir} --resume", file=sys.stderr)
        else:
            print(f"\ninterrupted in epoch {epoch}, before any epoch finished: nothing to resume, nothing "
                  f"written", file=sys.stderr)
        return 130
    return finish(run, wall_start)


def main(argv=None, on_epoch=None):
    """The command. on_epoch(row), if given, is called on rank 0 after each epoch's validation with its history
    row (tune.py prunes trials with it); an exception it raises ends the run, the epoch's files already written."""
    parser = parse_args(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        dist = distributed.setup_distributed(torch.device(args.device), args.dist_timeout)
    except Exception as err:  # a bad rendezvous address, a port in use, a peer that never came
        fail(f"could not join the torchrun process group ({str(err).splitlines()[0][:160]})", 2)
    args.device = str(dist.device)
    try:
        return train(args, dist, on_epoch)
    except (RuntimeError, torch.distributed.DistError) as err:
        if not dist.enabled:
            raise
        fail(f"rank {dist.rank}: lost contact with the other training processes: one of them failed or timed out "
             f"(see its output); {str(err).splitlines()[0][:160]}")
    finally:
        distributed.close(dist)


if __name__ == "__main__":
    sys.exit(main())
