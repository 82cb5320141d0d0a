"""--ema: an exponential moving average of the weights, kept beside the model and chosen where it validates better.

After every step the average moves towards the model: ema <- decay * ema + (1 - decay) * model, batch-norm
statistics included. It is PyTorch's own torch.optim.swa_utils.AveragedModel; on fast_step's CUDA path the same
update runs on the device (fast_step.DeviceEMA). Each epoch, validation scores both, and the better one is the
epoch's candidate for the best checkpoint, whose "weights" entry says which it holds.
"""
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common import fraction


def add_args(parser):
    group = parser.add_argument_group("moving average of the weights (ema.py)")
    group.add_argument("--ema", type=fraction, default=0.0, metavar="DECAY",
                       help="keep an exponential moving average of the weights beside the model (decay per step, "
                            "e.g. 0.999; 0: off); each epoch the better of the two on validation is kept")


def make(model, decay):
    """The average of `model` (None when decay is 0): a copy whose weights and buffers follow the model's,
    starting from the first step's."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def better_of(run, row, evaluate, better):
    """(module, validation loss, accuracy) of this epoch's candidate: the model, or with --ema whichever of the
    model and its average validates better. Adds the average's scores and the choice to the history row."""
    if run.ema is None:
        return run.model, row["val_loss"], row["val_acc"]
    loss, acc = evaluate(run.ema.module, *run.val, run.ctx, run.dist, label_smoothing=run.args.label_smoothing)
    row.update(ema_val_loss=round(loss, 6), ema_val_acc=round(acc, 6))
    if better(acc, loss, row["val_acc"], row["val_loss"]):
        row["weights"] = "ema"
        return run.ema.module, loss, acc
    row["weights"] = "model"
    return run.model, row["val_loss"], row["val_acc"]


def note(row):
    """The epoch line's part about the average."""
    if "weights" not in row:
        return ""
    return f" | ema loss {row['ema_val_loss']:.4f} acc {row['ema_val_acc'] * 100:6.2f}% -> {row['weights']:<5}"


def kept_name(best):
    return "model's moving average (--ema)" if best.get("weights") == "ema" else "model"
