"""Trusted scoring: the host reads a sandbox's predictions and computes accuracy.

The predictions file is written by untrusted code, so it is read with a size
cap, without pickle, and checked for dtype, shape and label range before it is
compared with test labels that never left the host.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np


class InvalidPredictions(ValueError):
    """The predictions file is missing, too large, unreadable or does not fit the test set."""


def read_untrusted(path: str | os.PathLike, max_bytes: int, below: str | os.PathLike | None = None,
                   tail: bool = False) -> bytes:
    """The bytes of a file that sandboxed code may have planted, read without following a
    symlink (in any component below `below`, or in the last one), only from a regular file
    (a FIFO or a device would block or never end), and at most `max_bytes` of it: the whole
    file, or with `tail` its last `max_bytes`. Raises InvalidPredictions saying why not."""
    p = Path(path)
    base = Path(below) if below is not None else p.parent
    try:
        rel = p.relative_to(base).parts
    except ValueError:
        raise InvalidPredictions(f"{p} is not below {base}") from None
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise InvalidPredictions(f"cannot open {base}: {e.strerror or e}") from None
    try:
        for part in rel[:-1]:
            try:
                nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            except OSError as e:
                raise InvalidPredictions(f"{part}/ is not a plain directory ({e.strerror or e})") from None
            os.close(fd)
            fd = nxt
        try:
            ffd = os.open(rel[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            raise InvalidPredictions(f"no file {rel[-1]}") from None
        except OSError as e:
            raise InvalidPredictions(f"{rel[-1]} cannot be opened as a plain file ({e.strerror or e})") from None
        try:
            st = os.fstat(ffd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidPredictions(f"{rel[-1]} is not a regular file")
            if st.st_size > max_bytes and not tail:
                raise InvalidPredictions(f"{rel[-1]} is {st.st_size} bytes, over the {max_bytes}-byte limit")
            if tail and st.st_size > max_bytes:
                os.lseek(ffd, st.st_size - max_bytes, os.SEEK_SET)
            chunks, left = [], max_bytes
            while left > 0:
                chunk = os.read(ffd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(ffd)
    finally:
        os.close(fd)


def load_predictions(path: str | os.PathLike, n_test: int, num_classes: int, max_bytes: int,
                     below: str | os.PathLike | None = None) -> np.ndarray:
    """Reads (see `read_untrusted`), parses without pickle and validates a predictions .npy."""
    try:
        raw = read_untrusted(path, max_bytes, below)
    except InvalidPredictions as e:
        text = str(e)
        raise InvalidPredictions("no predictions file" if text.startswith("no file") else f"predictions: {text}"
                                 ) from None
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is the same verdict
        raise InvalidPredictions(f"predictions file is not a readable .npy: {type(e).__name__}: "
                                 f"{str(e)[:200]}") from None
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
