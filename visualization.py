"""Pictures from numbers: training curves and the report figures. No computing here, only drawing.

plot_training_history() draws what the training loop recorded; plot_test_report() draws a metrics report
(metrics.compute_metrics) next to the test images it came from. Every figure is closed after saving.
"""
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np

from common import atomic_write

matplotlib.use("Agg")  # files only, never a window: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter  # noqa: E402

# One meaning, one colour, in every figure.
TRAIN, VAL, EMA, LR, BEST = "tab:blue", "tab:orange", "tab:purple", "tab:green", "dimgray"
RIGHT, WRONG = "darkgreen", "tab:red"
PRECISION, RECALL, F1 = sns.color_palette("colorblind", 3)
DPI = 110
SAMPLE_GRID = (5, 10)  # sample_predictions.png: rows, columns
STYLE = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "figure.titlesize": 15,
         "legend.fontsize": 10, "xtick.labelsize": 10, "ytick.labelsize": 10}


@contextmanager
def _figure(path, *args, title=None, **kwargs):
    """A figure in the shared style, saved to path and closed even when drawing fails."""
    with plt.rc_context(STYLE):
        # Constrained layout keeps the title, labels and colour bars inside the picture.
        fig, axes = plt.subplots(*args, layout="constrained", **kwargs)
        try:
            yield fig, axes
            if title:
                fig.suptitle(title, fontweight="bold")
            with atomic_write(path) as tmp:
                fig.savefig(tmp, dpi=DPI)
        finally:
            plt.close(fig)


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def plot_training_history(history, path, best_epoch=None, label_smoothing=0.0):
    """history: list of dicts with epoch, train_loss, val_loss, train_acc, val_acc, lr (with --ema also
    ema_val_loss, ema_val_acc and weights) -> a PNG at path.

    Like with like: both losses are the cross-entropy training minimises, label smoothing included (the
    loop records them so). With --ema the average's validation curves are drawn too, and the best epoch is
    marked on the curve it was chosen on.
    """
    epochs = [h["epoch"] for h in history]
    ema = "ema_val_acc" in history[0]
    loss_title = "Loss: cross-entropy" + (f", label smoothing {label_smoothing:g} as trained" if label_smoothing
                                          else "")
    with _figure(path, 1, 3, figsize=(16, 4.6), title="Training history") as (fig, axes):
        for ax, key, name in ((axes[0], "loss", loss_title), (axes[1], "acc", "Accuracy")):
            scale = 100 if key == "acc" else 1  # accuracy in percent: 99.1 reads faster than 0.991
            ax.plot(epochs, [h[f"train_{key}"] * scale for h in history], "o-", color=TRAIN, label="train")
            ax.plot(epochs, [h[f"val_{key}"] * scale for h in history], "o-", color=VAL, label="validation")
            if ema:
                ax.plot(epochs, [h[f"ema_val_{key}"] * scale for h in history], "o-", color=EMA,
                        label="validation, moving average")
            if best_epoch is not None:
                chosen = history[epochs.index(best_epoch)]
                column = "ema_val" if chosen.get("weights") == "ema" else "val"
                ax.plot(best_epoch, chosen[f"{column}_{key}"] * scale, "*", color=BEST, markersize=16,
                        label="kept (chosen on validation accuracy)")
            ax.set(title=name, xlabel="epoch", ylabel="accuracy (%)" if key == "acc" else "loss")
        if len(history) > 2:  # late epochs differ by tiny losses: a log scale keeps them apart
            axes[0].set_yscale("log")
            axes[0].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            axes[0].yaxis.set_major_formatter(FormatStrFormatter("%g"))
            axes[0].yaxis.set_minor_formatter(NullFormatter())
        axes[2].plot(epochs, [h["lr"] for h in history], "o-", color=LR)
        axes[2].set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="learning rate", yscale="log")
        for ax in axes:
            if best_epoch is not None:
                ax.axvline(best_epoch, color=BEST, linestyle="--", linewidth=1.2, label=f"best epoch ({best_epoch})")
            if len(epochs) <= 15:
                ax.set_xticks(epochs)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
            ax.grid(alpha=0.3)
        axes[0].legend()
        axes[1].legend(loc="lower right")
    return path


def plot_confusion_matrix(cm, path):
    """Counts on the left; on the right the errors only, as % of each true digit, so they are not drowned out."""
    cm = np.asarray(cm)
    digits = range(len(cm))
    rates = 100 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
    diagonal = np.eye(len(cm), dtype=bool)
    blank_zeros = lambda values, fmt: np.where(cm > 0, np.vectorize(fmt.format)(values), "")  # noqa: E731
    with _figure(path, 1, 2, figsize=(17, 7.6), title="Confusion matrix (test set)") as (fig, (left, right)):
        sns.heatmap(cm, ax=left, annot=blank_zeros(cm, "{:d}"), fmt="", cmap="Blues", square=True,
                    cbar_kws={"label": "images", "shrink": 0.85}, xticklabels=digits, yticklabels=digits,
                    annot_kws={"size": 10}, linewidths=0.5, linecolor="white")
        left.set(title="Counts (blank: none)", xlabel="predicted digit", ylabel="true digit")
        # Diagonal and empty cells are masked: the ~99% diagonal would set the colour scale and every
        # error would look white.
        vmax = max(rates[~diagonal].max(), 0.1)
        sns.heatmap(rates, ax=right, mask=diagonal | (cm == 0), annot=blank_zeros(rates, "{:.1f}"), fmt="",
                    cmap="Reds", vmin=0, vmax=vmax, square=True, xticklabels=digits, yticklabels=digits,
                    annot_kws={"size": 10}, linewidths=0.5, linecolor="whitesmoke",
                    cbar_kws={"label": "% of the true digit's images", "shrink": 0.85,
                              "format": PercentFormatter(decimals=1)})
        for d in digits:  # the diagonal as grey text: recall per digit, outside the colour scale
            right.add_patch(plt.Rectangle((d, d), 1, 1, color="gainsboro", zorder=0.5))
            right.text(d + 0.5, d + 0.5, f"{rates[d, d]:.1f}", ha="center", va="center", fontsize=9, color="dimgray")
        right.set(title="Errors as % of each true digit (grey diagonal: % right)", xlabel="predicted digit",
                  ylabel="true digit")
        for ax in (left, right):
            ax.tick_params(rotation=0)
    return path


