"""Train a CNN on MNIST: python train_pytorch.py --model simple

Read it top to bottom: the settings; train_step(), one optimiser step; train_epoch(), the plain loop over one
epoch; main(), the epoch loop; then set_up(), which builds what the loop uses, and finish(), which calibrates
the kept model and scores the test set, once. What is not the plain loop on one device is one call into a
module of its own, which also owns its flags: resume.py (--resume, --init_from), ema.py (--ema), distributed.py
(torchrun), fast_step.py (one CUDA GPU: bf16, torch.compile, the step replayed as a CUDA graph), calibration.py.
"""
import math
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import calibration
import data_loader
import distributed
import ema
import fast_step
import resume
import writers
from checkpoint import CheckpointError, atomic_save, make_checkpoint
from cnn_pytorch import MODELS, build_model
from common import (PROJECT_DIR, OneLineParser, at_least, device_label, fail, fraction, memory_format, positive,
                    synchronize)

# Named sets of defaults. fast: time to 99% (the 29k-parameter tiny CNN, one epoch at a high peak rate, no
# augmentation, which would slow the epoch). accurate: the improved CNN over 20 epochs with elastic
# augmentation and no early stopping (one-cycle does its best work in the last epochs).
PRESETS = {"fast": {"model": "tiny", "epochs": 1, "max_lr": 0.01, "augment": "none"},
           "accurate": {"model": "improved", "epochs": 20, "augment": "strong", "patience": 0}}
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
EXTRAS = (writers, resume, ema, distributed, fast_step)  # the modules that own flags beside the everyday ones


