"""Hyperparameter search over train_pytorch.py with Optuna: python tune.py

The classic grid (learning rate 0.001, 0.0001 x optimiser adam, sgd, rmsprop x batch size 64, 128, 256), or TPE or
random sampling of a wider space, pruned on validation accuracy. A trial is train_pytorch.main() with --no_test; the
test set is scored once, by --train_best. Every trial is recorded in an Optuna storage as it ends (a journal file in
--save_dir, or a database that several machines share), so the same command resumes the study.
"""
import argparse
import csv
import io
import itertools
import json
import multiprocessing
import os
import shlex
import signal
import socket
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout

import torch
from filelock import FileLock, Timeout

import train_pytorch
from augment import AUGMENTATIONS
from cnn_pytorch import MODELS
from common import OneLineParser, at_least, atomic_write, fail, first_line, print_error

try:  # tune.py's own package, not the project's: without it, main() says so in one line
    import optuna
    from optuna.trial import TrialState
    LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)  # hold a point or place
except ImportError:
    optuna = None

NO_OPTUNA = 'optuna is not installed: pip install "optuna>=4.0" (tune.py needs it)'
GRID = {"learning_rate": [0.001, 0.0001], "optimizer": ["adam", "sgd", "rmsprop"], "batch_size": [64, 128, 256]}


