"""Temperature scaling (Guo et al. 2017): one scalar T fitted on a validation split so that
softmax(logits / T) (or sigmoid(logit / T)) gives probabilities that match observed frequencies.

It changes no decision (argmax and sign are unchanged by T > 0), only how sure the judge says it is,
which matters where probabilities are used as soft labels (stage 2) or rewards.
"""
from __future__ import annotations

import numpy as np


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    if z.ndim == 1:  # binary: labels in {0, 1} (or soft in [0, 1]), logit of class 1
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels, low: float = 0.05, high: float = 20.0) -> float:
    """The T in [low, high] minimising the negative log-likelihood; golden-section search on log T
    (the NLL is unimodal in log T for a fixed set of logits)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(logits) == 0:
        raise ValueError("fit_temperature needs at least one example")
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if _nll(logits, labels, np.exp(c)) < _nll(logits, labels, np.exp(d)):
            b = d
        else:
            a = c
        c, d = b - ratio * (b - a), a + ratio * (b - a)
    return float(np.exp((a + b) / 2.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
