"""What a job reports: its own writers of the result files, and its status mapping."""
from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from deltanas.sandbox import outcome


def test_write_result_is_valid_json_whatever_the_text(tmp_path):
    fields = {"status": "crashed", "error": 'say "hi"\\ \n\t\x01 é', "param_count": 12,
              "train_seconds": 1.5, "final_loss": float("nan"), "flag": True, "none": None}
    outcome.write_result(str(tmp_path), fields)
    back = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert back == {**fields, "final_loss": None}
    assert not (tmp_path / "result.json.part").exists()


def test_write_predictions_is_a_plain_npy(tmp_path):
    labels = np.array([0, 3, 9, 1, 2] * 41, dtype=np.int64)
    outcome.write_predictions(str(tmp_path), labels)
    raw = (tmp_path / "predictions.npy").read_bytes()
    assert (len(raw) - len(labels) * 2) % 64 == 0  # header padded to the format's 64-byte alignment
    back = np.load(tmp_path / "predictions.npy", allow_pickle=False)
    assert back.dtype == np.int16 and back.tolist() == labels.tolist()


@pytest.mark.parametrize("exc, status, text", [
    (SyntaxError("invalid syntax", ("model.py", 3, 1, "x")), "invalid", "SyntaxError: invalid syntax (line 3)"),
    (MemoryError(), "oom", "MemoryError"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"), "oom", "can't allocate memory"),
    (OSError(errno.EFBIG, "File too large"), "output_limit", "output file size"),
    (ValueError("bad\nsecond line"), "crashed", "ValueError: bad"),
    (SystemExit(3), "crashed", "SystemExit: 3"),
])
def test_classify_maps_exceptions_to_statuses(exc, status, text):
    out = outcome.classify(exc, "build")
    assert out.status == status
    assert out.error.startswith("build: ") and text in out.error
    assert "second line" not in out.error
