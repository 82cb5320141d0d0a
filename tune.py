"""Hyperparameter search over train_pytorch.py: python tune.py

`python tune.py` runs the classic grid: learning rate 0.001, 0.0001 x optimiser adam, sgd, rmsprop x batch size
64, 128, 256 = 18 trials. `--search tpe|random --trials N` runs Optuna over a wider space (learning rate and
peak rate, optimiser, batch size, weight decay, dropout, augmentation, label smoothing) and prunes trials whose
per-epoch validation accuracy falls behind the median.

Every trial is a real run of this project: train_pytorch.main() with --no_test, in this process or in one of
--jobs worker processes, in its own folder. Trials are scored on the validation split only; the test set is
scored once, by --train_best. Every trial is recorded in an Optuna storage as it ends (a journal file under
--save_dir, or a --storage database shared by several machines), so Ctrl-C or a crash loses at most the
running trials and the same command resumes the study.

This file owns the search: the study, its trials and its reports. It uses Optuna's public API only (a grid
point is an enqueued trial; Study.optimize runs each trial, with Optuna's heartbeat on a database), and of
train_pytorch only main(argv, on_epoch=...) and parse_args(): it must not reach into either's internals.
"""
import argparse
import csv
import functools
import inspect
import io
import itertools
import math
import os
import random
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from tqdm import tqdm

import train_pytorch
from cnn_pytorch import MODELS
from common import OneLineParser, atomic_write, fail, print_error

try:  # tune.py's own dependency, not the project's: without it, main() says so in one line
    import optuna
    from optuna.trial import TrialState
except ImportError:
    optuna = TrialState = None

NO_OPTUNA = 'optuna is not installed: pip install "optuna>=4.0" (tune.py needs it)'

# The classic grid of the project description; each list can be replaced on the command line.
GRID = {"learning_rate": [0.001, 0.0001], "optimizer": ["adam", "sgd", "rmsprop"], "batch_size": [64, 128, 256]}
# The budget per trial of `python tune.py`: one epoch on all 55,000 training images. The 18 grid trials took
# 307 s in all on a 2-core CPU, two at a time (see docs/tune.md): well inside the 20 minutes it is allowed.
DEFAULT_EPOCHS = 1
DEFAULT_TRIALS = 30           # --search tpe|random
JOBS_PER_GPU = 4              # see --jobs
CPU_JOBS_MAX = 4              # on the CPU: one trial per core, at most this many (a worker holds about 1 GB)
TRAIN_IMAGES = 55_000         # MNIST's 60,000 training images less train_pytorch's default 5,000 for validation
SEARCH_BATCH_SIZES = [64, 128, 256, 512]
# --augment in the search space -> train_pytorch flags
AUGMENT = {"off": ["--no_augment"], "standard": ["--augment"], "strong": ["--augment", "--strong_augment"]}
HEARTBEAT_SECONDS = 60        # database storages: a trial whose worker stopped beating for 3 minutes is failed


@functools.lru_cache(maxsize=None)
def train_choices(dest):
    """The choices train_pytorch.py offers for one flag: the one place they are listed."""
    return next(a.choices for a in train_pytorch.parse_args()._actions if a.dest == dest)


def parse_args(argv=None):
    optimizers = train_choices("optimizer")
    p = OneLineParser(prog="tune.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--search", default="grid", choices=["grid", "tpe", "random"],
                   help="grid: every combination of --learning_rates x --optimizers x --batch_sizes (the rate is "
                        "constant: train_pytorch --scheduler none); tpe/random: Optuna's TPE or random sampling "
                        "over a wider space (onecycle from --learning_rate to a peak --max_lr, optimiser, batch "
                        "size, weight decay, dropout, augmentation off/standard/strong, label smoothing) with a "
                        "median pruner on the per-epoch validation accuracy (it acts from --epochs 2 on)")
    p.add_argument("--model", default="simple", help=f"which network every trial trains: {', '.join(MODELS)}")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="training budget per trial. The default grid (1 epoch on all 55,000 training images, "
                        "18 trials, 2 jobs) took 5.1 minutes on a 2-core CPU")
    p.add_argument("--train_subset", "--train-subset", type=int, default=None,
                   help="train every trial on the first N training images only (default: all 55,000); "
                        "--train_best always trains on all of them%(default).0s")
    p.add_argument("--trials", type=int, default=None,
                   help=f"tpe/random: trials the study should hold when done, counting those already in the "
                        f"storage (default {DEFAULT_TRIALS}); the grid always runs every combination%(default).0s")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"trials at once, each in its own worker process on the same storage%(default).0s. Default: "
                        f"on the CPU one per core (at most {CPU_JOBS_MAX}), each on cores / jobs threads; on CUDA "
                        f"{JOBS_PER_GPU} per GPU (at most one per CPU core), spread over the GPUs; on MPS 1 "
                        f"(docs/tune.md says why)")
    p.add_argument("--storage", default=None,
                   help="a database URL (postgresql://user:password@host/db, mysql://...; needs its driver, e.g. "
                        "pip install psycopg2-binary) shared by several machines running the same command. Default: "
                        "a journal file in --save_dir (study.journal)%(default).0s")
    p.add_argument("--study", default=None, help="study name (default: <search>-<model>, e.g. grid-simple)%(default).0s")
    p.add_argument("--seed", type=int, default=0,
                   help="every trial's train_pytorch --seed (validation split, initialisation, shuffling); also "
                        "the grid's order and, with the process id, the sampler's seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--save_dir", "--save-dir", default="results/tuning",
                   help="where the storage, trials.csv, summary.md, the plots and the trial logs go (relative "
                        "paths are taken from the project folder)")
    p.add_argument("--train_best", "--train-best", action="store_true",
                   help="then train the best configuration with train_pytorch.py on all training images and the "
                        "same epochs, score the test set once, and print its accuracy and the command that "
                        "reproduces it (into <save_dir>/best)")
    p.add_argument("--learning_rates", "--learning-rates", type=float, nargs="+", default=None,
                   help=f"the grid's learning rates (default {' '.join(map(str, GRID['learning_rate']))})%(default).0s")
    p.add_argument("--optimizers", nargs="+", default=None, choices=optimizers,
                   help=f"the grid's optimisers (default {' '.join(GRID['optimizer'])})%(default).0s")
    p.add_argument("--batch_sizes", "--batch-sizes", type=int, nargs="+", default=None,
                   help=f"the grid's batch sizes (default {' '.join(map(str, GRID['batch_size']))})%(default).0s")
    return p


