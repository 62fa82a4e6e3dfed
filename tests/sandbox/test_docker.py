"""The docker sandbox against good and hostile candidates, with a real daemon and image.

Skips as a whole, saying why, where no Docker daemon answers or the sandbox image is
missing (CI starts the engine and builds the image first). After every test no
container labelled `deltanas` may be left.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deltanas.sandbox.base import Job, Limits
from deltanas.sandbox.docker import (DEFAULT_IMAGE, LABEL, OWNER_LABEL, DockerSandbox, docker_available,
                                     image_available)
from deltanas.tools.proxy import evaluate_source

_ok, _why = docker_available()
if not _ok:
    pytest.skip(f"docker sandbox tests need a Docker daemon: {_why}", allow_module_level=True)
if not image_available(DEFAULT_IMAGE):
    pytest.skip(f"docker sandbox tests need the image {DEFAULT_IMAGE} (`deltanas sandbox build`)",
                allow_module_level=True)

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 256, 128
LIMITS = Limits(timeout_s=60, memory_mb=4096, cpu_threads=1)
HANG = Limits(timeout_s=6, memory_mb=2048, cpu_threads=1, max_processes=32)

GOOD = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


class Arrays:
    """Stands in for deltanas.tools.datasets.DatasetArrays."""

    def __init__(self, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.name, self.num_classes, self.mean, self.std = "noise", 10, [0.5], [0.25]
        self.x_train = rng.integers(0, 256, (N_TRAIN, 1, 28, 28)).astype(np.uint8)
        self.y_train = rng.integers(0, 10, N_TRAIN).astype(np.int64)
        self.x_test = rng.integers(0, 256, (N_TEST, 1, 28, 28)).astype(np.uint8)
        self.y_test = rng.integers(0, 10, N_TEST).astype(np.int64)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@pytest.fixture(scope="module")
def client():
    import docker

    return docker.from_env()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = Arrays()
    root = tmp_path_factory.mktemp("handle")
    np.save(root / "train_x.npy", ds.x_train)
    np.save(root / "train_y.npy", ds.y_train)
    np.save(root / "test_x.npy", ds.x_test)
    (root / "meta.json").write_text(json.dumps({
        "name": ds.name, "num_classes": 10, "shape": [1, 28, 28], "mean": ds.mean, "std": ds.std,
        "n_train": N_TRAIN, "n_test": N_TEST}))
    return ds, root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Stands in for a run directory: an archive beside the sandbox's work root."""
    d = tmp_path_factory.mktemp("run")
    (d / "archive.sqlite").write_text("secret archive")
    return d


@pytest.fixture(scope="module")
def sandbox(run_dir):
    sb = DockerSandbox(run_dir / ".work")
    yield sb
    sb.close()


@pytest.fixture(autouse=True)
def no_container_left(client):
    yield
    left = client.containers.list(all=True, filters={"label": f"{LABEL}=1"})
    assert left == [], f"containers left behind: {[c.name for c in left]}"


def run(sandbox, data, source, limits=LIMITS, **kw):
    ds, handle = data
    return sandbox.run(Job(candidate_id="docker-test", source=source, dataset_dir=str(handle), batch_size=64,
                           limits=limits, **kw))


def probe(body: str) -> str:
    """A candidate that reports what it saw through the error line, then stops."""
    return "import os, socket\nseen = []\n" + body + "\nraise RuntimeError('SEEN ' + ' | '.join(seen))\n"


def test_good_candidate_is_ok_and_scored_on_the_host(sandbox, data):
    ds, handle = data
    out = evaluate_source(GOOD, sandbox=sandbox, dataset=ds, handle_dir=handle, candidate_id="good",
                          limits=LIMITS, batch_size=64)
    assert out.status == "ok", out.error + out.log_tail
    assert out.param_count == 784 * 10 + 10
    assert out.accuracy is not None and 0.0 <= out.accuracy <= 1.0
    r = run(sandbox, data, GOOD)
    preds = np.load(r.predictions_path)
    assert preds.shape == (N_TEST,)
    assert out.accuracy == pytest.approx(float(np.mean(preds == ds.y_test)))


def test_infinite_loop_is_killed_on_the_clock(sandbox, data):
    t0 = time.monotonic()
    r = run(sandbox, data, "while True:\n    pass\n", limits=HANG)
    assert r.status == "timeout", r.error
    assert time.monotonic() - t0 < HANG.timeout_s + 5


def test_no_network_inside(sandbox, data):
    r = run(sandbox, data, probe('''
seen.append("ifaces=" + ",".join(sorted(n for _, n in socket.if_nameindex())))
for host in ("1.1.1.1", "172.17.0.1"):
    try:
        socket.create_connection((host, 53), timeout=3)
        seen.append(host + " connected")
    except OSError as e:
        seen.append(host + " blocked")
'''))
    assert r.status == "crashed"
    assert "SEEN ifaces=lo | 1.1.1.1 blocked | 172.17.0.1 blocked" in r.error, r.error


