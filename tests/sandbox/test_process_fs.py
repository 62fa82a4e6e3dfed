"""The process sandbox under bubblewrap: a candidate sees neither the dataset cache (test
labels), nor the run directory, nor the project, so it cannot turn them into a perfect score."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from deltanas.sandbox.base import Job, JobSpec, Limits
from deltanas.sandbox.process import ProcessSandbox, bwrap_available
from deltanas.tools.proxy import evaluate_source

from support import LINEAR_NET, noise, write_handle

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bwrap") is None or not bwrap_available(),
                                 reason="bubblewrap (bwrap) is not installed or cannot make namespaces here")]

N_TRAIN, N_TEST = 256, 128
LIMITS = Limits(timeout_s=60, memory_mb=4096, cpu_threads=1)

# Reads each secret, logs the outcome, and predicts the leaked test labels where it got them.
THIEF = '''
import io
import numpy as np
import torch
import torch.nn as nn

LEAKED = None
for name, path in {TARGETS!r}.items():
    try:
        data = open(path, "rb").read()
        print("READ", name, "ok", flush=True)
        if name == "cache":
            LEAKED = torch.as_tensor(np.load(io.BytesIO(data))["y_test"].astype("int64"))
    except OSError as e:
        print("READ", name, "blocked", type(e).__name__, flush=True)


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])
        self.seen = 0

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training or LEAKED is None:
            return out
        labels = LEAKED[self.seen:self.seen + len(x)]
        self.seen += len(x)
        return torch.nn.functional.one_hot(labels, out.shape[1]).float() * 100
'''
GOOD = LINEAR_NET


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A dataset cache holding the labels (as DELTANAS_CACHE), a run dir with its archive
    and the work root inside it, as a real `deltanas run` lays them out."""
    ds = noise(N_TRAIN, N_TEST, seed=2)
    root = tmp_path_factory.mktemp("host")
    cache = root / "cache"
    cache.mkdir()
    np.savez(cache / "noise.npz", x_test=ds.x_test, y_test=ds.y_test)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "archive.sqlite").write_bytes(b"SQLite format 3\0 secret archive")
    handle = write_handle(ds, root / "handle")
    project_file = Path(importlib.util.find_spec("deltanas.agent.cli").origin)
    assert project_file.is_file()
    targets = {"cache": str(cache / "noise.npz"), "archive": str(run_dir / "archive.sqlite"),
               "project": str(project_file)}
    return ds, handle, run_dir, targets


def thief_score(sandbox, setting):
    ds, handle, _, targets = setting
    src = THIEF.replace("{TARGETS!r}", repr(targets))
    return evaluate_source(src, sandbox=sandbox, dataset=ds, candidate_id="thief",
                           spec=JobSpec(str(handle), limits=LIMITS, batch_size=64))


def test_secrets_are_out_of_sight_and_cannot_raise_the_score(setting, monkeypatch):
    ds, handle, run_dir, targets = setting
    monkeypatch.setenv("DELTANAS_CACHE", str(Path(targets["cache"]).parent))
    sb = ProcessSandbox(run_dir / "work", use_bwrap=True)
    try:
        assert sb.fs_isolated and "bubblewrap" in sb.isolation()
        out = thief_score(sb, setting)
    finally:
        sb.close()
    assert out.status == "ok", out.error
    assert out.accuracy is not None and out.accuracy < 1.0
    for name in targets:
        assert f"READ {name} blocked FileNotFoundError" in out.log_tail, out.log_tail
        assert f"READ {name} ok" not in out.log_tail


def test_a_good_candidate_still_scores(setting):
    ds, handle, run_dir, _ = setting
    sb = ProcessSandbox(run_dir / "work-good", use_bwrap=True)
    try:
        r = sb.run(Job(candidate_id="good", source=GOOD, dataset_dir=str(handle), batch_size=64, limits=LIMITS))
    finally:
        sb.close()
    assert r.status == "ok", r.error + r.log_tail
    assert r.predictions_path and Path(r.predictions_path).is_file()