def check_args(parser, args, argv):
    """Every flag is checked here, before anything runs; then the save folder and the storage are opened."""
    if args.model not in MODELS:
        parser.error(f"unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    for name in ("epochs", "jobs", "trials", "train_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    grid_flags = [f"--{n}" for n in ("learning_rates", "optimizers", "batch_sizes") if getattr(args, n) is not None]
    if args.search == "grid":
        if args.trials is not None:
            parser.error("--trials is for --search tpe or random: the grid runs every combination once")
        args.grid = {"learning_rate": args.learning_rates or GRID["learning_rate"],
                     "optimizer": args.optimizers or GRID["optimizer"],
                     "batch_size": args.batch_sizes or GRID["batch_size"]}
        for name, values in args.grid.items():
            if len(set(values)) != len(values):
                parser.error(f"--{name}s lists a value twice: {' '.join(map(str, values))}")
        if not all(lr > 0 for lr in args.grid["learning_rate"]) or not all(math.isfinite(lr) for lr in
                                                                             args.grid["learning_rate"]):
            parser.error("--learning_rates must all be positive numbers")
        batch_sizes = args.grid["batch_size"]
    else:
        if grid_flags:
            parser.error(f"{' and '.join(grid_flags)} set the grid: use them with --search grid")
        args.grid = None
        args.trials = args.trials or DEFAULT_TRIALS
        batch_sizes = [b for b in SEARCH_BATCH_SIZES if b <= (args.train_subset or TRAIN_IMAGES)]
        if not batch_sizes:
            parser.error(f"--train_subset {args.train_subset} is smaller than the smallest batch of the search "
                         f"({SEARCH_BATCH_SIZES[0]})")
    train_images = args.train_subset or TRAIN_IMAGES
    if min(batch_sizes) < 1 or max(batch_sizes) > train_images:
        parser.error(f"--batch_sizes must be between 1 and the {train_images:,} training images of a trial")
    args.search_batch_sizes = batch_sizes
    args.study = args.study or f"{args.search}-{args.model}"
    device = parser.device(args.device)
    args.device = str(device)
    args.gpus = gpu_count() if device.type == "cuda" and device.index is None else 1
    if args.jobs is None:
        args.jobs = default_jobs(device.type, args.gpus)
    args.save_dir = parser.output_dir(args.save_dir)
    # The command as people see it in messages and summary.md: a password in a --storage URL is not shown.
    shown = [redact(a) if "://" in a else a for a in argv]
    args.command = "python tune.py" + "".join(f" {shlex.quote(a)}" for a in shown)
    try:
        args.storage_obj, args.storage_label = open_storage(args.storage, args.save_dir)
        args.settings = check_study(args)
    except StorageError as err:
        parser.error(str(err))


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(device_type, gpus):
    if device_type == "cuda":
        return min(JOBS_PER_GPU * gpus, cpu_cores())
    if device_type == "cpu":
        return min(cpu_cores(), CPU_JOBS_MAX)
    return 1  # mps: one GPU that the processes of one machine would share with little to gain


def gpu_count():
    import torch
    return torch.cuda.device_count()


# ------------------------------------------------------------------------------------------------------------
# The storage and the study
# ------------------------------------------------------------------------------------------------------------

class StorageError(Exception):
    """The storage cannot be opened, or holds a study made with other settings: one line for people."""


def open_storage(url, save_dir):
    """(storage, label): a journal file under save_dir, or a database at url."""
    if url is None:
        path = Path(save_dir) / "study.journal"
        # Every process opens the file through Optuna's lock, so workers on one machine share it safely.
        return optuna.storages.JournalStorage(InterruptSafeJournal(str(path))), f"journal file {path}"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        raise StorageError(f"--storage {url!r} is not a database URL: use postgresql://user:password@host/db, "
                           f"mysql://..., sqlite:///path.db, or leave it out for a journal file in --save_dir")
    label = f"database {redact(url)}"
    url, scheme = with_installed_driver(url, scheme)
    engine_kwargs = {"pool_pre_ping": True}
    if scheme.startswith(("postgresql", "mysql")):  # an unreachable host fails in seconds, not minutes
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(3):
        try:
            # Optuna's heartbeat: Study.optimize beats for each running trial, and a trial whose worker fell
            # silent (killed, or its machine lost) is failed by the next worker, so its place runs again.
            with warnings.catch_warnings():  # "heartbeat_interval is experimental": it has been since Optuna 2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, grace_period=3 * HEARTBEAT_SECONDS,
                                                  heartbeat_interval=HEARTBEAT_SECONDS), label
        except ImportError:  # Optuna's words for a missing driver
            raise StorageError(f"--storage {scheme}://... needs its Python driver: pip install "
                               f"{DRIVERS.get(scheme.split('+')[0], [('', 'the driver SQLAlchemy names')])[0][1]}"
                               ) from None
        except Exception as err:  # unreachable host, refused login, unknown database: the driver says which
            # Several machines starting on an empty database all create Optuna's tables: the losers see an
            # IntegrityError or ProgrammingError (a table that already exists), and the second try finds them.
            if type(err).__name__ in ("IntegrityError", "ProgrammingError") and attempt < 2:
                time.sleep(1.0 + attempt)
                continue
            raise StorageError(f"cannot open the --storage {label}: {type(err).__name__}: {first_words(err)}") from None


