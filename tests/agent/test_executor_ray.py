"""The Ray executor on a local Ray instance, with real process-sandbox jobs on small data:
the same results as the local executor, an actor killed mid-candidate, close() during jobs,
and a whole `deltanas run --executor ray`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from deltanas.agent.config import SandboxConfig  # noqa: E402
from deltanas.agent.run.executor import LocalExecutor, targets  # noqa: E402
from deltanas.agent.run.executor_ray import RayExecutor  # noqa: E402
from deltanas.agent.stopping import RunStopped  # noqa: E402
from deltanas.sandbox.base import JobSpec, Limits  # noqa: E402
from deltanas.sandbox.process import ProcessSandbox  # noqa: E402

from support import Arrays, synthetic, write_handle  # noqa: E402

SMALL_CNN = '''
import time
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        time.sleep(SLEEP)
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 4, 4, stride=4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 7 * 7, out_shape[0])

    def forward(self, x):
        return self.head(self.features(x))
'''


def cnn(sleep: float = 0.0) -> str:
    return SMALL_CNN.replace("SLEEP", repr(sleep))


LIMITS = Limits(timeout_s=600, memory_mb=3000, cpu_threads=1)  # generous: a loaded CI machine starts workers slowly


def job_spec(handle, **over) -> JobSpec:
    settings = dict(hyperparameters={"lr": 0.05, "momentum": 0.9}, epochs=1, batch_size=64, device="cpu",
                    limits=LIMITS, seed=3)
    return JobSpec(str(handle), **{**settings, **over})


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Arrays, Path]:
    ds = synthetic()
    return ds, write_handle(ds, tmp_path_factory.mktemp("handle"))


def ray_executor(data, tmp_path, workers: int = 1) -> RayExecutor:
    ds, handle = data
    return RayExecutor(SandboxConfig(type="process"), targets((ds, job_spec(handle))), tmp_path / "driver", workers=workers)


def processes_under(actor_pid: int) -> list[int]:
    """Live processes whose command line names the actor's work dir (its warm workers and jobs)."""
    mark = f"deltanas-ray-{actor_pid}-".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if mark in Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def candidate_child(actor_pid: int) -> int:
    """The pid of the job's forked child under the actor's warm worker (a candidate running), or 0."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(entry.name)] = (ppid, argv)

    def warm(pid):  # the worker itself or its fork, not the bwrap/unshare launching it
        argv = table.get(pid, (0, [b""]))[1]
        return b"deltanas.sandbox.warm" in argv and not argv[0].endswith((b"bwrap", b"unshare"))

    roots = set(processes_under(actor_pid))
    under = set(roots)
    for _ in range(6):  # bwrap -> bwrap (init) -> warm worker -> job child
        under |= {pid for pid, (ppid, _) in table.items() if ppid in under}
    return next((pid for pid in under if warm(pid) and warm(table[pid][0])), 0)


def job_running(ex: RayExecutor, cid: str) -> int:
    """The pid of the actor training `cid`, once the candidate's own process runs in its sandbox."""
    pid = ex.busy().get(cid)
    return pid if pid and candidate_child(pid) else 0


@pytest.mark.slow
def test_results_equal_the_local_executor(local_ray, data, tmp_path):
    ds, handle = data
    source = cnn()
    local = LocalExecutor(ProcessSandbox(tmp_path / "local-work"), targets((ds, job_spec(handle))), workers=1)
    try:
        want = local.evaluate(source, "c000-000", tmp_path / "local")
    finally:
        local.close()
    ex = ray_executor(data, tmp_path)
    try:
        assert ex.actor_pids() and os.getpid() not in ex.actor_pids()
        # Ready means ready to train: the actor's warm worker started before the first job.
        assert processes_under(ex.actor_pids()[0]), "no warm worker runs in the ready actor"
        assert ex.isolation().startswith("ray executor: 1 actor(s) on 1 node(s) of a local Ray instance")
        got = ex.evaluate(source, "c000-000", tmp_path / "ray")
    finally:
        ex.close()
    assert want.status == got.status == "ok", (want, got)
    assert got.accuracy == want.accuracy and got.accuracy > 0.3  # learnable, scored on the driver
    assert got.param_count == want.param_count
    assert np.array_equal(np.load(tmp_path / "ray" / "predictions.npy"), np.load(tmp_path / "local" / "predictions.npy"))
    assert json.loads((tmp_path / "ray" / "result.json").read_text())["accuracy"] == want.accuracy
    assert (tmp_path / "ray" / "model.py").read_text() == source


