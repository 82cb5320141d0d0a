"""metrics.py against answers worked out by hand and against scikit-learn; visualization.py writes readable PNGs."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import classification_report

import metrics
import visualization

# Ten samples, three classes. Each row: (true, probabilities); the predicted class is the largest.
#   idx  true pred  note
#   2    0    1     wrong, 60% sure, runner-up 0 (the truth)
#   5    1    2     wrong, 80% sure, runner-up 1 (the truth)
#   9    2    0     wrong, 95% sure, runner-up 1, the truth only 1%: outside the top 2
HAND = [(0, [0.90, 0.05, 0.05]), (0, [0.60, 0.30, 0.10]), (0, [0.30, 0.60, 0.10]),
        (1, [0.15, 0.80, 0.05]), (1, [0.05, 0.70, 0.25]), (1, [0.05, 0.15, 0.80]),
        (2, [0.04, 0.06, 0.90]), (2, [0.20, 0.10, 0.70]), (2, [0.30, 0.20, 0.50]),
        (2, [0.95, 0.04, 0.01])]


@pytest.fixture(scope="module")
def hand():
    y = np.array([t for t, _ in HAND])
    probs = np.array([p for _, p in HAND], dtype=np.float32)
    return y, probs, metrics.compute_metrics(y, probs)


def test_hand_case_headline_numbers(hand):
    _, _, m = hand
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["top2_accuracy"] == pytest.approx(0.9)  # only sample 9 has its truth outside the top two
    p_true = [0.9, 0.6, 0.3, 0.8, 0.7, 0.15, 0.9, 0.7, 0.5, 0.01]
    assert m["loss"] == pytest.approx(-np.mean(np.log(p_true)), rel=1e-5)
    assert (m["num_samples"], m["num_errors"]) == (10, 3)


def test_hand_case_confusion_and_class_scores(hand):
    y, probs, m = hand
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    # Worked out from the matrix: precision = column diagonal / column sum, recall = row diagonal / row sum.
    for c, expected in {"0": 2 / 3, "1": 2 / 3, "2": 3 / 4}.items():
        s = m["per_class"][c]
        assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((expected,) * 3)
    assert [m["per_class"][c]["support"] for c in "012"] == [3, 3, 4]
    assert m["macro_avg"]["precision"] == pytest.approx(25 / 36)
    assert m["weighted_avg"]["recall"] == pytest.approx(0.7)
    # And the same numbers as scikit-learn's own report.
    ref = classification_report(y, probs.argmax(1), output_dict=True, zero_division=0)
    for c in "012":
        for key in ("precision", "recall", "f1"):
            assert m["per_class"][c][key] == pytest.approx(ref[c][key if key != "f1" else "f1-score"])
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_avg"]["f1"] == pytest.approx(ref[f"{avg} avg"]["f1-score"])


def test_hand_case_worst_misclassifications(hand):
    _, _, m = hand
    worst = [(w["index"], w["true"], w["predicted"], w["second"]) for w in m["worst_misclassifications"]]
    assert worst == [(9, 2, 0, 1), (5, 1, 2, 1), (2, 0, 1, 0)]  # most confident first
    first = m["worst_misclassifications"][0]
    assert (first["confidence"], first["second_confidence"], first["true_confidence"]) == pytest.approx(
        (0.95, 0.04, 0.01), rel=1e-5)


def test_most_confused_orders_by_count_then_pair():
    cm = np.diag([100] * 10)
    cm[4, 9], cm[9, 4], cm[7, 2], cm[3, 5] = 7, 5, 5, 2
    singles = [(0, 6), (1, 7), (2, 3), (5, 3), (6, 0), (8, 3), (9, 7), (2, 8)]
    for t, p in singles:
        cm[t, p] = 1
    pairs = [(p["true"], p["predicted"], p["count"]) for p in metrics.most_confused(cm)]
    assert pairs == [(4, 9, 7), (7, 2, 5), (9, 4, 5), (3, 5, 2),
                     (0, 6, 1), (1, 7, 1), (2, 3, 1), (2, 8, 1), (5, 3, 1), (6, 0, 1)]  # ten, no more


def test_no_errors_means_empty_error_lists():
    y = np.arange(10)
    m = metrics.compute_metrics(y, np.eye(10) * 0.9 + 0.01)
    assert m["accuracy"] == 1.0 and m["most_confused"] == [] and m["worst_misclassifications"] == []


def test_worst_misclassifications_keeps_the_most_confident():
    y = np.zeros(100, dtype=int)
    probs = np.full((100, 10), 0.01)
    probs[:, 1] = np.linspace(0.5, 0.9, 100)  # every one wrong (says 1), later ones more sure
    probs[:, 0] = 1 - probs[:, 1:].sum(1)
    worst = metrics.worst_misclassifications(y, probs / probs.sum(1, keepdims=True))
    assert [w["index"] for w in worst] == list(range(99, 99 - metrics.WORST, -1))
    assert all(w["second"] == 0 for w in worst)


@pytest.mark.parametrize("confidences, correct, expected", [
    ([0.9] * 4, [1, 1, 0, 0], 0.4),                        # says 90%, right half the time
    ([0.95, 0.95, 0.55, 0.55], [1, 1, 1, 0], 0.05),        # two bins, each 5 points off
    ([0.75] * 4, [1, 1, 1, 0], 0.0),                       # perfectly calibrated
])
def test_expected_calibration_error(confidences, correct, expected):
    # Two classes: the top class gets the confidence; the label agrees with it where `correct`.
    probs = np.array([[c, 1 - c] for c in confidences])
    y = np.array([0 if ok else 1 for ok in correct])
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(expected)


@pytest.mark.parametrize("sharpness", [0.5, 3.0])
def test_fit_temperature_finds_how_far_the_probabilities_are_off(sharpness):
    # Labels drawn from softmax(z): those probabilities are calibrated. Shown softmax(sharpness * z) instead
    # (overconfident for 3, a label-smoothed model's underconfidence for 0.5), the fit undoes the sharpness.
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (20000, 10))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(10, p=row) for row in p])
    shown = np.exp(sharpness * (z - z.max(1, keepdims=True)))
    shown /= shown.sum(1, keepdims=True)
    import calibration
    t = calibration.fit_temperature(y, shown.astype(np.float32))
    assert t == pytest.approx(sharpness, rel=0.05)
    calibrated = np.exp(np.log(shown) / t)
    calibrated /= calibrated.sum(1, keepdims=True)
    assert metrics.expected_calibration_error(y, calibrated) < metrics.expected_calibration_error(y, shown) / 3
    assert (calibrated.argmax(1) == shown.argmax(1)).all()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected labels"):
        metrics.compute_metrics([0, 1, 2], np.full((2, 10), 0.1))


def test_written_files_hold_the_documented_keys(hand, tmp_path):
    _, _, m = hand
    txt, js = metrics.write_metrics(m, tmp_path, "simple", {"model": "simple", "parameters": 1234, "seed": 0})
    assert (txt.name, js.name) == ("metrics_simple.txt", "metrics_simple.json")
    data = json.loads(js.read_text())
    assert set(metrics.REPORT_KEYS) <= set(data) and set(metrics.RUN_KEYS) <= set(data)
    assert data["epochs_run"] is None and data["parameters"] == 1234  # unknown facts are null, not missing
    assert data["accuracy"] == m["accuracy"] and data["confusion_matrix"] == m["confusion_matrix"]
    text = txt.read_text()
    assert "70.00%" in text and "macro avg" in text and "weighted avg" in text
    assert "epochs_run            unknown" in text


def _check_png(path, min_size=(400, 200)):
    assert path.is_file(), f"{path.name} was not written"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("L"))
    assert min_size[0] <= w <= 4000 and min_size[1] <= h <= 4000, f"{path.name} is {w}x{h}"
    assert pixels.std() > 10, f"{path.name} looks blank"


@pytest.fixture(scope="module")
def synthetic():
    """60 fake 'digits' (a bar at a label-dependent row) and a noisy classifier of them."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 60)
    images = np.zeros((60, 28, 28), dtype=np.uint8)
    for i, label in enumerate(y):
        images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 255
    probs = rng.dirichlet(np.ones(10), 60)
    probs[np.arange(40), y[:40]] += 2  # two thirds right
    return images, y, probs / probs.sum(1, keepdims=True)