def first_words(err):
    return " ".join(str(err).split("\n", 1)[0].split())[:200]


class InterruptSafeJournal(optuna.storages.journal.JournalFileBackend if optuna else object):
    """Optuna's journal file, where Ctrl-C waits until a line is written and the file's lock is released.

    A KeyboardInterrupt inside Optuna's lock code can remove a lock another worker holds, or leave the file
    half-written; so SIGINT is held back for the few milliseconds of each append and delivered right after.
    """

    def append_logs(self, logs):
        if threading.current_thread() is not threading.main_thread():
            return super().append_logs(logs)
        caught = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
        try:
            super().append_logs(logs)
        finally:
            signal.signal(signal.SIGINT, previous)
            if caught and callable(previous):
                previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt here


# A bare scheme -> the drivers that serve it, SQLAlchemy's default first: (module, what to pip install).
DRIVERS = {"postgresql": [("psycopg", "psycopg2-binary (or psycopg[binary])"), ("psycopg2", "psycopg2-binary")],
           "mysql": [("MySQLdb", "mysqlclient (or pymysql)"), ("pymysql", "pymysql")]}


def with_installed_driver(url, scheme):
    """postgresql:// means psycopg 3 to SQLAlchemy 2.1 and psycopg2 to older ones: take whichever is installed."""
    import importlib.util
    if scheme == "postgres":  # Heroku-style spelling
        url, scheme = "postgresql" + url[len("postgres"):], "postgresql"
    drivers = DRIVERS.get(scheme)
    if drivers and importlib.util.find_spec(drivers[0][0]) is None:
        for module, _ in drivers[1:]:
            if importlib.util.find_spec(module) is not None:
                return f"{scheme}+{module}{url[len(scheme):]}", scheme
    return url, scheme


def redact(url):
    """The URL without its password, for messages and reports."""
    head, sep, rest = url.partition("://")
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        rest = f"{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else rest
    return head + sep + rest


def study_settings(args):
    """What defines a study's trials: the same study must always be resumed with the same values."""
    return {"search": args.search, "model": args.model, "epochs": args.epochs, "train_subset": args.train_subset,
            "seed": args.seed, "grid": args.grid, "batch_sizes": args.search_batch_sizes}


def check_study(args):
    """Create the study or load it; refuse to mix trials of other settings into it."""
    settings = study_settings(args)
    try:
        study = optuna.create_study(study_name=args.study, storage=args.storage_obj, direction="maximize",
                                    load_if_exists=True)
        saved = study.user_attrs.get("settings")
        if saved is None:
            study.set_user_attr("settings", settings)
        elif saved != settings:
            diff = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in settings.items() if saved.get(k) != v)
            raise StorageError(f"study {args.study!r} in the {args.storage_label} was made with other settings: "
                               f"{diff}; use the same flags to resume it, or name a new --study")
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(f"cannot use the {args.storage_label}: {type(err).__name__}: {first_words(err)}") from None
    return settings