@pytest.mark.slow
def test_an_actor_killed_mid_candidate_loses_nothing(local_ray, data, tmp_path):
    ex = ray_executor(data, tmp_path, workers=2)
    try:
        before = ex.actor_pids()
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("out", ex.evaluate(cnn(2.0), "c001-000", tmp_path / "c")))
        t.start()
        victim = wait_for(lambda: job_running(ex, "c001-000"), 120, "the job to start in an actor")
        time.sleep(0.5)  # inside the candidate's 2 s sleep in Net.__init__: mid-candidate
        os.kill(victim, signal.SIGKILL)
        t.join(180)
        out = box["out"]
        assert out.status == "ok" and out.accuracy is not None and out.accuracy > 0.3, out  # retried, not lost
        assert json.loads((tmp_path / "c" / "result.json").read_text())["status"] == "ok"
        assert ex.replaced == 1
        after = wait_for(lambda: len(ex.actor_pids()) == 2 and ex.actor_pids(), 120, "the replacement to be ready")
        assert victim in before and victim not in after
        # the dead actor's sandbox worker and job died with it
        wait_for(lambda: not processes_under(victim), 20, "the dead actor's sandbox processes to end")
        assert ex.evaluate(cnn(), "c001-001", tmp_path / "d").status == "ok"
    finally:
        ex.close()


@pytest.mark.slow
def test_an_actor_lost_twice_ends_as_a_recorded_crash(local_ray, data, tmp_path):
    ex = ray_executor(data, tmp_path, workers=2)
    killed = []

    def killer():
        while len(killed) < 2:
            pid = job_running(ex, "c002-000")
            if pid and pid not in killed:
                time.sleep(0.3)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    try:
        k = threading.Thread(target=killer, daemon=True)
        k.start()
        out = ex.evaluate(cnn(5.0), "c002-000", tmp_path / "c")
        assert out.status == "crashed" and out.accuracy is None
        assert "lost its Ray actor 2 times" in out.error and all(f"pid {p}" in out.error for p in killed)
        recorded = json.loads((tmp_path / "c" / "result.json").read_text())
        assert recorded["status"] == "crashed" and recorded["error"] == out.error
        assert ex.replaced == 2
        after = wait_for(lambda: len(ex.actor_pids()) == 2 and ex.actor_pids(), 120, "the replacements to be ready")
        assert not set(killed) & set(after)
    finally:
        ex.close()


@pytest.mark.slow
def test_a_replacement_that_cannot_start_fails_callers_only_when_no_actor_is_left(local_ray, data, tmp_path):
    ex = ray_executor(data, tmp_path, workers=2)
    # Replacements now get another digest than their handle's: they refuse to start, as on a node
    # whose data changed.
    ex._actor_args = (*ex._actor_args[:2], "0" * 32, *ex._actor_args[3:])

    def run(cid: str) -> dict:
        box: dict = {}

        def body():
            try:
                box["out"] = ex.evaluate(cnn(2.0), cid, tmp_path / cid)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        t = threading.Thread(target=body)
        t.start()
        victim = wait_for(lambda: job_running(ex, cid), 120, f"{cid} to start in an actor")
        time.sleep(0.5)  # inside the candidate's 2 s sleep in Net.__init__
        os.kill(victim, signal.SIGKILL)
        t.join(240)
        assert not t.is_alive()
        return box

    try:
        first = run("c004-000")  # retried at once on the other actor; the lost one's replacement fails
        assert first["out"].status == "ok", first
        wait_for(lambda: ex._start_error, 120, "the replacement to fail")
        assert "differs from the driver's" in ex._start_error and len(ex.actor_pids()) == 1
        assert ex.evaluate(cnn(), "c004-001", tmp_path / "c004-001").status == "ok"  # one actor short, on
        second = run("c004-002")  # the last actor lost, and no replacement: the callers get why
        error = second.get("error")
        assert isinstance(error, RuntimeError) and "none could be replaced" in str(error), second
        assert "differs from the driver's" in str(error)
        assert not (tmp_path / "c004-002" / "result.json").exists()  # not recorded: redone on resume
        with pytest.raises(RuntimeError, match="none could be replaced"):
            ex.evaluate(cnn(), "c004-003", tmp_path / "c004-003")
    finally:
        ex.close()


