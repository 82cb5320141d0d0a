"""Train a CNN on MNIST: python train_pytorch.py --model simple

The whole dataset lives on the training device as uint8; batches are normalised and augmented there. The best
epoch on a validation split (never the test set) is kept as results/best_model_<model>_pt.pth; everything
needed to resume goes to results/last_<model>_pt.pth; the test set is scored once, at the end.

Read it top to bottom: the settings, then the step (one optimiser step with everything on the device, replayed
as a CUDA graph on a GPU), then the run in four phases: set_up, train_epoch, validate_and_keep_best, finish.
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

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from cnn_pytorch import MODELS, build_model, count_parameters
from checkpoint import CheckpointError, atomic_save, make_checkpoint, read_checkpoint, unwrap
from common import PROJECT_DIR, OneLineParser, atomic_write
from data_loader import predict_probs


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
                "dropout", "lr_scaling", "deterministic")
# torch.compile modes that replay CUDA graphs of their own: the project's whole-step graph stays out of their way.
COMPILE_GRAPH_MODES = ("reduce-overhead", "max-autotune")
WARM_UP_STEPS = 3  # cuDNN autotune, lazy initialisation, compilation: all done before the clock starts


def parse_args(argv=None):
    p = OneLineParser(prog="train_pytorch.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named set of defaults: fast = --model tiny --epochs 1 --max_lr 0.01 --no_augment "
                        "(99.1%% in about 8 s on a 2-core CPU); accurate = --model improved --epochs 20 "
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
    p.add_argument("--label_smoothing", "--label-smoothing", type=float, default=0.1,
                   help="share of the target spread over all classes in the training loss (0 to <1); it also "
                        "puts a floor of about 0.5 under the training loss. Measured on a 2-core CPU, seed 0: "
                        "one epoch of simple 98.98%% at 0 vs 99.12%% at 0.1, ten epochs 99.42%% vs 99.59%%")
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
                        "for single-process CUDA training; a capture that fails falls back to the eager step")
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
    p.add_argument("--resume", action="store_true",
                   help="continue from <save_dir>/last_<model>_pt.pth with the settings it was started with")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="one batch through train, validation and test, then stop: checks the setup in seconds")
    p.add_argument("--no_test", "--no-test", action="store_true",
                   help="do not score the test set at the end (tune.py: choose on validation only); the best "
                        "checkpoint and the history are still written")
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
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dropout is not None and args.model not in DROPOUT_ARGS:
        parser.error(f"--dropout: the {args.model} model has no dropout; drop the flag or pick "
                     f"{' or '.join(DROPOUT_ARGS)}")
    if args.patience < 0 or (args.train_subset is not None and args.train_subset < 1):
        parser.error("--patience must be >= 0 and --train_subset >= 1")
    args.device = str(parser.device(args.device))
    if args.cuda_graphs == "on":
        if not args.device.startswith("cuda"):
            parser.error("--cuda_graphs on needs a CUDA device: use --device cuda, or --cuda_graphs auto")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            parser.error("--cuda_graphs on is for single-process training; under torchrun use auto or off")
        if args.compile and args.compile_mode in COMPILE_GRAPH_MODES:
            parser.error(f"--compile_mode {args.compile_mode} replays CUDA graphs of its own: use --cuda_graphs "
                         f"off (or auto), or --compile_mode default")
    args.save_dir = str(parser.output_dir(args.save_dir))
    if args.amp is None:
        args.amp = args.device.startswith("cuda")


def model_args_for(args):
    """The constructor arguments that differ from the model's defaults (stored in the checkpoint)."""
    return DROPOUT_ARGS[args.model](args.dropout) if args.dropout is not None else {}


def _dense_dropout_of_improved(p):
    conv_dropout = inspect.signature(MODELS["improved"]).parameters["dropout"].default[0]
    return {"dropout": [conv_dropout, p]}


# --dropout sets the dropout before the dense layers; the convolutional dropout of improved keeps its default.
DROPOUT_ARGS = {"simple": lambda p: {"dropout": p}, "improved": _dense_dropout_of_improved}