def make_sampler(settings, worker):
    if settings["search"] == "grid":  # every grid trial is an enqueued point: the sampler never draws one
        return optuna.samplers.RandomSampler(seed=settings["seed"])
    # Each process draws its own sequence (a resumed or second worker must not repeat the first one's draws).
    seed = (settings["seed"] * 1_000_003 + os.getpid() * 7919 + worker) % 2 ** 32
    if settings["search"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(settings):
    if settings["search"] == "grid":  # a grid compares every point on the full budget
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


# ------------------------------------------------------------------------------------------------------------
# One trial: the configuration, as train_pytorch.py flags, and the run
# ------------------------------------------------------------------------------------------------------------

def has_dropout(model):
    return "dropout" in inspect.signature(MODELS[model]).parameters


def suggest(trial, settings):
    """The trial's configuration: its enqueued grid point, or what the sampler draws."""
    if settings["search"] == "grid":
        return {name: trial.suggest_categorical(name, values) for name, values in settings["grid"].items()}
    params = {
        "optimizer": trial.suggest_categorical("optimizer", train_choices("optimizer")),
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
        "max_lr": trial.suggest_float("max_lr", 1e-4, 5e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", settings["batch_sizes"]),
        "weight_decay": trial.suggest_float("weight_decay", 1e-7, 1e-3, log=True),
        "augment": trial.suggest_categorical("augment", list(AUGMENT)),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
    }
    if has_dropout(settings["model"]):
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.6)
    return params


def number(x):
    """A float as a short, exact flag value: the trial runs the very value its command line shows."""
    return f"{x:.4g}"


def config_flags(settings, params):
    """train_pytorch.py flags of one configuration (without the data subset, output or device)."""
    flags = ["--model", settings["model"], "--epochs", str(settings["epochs"]), "--optimizer", params["optimizer"],
             "--learning_rate", number(params["learning_rate"]), "--batch_size", str(params["batch_size"])]
    if settings["search"] == "grid":
        return flags + ["--scheduler", "none", "--seed", str(settings["seed"])]
    flags += ["--max_lr", number(params["max_lr"]), "--weight_decay", number(params["weight_decay"]),
              "--label_smoothing", number(params["label_smoothing"]), *AUGMENT[params["augment"]]]
    if "dropout" in params:
        flags += ["--dropout", number(params["dropout"])]
    return flags + ["--seed", str(settings["seed"])]


class TrialFailed(Exception):
    """A trial that ended with an error (not a divergence, not Ctrl-C): the worker stops and says why."""


class Surplus(Exception):
    """A trial another worker made unneeded in the same instant: recorded as failed, and never shown."""


def best_epoch(history):
    """The epoch train_pytorch keeps: the highest validation accuracy, ties to the lower validation loss."""
    return max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))


def train(trial, settings, params, trial_dir, device):
    """train_pytorch.main() on one configuration; returns its best validation accuracy.

    Its output goes to <trial_dir>/train.log; its checkpoints are deleted when it ends (--train_best retrains).
    Raises optuna.TrialPruned when the pruner stops it or the loss diverged, KeyboardInterrupt on Ctrl-C.
    """
    flags = config_flags(settings, params)
    trial.set_user_attr("flags", flags)
    subset = ["--train_subset", str(settings["train_subset"])] if settings["train_subset"] else []
    argv = [*flags, *subset, "--device", device, "--save_dir", str(trial_dir), "--no_test", "--no_progress"]
    history = []

    def on_epoch(row):
        history.append({k: row[k] for k in ("epoch", "val_acc", "val_loss", "train_loss", "train_acc", "seconds")})
        trial.set_user_attr("history", history)  # in the storage at once: a pruned trial keeps its curve
        trial.report(row["val_acc"], row["epoch"])
        if row["epoch"] < settings["epochs"] and trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {row['val_acc']:.4f} at epoch {row['epoch']} is behind")

    log = io.StringIO()
    start = time.perf_counter()
    try:
        with redirect_stdout(log), redirect_stderr(log):
            code = train_pytorch.main(argv, on_epoch=on_epoch)
    except SystemExit as err:  # train_pytorch's fail(): one line on (our redirected) stderr, then exit
        code = err.code
    finally:
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        trial_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(trial_dir / "train.log") as tmp:
            tmp.write_text(f"python train_pytorch.py {shlex.join(argv)}\n{log.getvalue()}")
        for path in trial_dir.glob("*.pth"):
            path.unlink(missing_ok=True)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        last = (log.getvalue().strip().splitlines() or ["no output"])[-1]
        if "diverged" in last:  # a finished result of this configuration, not an error of the search
            trial.set_user_attr("note", "diverged")
            raise optuna.TrialPruned(last)
        raise TrialFailed(f"trial {trial.number} failed (exit code {code}): {last} (log: {trial_dir / 'train.log'})")
    if not history:
        raise TrialFailed(f"trial {trial.number} trained no epoch (log: {trial_dir / 'train.log'})")
    return best_epoch(history)["val_acc"]


