"""Log-probabilities from logits (float64, numerically stable), shared by completions and nll()."""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax over `axis`, as float64 (a row of all -inf gives NaN-free -inf, not a warning)."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=axis, keepdims=True)
    x = x - np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