# ------------------------------------------------------------------------------------------------------------
# Torchrun: where this process stands
# ------------------------------------------------------------------------------------------------------------

class Dist:
    """Where this process stands in a torchrun launch; a plain run is rank 0 of 1."""

    def __init__(self, device, rank=0, world=1, local_rank=0):
        self.device, self.rank, self.world, self.local_rank = device, rank, world, local_rank
        self.is_main = rank == 0
        self.enabled = world > 1

    def sum(self, *values):
        """Sum numbers or 0-dim tensors over all ranks (one all_reduce); returns floats.

        float32, never float64: Apple's MPS has no float64, and counts up to 2**24 are exact in float32.
        """
        t = torch.stack([torch.as_tensor(v, device=self.device).float() for v in values])
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


def lr_scale(args, world):
    return {"none": 1.0, "sqrt": world ** 0.5, "linear": float(world)}[args.lr_scaling]


# ------------------------------------------------------------------------------------------------------------
# The step: one optimiser step on one batch, everything on the device
# ------------------------------------------------------------------------------------------------------------

def make_optimizer(args, model, lr, capturable=False):
    """lr is a 0-dim tensor on the training device, shared by every parameter group: the step writes the
    scheduled rate into it on the device, so a captured graph follows the schedule without the host.

    capturable: the step will be captured in a CUDA graph (PyTorch refuses to capture Adam without it, and warns
    when a capturable optimiser runs eagerly)."""
    cuda = lr.device.type == "cuda"
    if args.optimizer == "adam":  # fused on CUDA (one kernel for all parameters); the plain loop elsewhere
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay,
                                **({"fused": True, "capturable": capturable} if cuda else {"foreach": False}))
    if args.optimizer == "sgd":  # SGD keeps no step count on the host: fused SGD is graph-safe as it is
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay, **({"fused": True} if cuda else {}))
    return torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=args.weight_decay,
                               **({"capturable": capturable, "foreach": True} if cuda else {}))


def make_scheduler(args, optimizer, steps_per_epoch, scale=1.0):
    """PyTorch's schedulers: returns (scheduler or None, whether it steps every batch)."""
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


