"""Trusted scoring: the host reads a sandbox's predictions and computes accuracy.

The predictions file is written by untrusted code, so it is read with a size
cap, without pickle, and checked for dtype, shape and label range before it is
compared with test labels that never left the host.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class InvalidPredictions(ValueError):
    """The predictions file is missing, too large, unreadable or does not fit the test set."""


def load_predictions(path: str | os.PathLike, n_test: int, num_classes: int, max_bytes: int) -> np.ndarray:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InvalidPredictions(f"no predictions file: {e.strerror or e}") from None
    if not p.is_file():
        raise InvalidPredictions("predictions path is not a regular file")
    if size > max_bytes:
        raise InvalidPredictions(f"predictions file is {size} bytes, over the {max_bytes}-byte limit")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is the same verdict
        raise InvalidPredictions(f"predictions file is not a readable .npy: {type(e).__name__}: {e}") from None
    validate_predictions(arr, n_test, num_classes)
    return arr.astype(np.int64)


def validate_predictions(arr: np.ndarray, n_test: int, num_classes: int) -> None:
    if not isinstance(arr, np.ndarray):
        raise InvalidPredictions(f"predictions must be an array, got {type(arr).__name__}")
    if arr.dtype.kind not in "iu":
        raise InvalidPredictions(f"predictions must be integers, got dtype {arr.dtype}")
    if arr.shape != (n_test,):
        raise InvalidPredictions(f"predictions must have shape ({n_test},), got {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
        raise InvalidPredictions(f"predictions must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")


def score_predictions(predictions: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy in [0, 1] of integer class predictions against the host's labels."""
    y = np.asarray(y_test)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"test labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise ValueError("test labels are empty")
    if not isinstance(predictions, np.ndarray) or predictions.dtype.kind not in "iu":
        raise InvalidPredictions("predictions must be an integer array")
    if predictions.shape != y.shape:
        raise InvalidPredictions(f"predictions must have shape {y.shape}, got {predictions.shape}")
    return float(np.mean(predictions.astype(np.int64) == y.astype(np.int64)))
