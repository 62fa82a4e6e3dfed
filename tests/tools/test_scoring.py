"""Trusted scoring of untrusted prediction files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from deltanas.tools.scoring import InvalidPredictions, load_predictions, score_predictions


def test_score_is_plain_accuracy():
    y = np.array([0, 1, 2, 3])
    assert score_predictions(np.array([0, 1, 0, 0], dtype=np.int16), y) == 0.5
    assert score_predictions(y.copy(), y) == 1.0


@pytest.mark.parametrize("preds", [np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 1, 2]), np.zeros((4, 1), int)])
def test_score_rejects_wrong_dtype_or_shape(preds):
    with pytest.raises(InvalidPredictions):
        score_predictions(preds, np.array([0, 1, 2, 3]))


def test_load_round_trip(tmp_path):
    np.save(tmp_path / "p.npy", np.array([1, 0, 2], dtype=np.int16))
    out = load_predictions(tmp_path / "p.npy", n_test=3, num_classes=3, max_bytes=1000)
    assert out.tolist() == [1, 0, 2]


@pytest.mark.parametrize("arr, needle", [
    (np.array([1, 0]), "shape"),
    (np.array([1, 0, 3]), "[0, 3)"),
    (np.array([1, 0, -1]), "[0, 3)"),
    (np.array([1.0, 0.0, 2.0]), "integers"),
    (np.array(["a", "b", "c"]), "integers"),
])
def test_load_rejects_bad_arrays(tmp_path, arr, needle):
    np.save(tmp_path / "p.npy", arr)
    with pytest.raises(InvalidPredictions, match=needle.replace("[", r"\[").replace(")", r"\)")):
        load_predictions(tmp_path / "p.npy", n_test=3, num_classes=3, max_bytes=10_000)


def test_load_refuses_pickles_oversize_garbage_and_missing(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([1, None, 2], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidPredictions, match="readable"):
        load_predictions(tmp_path / "obj.npy", n_test=3, num_classes=3, max_bytes=10_000)
    np.save(tmp_path / "big.npy", np.zeros(10_000, dtype=np.int64))
    with pytest.raises(InvalidPredictions, match="limit"):
        load_predictions(tmp_path / "big.npy", n_test=10_000, num_classes=3, max_bytes=1000)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InvalidPredictions):
        load_predictions(tmp_path / "junk.npy", n_test=3, num_classes=3, max_bytes=1000)
    with pytest.raises(InvalidPredictions, match="no predictions"):
        load_predictions(tmp_path / "missing.npy", n_test=3, num_classes=3, max_bytes=1000)
    assert issubclass(InvalidPredictions, ValueError)


def test_planted_links_fifos_and_directories_are_refused(tmp_path):
    """A sandboxed job controls its work dir: a symlink to the host's test labels must not
    be followed, a FIFO must not block the host, a directory is no file."""
    from deltanas.tools.scoring import read_untrusted

    labels = tmp_path / "labels.npy"
    np.save(labels, np.array([0, 1, 2]))
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "predictions.npy").symlink_to(labels)
    with pytest.raises(InvalidPredictions, match="plain file"):
        load_predictions(work / "out" / "predictions.npy", n_test=3, num_classes=3, max_bytes=1000, below=work)
    # a symlinked directory on the way is refused too
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    np.save(elsewhere / "predictions.npy", np.array([0, 1, 2]))
    (work / "out2").symlink_to(elsewhere)
    with pytest.raises(InvalidPredictions, match="plain directory"):
        load_predictions(work / "out2" / "predictions.npy", n_test=3, num_classes=3, max_bytes=1000, below=work)
    os.mkfifo(work / "out" / "fifo.npy")
    with pytest.raises(InvalidPredictions, match="not a regular file"):
        load_predictions(work / "out" / "fifo.npy", n_test=3, num_classes=3, max_bytes=1000, below=work)
    (work / "out" / "dir.npy").mkdir()
    with pytest.raises(InvalidPredictions):
        load_predictions(work / "out" / "dir.npy", n_test=3, num_classes=3, max_bytes=1000, below=work)
    # the tail of a long regular file
    (work / "log.txt").write_bytes(b"a" * 100 + b"END")
    assert read_untrusted(work / "log.txt", 3, below=work, tail=True) == b"END"
    with pytest.raises(InvalidPredictions, match="limit"):
        read_untrusted(work / "log.txt", 3, below=work)