class LearningRates:
    """The learning rate of every step of the run, as one float32 tensor on the device that the step indexes.

    PyTorch's own schedulers compute the values, driving a stand-in optimiser that holds one dummy parameter
    (they write Python floats into their optimiser, which a CUDA graph could not see). Per-batch schedules
    (onecycle, cosine) fill the whole table up front; per-epoch ones (step, plateau) fill the next epoch's rows
    when an epoch ends, since plateau needs that epoch's validation loss.
    """

    def __init__(self, args, steps_per_epoch, scale, device):
        self.steps_per_epoch, self.plateau = steps_per_epoch, args.scheduler == "plateau"
        self._stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate * scale)
        self.scheduler, self.per_batch = make_scheduler(args, self._stand_in, steps_per_epoch, scale)
        total = args.epochs * steps_per_epoch
        self.table = torch.tensor(self._per_batch_values(total) if self.per_batch else [self.current()] * total,
                                  dtype=torch.float32, device=device)

    def current(self):
        return self._stand_in.param_groups[0]["lr"]

    def _step(self, *metric):
        with warnings.catch_warnings():  # the stand-in never steps: PyTorch's "step order" warning is moot here
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
            self.scheduler.step(*metric)

    def _per_batch_values(self, total):
        values = []
        for i in range(total):
            values.append(self.current())
            if i + 1 < total:  # OneCycleLR refuses to step past its last step
                self._step()
        return values

    def end_epoch(self, epoch, val_loss):
        """After epoch `epoch` (1-based): the per-epoch schedules set the rate of the epochs that follow."""
        if self.scheduler is None or self.per_batch:
            return
        self._step(val_loss) if self.plateau else self._step()
        self.table[epoch * self.steps_per_epoch:].fill_(self.current())

    def used_in(self, epoch):
        """The rate of the last step of epoch `epoch` (for the history)."""
        return self.table[epoch * self.steps_per_epoch - 1].item()

    def state_dict(self):
        return {"table": self.table.cpu(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state, start_epoch):
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if "table" in state and state["table"].shape == self.table.shape:
            self.table.copy_(state["table"])
        elif not self.per_batch and self.scheduler is not None and state.get("scheduler") is not None:
            # A state from before the table existed: the scheduler's last rate holds from here on.
            self.table[start_epoch * self.steps_per_epoch:].fill_(float(state["scheduler"]["_last_lr"][0]))


class TrainStep:
    """One optimiser step, with every part of it on the device and nothing read back to the host.

    The batch is gathered from the epoch's device-side order by a step counter that lives on the device; the
    learning rate is copied from the LearningRates table by the same counter; the running loss and accuracy are
    summed on the device. So the same code runs eagerly (CPU, MPS, torchrun) and, captured once, as a CUDA graph
    whose replays advance on their own. In a captured step, zero_grad(set_to_none=True) makes backward write
    fresh gradients into memory the graph owns, which is what every replay then reuses.
    """

    def __init__(self, model, batches, optimizer, lrs, ctx, label_smoothing=0.0, mark_cudagraph_step=False):
        device = batches.images.device
        self.model, self.batches, self.optimizer, self.lrs, self.ctx = model, batches, optimizer, lrs, ctx
        self.label_smoothing, self.mark_cudagraph_step = label_smoothing, mark_cudagraph_step
        self.lr = optimizer.param_groups[0]["lr"]
        self.counter = torch.zeros((), dtype=torch.long, device=device)  # steps taken since the run began
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self):
        if self.mark_cudagraph_step:  # torch.compile's own CUDA graphs: a new step, old outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        x, y = self.batches.batch(self.counter % len(self.batches))
        self.lr.copy_(self.lrs.table.index_select(0, self.counter.view(1)).view(()))
        with self.ctx:
            logits = self.model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach().float() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.counter += 1

    def start_epoch(self, epoch):
        """Before epoch `epoch` (1-based): the counter points at its first step, the sums start from zero."""
        self.counter.fill_((epoch - 1) * len(self.batches))
        self.loss_sum.zero_()
        self.correct.zero_()