def parse_args():
    p = OneLineParser(prog="tune.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, count = p.add_argument, at_least(1)
    add("--search", default="grid", choices=["grid", "tpe", "random"], help="grid: every combination of the three "
        "lists below at a constant rate; tpe/random: sampling of a wider space, pruned on validation accuracy")
    add("--model", default="simple", choices=list(MODELS), help="the network every trial trains")
    add("--epochs", type=count, default=1, help="training budget per trial")
    add("--train_subset", type=count, help="train every trial on the first N training images only")
    add("--trials", type=count, default=30, help="tpe/random: trials in the study when done, those before included")
    add("--jobs", type=lambda s: s if s == "auto" else count(s), default="auto", help="trials at once, each in a "
        "worker process; auto: one per CPU core (at most 4) on the CPU, 4 per GPU on CUDA, 1 on MPS")
    add("--storage", help="a database URL that several machines running the same command share, e.g. "
        "postgresql://user:password@host/db; without it, the journal file study.journal in --save_dir")
    add("--study", help="the study's name in the storage; without it, <search>-<model>, e.g. grid-simple")
    add("--seed", type=at_least(0), default=0, help="every trial's train_pytorch --seed")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    add("--save_dir", default="results/tuning", help="where the storage, the reports and the trials' logs go")
    add("--train_best", action="store_true", help="then train the best configuration on all images, test it once")
    for name, kind in (("learning_rate", at_least(0.0, float)), ("optimizer", None), ("batch_size", count)):
        add(f"--{name}s", type=kind, nargs="+", default=GRID[name], help=f"the grid's {name.replace('_', ' ')}s",
            choices=list(train_pytorch.OPTIMIZERS) if name == "optimizer" else None)
    return p


def check(parser, args, argv):
    """What argparse cannot check alone, before anything runs; then what every worker needs to know."""
    from sqlalchemy.engine import make_url
    grid = {name: list(dict.fromkeys(getattr(args, name + "s"))) for name in GRID}  # a value given twice runs once
    args.grid = grid if args.search == "grid" else None
    if args.grid and args.trials != parser.get_default("trials"):  # (a --trials 30 cannot be told from none)
        parser.error("--trials is for --search tpe or random: the grid runs each of its points once")
    args.study = args.study or f"{args.search}-{args.model}"
    args.save_dir = parser.output_dir(args.save_dir)
    url = args.storage and "://" in args.storage  # a URL's password is never printed or written
    shown = make_url(args.storage).render_as_string(hide_password=True) if url else args.storage
    args.where = f"database {shown}" if shown else f"journal file {args.save_dir / 'study.journal'}"
    args.command = "python tune.py " + shlex.join(a.replace(args.storage, shown) if shown else a for a in argv)
    device = parser.device(args.device)
    args.device = str(device)
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.jobs == "auto":  # docs/tune.md says why
        args.jobs = {"cuda": min(4 * gpus, cores), "cpu": min(cores, 4)}.get(device.type, 1)
    args.devices = [f"cuda:{i % gpus}" if gpus > 1 else args.device for i in range(args.jobs)]
    args.threads = max(1, cores // args.jobs) if device.type == "cpu" else None  # waiting threads crawl on a busy CPU
    return args


def open_storage(args):
    """A journal file in --save_dir, or the --storage database with Optuna's heartbeat for workers that go silent."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, TPE's options
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # work() says a line a trial; Optuna's would add tracebacks
    if args.storage is None:
        path = str(args.save_dir / "study.journal")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    timeout = {"connect_args": {"connect_timeout": 10}} if args.storage.startswith(("postgresql", "mysql")) else {}
    return optuna.storages.RDBStorage(args.storage, engine_kwargs=timeout, heartbeat_interval=60, grace_period=180)


def open_study(parser, args):
    """Create the study or load it; refuse one made with other settings."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError
    settings = {k: getattr(args, k) for k in ("search", "model", "epochs", "train_subset", "seed", "grid")}
    for attempt in range(3):
        try:
            study = optuna.create_study(study_name=args.study, storage=open_storage(args), direction="maximize",
                                        load_if_exists=True)
            break
        except Exception as err:  # no driver, unreachable, refused: the driver's words say which
            if attempt == 2 or not isinstance(err, (IntegrityError, ProgrammingError)):
                parser.error(f"cannot open the {args.where}: {first_line(err.__cause__ or err)}")
            time.sleep(1 + attempt)  # machines that start together race to create Optuna's tables: the losers retry
    saved = study.user_attrs.get("settings")
    if saved not in (None, settings):
        diff = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in settings.items() if saved.get(k) != v)
        parser.error(f"study {args.study!r} in the {args.where} was made with other settings: {diff}; use the same "
                     f"flags to resume it, or name a new --study")
    study.set_user_attr("settings", settings)
    if args.storage is None:  # one command per --save_dir (main's lock): a trial running there is a dead one's
        fail_running(study)
    queue_grid(study, args)  # before any worker starts, so that workers starting together do not all queue it
    return study


def queue_grid(study, args):
    """Queue each grid point that no trial has done, runs or waits for: a resumed grid repeats no point, and a point
    whose trial failed runs again (Optuna's GridSampler would count it as done)."""
    held = [t.user_attrs.get("grid_point") for t in study.get_trials(deepcopy=False, states=LIVE)]
    for point in map(list, itertools.product(*args.grid.values())) if args.grid else []:
        if point not in held:
            study.enqueue_trial(dict(zip(args.grid, point)), user_attrs={"grid_point": point})


def fail_running(study, workers=None):
    """Fail the trials left running by these workers, or by anyone, so that their points or places run again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if workers is None or t.user_attrs.get("worker") in workers:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


class TrialFailed(Exception):
    """A trial that ended with an error (not a divergence, not Ctrl-C): its worker stops and says why."""


def trial_flags(trial, args):
    """The trial's train_pytorch.py flags: its grid point, or the sampler's draw cut to 4 digits (what runs)."""
    def draw(name, low, high, log=False):
        return f"{trial.suggest_float(name, low, high, log=log):.4g}"

    if args.grid:
        p = {name: trial.suggest_categorical(name, values) for name, values in args.grid.items()}
        p["learning_rate"], extra = f"{p['learning_rate']:.4g}", ["--scheduler", "none"]
    else:
        p = {"optimizer": trial.suggest_categorical("optimizer", list(train_pytorch.OPTIMIZERS)),
             "learning_rate": draw("learning_rate", 1e-5, 1e-2, log=True),
             "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256, 512])}
        extra = ["--max_lr", draw("max_lr", 1e-4, 5e-2, log=True), "--weight_decay", draw("weight_decay", 1e-7, 1e-3,
                 log=True), "--label_smoothing", draw("label_smoothing", 0.0, 0.2),
                 "--augment", trial.suggest_categorical("augment", ["none", *AUGMENTATIONS])]
        if args.model != "tiny":  # the one without dropout
            extra += ["--dropout", draw("dropout", 0.0, 0.6)]
    return ["--model", args.model, "--epochs", str(args.epochs), "--optimizer", p["optimizer"], "--learning_rate",
            p["learning_rate"], "--batch_size", str(p["batch_size"]), *extra, "--seed", str(args.seed)]


def objective(trial, args, device):
    """One trial: train_pytorch.main(), logged in trials/<study>/trial_NNNN/train.log; its best validation accuracy."""
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    # When two workers take the last grid point or place at once, the lower trial number (unique) runs.
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number]
    point, taken = trial.user_attrs.get("grid_point"), [t.user_attrs.get("grid_point") for t in earlier]
    if (point is None or point in taken) if args.grid else len(earlier) >= args.trials:  # None: the queue was empty
        trial.set_user_attr("note", "surplus")
        return None  # Optuna records a trial without a value as failed
    trial.set_user_attr("flags", flags := trial_flags(trial, args))
    folder = args.save_dir / "trials" / args.study / f"trial_{trial.number:04d}"
    argv = [*flags, "--device", device, "--save_dir", str(folder), "--no_test", "--no_progress",
            *(["--train_subset", str(args.train_subset)] if args.train_subset else [])]
    accuracies, log = [], io.StringIO()

    def on_epoch(row):
        accuracies.append(row["val_acc"])
        trial.report(row["val_acc"], row["epoch"])  # in the storage at once: a pruned trial keeps its curve
        if row["epoch"] < args.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {row['val_acc']:.4f} at epoch {row['epoch']} is behind")

    try:
        with redirect_stdout(log), redirect_stderr(log):
            code = train_pytorch.main(argv, on_epoch=on_epoch)
    except SystemExit as err:  # train_pytorch's one-line errors: bad flags, a diverged loss
        code = err.code
    finally:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / "train.log") as tmp:
            tmp.write_text(f"python train_pytorch.py {shlex.join(argv)}\n{log.getvalue()}")
        for path in folder.glob("*.pth"):  # --train_best retrains the one it needs
            path.unlink()
    last = (log.getvalue().strip().splitlines() or ["no output"])[-1]
    if code == 130:
        raise KeyboardInterrupt
    if code or not accuracies:  # a diverged loss is a result of this configuration, not an error of the search
        trial.set_user_attr("note", "diverged" if "diverged" in last else "error")
        if "diverged" in last:
            raise optuna.TrialPruned(last)
        raise TrialFailed(f"trial {trial.number} failed (exit code {code}): {last} (log: {folder / 'train.log'})")
    return max(accuracies)


def work(args, device, parent=None):
    """Run trials one at a time until none is left to start or, in a --jobs worker, the command (parent) is gone."""
    if parent:  # Ctrl-C is the command's, which stops its workers: one cut off in Optuna's journal lock breaks it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(args.threads or torch.get_num_threads())
    storage, seed = open_storage(args), (args.seed * 1_000_003 + os.getpid()) % 2 ** 32  # a sequence per worker
    sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True) if args.search == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))  # the grid's never draws: its points are queued
    pruner = optuna.pruners.NopPruner() if args.grid else optuna.pruners.MedianPruner(n_startup_trials=5)
    study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler, pruner=pruner)

    def say(study, t):  # a line a trial
        value = f"{t.value:.2%} validation accuracy" if t.value else t.user_attrs.get("note", "")
        print(f"trial {t.number}: {t.state.name.lower()} {value}", flush=True)

    while parent is None or os.getppid() == parent:
        queue_grid(study, args)  # a point of a trial that failed since: Ctrl-C, or a machine that went silent
        live = study.get_trials(deepcopy=False, states=LIVE)  # left to start: a queued trial, or a place in the count
        if not any(t.state == TrialState.WAITING for t in live) and (args.grid or len(live) >= args.trials):
            return
        try:  # one trial a call; Optuna records its state (beating its heartbeat), then raises Ctrl-C and errors
            study.optimize(lambda trial: objective(trial, args, device), n_trials=1, callbacks=[say])
        except TrialFailed as err:
            if parent is None:
                raise
            print_error("tune.py", err)
            sys.exit(1)


def run_workers(args, study):
    procs = [multiprocessing.get_context("spawn").Process(target=work, args=(args, device, os.getpid()))
             for device in args.devices]  # spawned: CUDA cannot live in a forked child
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:  # after Ctrl-C, each worker stops where it is and its running trial is failed here
        for p in procs:
            p.terminate()
            p.join()
        fail_running(study, [{"host": socket.gethostname(), "pid": p.pid} for p in procs])
    if any(p.exitcode for p in procs):
        raise TrialFailed("a worker stopped with an error (see above) or was killed")


def write_reports(args, study, seconds, best_run=None):
    """trials.csv (every trial that trained), summary.md and Optuna's figures; returns (trials done, the best)."""
    rows = [{"trial": t.number, "state": t.state.name.lower(), "note": t.user_attrs.get("note", ""),
             "val_acc": max(t.intermediate_values.values(), default=None),
             **{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in t.params.items()},
             **{f"val_acc_{epoch}": acc for epoch, acc in t.intermediate_values.items()},
             "seconds": t.duration and round(t.duration.total_seconds(), 1),
             "flags": shlex.join(t.user_attrs.get("flags", []))}
            for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
            and t.user_attrs.get("note") != "surplus"]
    with atomic_write(args.save_dir / "trials.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    n = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: (r["val_acc"], -r["trial"]), default=None)
    lines = [f"# Hyperparameter search: {args.study}", "", f"`{args.command}`", "",
             f"`--model {args.model}`, {args.epochs} epoch(s) a trial on {args.train_subset or 'all'} training images"
             f", scored on validation: {n['complete']} complete, {n['pruned']} pruned, {n['fail']} failed, "
             f"{n['running']} running (trials.csv). The {args.where}; {seconds:.0f} s with --jobs {args.jobs}.", ""]
    if best:
        command = "python train_pytorch.py " + best["flags"]
        lines += [f"Best: trial {best['trial']}, {best['val_acc']:.2%} validation accuracy; on all training images, "
                  f"with the test set scored once at the end:", "", "```", command, "```", ""]
    if best_run:
        lines += [f"`--train_best` ran it: **{best_run['accuracy']:.2%} test accuracy**, in {args.save_dir / 'best'}.",
                  ""]
    for name in ("optimization_history", "slice" if args.grid else "param_importances"):
        try:  # the history, and what each parameter does (grid) or how much it matters (search)
            import visualization  # matplotlib with the Agg backend: files only, never a window
            from optuna.visualization import matplotlib as figures
            with warnings.catch_warnings(action="ignore"):  # "experimental", and matplotlib's notes on one point
                axes = getattr(figures, f"plot_{name}")(study)
            with atomic_write(args.save_dir / f"{name}.png") as tmp:
                getattr(axes, "flat", [axes])[0].figure.savefig(tmp, dpi=visualization.DPI, bbox_inches="tight")
            visualization.plt.close("all")
            lines.append(f"![{name}]({name}.png)")
        except Exception as err:  # no matplotlib, or too few complete trials for the importances
            print(f"tune.py: no {name}.png: {first_line(err)}", file=sys.stderr)
    with atomic_write(args.save_dir / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return n["complete"] + n["pruned"], best


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if optuna is None:
        fail("tune.py", NO_OPTUNA, 2)
    parser = parse_args()
    args = check(parser, parser.parse_args(argv), argv)
    try:
        lock = FileLock(str(args.save_dir / "tune.lock")).acquire(timeout=0)  # one command per --save_dir
    except Timeout:
        parser.error(f"another tune.py is running with --save_dir {args.save_dir}: wait for it, or use another")
    with lock:
        return search(parser, args)


def search(parser, args):
    study, start, code = open_study(parser, args), time.perf_counter(), 0
    try:
        work(args, args.device) if args.jobs == 1 else run_workers(args, study)
    except KeyboardInterrupt:
        code = 130
    except TrialFailed as err:
        print_error("tune.py", err)
        code = 1
    done, best = write_reports(args, study, wall := time.perf_counter() - start)
    if code == 130:
        print(f"\ninterrupted: {done} trials are recorded in the {args.where}; the same command resumes the study:"
              f"\n  {args.command}", file=sys.stderr)
        return code
    total = len(list(itertools.product(*args.grid.values()))) if args.grid else args.trials
    print(f"{args.study}: {done} of {total} trials done in {wall:.0f} s | reports in {args.save_dir}"
          + (f" | best: trial {best['trial']}, {best['val_acc']:.2%} validation accuracy" if best else ""))
    if code or not args.train_best:
        return code
    if best is None:
        print_error("tune.py", "--train_best: no complete trial to train")
        return 1
    out = args.save_dir / "best"
    command = f"python train_pytorch.py {best['flags']} --save_dir {shlex.quote(str(out))}"
    print(f"training the best configuration on all training images:\n  {command}", flush=True)
    if train_pytorch.main([*shlex.split(best["flags"]), "--device", args.device, "--save_dir", str(out)]) != 0:
        print_error("tune.py", "--train_best: train_pytorch.py stopped with an error")
        return 1
    report = json.loads((out / f"metrics_{args.model}.json").read_text())
    write_reports(args, study, time.perf_counter() - start, report)
    print(f"test accuracy of the best configuration: {report['accuracy']:.2%}; reproduce it with:\n  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
