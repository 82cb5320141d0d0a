"""Temperature scaling: make the kept model's probabilities mean what they say (Guo et al. 2017).

Label smoothing, the default, trains a model to say about 91% where it is right 99.7% of the time; a person
reading predict.py's percentages, and the number reader multiplying them, need them true. One number T is fitted
on the validation split so that softmax(logits / T) has the lowest cross-entropy there, and folded into the
model's last layer, so the calibrated file reads like any other. The predicted digit never changes.
"""
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
import torch
import torch.nn as nn

import distributed
from checkpoint import unwrap


def fit_temperature(y_true, probs):
    """The T that calibrates these softmax outputs best, by scipy's bounded 1-D search. log(probs) differs from
    the logits by a constant per row, which softmax ignores, so the probabilities are enough."""
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    found = minimize_scalar(lambda log_t: nll(y_true, probs, np.exp(log_t)), bounds=(np.log(0.05), np.log(20.0)),
                            method="bounded")
    return float(np.exp(found.x))


def fold_temperature(model, temperature):
    """Make the model's logits its logits / temperature, by scaling its last linear layer (exact: the logits are
    affine in it). Every model here ends in nn.Linear."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.div_(temperature)
        if last.bias is not None:
            last.bias.div_(temperature)


def nll(y_true, probs, temperature=1.0):
    """Mean cross-entropy of softmax(log(probs) / temperature) on y_true."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-38, None))  # a float32 softmax underflows to 0
    return float(-log_softmax(logp / temperature, axis=1)[np.arange(len(y_true)), y_true].mean())


def calibrate(model, best, val, ctx, dist):
    """Fit T on the validation split (every process fits the same number on the same gathered probabilities),
    fold it into `model`, and put into the checkpoint dict `best` the calibrated weights, T, and in words what
    it did to the validation loss (the metrics report shows it beside the test loss, which is after it)."""
    probs = distributed.gather_probs(model, val[0], ctx, dist).cpu().numpy()
    y_true = val[1].cpu().numpy()
    t = fit_temperature(y_true, probs)
    fold_temperature(unwrap(model), t)
    best["state_dict"] = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    best["temperature"] = best.get("temperature", 1.0) * t  # a finished run resumed again folds in another ~1.0
    best["calibration"] = (f"temperature {t:.3f} fitted on validation: its loss {nll(y_true, probs):.4f} -> "
                           f"{nll(y_true, probs, t):.4f}, its accuracy unchanged (the test loss is after it)")
    return t