# ------------------------------------------------------------------------------------------------------------
# The work: which trials are still to run, and a worker that runs them until none is left
# ------------------------------------------------------------------------------------------------------------
# A grid point is an enqueued trial that carries its point as the user attribute "grid_point"; a point whose
# trial failed (Ctrl-C, a dead worker) is enqueued again. A search counts its live trials up to --trials. Two
# workers may take the same place in the same instant: trial numbers are unique in the storage, so the lower
# number always wins, and the other is a surplus trial, failed at once and left out of every report.

def is_done(t):
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED)


def is_live(t):
    return is_done(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)


def note(t):
    """Why a trial ended as it did. A failed trial without a note was failed by another worker, since its own
    would have said why: its worker died (killed, or its heartbeat stopped)."""
    return t.user_attrs.get("note") or ("worker died" if t.state == TrialState.FAIL else "")


def target_trials(settings, trials=None):
    if settings["search"] == "grid":
        return math.prod(len(v) for v in settings["grid"].values())
    return trials


def grid_points(settings):
    """Every point of the grid, in an order shuffled by --seed (JSON-like lists: they are stored as such)."""
    points = [list(p) for p in itertools.product(*settings["grid"].values())]
    random.Random(settings["seed"]).shuffle(points)
    return points


def enqueue_missing_points(study, settings):
    if settings["search"] != "grid":
        return
    taken = [t.user_attrs.get("grid_point") for t in study.get_trials(deepcopy=False) if is_live(t)]
    for point in grid_points(settings):
        if point not in taken:
            study.enqueue_trial(dict(zip(settings["grid"], point)), user_attrs={"grid_point": point})


def nothing_left(settings, study, trials):
    """True when no trial needs starting: the study is done, or its last trials run in other workers."""
    started = [t for t in study.get_trials(deepcopy=False) if is_live(t) and t.state != TrialState.WAITING]
    if settings["search"] == "grid":
        taken = [t.user_attrs.get("grid_point") for t in started]
        return all(point in taken for point in grid_points(settings))
    return len(started) >= trials


def is_surplus(settings, study, trial, trials):
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and is_live(t)]
    if settings["search"] == "grid":
        point = trial.user_attrs.get("grid_point")  # None: no queued point was left for this trial
        return point is None or any(t.user_attrs.get("grid_point") == point for t in earlier)
    return len(earlier) >= trials


def worker_id():
    return {"host": socket.gethostname(), "pid": os.getpid()}


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study):
    """Trials left RUNNING by a dead worker are failed, so their grid point or place in the count is free again.

    On a database Optuna's heartbeat finds them, on any machine. A journal file has no heartbeat, so there a
    worker on this machine that no longer exists (killed, crashed) is found by its process id.
    """
    optuna.storages.fail_stale_trials(study)
    here = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("worker")
        if who and who["host"] == here and who["pid"] != os.getpid() and not alive(who["pid"]):
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except Exception:  # another worker failed it in the same instant
                pass


def prepare(study, settings):
    """Before a worker takes a trial: free what dead workers hold, and queue the grid points not yet done."""
    fail_dead_trials(study)
    enqueue_missing_points(study, settings)


def objective(trial, args, trial_root, device):
    """One trial as Study.optimize runs it: a failed trial says why in its note before Optuna records it."""
    trial.set_user_attr("worker", worker_id())
    if is_surplus(args.settings, trial.study, trial, args.trials):
        trial.set_user_attr("note", "surplus")
        raise Surplus
    params = suggest(trial, args.settings)
    try:
        return train(trial, args.settings, params, trial_root / f"trial_{trial.number:04d}", device)
    except optuna.TrialPruned:
        raise
    except BaseException as err:  # Ctrl-C, a failed trial: recorded as failed, its place is free again
        trial.set_user_attr("note", "interrupted" if isinstance(err, KeyboardInterrupt) else "error")
        raise


def work(args, worker=0, device=None, on_trial_end=None, parent=None):
    """Run trials of the study until nothing is left to start (or, in a worker process, until the command that
    started it is gone)."""
    quiet_optuna()
    settings = args.settings
    study = optuna.load_study(study_name=args.study, storage=args.storage_obj, sampler=make_sampler(settings, worker),
                              pruner=make_pruner(settings))
    run = functools.partial(objective, args=args, trial_root=Path(args.save_dir) / "trials" / args.study,
                            device=device or args.device)
    while True:
        prepare(study, settings)
        if parent is not None and os.getppid() != parent:  # the command was killed: no new trial
            return
        if nothing_left(settings, study, args.trials):
            return
        # One trial per call, so the checks above run between trials; Optuna records its state, beats its
        # heartbeat on a database, and raises Ctrl-C and errors (but not a surplus) once it is recorded.
        study.optimize(run, n_trials=1, catch=(Surplus,))
        if on_trial_end is not None:
            on_trial_end(study)


