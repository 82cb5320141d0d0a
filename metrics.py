"""Numbers from predictions: accuracy, loss, per-class scores, errors, calibration; the metrics_<model> files.

Everything here takes plain arrays (true labels, predicted probabilities) and returns plain numbers, so the
same functions score a training run, a saved checkpoint or an ensemble. scikit-learn does the scoring.
compute_metrics() gives the keys of REPORT_KEYS; write_metrics() adds the run facts of RUN_KEYS (null when
unknown) and whatever else it is given to the JSON, and writes the same numbers as an aligned text report.
"""
import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support,
                             top_k_accuracy_score)

from common import atomic_write

TOP_PAIRS = 10   # most-confused (true, predicted) pairs kept
WORST = 20       # worst misclassifications kept (misclassified.png shows them all)
ECE_BINS = 15    # the usual choice since Guo et al. 2017, so numbers compare with papers
REPORT_KEYS = ("accuracy", "top2_accuracy", "loss", "num_samples", "num_errors", "ece", "per_class", "macro_avg",
               "weighted_avg", "confusion_matrix", "most_confused", "worst_misclassifications")
RUN_KEYS = ("model", "parameters", "epochs_run", "training_seconds", "device", "seed")


def _check_inputs(y_true, probs):
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true) or len(y_true) == 0:
        raise ValueError(f"expected labels (N,) and probabilities (N, classes) with N > 0, "
                         f"got {y_true.shape} and {probs.shape}")
    return y_true, probs / probs.sum(1, keepdims=True)  # float32 softmax sums drift from 1 by ~1e-7


def _scores(precision, recall, f1, support):
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)}


def class_scores(y_true, y_pred, labels):
    """Per-class precision/recall/F1/support plus their macro and weighted averages, from scikit-learn."""
    per_class = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {"per_class": {str(c): _scores(*(column[i] for column in per_class)) for i, c in enumerate(labels)}}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        out[f"{average}_avg"] = _scores(p, r, f, len(y_true))  # sklearn gives no support for averages
    return out


def most_confused(cm, top=TOP_PAIRS):
    """The largest off-diagonal cells of a confusion matrix: [{true, predicted, count}], most errors first.

    Ties are broken by (true, predicted) so the list is the same on every run.
    """
    cm = np.asarray(cm)
    pairs = [(-int(cm[t, p]), t, p) for t in range(len(cm)) for p in range(len(cm)) if t != p and cm[t, p] > 0]
    return [{"true": t, "predicted": p, "count": -n} for n, t, p in sorted(pairs)[:top]]


def worst_misclassifications(y_true, probs, top=WORST):
    """Wrong predictions made with the highest confidence, with the runner-up class and the true class's share.

    Those are the interesting errors: either a mislabelled or ambiguous digit, or a blind spot of the model.
    """
    order = np.argsort(-probs, axis=1, kind="stable")
    pred, second = order[:, 0], order[:, 1]
    rows = np.arange(len(y_true))
    confidence = probs[rows, pred]
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.lexsort((wrong, -confidence[wrong]))][:top]  # most confident first, then by index
    return [{"index": int(i), "true": int(y_true[i]), "predicted": int(pred[i]), "confidence": float(confidence[i]),
             "second": int(second[i]), "second_confidence": float(probs[i, second[i]]),
             "true_confidence": float(probs[i, y_true[i]])} for i in wrong]