def parse_args():
    p = OneLineParser(prog="train_pytorch.py", description=__doc__.splitlines()[0])
    add, count = p.add_argument, at_least(1)
    add("--preset", choices=list(PRESETS), help="a named set of defaults (PRESETS); flags you give still win")
    add("--model", default="simple", choices=list(MODELS), help="which network (cnn_pytorch.py)")
    add("--epochs", type=count, default=10, help="passes over the training images (early stopping may end sooner)")
    add("--batch_size", type=count, default=128, help="images per step (per process under torchrun)")
    add("--learning_rate", type=positive, default=0.001, help="the start of the schedule, or the constant rate")
    add("--max_lr", type=positive, default=0.005, help="the peak of the onecycle schedule")
    add("--scheduler", default="onecycle", choices=["onecycle", "cosine", "none"], help="the rate over the steps")
    add("--optimizer", default="adam", choices=list(OPTIMIZERS), help="sgd has Nesterov momentum 0.9")
    add("--weight_decay", type=at_least(0.0, float), default=0.0, help="L2 weight decay")
    add("--dropout", type=fraction, help="dropout before the dense layers (default: the model's own; tiny has none)")
    add("--label_smoothing", type=fraction, default=0.1, help="share of the target spread over all classes")
    add("--augment", default="standard", choices=["none", *augment.AUGMENTATIONS],
        help="per-image random warps (augment.py); strong adds an elastic warp, for long runs")
    add("--patience", type=at_least(0), default=5, help="epochs without a better validation score (0: never stop)")
    add("--seed", type=at_least(0), default=0, help="seed of the validation split, initialisation, order, warps")
    add("--val_size", type=count, default=5000, help="validation images held out of the 60,000 training images")
    add("--train_subset", type=count, help="train on the first N training images only (quick checks)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    add("--data_dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    add("--save_dir", default="results", help="where checkpoints and reports go (relative to the project)")
    add("--dry_run", action="store_true", help="one batch through train, validation and test, then stop")
    add("--no_test", action="store_true", help="do not score the test set (tune.py chooses on validation)")
    add("--no_plots", action="store_true", help="write the metrics but no PNG figures")
    add("--no_progress", action="store_true", help="no progress bars, one line per epoch")
    for extra in EXTRAS:  # each adds its own group of flags
        extra.add_args(p)
    return p


def settings(argv=None):
    """The flags after the preset, checked: anything wrong is one line and exit code 2, before any work."""
    parser = parse_args()
    parser.set_defaults(**PRESETS.get(parser.parse_known_args(argv)[0].preset, {}))
    args = parser.parse_args(argv)
    args.device = str(parser.device(args.device))
    args.save_dir = str(parser.output_dir(args.save_dir))
    for extra in (resume, fast_step):  # the extras with flags to check against each other
        extra.check_args(parser, args)
    return args


# ---------------------------------------------------------------------------------- the step and the loop

def train_step(model, optimizer, x, y, ctx, label_smoothing):
    """One optimiser step on the batch (x, y): forward, loss, backward, update. Returns the loss and the logits,
    detached and still on the device: reading them back here (loss.item()) would make a GPU wait for Python at
    every step, so the epoch sums them on the device instead."""
    with ctx:  # bf16 autocast on CUDA, nothing elsewhere (fast_step.precision)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_epoch(run, epoch, steps=None):
    """One pass over the shuffled training batches: (mean loss, accuracy, seconds), over every process."""
    run.model.train()
    run.batches.new_epoch()
    steps = tqdm(range(steps or len(run.batches)), f"epoch {epoch}/{run.args.epochs}", leave=False, disable=run.quiet)
    synchronize(run.device)
    start = time.perf_counter()
    if run.fast is not None:  # one CUDA GPU: the same train_step, replayed as a CUDA graph
        loss_sum, correct = run.fast.run_epoch(epoch, steps)
    else:
        loss_sum = torch.zeros((), device=run.device)
        correct = torch.zeros((), dtype=torch.long, device=run.device)
        for i in steps:
            x, y = run.batches.batch(i)
            loss, logits = train_step(run.step_model, run.optimizer, x, y, run.ctx, run.args.label_smoothing)
            run.lr_used = run.optimizer.param_groups[0]["lr"]  # for the history: the rate of the last step
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            loss_sum += loss.float() * len(y)  # summed on the device: no .item(), no wait for a GPU
            correct += (logits.argmax(1) == y).sum()
    synchronize(run.device)
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = run.dist.sum(loss_sum, correct, len(steps) * run.batches.batch_size)
    return loss_sum / seen, correct / seen, seconds


def main(argv=None, on_epoch=None):
    """The command. on_epoch(row) sees each epoch's history row after validation; an exception it raises ends
    the run with the epoch's files written (tune.py prunes trials so)."""
    args = settings(argv)
    with distributed.process_group(args) as dist:
        try:
            run = set_up(args, dist)
        except (data_loader.DataError, writers.WritersError, CheckpointError, ValueError) as err:
            fail("train_pytorch.py", err, 2)
        if args.dry_run:  # one batch through each split: the set-up works, in seconds
            losses = [train_epoch(run, 1, steps=1)[0]] + [evaluate(run.model, *split, run.ctx, dist, max_batches=1)[0]
                                                           for split in (run.val, run.test)]
            return run.say("dry run: one batch each through train, validation and test (loss {:.3f}, {:.3f}, "
                           "{:.3f}); nothing written. Setup works.".format(*losses)) or 0
        try:
            for epoch in range(run.state.epoch + 1, args.epochs + 1):
                loss, accuracy, seconds = train_epoch(run, epoch)
                if not math.isfinite(loss):
                    fail("train_pytorch.py", f"training diverged at epoch {epoch} (loss is NaN/inf): try lower rates; "
                                             f"the last good state is in {resume.last_path(args)}")
                row = validate_and_keep_best(run, epoch, loss, accuracy, seconds)
                if on_epoch is not None and dist.is_main:
                    on_epoch(row)
                if dist.agree(args.patience and run.state.stale >= args.patience):
                    run.say(f"early stop: no better validation accuracy for {args.patience} epochs")
                    break
        except KeyboardInterrupt:
            return resume.interrupted(run)
        return finish(run)


# ---------------------------------------------------------------------- setting up, validating, finishing

def make_optimizer(args, model, lr, device_type, capturable=False):
    """lr: a float, or on fast_step's path a 0-dim tensor on the device that it writes each step's rate into."""
    extra = {"momentum": 0.9, "nesterov": True} if args.optimizer == "sgd" else {}
    return OPTIMIZERS[args.optimizer](model.parameters(), lr=lr, weight_decay=args.weight_decay, **extra,
                                      **fast_step.optimizer_flags(args.optimizer, device_type, capturable))


def make_scheduler(args, optimizer, total_steps, scale=1.0):
    """PyTorch's scheduler for the run, stepped after every batch."""
    if args.scheduler == "onecycle":
        base, peak = args.learning_rate * scale, max(args.max_lr, args.learning_rate) * scale
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps, pct_start=0.15,
                                                   div_factor=peak / base, final_div_factor=1e3, cycle_momentum=False)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def set_up(args, dist):
    wall_start, say = time.perf_counter(), dist.say  # only rank 0 talks and writes
    saved = resume.load(args)  # --resume: the interrupted run's state, and its settings put back into args
    device, layout = dist.device, memory_format(dist.device)
    ctx = fast_step.precision(args, device)  # decided once: bf16 autocast with --amp, else full precision
    torch.manual_seed(args.seed)
    shuffle = torch.Generator().manual_seed(args.seed)  # the same on every rank: each takes its own share
    splits = data_loader.get_splits(args.data_dir, args.val_size, args.seed, device, args.train_subset)
    splits = writers.mix(splits, args.writers, args.seed)  # --writers: other writers' digits beside MNIST's
    batches = data_loader.TrainBatches(*splits["train"], args.batch_size, args.augment, shuffle, dist.rank,
                                       dist.world, layout)
    data_seconds = time.perf_counter() - wall_start
    model_args, weights = resume.model_args_and_weights(args, saved)  # --init_from / --resume: the file's model
    model = build_model(args.model, **model_args).to(device, memory_format=layout)
    if weights is not None:
        model.load_state_dict(weights)
    say(f"{args.model} CNN: {sum(p.numel() for p in model.parameters()):,} parameters | {device_label(device)}"
        f"{f' x {dist.world} processes' if dist.enabled else ''} | amp {'bf16' if args.amp else 'off'} | train "
        f"{len(splits['train'][0]):,} val {len(splits['val'][0]):,} test {len(splits['test'][0]):,} | data ready "
        f"in {data_seconds:.1f}s")
    step_model, scale = distributed.wrap(model, dist, args)
    # One CUDA GPU: the rates come from a table on the device (a CUDA graph cannot see a scheduler's floats)
    total, lr, rates = args.epochs * len(batches), args.learning_rate * scale, None
    if fast_step.wanted(args, device, dist):
        rates = fast_step.LearningRates(lambda opt: make_scheduler(args, opt, total, scale), lr, total, device)
        lr = rates.table[0].clone()
    optimizer = make_optimizer(args, step_model, lr, device.type, capturable=rates is not None)
    run = SimpleNamespace(  # what the loop uses
        args=args, dist=dist, say=say, quiet=args.no_progress or not dist.is_main, device=device, ctx=ctx,
        shuffle=shuffle, batches=batches, val=splits["val"], test=splits["test"], model=model, model_args=model_args,
        step_model=step_model, optimizer=optimizer, rates=rates, lr_used=0.0, ema=ema.make(model, args.ema),
        scheduler=None if rates else make_scheduler(args, optimizer, total, scale), state=resume.RunState(),
        fast=None, warmup_seconds=0.0, best_path=resume.best_path(args), data_seconds=data_seconds,
        wall_start=wall_start)
    resume.restore(run, saved)  # --resume: weights, optimiser, schedule, random state, counters
    fast_step.enable(run, train_step)  # CUDA or --compile: warm up before the clock; one GPU: capture the step
    return run


