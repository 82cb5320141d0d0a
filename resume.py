"""Resume and fine-tune: what a run saves after every epoch, and how a run starts from a saved file.

--resume continues an interrupted run from <save_dir>/last_<model>_pt.pth so that it ends with exactly the
weights an uninterrupted run would have: the file holds the model, the optimiser's moments, the schedule, the
moving average (--ema), every random generator and the shuffling order's generator, and the run's own counters
(RunState); the run's settings come back from it too. --init_from starts a new run from the weights of a model
file (fine-tuning), with a fresh optimiser and schedule. train_pytorch.py calls this module at four places:
load() and model_args_and_weights() in set-up, restore() after it, save() after every epoch.
"""
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint, read_checkpoint
from common import random_state, set_random_state
from data_loader import NORMALIZATION

# Settings that define a run: a resumed run takes them from its file, so it ends as it would have.
RUN_SETTINGS = ("model", "epochs", "batch_size", "learning_rate", "max_lr", "optimizer", "scheduler", "patience",
                "weight_decay", "seed", "val_size", "augment", "label_smoothing", "train_subset", "dropout",
                "lr_scaling", "deterministic", "ema", "writers")
# How this run's optimiser was built for its device (fused kernels, capturable for a CUDA graph): a state saved
# on another device or path must not bring its own, or a resumed GPU run would lose its graph.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def add_args(parser):
    group = parser.add_argument_group("resume and fine-tune (resume.py)")
    group.add_argument("--resume", action="store_true",
                       help="continue from <save_dir>/last_<model>_pt.pth with the settings it was started with")
    group.add_argument("--init_from", metavar="CHECKPOINT",
                       help="fine-tune: start from the weights of a model file written by this script (its model "
                            "arguments; --model must match), with a fresh optimiser and schedule")


def check_args(parser, args):
    if args.init_from is not None and args.resume:
        parser.error("--init_from starts a new run from a model file, --resume continues one: pass one of them")


@dataclass
class RunState:
    """The run's counters, saved beside the tensors."""
    epoch: int = 0                    # epochs finished
    history: list = field(default_factory=list)
    best_val: float = -1.0            # the best validation accuracy so far ...
    best_val_loss: float = math.inf   # ... its loss (breaks ties) ...
    best_epoch: int = 0               # ... and its epoch
    stale: int = 0                    # epochs since the last improvement (early stopping)
    train_seconds: float = 0.0


def best_path(args):
    return Path(args.save_dir) / f"best_model_{args.model}_pt.pth"


def last_path(args):
    return Path(args.save_dir) / f"last_{args.model}_pt.pth"


def load(args):
    """With --resume: the saved state, checked like any model file, its run settings put back into args.
    CheckpointError (one line) when there is none or it is not one."""
    if not args.resume:
        return None
    path = last_path(args)
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist (train without --resume first)")
    saved = read_checkpoint(path)
    if not all(key in saved for key in ("optimizer", "args", "rng", "history")):
        raise CheckpointError(f"{path}: not a resumable training state of this project (a best_model file?)")
    for key in RUN_SETTINGS:
        if key in saved["args"]:  # a state from an older version lacks the newer settings: they keep their flags
            setattr(args, key, saved["args"][key])
    return saved


def model_args_and_weights(args, saved):
    """The model's arguments and the weights to start from: --dropout's, and the file's with --init_from (with
    --resume, restore() loads the weights)."""
    if args.dropout is not None and args.model == "tiny":
        raise ValueError("--dropout: the tiny model has no dropout; drop the flag or pick simple or improved")
    model_args = {} if args.dropout is None else {"dropout": args.dropout}
    if saved is not None:
        return saved["model_args"], None
    if args.init_from is None:
        return model_args, None
    start, ckpt = load_checkpoint(args.init_from, expected_model=args.model)
    return {**ckpt["model_args"], **model_args}, start.state_dict()


def save(run):
    """last_<model>_pt.pth after an epoch: the model itself, with --ema its average beside it, and the rest."""
    if not run.dist.is_main:
        return
    ckpt = make_checkpoint(run.model, run.args.model, NORMALIZATION, run.model_args, epoch=run.state.epoch,
                           weights="model", args=vars(run.args))
    extra = {"ema": {k: v.detach().cpu() for k, v in run.ema.state_dict().items()}} if run.ema is not None else {}
    atomic_save({**ckpt, **asdict(run.state), **extra, "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
                 "rng": {**random_state(run.device), "shuffle": run.shuffle.get_state()}}, last_path(run.args))


def restore(run, saved):
    """Put the interrupted run back: weights, average, optimiser, schedule, random generators, counters."""
    if saved is None:
        return
    run.model.load_state_dict(saved["state_dict"])
    if run.ema is not None and "ema" in saved:  # a state saved without --ema: the average starts afresh
        run.ema.load_state_dict(saved["ema"])
    load_optimizer_state(run.optimizer, saved["optimizer"])
    if run.scheduler is not None:  # (on fast_step's path the step counter picks the rate from its table)
        if saved.get("scheduler"):
            run.scheduler.load_state_dict(saved["scheduler"])
        else:  # a state written before schedules were saved: stepped to where it was
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step")
                for _ in range(saved["epoch"] * len(run.batches)):
                    run.scheduler.step()
        for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_last_lr()):
            group["lr"] = lr
    run.shuffle.set_state(saved["rng"]["shuffle"])
    set_random_state(saved["rng"], run.device)
    run.dist.reseed(run.args.seed, saved["epoch"])
    run.state = RunState(**{f.name: saved[f.name] for f in fields(RunState) if f.name in saved})
    run.say(f"resuming after epoch {run.state.epoch} of {run.args.epochs} from {last_path(run.args)}")


def load_optimizer_state(optimizer, saved):
    """optimizer.load_state_dict(saved), but each group keeps this run's learning rate and implementation
    flags: PyTorch's load replaces the groups with the saved ones, and places Adam's step counts by the flags
    it finds, so the saved groups are given this run's flags first."""
    saved = {**saved, "param_groups": [{**g, **{k: mine[k] for k in IMPLEMENTATION_FLAGS if k in mine}}
                                       for g, mine in zip(saved["param_groups"], optimizer.param_groups)]}
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def interrupted(run):
    """Ctrl-C: say what is saved and how to go on; exit code 130, as shells expect."""
    epoch = run.state.epoch + 1  # the epoch that was running
    if not run.dist.is_main:
        return 130
    if run.state.history:
        print(f"\ninterrupted in epoch {epoch}: the state after epoch {run.state.epoch} is saved in "
              f"{last_path(run.args)}\nresume with: python train_pytorch.py --model {run.args.model} --save_dir "
              f"{run.args.save_dir} --resume", file=sys.stderr)
    else:
        print(f"\ninterrupted in epoch {epoch}, before any epoch finished: nothing to resume, nothing written",
              file=sys.stderr)
    return 130