def expected_calibration_error(y_true, probs, bins=ECE_BINS):
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins by their size.

    0 means "when the model says 90%, it is right 90% of the time"; a bin is (lo, hi].
    """
    confidence, correct = probs.max(1), probs.argmax(1) == y_true
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    # sum over bins of (bin size / N) * |accuracy - confidence| = |right answers - summed confidence| / N
    gaps = np.bincount(which, correct, bins) - np.bincount(which, confidence, bins)
    return float(np.abs(gaps).sum() / len(y_true))


def compute_metrics(y_true, probs):
    """y_true (N,) ints, probs (N, classes) softmax outputs -> {REPORT_KEYS: JSON-ready numbers and lists}."""
    y_true, probs = _check_inputs(y_true, probs)
    y_pred = probs.argmax(1)
    labels = list(range(probs.shape[1]))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "top2_accuracy": float(top_k_accuracy_score(y_true, probs, k=2, labels=labels)),
        "loss": float(log_loss(y_true, probs, labels=labels)),
        "num_samples": int(len(y_true)),
        "num_errors": int((y_pred != y_true).sum()),
        "ece": expected_calibration_error(y_true, probs),
        **class_scores(y_true, y_pred, labels),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm),
        "worst_misclassifications": worst_misclassifications(y_true, probs),
    }


def _fact(value):
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _section(title):
    return ["", title, "-" * len(title)]


def _confusion_lines(cm):
    width = max(5, len(f"{max(max(r) for r in cm):,}") + 1)
    lines = ["true \\ predicted", " " * 6 + "".join(f"{c:>{width}}" for c in range(len(cm)))]
    for t, row in enumerate(cm):
        # Dots for zero cells: the few errors stand out from a page of zeros.
        lines.append(f"{t:>6}" + "".join(f"{(f'{v:,}' if v else '.'):>{width}}" for v in row))
    return lines


def format_metrics(m, info):
    """The text report: aligned columns, readable in a terminal, the same numbers as the JSON."""
    n, errors = m["num_samples"], m["num_errors"]
    lines = [f"MNIST test report: {info.get('model', '?')} model", *_section("Run"),
             *[f"{key:<22}{_fact(value)}" for key, value in info.items()], *_section("Summary"),
             f"{'test accuracy':<22}{m['accuracy'] * 100:7.2f}%   ({n - errors:,} of {n:,} right, {errors:,} wrong)",
             f"{'top-2 accuracy':<22}{m['top2_accuracy'] * 100:7.2f}%   (right digit among the two most likely)",
             f"{'test loss':<22}{m['loss']:8.4f}   (mean cross-entropy)",
             f"{'calibration error':<22}{m['ece'] * 100:7.2f}%   (ECE, {ECE_BINS} bins; 0: confidence = accuracy)",
             *_section("Per digit"), f"{'digit':>12} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>9}"]
    for name, s in [*m["per_class"].items(), ("macro avg", m["macro_avg"]), ("weighted avg", m["weighted_avg"])]:
        lines.append(f"{name:>12} {s['precision']:>10.4f} {s['recall']:>10.4f} {s['f1']:>10.4f} {s['support']:>9,}")
    lines += _section("Confusion matrix (rows: true digit, columns: predicted; . = 0)")
    lines += _confusion_lines(m["confusion_matrix"])
    lines += _section(f"Most confused pairs (top {TOP_PAIRS})") + [f"{'true':>6} {'predicted':>10} {'count':>7}"]
    lines += [f"{p['true']:>6} {p['predicted']:>10} {p['count']:>7}" for p in m["most_confused"]] or ["  none"]
    lines += _section("Worst misclassifications (the most confident mistakes; index: position in the test set)")
    lines.append(f"{'index':>6} {'true':>5} {'predicted':>10} {'confidence':>11} {'runner-up':>14} {'p(true)':>9}")
    for w in m["worst_misclassifications"]:
        lines.append(f"{w['index']:>6} {w['true']:>5} {w['predicted']:>10} {w['confidence'] * 100:>10.2f}% "
                     f"{w['second']:>5} ({w['second_confidence'] * 100:5.2f}%) {w['true_confidence'] * 100:>8.2f}%")
    if not m["worst_misclassifications"]:
        lines.append("  none: every test digit is right")
    return "\n".join(lines) + "\n"


def write_history(history, path):
    """The training history (one row per epoch) as CSV."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)


def write_metrics(metrics, save_dir, model_name, info):
    """Write metrics_<model>.txt (for people) and metrics_<model>.json (for scripts); returns both paths.

    The run facts of RUN_KEYS are always in the JSON (null when unknown) so scripts can rely on them.
    """
    save_dir = Path(save_dir)
    info = {**info, **{key: None for key in RUN_KEYS if key not in info}}
    txt, js = save_dir / f"metrics_{model_name}.txt", save_dir / f"metrics_{model_name}.json"
    for path, text in ((txt, format_metrics(metrics, info)), (js, json.dumps({**info, **metrics}, indent=2) + "\n")):
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    return txt, js


def write_test_report(save_dir, name, info, images, y_true, probs, figure_dir=None):
    """The test report of one model: compute_metrics, metrics_<name>.txt/.json into save_dir and, with a
    figure_dir, the four test figures there; returns the report dict."""
    report = compute_metrics(y_true, probs)
    write_metrics(report, save_dir, name, info)
    if figure_dir is not None:
        import visualization  # matplotlib takes seconds to import: only where figures are drawn
        Path(figure_dir).mkdir(exist_ok=True)
        visualization.plot_test_report(figure_dir, images, y_true, probs, report)
    return report