def evaluate(model, images, labels, ctx, dist, max_batches=None, label_smoothing=0.0):
    """(mean cross-entropy, accuracy) of the model on one split, over every process. With the training's label
    smoothing the loss is what training minimises, so the two loss curves compare like with like."""
    probs = data_loader.predict_probs(model, images[dist.rank::dist.world], ctx, max_batches=max_batches)
    logp, labels = probs.clamp_min(1e-12).log(), labels[dist.rank::dist.world][:len(probs)]
    loss = F.nll_loss(logp, labels, reduction="sum") * (1 - label_smoothing) - logp.mean(1).sum() * label_smoothing
    loss, correct, count = dist.sum(loss, (probs.argmax(1) == labels).sum(), len(labels))
    return loss / count, correct / count


def better(acc, loss, than_acc, than_loss):  # the higher accuracy; on a tie (common on 5,000 images), the lower loss
    return acc > than_acc or (acc == than_acc and loss < than_loss)


def validate_and_keep_best(run, epoch, train_loss, train_acc, seconds):
    """Score the validation split, log the epoch, save the best and the resumable state; returns the row."""
    state = run.state
    val_loss, val_acc = evaluate(run.model, *run.val, run.ctx, run.dist, label_smoothing=run.args.label_smoothing)
    row = {"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6), "val_loss":
           round(val_loss, 6), "val_acc": round(val_acc, 6), "seconds": round(seconds, 3),
           "lr": run.rates.used_in(epoch) if run.rates else run.lr_used}
    kept, loss, acc = ema.better_of(run, row, evaluate, better)  # the model, or with --ema its average
    if better(acc, loss, state.best_val, state.best_val_loss):
        state.best_val, state.best_val_loss, state.best_epoch, state.stale = acc, loss, epoch, 0
        if run.dist.is_main:
            atomic_save(make_checkpoint(kept, run.args.model, data_loader.NORMALIZATION, run.model_args,
                                        epoch=epoch, val_accuracy=acc, weights=row.get("weights", "model"),
                                        args=vars(run.args)), run.best_path)
    else:
        state.stale += 1
    state.epoch, state.train_seconds = epoch, state.train_seconds + seconds
    state.history.append(row)
    resume.save(run)
    run.say(f"epoch {epoch:>3}/{run.args.epochs} | train loss {train_loss:.4f} acc {train_acc * 100:6.2f}% | val "
            f"loss {val_loss:.4f} acc {val_acc * 100:6.2f}%{ema.note(row)}{' *' if state.stale == 0 else '  '} | "
            f"lr {row['lr']:.2e} | {seconds:5.2f}s", flush=True)
    return row