def _snapshot(model, optimizer, step):
    """Copies of everything a few training steps change, so that warm_up can put all of it back."""
    device = step.counter.device
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                          for p, s in optimizer.state.items()},
            "counter": step.counter.clone(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore(saved, model, optimizer, step):
    """In place, never by replacing tensors: a captured graph keeps pointing at the same memory."""
    device = step.counter.device
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(saved["model"][k])
        for p, state in optimizer.state.items():
            before = saved["optimizer"].get(p)
            for k, v in state.items():
                if torch.is_tensor(v):  # a state made by the warm-up itself starts from zero, as a fresh one does
                    v.copy_(before[k]) if before is not None else v.zero_()
    step.counter.copy_(saved["counter"])
    step.loss_sum.zero_()
    step.correct.zero_()
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def warm_up(step, model, optimizer, capture=False, steps=WARM_UP_STEPS, say=print):
    """A few real steps before the clock starts, then everything put back; returns (CUDA graph or None, seconds).

    The steps pay for what would otherwise land in the first timed epoch: cuDNN autotuning, lazy CUDA
    initialisation, torch.compile. With capture=True (CUDA only), one step is then captured as a CUDA graph. Then
    the weights, batch-norm statistics, optimiser state, step counter and random state are put back in place,
    so the run that follows is the run it would have been without the warm-up. A capture that fails is one line
    and the eager step, never a crash.
    """
    device = step.counter.device
    saved = _snapshot(model, optimizer, step)
    t = time.perf_counter()
    graph = None
    if device.type == "cuda":
        side = torch.cuda.Stream(device)  # warm-up off the default stream, as graph capture wants it
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(steps):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        if capture:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
            except Exception as err:  # an op that cannot be captured: train eagerly instead
                graph = None
                say(f"CUDA graph capture failed, training with the eager step instead "
                    f"({' '.join(str(err).split())[:160]})")
        torch.cuda.synchronize(device)
    else:
        for _ in range(steps):
            step()
    seconds = time.perf_counter() - t
    _restore(saved, model, optimizer, step)
    if graph is None:
        optimizer.zero_grad(set_to_none=True)
    return graph, seconds


# ------------------------------------------------------------------------------------------------------------
# Scoring a split (outside the training clock, in large batches)
# ------------------------------------------------------------------------------------------------------------

def eval_batch_size(device):
    return 5000 if device.type == "cuda" else 1000


def gather_probs(model, images, ctx, dist):
    """predict_probs over all ranks: each scores every world-th image, then all gather the whole (N, 10)."""
    batch = eval_batch_size(images.device)
    if not dist.enabled:
        return predict_probs(unwrap(model), images, ctx, batch_size=batch)
    n, world = len(images), dist.world
    per_rank = -(-n // world)
    mine = predict_probs(unwrap(model), images[dist.rank::world], ctx, batch_size=batch)
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
    probs = predict_probs(unwrap(model), images[rank::world], ctx, batch_size=eval_batch_size(images.device),
                          max_batches=max_batches)
    labels = labels[rank::world][:len(probs)]
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
    correct = (probs.argmax(1) == labels).sum()
    nll, correct, count = dist.sum(nll, correct, len(labels))
    return nll / count, correct / count


# ------------------------------------------------------------------------------------------------------------
# The run's state: what carries from one epoch to the next, saved and restored as a whole
# ------------------------------------------------------------------------------------------------------------

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
    """The last_<model>_pt.pth of an earlier run, checked like any model file before anything is built."""
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist (train without --resume first)")
    state = read_checkpoint(path)
    if not all(key in state for key in ("optimizer", "args", "rng", "history")):
        raise CheckpointError(f"{path}: not a resumable training state of this project (a best_model file?)")
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


# ------------------------------------------------------------------------------------------------------------
# The run, in four phases: set_up, train_epoch, validate_and_keep_best, finish
# ------------------------------------------------------------------------------------------------------------

class Run:
    """What set_up builds and the other phases use: the settings, the data, the model and its step."""


def set_up(args, dist, say):
    run = Run()
    run.args, run.dist, run.say = args, dist, say
    save_dir = Path(args.save_dir)
    run.save_dir = save_dir
    run.best_path = save_dir / f"best_model_{args.model}_pt.pth"
    run.last_path = save_dir / f"last_{args.model}_pt.pth"
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
    torch.manual_seed(args.seed)
    run.shuffle_gen = torch.Generator().manual_seed(args.seed)  # the same on every rank: each takes its own shard

    t0 = time.perf_counter()
    try:
        splits = data_loader.get_splits(args.data_dir, args.val_size, args.seed, device, args.train_subset)
    except (data_loader.DataError, ValueError) as err:
        fail(str(err), 2)
    run.data_seconds = time.perf_counter() - t0
    (train_x, train_y), run.val, run.test = splits["train"], splits["val"], splits["test"]
    try:
        run.batches = data_loader.TrainBatches(
            train_x, train_y, args.batch_size, augment=args.augment and ("strong" if args.strong_augment else "standard"),
            generator=run.shuffle_gen, rank=dist.rank, world_size=dist.world)
    except ValueError as err:
        fail(str(err), 2)

    run.model_args = model_args_for(args)
    model = run.model = build_model(args.model, **run.model_args).to(device).to(memory_format=torch.channels_last)
    run.n_params = count_parameters(model)
    say(f"{args.model} CNN: {run.n_params:,} parameters | device {device_label(device)}"
        f"{f' x {dist.world} processes' if dist.enabled else ''} | amp {'bf16' if args.amp else 'off'} | "
        f"train {len(train_x):,} val {len(run.val[0]):,} test {len(run.test[0]):,} | data ready in "
        f"{run.data_seconds:.1f}s")
    step_model = model
    if dist.enabled:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + 1 + dist.rank)  # a different augmentation on every rank
    scale = lr_scale(args, dist.world)
    if dist.enabled:
        say(f"distributed: {dist.world} processes x --batch_size {run.batches.batch_size} = "
            f"{dist.world * run.batches.batch_size} images per step; learning rates x {scale:.2f} "
            f"(--lr_scaling {args.lr_scaling})")
    compile_graphs = args.compile and args.compile_mode in COMPILE_GRAPH_MODES
    # Whole-step CUDA graphs: single-process CUDA, unless torch.compile replays graphs of its own.
    run.capture = (args.cuda_graphs != "off" and device.type == "cuda" and not dist.enabled
                   and not compile_graphs and not args.dry_run)
    if run.capture:  # the warm-up steps (and a failed capture's fallback) run it eagerly, on purpose
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
    run.lrs = LearningRates(args, len(run.batches), scale, device)
    run.optimizer = make_optimizer(args, step_model, run.lrs.table[0].clone(),
                                   capturable=run.capture)
    if args.compile:
        step_model = torch.compile(step_model, mode=None if args.compile_mode == "default" else args.compile_mode)
    run.step = TrainStep(step_model, run.batches, run.optimizer, run.lrs, run.ctx, args.label_smoothing,
                         mark_cudagraph_step=compile_graphs)

    run.state = RunState()
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        run.optimizer.load_state_dict(resume["optimizer"])
        for group in run.optimizer.param_groups:  # loading replaced the shared rate tensor with a copy
            group["lr"] = run.step.lr
        # A state from before the table existed has only the scheduler's own state, under "scheduler".
        run.lrs.load_state_dict(resume.get("lr_schedule") or {"scheduler": resume.get("scheduler")},
                                resume["epoch"])
        set_rng_state(resume["rng"], run.shuffle_gen)
        if dist.enabled:
            torch.manual_seed(args.seed + 1 + dist.rank + 7919 * resume["epoch"])
        run.state = RunState.from_dict(resume)
        say(f"resuming after epoch {run.state.epoch} of {args.epochs} from {run.last_path}")

    run.graph, run.warmup_seconds = None, 0.0
    if not args.dry_run and (device.type == "cuda" or args.compile):
        model.train()
        run.graph, run.warmup_seconds = warm_up(run.step, model, run.optimizer, capture=run.capture, say=say)
        what = ", ".join(w for w in (args.compile and f"compiled ({args.compile_mode})",
                                     run.graph is not None and "step captured as a CUDA graph") if w) or "warmed up"
        say(f"{what} in {run.warmup_seconds:.1f}s: not counted as training time")
    return run


def train_epoch(run, epoch, bar=None, max_steps=None):
    """One pass over the training batches; returns (mean loss, accuracy, seconds) over all ranks.

    The clock runs from the first step to the end of the last (synchronised); validation is not in it.
    """
    run.model.train()
    run.batches.new_epoch()
    run.step.start_epoch(epoch)
    steps = len(run.batches) if max_steps is None else min(max_steps, len(run.batches))
    take_step = run.graph.replay if run.graph is not None else run.step
    synchronize(run.device)
    t = time.perf_counter()
    for _ in range(steps):
        take_step()
        if bar is not None:
            bar.update(1)
    synchronize(run.device)
    seconds = time.perf_counter() - t
    seen = steps * run.batches.batch_size
    loss_sum, correct, seen = run.dist.sum(run.step.loss_sum, run.step.correct, seen)
    return loss_sum / seen, correct / seen, seconds


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def validate_and_keep_best(run, epoch, train_loss, train_acc, seconds):
    """Score the validation split, log the epoch, save the best and the resumable state; returns the row and
    whether it improved."""
    args, state = run.args, run.state
    val_loss, val_acc = evaluate(run.model, *run.val, run.ctx, run.dist)
    row = {"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
           "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "lr": run.lrs.used_in(epoch),
           "seconds": round(seconds, 3)}
    run.lrs.end_epoch(epoch, val_loss)
    # Ties are common on 5,000 images (one image is 0.02%): then the lower validation loss wins.
    improved = val_acc > state.best_val or (val_acc == state.best_val and val_loss < state.best_val_loss)
    if improved:
        state.best_val, state.best_val_loss, state.best_epoch, state.stale = val_acc, val_loss, epoch, 0
    else:
        state.stale += 1
    state.epoch, state.train_seconds = epoch, state.train_seconds + seconds
    state.history.append(row)
    if run.dist.is_main:
        ckpt = make_checkpoint(run.model, args.model, data_loader.NORMALIZATION, run.model_args, epoch=epoch,
                               val_accuracy=val_acc, args=vars(args))
        if improved:
            atomic_save(ckpt, run.best_path)
        atomic_save({**ckpt, **asdict(state), "optimizer": run.optimizer.state_dict(),
                     "lr_schedule": run.lrs.state_dict(), "rng": rng_state(run.shuffle_gen)},
                    run.last_path)
    run.say(f"epoch {epoch:>3}/{args.epochs} | train loss {train_loss:.4f} acc {train_acc * 100:6.2f}% | "
            f"val loss {val_loss:.4f} acc {val_acc * 100:6.2f}%{' *' if improved else '  '} | "
            f"lr {row['lr']:.2e} | {seconds:5.2f}s", flush=True)
    return row, improved


def finish(run, wall_start):
    """Score the test set once, with the epoch chosen on validation, and write the report."""
    args, state, dist = run.args, run.state, run.dist
    if dist.enabled:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    if not dist.is_main:
        if not args.no_test:
            best = torch.load(run.best_path, map_location="cpu", weights_only=True)
            run.model.load_state_dict(best["state_dict"])
            gather_probs(run.model, run.test[0], run.ctx, dist)
        return 0
    write_history_csv(state.history, run.save_dir / f"history_{args.model}.csv")
    if args.no_test:
        print(f"best validation accuracy {state.best_val * 100:.2f}% at epoch {state.best_epoch} | training "
              f"{state.train_seconds:.1f}s | test set not scored (--no_test) | saved {run.best_path}")
        return 0
    best = torch.load(run.best_path, map_location="cpu", weights_only=True)
    run.model.load_state_dict(best["state_dict"])
    test_x, test_y = run.test
    probs = gather_probs(run.model, test_x, run.ctx, dist)
    import metrics  # imported late: scikit-learn is only needed once training is done
    import visualization
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
            "cuda_graphs": run.graph is not None, "wall_seconds": round(time.perf_counter() - wall_start, 2),
            "device": device_label(run.device), "processes": dist.world, "amp": "bf16" if args.amp else "off",
            "seed": args.seed, "torch": torch.__version__}
    metrics.write_metrics(report, run.save_dir, args.model, info)
    visualization.plot_training_history(state.history, run.save_dir / "training_history.png", state.best_epoch)
    visualization.plot_test_report(run.save_dir, test_x.cpu().numpy(), y_true, probs.cpu().numpy(), report)
    print(f"test accuracy {report['accuracy'] * 100:.2f}% (loss {report['loss']:.4f}) with the epoch-"
          f"{state.best_epoch} model chosen on validation ({state.best_val * 100:.2f}%) | training "
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
        dist = setup_distributed(args)
    except Exception as err:  # a bad rendezvous address, a port in use, a peer that never came
        fail(f"could not join the torchrun process group ({str(err).splitlines()[0][:160]})", 2)
    try:
        return train(args, dist, on_epoch)
    except (RuntimeError, torch.distributed.DistError) as err:
        if not dist.enabled:
            raise
        fail(f"rank {dist.rank}: lost contact with the other training processes: one of them failed or timed out "
             f"(see its output); {str(err).splitlines()[0][:160]}")
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