def test_read_only_root_and_what_is_mounted(sandbox, data, run_dir):
    """The root filesystem and the host's Python are read-only; the run dir, its archive and the
    rest of the project are not there; the dataset handle holds no test labels."""
    venv_cfg = Path(os.sys.prefix) / "pyvenv.cfg"
    r = run(sandbox, data, probe(f'''
for target in ("/usr/evil", {str(venv_cfg) + ".evil"!r}, "/deltanas/data/evil"):
    try:
        open(target, "w").write("x")
        seen.append("wrote " + target)
    except OSError as e:
        seen.append("refused " + os.path.basename(target) + " " + str(e.errno))
seen.append("venv readable" if open({str(venv_cfg)!r}).read() else "venv empty")
seen.append("run dir " + ("VISIBLE" if os.path.exists({str(run_dir)!r}) else "absent"))
seen.append("archive " + ("VISIBLE" if os.path.exists({str(run_dir / "archive.sqlite")!r}) else "absent"))
seen.append("agent " + ("VISIBLE" if os.path.exists({str(Path(__file__).resolve().parents[2] / "agent")!r})
                        else "absent"))
seen.append("data " + ",".join(sorted(os.listdir("/deltanas/data"))))
seen.append("uid " + str(os.getuid()))
'''))
    assert r.status == "crashed", r.error + r.log_tail
    assert "refused evil 30" in r.error  # EROFS
    assert "refused pyvenv.cfg.evil 30" in r.error
    assert r.error.count(" 30") == 3, r.error
    assert "venv readable" in r.error
    assert "run dir absent | archive absent | agent absent" in r.error
    assert "data meta.json,test_x.npy,train_x.npy,train_y.npy" in r.error
    assert "uid 0" not in r.error


def test_a_gigabyte_of_stdout_hits_the_output_limit(sandbox, data):
    src = "import sys\nline = 'x' * (1 << 20) + '\\n'\nfor _ in range(1024):\n    sys.stdout.write(line)\n"
    limits = Limits(timeout_s=60, memory_mb=2048, cpu_threads=1, max_output_bytes=200_000)
    r = run(sandbox, data, src, limits=limits)
    assert r.status == "output_limit", r.error
    assert len(r.log_tail) <= 2048


def test_many_small_files_hit_the_work_dir_cap(sandbox, data):
    """Each file stays under the per-file cap; the work dir as a whole does not."""
    src = ("import time\nfor i in range(100000):\n    open(f'/deltanas/work/f{i}', 'w').write('x' * 150_000)\n"
           "time.sleep(60)\n")
    limits = Limits(timeout_s=60, memory_mb=2048, cpu_threads=1, max_output_bytes=200_000)
    r = run(sandbox, data, src, limits=limits)
    assert r.status == "output_limit", r.error


def test_unbounded_allocation_is_oom(sandbox, data):
    src = "hoard = []\nwhile True:\n    hoard.append(bytearray(64 << 20))\n"
    r = run(sandbox, data, src, limits=Limits(timeout_s=60, memory_mb=1536, cpu_threads=1))
    assert r.status == "oom", r.error


def _host_pids_of_uid(uid: int) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if f"\nUid:\t{uid}\t" in Path(f"/proc/{p}/status").read_text():
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def test_fork_bomb_ends_and_leaves_nothing(sandbox, data):
    src = '''
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.1)
'''
    r = run(sandbox, data, src, limits=HANG)
    assert r.status in ("timeout", "crashed"), r.error
    if os.geteuid() == 0:  # the job ran as nobody: none of its processes may survive
        assert _host_pids_of_uid(65534) == []


def test_close_kills_a_running_job(run_dir, data):
    sb = DockerSandbox(run_dir / ".work-close")
    results = []
    t = threading.Thread(target=lambda: results.append(run(sb, data, "import time\ntime.sleep(3600)\n")))
    t.start()
    time.sleep(2)
    t0 = time.monotonic()
    sb.close()
    t.join(timeout=30)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 15
    assert results and results[0].status == "crashed" and "closed" in results[0].error


def test_containers_of_a_dead_driver_are_swept_at_start(client, run_dir):
    dead = f"{socket.gethostname()}:999999999:1"
    orphan = client.containers.create(DEFAULT_IMAGE, command=["sleep", "600"], network_mode="none",
                                      labels={LABEL: "1", OWNER_LABEL: dead})
    sb = DockerSandbox(run_dir / ".work-sweep")
    try:
        assert sb.swept_at_start >= 1
        assert orphan.id not in [c.id for c in client.containers.list(all=True)]
    finally:
        sb.close()


def test_sandbox_still_works_after_all_that(sandbox, data):
    r = run(sandbox, data, GOOD)
    assert r.status == "ok", r.error + r.log_tail
    assert sandbox._running == set()