def finish(run):
    """Calibrate the epoch chosen on validation, score the test set once with it, and write the report."""
    args, state, dist, folder = run.args, run.state, run.dist, run.best_path.parent
    dist.barrier()  # rank 0 has written the best checkpoint
    best = torch.load(run.best_path, map_location="cpu", weights_only=True)
    run.model.load_state_dict(best["state_dict"])
    calibration.calibrate(run.model, best, run.val, run.ctx, dist)  # temperature scaling, folded into the model
    probs = None if args.no_test else distributed.gather_probs(run.model, run.test[0], run.ctx, dist).cpu()
    if not dist.is_main:
        return 0
    import metrics  # imported late: scikit-learn and matplotlib take seconds, and only the report needs them
    metrics.write_history(state.history, folder / f"history_{args.model}.csv")
    best.update(epochs_run=len(state.history), training_seconds=round(state.train_seconds, 2))
    result = "test set not scored (--no_test)"
    if probs is not None:
        report = metrics.write_test_report(folder, args.model, run_facts(run, best), *(t.cpu() for t in run.test),
                                           probs, None if args.no_plots else folder)
        best.update(test_accuracy=report["accuracy"], test_loss=report["loss"])
        if not args.no_plots:
            import visualization
            visualization.plot_training_history(state.history, folder / "training_history.png", state.best_epoch,
                                                args.label_smoothing)
        result = f"test accuracy {report['accuracy'] * 100:.2f}% (loss {report['loss']:.4f})"
    atomic_save(best, run.best_path)
    print(f"{result} with the epoch-{state.best_epoch} {ema.kept_name(best)} chosen on validation "
          f"({state.best_val * 100:.2f}%) | training {state.train_seconds:.1f}s | saved {run.best_path}")
    return 0


def run_facts(run, best):
    """The run, for the metrics report: what trained, on what, how long."""
    args, state, warmup = run.args, run.state, round(run.warmup_seconds, 2)
    return dict(model=args.model, parameters=sum(p.numel() for p in run.model.parameters()), seed=args.seed,
                best_epoch=state.best_epoch, epochs_run=best["epochs_run"], val_accuracy=round(state.best_val, 6),
                training_seconds=best["training_seconds"], data_seconds=round(run.data_seconds, 2),
                warmup_seconds=warmup, compile_seconds=warmup if args.compile else 0.0, cuda_graphs=bool(run.fast),
                wall_seconds=round(time.perf_counter() - run.wall_start, 2), device=device_label(run.device),
                amp="bf16" if args.amp else "off", torch=torch.__version__, weights=best.get("weights", "model"),
                temperature=round(best["temperature"], 4), calibration=best["calibration"])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except fast_step.CaptureFailed as err:  # --cuda_graphs auto: the same run again, with the plain loop
        fast_step.rerun_without_graph(err)
