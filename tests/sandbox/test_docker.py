"""The docker sandbox with a real daemon and image: scoring, warm worker containers, and no
container left behind after close, Ctrl-C or a killed driver. Hostile candidates against it
are in test_hostile.py.

Skips as a whole, saying why, where no Docker daemon answers or the sandbox image is
missing (CI starts the engine and builds the image first). After every test no
container labelled `deltanas` may be left.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deltanas.sandbox.base import Job, JobSpec, Limits
from deltanas.sandbox.docker import (DEFAULT_IMAGE, LABEL, OWNER_LABEL, DockerSandbox, docker_available,
                                     image_available)
from deltanas.tools.proxy import evaluate_source

from support import LINEAR_NET, noise, write_handle

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

GOOD = LINEAR_NET


@pytest.fixture(scope="module")
def client():
    import docker

    return docker.from_env()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = noise(N_TRAIN, N_TEST, seed=1)
    return ds, write_handle(ds, tmp_path_factory.mktemp("handle"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Stands in for a run directory: an archive beside the sandbox's work root."""
    d = tmp_path_factory.mktemp("run")
    (d / "archive.sqlite").write_text("secret archive")
    return d


@pytest.fixture(params=["warm", "cold"])
def sandbox(request, run_dir, tmp_path):
    sb = DockerSandbox(tmp_path / ".work", warm=request.param == "warm")
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


def test_good_candidate_is_ok_and_scored_on_the_host(sandbox, data):
    ds, handle = data
    out = evaluate_source(GOOD, sandbox=sandbox, dataset=ds, candidate_id="good",
                          spec=JobSpec(str(handle), limits=LIMITS, batch_size=64))
    assert out.status == "ok", out.error + out.log_tail
    assert out.param_count == 784 * 10 + 10
    assert out.accuracy is not None and 0.0 <= out.accuracy <= 1.0
    r = run(sandbox, data, GOOD)
    preds = np.load(r.predictions_path)
    assert preds.shape == (N_TEST,)
    assert out.accuracy == pytest.approx(float(np.mean(preds == ds.y_test)))


def test_a_warm_worker_container_serves_many_jobs(run_dir, data, client, tmp_path):
    sb = DockerSandbox(tmp_path / ".work", warm=True)
    try:
        results = [run(sb, data, GOOD) for _ in range(4)]
        assert [r.status for r in results] == ["ok"] * 4
        assert sb._pool.started == 1
        # all four predictions come from the same deterministic training
        first = np.load(results[0].predictions_path)
        assert all(np.array_equal(first, np.load(r.predictions_path)) for r in results[1:])
        warm = client.containers.list(filters={"label": [f"{LABEL}=1", "deltanas.role=warm-worker"]})
        assert len(warm) == 1 and warm[0].labels[OWNER_LABEL] == sb.owner
        attrs = warm[0].attrs["HostConfig"]
        assert attrs["NetworkMode"] == "none" and attrs["ReadonlyRootfs"] and attrs["CapDrop"] == ["ALL"]
        assert attrs["AutoRemove"] and attrs["PidsLimit"] > 0 and attrs["Memory"] > 0
        assert "no-new-privileges" in attrs["SecurityOpt"][0]
        # jobs of another dataset get a worker of their own
        other = tmp_path / "other"
        other.mkdir()
        for name in ("train_x.npy", "train_y.npy", "test_x.npy", "meta.json"):
            (other / name).write_bytes((Path(data[1]) / name).read_bytes())
        assert run(sb, (data[0], other), GOOD).status == "ok"
        assert sb._pool.started == 2
    finally:
        sb.close()


def test_close_kills_a_running_job(sandbox, data):
    results = []
    t = threading.Thread(target=lambda: results.append(run(sandbox, data, "import time\ntime.sleep(3600)\n")))
    t.start()
    time.sleep(4)
    t0 = time.monotonic()
    sandbox.close()
    t.join(timeout=30)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 15
    assert results and results[0].status == "crashed" and "closed" in results[0].error


DRIVER = """
import sys, time
from deltanas.sandbox.base import Job, Limits
from deltanas.sandbox.docker import DockerSandbox
sb = DockerSandbox(sys.argv[1], warm=sys.argv[3] == "warm")
print("STARTED", flush=True)
sb.run(Job(candidate_id="sleeper", source="import time\\ntime.sleep(3600)\\n", dataset_dir=sys.argv[2],
           limits=Limits(timeout_s=600, memory_mb=1024, cpu_threads=1)))
"""


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_a_killed_driver_leaves_no_container(mode, data, client, tmp_path):
    """kill -9 of the driver mid-job: a warm worker sees its control channel close and exits,
    and the daemon removes its container; a one-shot container is swept by the next sandbox."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "w"), str(data[1]), mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "STARTED"
    labelled = {"label": f"{LABEL}=1"}
    deadline = time.monotonic() + 60
    while not client.containers.list(filters=labelled) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the job is running
    assert client.containers.list(filters=labelled)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if mode == "warm":
        deadline = time.monotonic() + 20
        while client.containers.list(all=True, filters=labelled) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.containers.list(all=True, filters=labelled) == []
    else:
        sb = DockerSandbox(tmp_path / "next")
        sb.close()
        assert sb.swept_at_start == 1


def test_containers_of_a_dead_driver_are_swept_at_start(client, run_dir, tmp_path):
    dead = f"{socket.gethostname()}:999999999:1"
    orphan = client.containers.create(DEFAULT_IMAGE, command=["sleep", "600"], network_mode="none",
                                      labels={LABEL: "1", OWNER_LABEL: dead})
    sb = DockerSandbox(tmp_path / ".work-sweep")
    try:
        assert sb.swept_at_start >= 1
        assert orphan.id not in [c.id for c in client.containers.list(all=True)]
    finally:
        sb.close()


@pytest.mark.parametrize("warm", [True, False])
def test_a_relative_work_root_works(run_dir, data, tmp_path, monkeypatch, warm):
    """`deltanas run` puts its run dir at a relative path (runs/run); bind mounts need absolute ones."""
    monkeypatch.chdir(tmp_path)
    sb = DockerSandbox(Path("runs") / "run" / ".work", warm=warm)
    try:
        r = run(sb, data, GOOD)
        assert r.status == "ok", r.error + r.log_tail
    finally:
        sb.close()