def quiet_optuna():
    # The progress bar and the reports say what happened; Optuna's per-trial lines would drown them.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def worker_main(args, worker, device, threads, parent):
    """Entry point of a --jobs worker process (spawned: a fresh interpreter, no state shared with the parent)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    args.storage_obj, _ = open_storage(args.storage, args.save_dir)
    try:
        work(args, worker, device, parent=parent)
    except KeyboardInterrupt:
        sys.exit(130)
    except TrialFailed as err:
        print_error("tune.py", f"worker {worker}: {err}")
        sys.exit(1)


def worker_devices(args):
    """The device of each worker: spread over the GPUs when --device names no single one."""
    if args.device.startswith("cuda") and args.gpus > 1:
        return [f"cuda:{i % args.gpus}" for i in range(args.jobs)]
    return [args.device] * args.jobs


def run_workers(args, progress):
    """--jobs worker processes on the same storage; this process watches the storage and draws the bar."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot live in a forked child
    threads = max(1, cpu_cores() // args.jobs) if args.device == "cpu" else None
    child_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "storage_obj"})
    procs = [ctx.Process(target=worker_main, args=(child_args, i, device, threads, os.getpid()))
             for i, device in enumerate(worker_devices(args))]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            progress.update()
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:  # a terminal's Ctrl-C reaches them too; a signal sent to this process alone does not
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join()
        raise
    for p in procs:
        p.join()
    progress.update()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise TrialFailed(f"worker{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} stopped with an "
                          f"error (see above)")


# ------------------------------------------------------------------------------------------------------------
# Progress and reports
# ------------------------------------------------------------------------------------------------------------

class Progress:
    """A bar over the study's trials with the best validation accuracy so far; tqdm's ETA."""

    def __init__(self, args):
        self.args = args
        self.total = target_trials(args.settings, args.trials)
        self.study = optuna.load_study(study_name=args.study, storage=args.storage_obj)
        self.seen = None
        self.bar = tqdm(total=self.total, initial=self.count(), desc=f"{args.study} trials", unit="trial",
                        dynamic_ncols=True, file=sys.stderr)
        self.update()

    def count(self):
        return sum(map(is_done, self.study.get_trials(deepcopy=False)))

    def update(self, _study=None):
        trials = self.study.get_trials(deepcopy=False)
        done = sum(map(is_done, trials))
        if done == self.seen:
            return
        self.seen = done
        self.bar.update(max(0, min(done, self.total) - self.bar.n))
        best = best_trial(rows_of(trials))
        if best is not None:
            self.bar.set_postfix_str(f"best {best['val_acc'] * 100:.2f}% (trial {best['trial']})")
        write_table(self.args, trials)

    def close(self):
        self.bar.close()


PARAM_ORDER = ["learning_rate", "max_lr", "optimizer", "batch_size", "weight_decay", "dropout", "augment",
               "label_smoothing"]


def rows_of(trials):
    """One dict per trial (surplus and queued trials, which never trained, left out)."""
    rows = []
    for t in trials:
        if note(t) == "surplus" or t.state == TrialState.WAITING:
            continue
        history = t.user_attrs.get("history", [])
        best = best_epoch(history) if history else None
        row = {"trial": t.number, "state": t.state.name.lower(),
               "val_acc": best["val_acc"] if best else None, "val_loss": best["val_loss"] if best else None,
               "best_epoch": best["epoch"] if best else None}
        # The values the trial ran: its flags carry 4 significant digits of what the sampler drew.
        row.update({k: float(number(v)) if isinstance(v, float) else v
                    for k, v in t.params.items() if k in PARAM_ORDER})
        for r in history:
            row[f"val_acc_{r['epoch']}"] = r["val_acc"]
            row[f"val_loss_{r['epoch']}"] = r["val_loss"]
        row.update(seconds=t.user_attrs.get("seconds"), note=note(t),
                   flags=t.user_attrs.get("flags"))
        rows.append(row)
    return rows


def best_trial(rows):
    """The complete trial with the highest validation accuracy; ties to the lower validation loss."""
    done = [r for r in rows if r["state"] == "complete" and r["val_acc"] is not None]
    return min(done, key=lambda r: (-r["val_acc"], r["val_loss"], r["trial"])) if done else None


