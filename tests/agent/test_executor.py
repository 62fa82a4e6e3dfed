"""The local executor's stop: a job that close() kills is neither scored nor written, so that a
resume trains it again (the Ray executor's own test is in test_executor_ray.py)."""
from __future__ import annotations

import threading

import pytest

from deltanas.agent.run.executor import LocalExecutor, Target
from deltanas.agent.stopping import RunStopped
from deltanas.sandbox.base import JobSpec, Result
from deltanas.tools.zoo import get_baseline


class HangingSandbox:
    """Trains every job until closed, then reports it the way the real sandboxes report a job
    they killed on close."""

    name = "hanging"

    def __init__(self):
        self.running = threading.Semaphore(0)
        self.closed = threading.Event()

    def isolation(self) -> str:
        return "none: a test double"

    def run(self, job):
        self.running.release()
        self.closed.wait(30)
        return Result(status="crashed", error="killed because the sandbox was closed")

    def close(self):
        self.closed.set()


def test_close_during_jobs_raises_run_stopped_and_writes_nothing(tmp_path):
    sandbox = HangingSandbox()
    ex = LocalExecutor(sandbox, {"mnist": Target(None, JobSpec(str(tmp_path / "handle"), batch_size=8))}, workers=2)
    source = get_baseline("lenet").source
    errors: dict[str, BaseException] = {}

    def run(cid):
        try:
            ex.evaluate(source, cid, tmp_path / cid)
        except BaseException as e:  # noqa: BLE001 - the test looks at what each caller got
            errors[cid] = e

    threads = [threading.Thread(target=run, args=(f"c000-00{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in threads:
        assert sandbox.running.acquire(timeout=10)
    ex.close()
    for t in threads:
        t.join(10)
    assert set(errors) == {"c000-000", "c000-001"} and all(isinstance(e, RunStopped) for e in errors.values())
    assert not any((tmp_path / f"c000-00{i}" / "result.json").exists() for i in range(2))  # redone on resume
    with pytest.raises(RunStopped):
        ex.evaluate(source, "c000-002", tmp_path / "late")
