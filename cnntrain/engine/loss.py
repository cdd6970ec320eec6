"""Softmax with cross-entropy, the output layer's loss."""

import numpy as np


def softmax(logits):
    """Row-wise softmax of (N, K) logits, shifted by the row max so exp cannot overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits, labels, denominator=None):
    """Mean cross-entropy of (N, K) logits against (N,) integer labels.

    Returns (loss, dlogits, probs). dlogits is the seed's `predicted - actual`, divided by
    N because the loss is the batch mean; with N = 1 it is exactly the seed's gradient.
    A chunk of a larger batch passes the batch's size as `denominator`.
    """
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(n)
    # log p[label] = z[label] - log sum exp z; computed in log space so a confident
    # wrong answer gives a large finite loss instead of log(0).
    loss = float(np.mean(log_norm - z[rows, labels]))
    probs = np.exp(z - log_norm[:, None])
    dlogits = probs.copy()
    dlogits[rows, labels] -= 1
    dlogits /= n if denominator is None else denominator
    return loss, dlogits, probs
