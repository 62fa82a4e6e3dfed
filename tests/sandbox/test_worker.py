"""The in-sandbox worker: its own writers, its status mapping, its batches, and a real run."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltanas.sandbox import worker

from support import Arrays, write_handle

LEMUR_NET = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])

    def forward(self, x):
        return self.fc(x.flatten(1))

    def train_setup(self, prm):
        self.criteria = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"])

    def learn(self, train_data):
        total = 0.0
        for x, y in train_data:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            self.optimizer.zero_grad()
            loss = self.criteria(self(x), y)
            loss.backward()
            self.optimizer.step()
            total = float(loss)
        return total
'''


def test_write_result_is_valid_json_whatever_the_text(tmp_path):
    fields = {"status": "crashed", "error": 'say "hi"\\ \n\t\x01 é', "param_count": 12,
              "train_seconds": 1.5, "final_loss": float("nan"), "flag": True, "none": None}
    worker.write_result(str(tmp_path), fields)
    back = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert back == {**fields, "final_loss": None}
    assert not (tmp_path / "result.json.part").exists()


def test_write_predictions_is_a_plain_npy(tmp_path):
    labels = np.array([0, 3, 9, 1, 2] * 41, dtype=np.int64)
    worker.write_predictions(str(tmp_path), labels)
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
    out = worker.classify(exc, "build")
    assert out.status == status
    assert out.error.startswith("build: ") and text in out.error
    assert "second line" not in out.error


def test_train_batches_reshuffle_per_pass_and_are_seeded():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    data = worker.TrainBatches(x, y, mean, std, batch_size=3, seed=7)
    first = [yb.tolist() for _, yb in data]
    second = [yb.tolist() for _, yb in data]
    assert len(data) == 3 == len(first)  # 3+3+3, the lone 10th sample is dropped (BatchNorm needs 2)
    assert first != second
    again = [yb.tolist() for _, yb in worker.TrainBatches(x, y, mean, std, batch_size=3, seed=7)]
    assert again == first
    xb, yb = next(iter(data))
    assert xb.dtype == torch.float32
    assert torch.allclose(xb.flatten(), yb.float() / 255.0)


def _handle(root: Path) -> Path:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (200, 1, 8, 8)).astype(np.uint8)
    y_train = rng.integers(0, 3, 200).astype(np.int64)
    x_test = rng.integers(0, 256, (50, 1, 8, 8)).astype(np.uint8)
    y_test = rng.integers(0, 3, 50).astype(np.int64)
    return write_handle(Arrays("t", x_train, y_train, x_test, y_test, 3, [0.5], [0.3]), root)


def _run_worker(workdir: Path, handle: Path, source: str) -> dict:
    workdir.mkdir()
    (workdir / "model.py").write_text(source)
    (workdir / "job.json").write_text(json.dumps({
        "candidate_id": "w", "dataset_dir": str(handle), "hyperparameters": {"lr": 0.05}, "epochs": 2,
        "seed": 3, "batch_size": 32, "device": "cpu", "limits": {"cpu_threads": 1}}))
    proc = subprocess.run([sys.executable, "-m", "deltanas.sandbox.worker", str(workdir), str(handle)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train_setup/learn" in proc.stdout
    return json.loads((workdir / "out" / "result.json").read_text())


@pytest.mark.slow
def test_worker_runs_a_lemur_module_deterministically(tmp_path):
    handle = _handle(tmp_path / "ds")
    a = _run_worker(tmp_path / "a", handle, LEMUR_NET)
    b = _run_worker(tmp_path / "b", handle, LEMUR_NET)
    assert a["status"] == "ok" and a["error"] == ""
    assert a["param_count"] == 64 * 3 + 3
    assert isinstance(a["final_loss"], float) and a["final_loss"] == b["final_loss"]
    assert a["train_seconds"] > 0
    pa = np.load(tmp_path / "a" / "out" / "predictions.npy", allow_pickle=False)
    pb = np.load(tmp_path / "b" / "out" / "predictions.npy", allow_pickle=False)
    assert pa.shape == (50,) and pa.dtype == np.int16 and set(pa.tolist()) <= {0, 1, 2}
    assert pa.tolist() == pb.tolist()


def test_worker_usage_error_exits_2():
    proc = subprocess.run([sys.executable, "-m", "deltanas.sandbox.worker", "only-one"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