@pytest.mark.slow
def test_test_report_writes_four_readable_pngs(synthetic, tmp_path):
    import matplotlib.pyplot as plt
    images, y, probs = synthetic
    report = metrics.compute_metrics(y, probs)
    paths = visualization.plot_test_report(tmp_path, images, y, probs, report)
    assert plt.get_fignums() == []  # every figure closed: a long run must not pile them up
    assert [p.name for p in paths] == ["confusion_matrix.png", "sample_predictions.png", "misclassified.png",
                                       "per_class_metrics.png"]
    for path in paths:
        _check_png(path)


def test_test_report_without_errors_and_from_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    y = torch.arange(10).repeat(3)
    probs = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8)
    report = metrics.compute_metrics(y.numpy(), probs.numpy())
    for path in visualization.plot_test_report(tmp_path, images, y, probs, report):
        _check_png(path, min_size=(300, 100))


@pytest.mark.parametrize("epochs", [1, 12])
def test_training_history_png(tmp_path, epochs):
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.1 / e, "val_loss": 0.5 / e, "val_acc": 1 - 0.05 / e,
                "lr": 1e-3 * 0.8 ** e, "seconds": 1.0} for e in range(1, epochs + 1)]
    path = visualization.plot_training_history(history, tmp_path / "training_history.png", best_epoch=epochs)
    _check_png(path)


def test_training_history_draws_the_average_and_marks_the_kept_epoch_on_the_curve_it_was_chosen_on(tmp_path,
                                                                                                   monkeypatch):
    from matplotlib.axes import Axes
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.9, "val_loss": 0.5 / e, "val_acc": 0.95,
                "ema_val_loss": 0.4 / e, "ema_val_acc": 0.96 + e / 100, "weights": "ema" if e == 2 else "model",
                "lr": 1e-3, "seconds": 1.0} for e in (1, 2, 3)]
    drawn, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **k: drawn.append((ax, a, k)) or real(ax, *a, **k))
    visualization.plot_training_history(history, tmp_path / "h.png", best_epoch=2, label_smoothing=0.1)
    drawn = [(ax.get_title(), a, k) for ax, a, k in drawn]  # the titles are set after the curves
    titles = {title for title, _, _ in drawn}
    assert "Loss: cross-entropy, label smoothing 0.1 as trained" in titles
    assert sum(k.get("label") == "validation, moving average" for _, _, k in drawn) == 2  # loss and accuracy
    kept = [a for title, a, k in drawn if title == "Accuracy" and k.get("label", "").startswith("kept")]
    assert kept == [(2, 0.98 * 100, "*")]  # on the average's curve: epoch 2 kept the average
