"""Numbers from predictions: accuracy, loss, per-class scores, confusion matrix; the metrics_<model> files.

Everything here takes plain arrays (true labels, predicted probabilities) and returns plain numbers, so the
same functions score a training run, a saved checkpoint or an ensemble. scikit-learn does the scoring.
"""
import json
import os
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support


def compute_metrics(y_true, probs):
    """y_true (N,) ints, probs (N, 10) softmax outputs -> dict of plain numbers and lists."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax sums drift from 1 by ~1e-7
    y_pred = probs.argmax(1)
    labels = list(range(probs.shape[1]))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "loss": float(log_loss(y_true, probs, labels=labels)),
        "num_samples": int(len(y_true)),
        "per_class": {str(c): {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                               "support": int(support[c])} for c in labels},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _atomic_write_text(path, text):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_metrics(metrics, info):
    lines = [f"MNIST test report: {info.get('model', '?')} model", ""]
    for key, value in info.items():
        lines.append(f"{key:<20} {value}")
    lines += ["", f"{'test accuracy':<20} {metrics['accuracy'] * 100:.2f}%",
              f"{'test loss':<20} {metrics['loss']:.4f}", "",
              f"{'digit':>5} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}"]
    for c, row in metrics["per_class"].items():
        lines.append(f"{c:>5} {row['precision']:>10.4f} {row['recall']:>10.4f} {row['f1']:>10.4f} {row['support']:>8}")
    return "\n".join(lines) + "\n"


def write_metrics(metrics, save_dir, model_name, info):
    """Write metrics_<model>.txt (for people) and metrics_<model>.json (for scripts); returns both paths."""
    save_dir = Path(save_dir)
    txt, js = save_dir / f"metrics_{model_name}.txt", save_dir / f"metrics_{model_name}.json"
    _atomic_write_text(txt, format_metrics(metrics, info))
    _atomic_write_text(js, json.dumps({**info, **metrics}, indent=2) + "\n")
    return txt, js