def write_table(args, trials):
    rows = rows_of(trials)
    epochs = args.settings["epochs"]
    params = [k for k in PARAM_ORDER if any(k in r for r in rows)]
    fields = (["trial", "state", "val_acc", "val_loss", "best_epoch", *params]
              + [f"val_acc_{e}" for e in range(1, epochs + 1)] + [f"val_loss_{e}" for e in range(1, epochs + 1)]
              + ["seconds", "note"])
    with atomic_write(Path(args.save_dir) / "trials.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def train_command(flags, save_dir=None):
    out = ["--save_dir", str(save_dir)] if save_dir else []
    return "python train_pytorch.py " + shlex.join([*flags, *out])


def percent(x):
    return "" if x is None else f"{x * 100:.2f}%"


def write_summary(args, rows, wall_seconds, plots, best_result=None):
    settings = args.settings
    best = best_trial(rows)
    states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    images = f"{settings['train_subset']:,}" if settings["train_subset"] else f"all {TRAIN_IMAGES:,}"
    lines = [f"# Hyperparameter search: {args.study}", "",
             f"`{args.command}`", "",
             f"- search: {settings['search']}, {target_trials(settings, args.trials)} trials of `--model "
             f"{settings['model']}`, {settings['epochs']} epoch{'s' if settings['epochs'] > 1 else ''} each on "
             f"{images} training images, seed "
             f"{settings['seed']}; trials are scored on the 5,000-image validation split, the test set is used "
             f"only by `--train_best`",
             f"- storage: {args.storage_label}, study `{args.study}`",
             f"- trials: {states['complete']} complete, {states['pruned']} pruned, {states['fail']} failed"
             + (f", {states['running']} running elsewhere" if states["running"] else "")
             + f"; {sum(r['seconds'] or 0 for r in rows):.0f} s of trials in all",
             f"- this command: {wall_seconds:.0f} s wall time on {args.device} with --jobs {args.jobs}", ""]
    ranked = sorted((r for r in rows if r["val_acc"] is not None),
                    key=lambda r: (r["state"] != "complete", -r["val_acc"], r["val_loss"]))
    params = [k for k in PARAM_ORDER if any(k in r for r in rows)]
    lines += ["## Best trials", "",
              "| trial | state | val acc | val loss | " + " | ".join(params) + " | seconds |",
              "|---:|---|---:|---:|" + "---|" * len(params) + "---:|"]
    for r in ranked[:10]:
        cells = [fmt_param(r.get(k)) for k in params]
        lines.append(f"| {r['trial']} | {r['state']}{' (' + r['note'] + ')' if r['note'] else ''} | "
                     f"{percent(r['val_acc'])} | {r['val_loss']:.4f} | {' | '.join(cells)} | {r['seconds'] or 0:.1f} |")
    lines.append("")
    if best is not None:
        lines += ["## The best configuration", "",
                  f"Trial {best['trial']}: {percent(best['val_acc'])} validation accuracy (epoch "
                  f"{best['best_epoch']}). Trained on all training images, with the test set scored once at the end:",
                  "", "```", train_command(best["flags"]), "```", ""]
        if best_result:
            lines += [f"`--train_best` ran it: **{percent(best_result['accuracy'])} test accuracy** "
                      f"({percent(best_result['val_accuracy'])} on validation), in {best_result['save_dir']}.", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    with atomic_write(Path(args.save_dir) / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))


def fmt_param(v):
    if isinstance(v, float):
        return number(v)
    return "" if v is None else str(v)


def plot_grid(args, rows, path):
    """Validation accuracy over learning rate x batch size, one panel per optimiser (seaborn heatmaps)."""
    import numpy as np
    import visualization
    plt, sns = visualization.plt, visualization.sns
    grid = args.settings["grid"]
    lrs, sizes = sorted(grid["learning_rate"], reverse=True), sorted(grid["batch_size"])
    values = {(r["optimizer"], r["learning_rate"], r["batch_size"]): r for r in rows
              if r["state"] in ("complete", "pruned")}
    with plt.rc_context(visualization.STYLE):
        fig, axes = plt.subplots(1, len(grid["optimizer"]), figsize=(4.2 * len(grid["optimizer"]) + 1, 3.8),
                                 layout="constrained", squeeze=False)
        try:
            acc = [[[values.get((o, lr, b), {}).get("val_acc") for b in sizes] for lr in lrs] for o in grid["optimizer"]]
            known = [a for panel in acc for row in panel for a in row if a is not None]
            # The colours span the best 5 points, where the choice is made; anything lower is the darkest.
            vmax = max(known) * 100 if known else 100
            vmin = max(min(known) * 100, vmax - 5) if known else 0
            for ax, opt, panel in zip(axes[0], grid["optimizer"], acc):
                data = np.array([[np.nan if a is None else a * 100 for a in row] for row in panel])
                labels = [[("diverged" if values.get((opt, lr, b), {}).get("note") == "diverged" else "")
                           if np.isnan(v) else f"{v:.2f}" for v, b in zip(row, sizes)]
                          for row, lr in zip(data, lrs)]
                sns.heatmap(data, ax=ax, annot=np.array(labels), fmt="", cmap="viridis", vmin=vmin, vmax=vmax,
                            cbar=ax is axes[0][-1], cbar_kws={"label": "validation accuracy (%)"},
                            xticklabels=sizes, yticklabels=[f"{lr:g}" for lr in lrs], linewidths=0.5)
                ax.set(title=opt, xlabel="batch size", ylabel="learning rate" if ax is axes[0][0] else "")
            epochs = args.settings["epochs"]
            fig.suptitle(f"Validation accuracy, {args.settings['model']} CNN, {epochs} epoch{'s' if epochs > 1 else ''}"
                         f" per trial", fontweight="bold")
            with atomic_write(path) as tmp:
                fig.savefig(tmp, dpi=visualization.DPI)
        finally:
            plt.close(fig)


def plot_search(args, path_history, path_importance):
    """Optuna's own matplotlib figures: the optimisation history and the parameter importances."""
    import visualization  # matplotlib with the Agg backend
    from optuna.visualization import matplotlib as ovm
    plt = visualization.plt
    study = optuna.load_study(study_name=args.study, storage=args.storage_obj)
    written = []
    for path, draw in ((path_history, ovm.plot_optimization_history), (path_importance, ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = ax.figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            with atomic_write(path) as tmp:
                fig.savefig(tmp, dpi=visualization.DPI)
            plt.close(fig)
            written.append(path)
        except Exception as err:  # too few complete trials for importances: say so, do not fail the study
            print(f"tune.py: no {path.name}: {' '.join(str(err).split())[:160]}", file=sys.stderr)
            plt.close("all")
    return written


def write_reports(args, wall_seconds, best_result=None):
    """trials.csv, summary.md and the plots, from everything the storage holds now."""
    study = optuna.load_study(study_name=args.study, storage=args.storage_obj)
    rows = write_table(args, study.get_trials(deepcopy=False))
    save_dir = Path(args.save_dir)
    if args.settings["search"] == "grid":
        plots = [save_dir / "heatmap.png"]
        plot_grid(args, rows, plots[0])
    else:
        plots = plot_search(args, save_dir / "optimization_history.png", save_dir / "param_importances.png")
    write_summary(args, rows, wall_seconds, plots, best_result)
    return rows


def train_best(args, best):
    """The best configuration on all training images, the test set scored once; returns its figures."""
    import json
    out = Path(args.save_dir) / "best"
    command = train_command(best["flags"], out)
    print(f"training the best configuration (trial {best['trial']}, {percent(best['val_acc'])} on validation) "
          f"on all training images:\n  {command}", flush=True)
    code = train_pytorch.main([*best["flags"], "--device", args.device, "--save_dir", str(out)])
    if code != 0:
        raise TrialFailed(f"--train_best: train_pytorch.py stopped with exit code {code}")
    report = json.loads((out / f"metrics_{args.settings['model']}.json").read_text())
    return {"accuracy": report["accuracy"], "val_accuracy": report["val_accuracy"], "save_dir": str(out),
            "command": command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if optuna is None:
        fail("tune.py", NO_OPTUNA, 2)
    quiet_optuna()
    parser = parse_args()
    args = parser.parse_args(argv)
    check_args(parser, args, argv)
    start = time.perf_counter()
    # The grid's points are queued before any worker starts, so workers starting together do not all queue them.
    prepare(optuna.load_study(study_name=args.study, storage=args.storage_obj), args.settings)
    progress = Progress(args)
    code = 0
    try:
        if args.jobs == 1:
            work(args, on_trial_end=progress.update)
        else:
            run_workers(args, progress)
    except KeyboardInterrupt:
        code = 130
    except TrialFailed as err:
        print(file=sys.stderr)
        print_error("tune.py", err)
        code = 1
    finally:
        progress.update()
        progress.close()
    wall = time.perf_counter() - start
    rows = write_reports(args, wall)
    best = best_trial(rows)
    done = sum(r["state"] in ("complete", "pruned") for r in rows)
    if code == 130:
        print(f"\ninterrupted: {done} trials are recorded in the {args.storage_label}; the same command resumes "
              f"the study:\n  {args.command}", file=sys.stderr)
        return code
    print(f"{args.study}: {done} of {progress.total} trials done in {wall:.0f} s | reports in {args.save_dir}")
    if best is not None:
        print(f"best: trial {best['trial']}, {percent(best['val_acc'])} validation accuracy\n  "
              f"{train_command(best['flags'])}")
    if code == 0 and args.train_best:
        if best is None:
            print_error("tune.py", "--train_best: no complete trial to train")
            return 1
        try:
            result = train_best(args, best)
        except TrialFailed as err:
            print_error("tune.py", err)
            return 1
        write_reports(args, time.perf_counter() - start, result)
        print(f"test accuracy of the best configuration: {percent(result['accuracy'])}; reproduce it with:\n  "
              f"{result['command']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
