"""The evaluation executor: a bounded pool of sandbox slots shared by the graph's threads.

The graph runs a cycle's candidates concurrently; the executor decides how many
train at once (`sandbox.workers`) and owns the sandbox's lifetime, so that a
Ctrl-C or a crash of the driver kills every running candidate.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol

from deltanas.agent.stopping import RunStopped
from deltanas.sandbox.base import JobSpec, Sandbox
from deltanas.tools.proxy import EvalOutcome, make_job, score_result


class Executor(Protocol):
    """Trains candidates (from several threads at once) and scores them on the driver.
    `RayExecutor` (agent/run/executor_ray.py) is the other implementation."""

    def evaluate(self, source: str, candidate_id: str, out_dir: Path) -> EvalOutcome: ...

    def isolation(self) -> str:
        """Where candidates run and under which isolation, in a sentence or two."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """`workers` slots of one sandbox on this machine; every job takes the run's `spec`."""

    def __init__(self, sandbox: Sandbox, dataset, spec: JobSpec, *, workers: int,
                 stop: threading.Event | None = None):
        self.sandbox = sandbox
        self.dataset = dataset
        self.spec = spec
        self._slots = threading.Semaphore(workers)
        self.stop = stop if stop is not None else threading.Event()
        self._closed = False

    def evaluate(self, source: str, candidate_id: str, out_dir: Path) -> EvalOutcome:
        with self._slots:
            # Callers queue on the slots; one that gets a slot after a stop must not start a job.
            if self.stop.is_set():
                raise RunStopped(f"stop requested before {candidate_id} started")
            started = time.perf_counter()
            job = make_job(self.spec, source, candidate_id)
            try:
                result = self.sandbox.run(job)
            except Exception:
                if self._closed:
                    raise RunStopped(f"the run stopped while {candidate_id} trained") from None
                raise
            # A job that close() killed says "crashed"; it is neither scored nor written, so that a
            # resume trains it again rather than finding a crash it never had.
            if self._closed:
                raise RunStopped(f"the run stopped while {candidate_id} trained")
            return score_result(result, source, dataset=self.dataset, out_dir=out_dir, started=started)

    def isolation(self) -> str:
        return self.sandbox.isolation()

    def close(self) -> None:
        self._closed = True
        self.stop.set()
        self.sandbox.close()