def _show_digit(ax, image, title, color):
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
    ax.set_title(title, color=color, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():  # a coloured frame: wrong digits are found without reading
        spine.set_edgecolor(color)
        spine.set_linewidth(2.5 if color == WRONG else 0.8)


def _percent(p):
    """A confidence as a whole percent; 99.7% is not shown as a claim of certainty (100%)."""
    return ">99%" if p > 0.99 else f"{p * 100:.0f}%"


def plot_sample_predictions(images, y_true, probs, path, grid=SAMPLE_GRID, seed=0):
    """A fixed random sample of test digits with predicted and true label (and confidence); wrong ones in red.

    A random sample (always the same one) shows the typical case honestly; misclassified.png shows the errors.
    """
    rows, cols = grid
    n = min(rows * cols, len(images))
    pick = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    pred = probs.argmax(1)
    wrong = int((pred[pick] != y_true[pick]).sum())
    with _figure(path, rows, cols, figsize=(1.55 * cols, 1.75 * rows + 0.4),
                 title=f"Random test digits: predicted (confidence); red: wrong, with the true digit "
                       f"({wrong} of {n})") as (fig, axes):
        for ax in np.ravel(axes)[n:]:
            ax.axis("off")
        for ax, i in zip(np.ravel(axes), pick):
            ok = pred[i] == y_true[i]
            label = f"{pred[i]} ({_percent(probs[i, pred[i]])})" + ("" if ok else f"\ntrue {y_true[i]}")
            _show_digit(ax, images[i], label, RIGHT if ok else WRONG)
    return path


def plot_misclassified(images, worst, path, cols=5):
    """The worst misclassifications of a report: image, true, predicted with confidence, and the runner-up."""
    if not worst:
        with _figure(path, figsize=(6, 2), title="Misclassified test digits") as (fig, ax):
            ax.axis("off")
            ax.text(0.5, 0.5, "none: every test digit is classified correctly", ha="center", va="center")
        return path
    rows = -(-len(worst) // cols)
    with _figure(path, rows, cols, figsize=(2.5 * cols, 2.75 * rows + 0.5), squeeze=False,
                 title=f"The {len(worst)} most confident mistakes (test set)") as (fig, axes):
        for ax in axes.ravel()[len(worst):]:
            ax.axis("off")
        for ax, w in zip(axes.ravel(), worst):
            title = (f"#{w['index']}: true {w['true']}, said {w['predicted']}\n"
                     f"{w['confidence'] * 100:.1f}% sure; 2nd: {w['second']} ({w['second_confidence'] * 100:.1f}%)")
            _show_digit(ax, images[w["index"]], title, WRONG)
    return path


def plot_per_class_metrics(report, path):
    """Precision, recall and F1 per digit as grouped bars, with the y axis zoomed onto where they differ."""
    digits = list(report["per_class"])
    x = np.arange(len(digits))
    values = {k: np.array([report["per_class"][d][k] for d in digits]) * 100 for k in ("precision", "recall", "f1")}
    low = min(v.min() for v in values.values())
    bottom = max(0.0, np.floor(low - max((100 - low) * 0.3, 0.5)))  # zoomed: at 99% all bars look equal from 0
    with _figure(path, figsize=(12, 5.4), title="Precision, recall and F1 per digit (test set)") as (fig, ax):
        for offset, (key, color) in zip((-0.27, 0, 0.27), (("precision", PRECISION), ("recall", RECALL),
                                                              ("f1", F1))):
            ax.bar(x + offset, values[key], width=0.26, color=color, label=key if key != "f1" else "F1")
        ax.axhline(report["accuracy"] * 100, color=BEST, linestyle="--", linewidth=1.2,
                   label=f"accuracy {report['accuracy'] * 100:.2f}%")
        ax.set_xticks(x, [f"{d}\n(n={report['per_class'][d]['support']})" for d in digits])
        ax.set_ylim(bottom, 100)
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=1 if 100 - bottom < 5 else 0))
        ax.set(xlabel="digit (number of test images)", ylabel=f"score (axis starts at {bottom:g}%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    return path


def plot_test_report(save_dir, images, y_true, probs, report):
    """The four test-set figures of a report into save_dir; returns their paths.

    images: uint8 (N, 28, 28) test images, y_true (N,), probs (N, 10) softmax, report: metrics.compute_metrics().
    """
    save_dir = Path(save_dir)
    images, y_true, probs = _numpy(images), _numpy(y_true), _numpy(probs)
    return [plot_confusion_matrix(report["confusion_matrix"], save_dir / "confusion_matrix.png"),
            plot_sample_predictions(images, y_true, probs, save_dir / "sample_predictions.png"),
            plot_misclassified(images, report["worst_misclassifications"], save_dir / "misclassified.png"),
            plot_per_class_metrics(report, save_dir / "per_class_metrics.png")]