@pytest.mark.slow
def test_close_during_jobs_kills_them_and_records_nothing(local_ray, data, tmp_path):
    ex = ray_executor(data, tmp_path, workers=2)
    errors: dict[str, BaseException] = {}

    def run(cid):
        try:
            ex.evaluate(cnn(60.0), cid, tmp_path / cid)
        except BaseException as e:  # noqa: BLE001
            errors[cid] = e

    threads = [threading.Thread(target=run, args=(f"c003-00{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    pids = [wait_for(lambda c=f"c003-00{i}": job_running(ex, c), 120, "both jobs to start") for i in range(2)]
    assert len(set(pids)) == 2  # one actor each
    t0 = time.monotonic()
    ex.close()
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    assert took < 30 and all(not t.is_alive() for t in threads)
    assert set(errors) == {"c003-000", "c003-001"} and all(isinstance(e, RunStopped) for e in errors.values())
    assert not any((tmp_path / f"c003-00{i}" / "result.json").exists() for i in range(2))  # redone on resume
    for pid in pids:
        wait_for(lambda p=pid: not alive(p) and not processes_under(p), 20, "the actors and their jobs to end")
    with pytest.raises(RunStopped):
        ex.evaluate(cnn(), "c003-002", tmp_path / "late")
    assert ray.is_initialized()  # not this executor's instance to shut down


def test_missing_ray_is_a_config_error(monkeypatch):
    from deltanas.agent.config import ConfigError, load_config
    from deltanas.agent.run import executor_ray
    from deltanas.agent.run.build import preflight

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"deltanas\[ray\]"):
        executor_ray.import_ray()
    cfg = load_config(None, {"sandbox.executor": "ray", "llm.spec": "mutate", "data.dataset": "digits"})
    with pytest.raises(ConfigError, match=r"pip install 'deltanas\[ray\]'"):
        preflight(cfg)


def test_too_few_resources_is_a_config_error(local_ray, data, tmp_path):
    from deltanas.agent.config import ConfigError

    ds, handle = data
    with pytest.raises(ConfigError, match=r"3 Ray actors need 3 CPU\(s\).*has 2"):
        RayExecutor(SandboxConfig(type="process"), targets((ds, job_spec(handle))), tmp_path / "d", workers=3)


def test_an_actor_without_the_drivers_handle_refuses_to_start(local_ray, data, tmp_path):
    from deltanas.agent.config import ConfigError
    from deltanas.agent.run import executor_ray

    ds, handle = data
    other = write_handle(synthetic(seed=9), tmp_path / "other")
    real = executor_ray.handle_fingerprint
    try:  # the driver's digest is of `other`: as if a node held different data at the same path
        executor_ray.handle_fingerprint = lambda p: real(other)
        with pytest.raises(ConfigError, match="differs from the driver's"):
            RayExecutor(SandboxConfig(type="process"), targets((ds, job_spec(handle))), tmp_path / "d", workers=1)
    finally:
        executor_ray.handle_fingerprint = real


@pytest.mark.slow
def test_whole_run_with_the_ray_executor(tmp_path):
    d = tmp_path / "run"
    args = ["run", "--executor", "ray", "--llm", "mutate", "--dataset", "digits", "--baselines", "lenet", "--cycles",
            "1", "--candidates", "2", "--sandbox", "process", "--workers", "1", "--run-dir", str(d), "--plain"]
    r = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", *args], capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ray executor: 1 actor(s)" in r.stdout
    s = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "status", str(d), "--json"], capture_output=True,
                       text=True)
    status = json.loads(s.stdout)
    assert status["candidates"] == 2 and "proposed" not in status["per_status"]
    assert 0.1 < status["baselines"]["base-lenet"] <= 1.0
    from deltanas.agent.archive import Store

    rows = Store(d / "archive.sqlite", readonly=True).candidates()
    assert {r.id for r in rows} == {"base-lenet", "c000-000", "c000-001"} and all(r.final for r in rows)
    for row in rows:
        if row.status == "ok":
            result = json.loads((d / "candidates" / row.id / "result.json").read_text())
            assert result["accuracy"] == row.accuracy and (d / "candidates" / row.id / "predictions.npy").exists()
    assert not (d / ".work" / "ray").exists()  # the driver's scratch for predictions is gone


def test_cuda_under_ray_is_checked_against_the_cluster_not_the_driver(local_ray, data, tmp_path):
    import torch

    from deltanas.agent.config import ConfigError
    from deltanas.sandbox.sizing import SandboxUnfit, check_device

    if torch.cuda.is_available():
        pytest.skip("needs a driver without CUDA")
    check_device("cuda", here=False)  # the GPUs may be on other nodes
    with pytest.raises(SandboxUnfit, match="CUDA is not available"):
        check_device("cuda")
    ds, handle = data
    with pytest.raises(ConfigError, match=r"1 Ray actors need 1 GPU\(s\).*has 0"):
        RayExecutor(SandboxConfig(type="process"), targets((ds, job_spec(handle, device="cuda"))), tmp_path / "d", workers=1)
