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
from deltanas.sandbox.base import Limits, Sandbox
from deltanas.tools.proxy import EvalOutcome, make_job, score_result


class Executor(Protocol):
    """Trains candidates (from several threads at once) and scores them on the driver.
    `RayExecutor` (agent/executor_ray.py) is the other implementation."""

    def evaluate(self, source: str, candidate_id: str, out_dir: Path) -> EvalOutcome: ...

    def isolation(self) -> str:
        """Where candidates run and under which isolation, in a sentence or two."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    def __init__(self, sandbox: Sandbox, dataset, handle_dir: Path, *, workers: int, hyperparameters: dict,
                 epochs: int, batch_size: int, device: str, limits: Limits, seed: int = 0,
                 stop: threading.Event | None = None, cuda_graphs: bool = True):
        self.sandbox = sandbox
        self.dataset = dataset
        self.handle_dir = handle_dir
        self.hyperparameters = hyperparameters
        self.epochs = epochs
        self.batch_size = batch_size
        self.cuda_graphs = cuda_graphs
        self.device = device
        self.limits = limits
        self.seed = seed
        self._slots = threading.Semaphore(workers)
        self.stop = stop if stop is not None else threading.Event()
        self._closed = False

    def evaluate(self, source: str, candidate_id: str, out_dir: Path) -> EvalOutcome:
        with self._slots:
            # Callers queue on the slots; one that gets a slot after a stop must not start a job.
            if self.stop.is_set():
                raise RunStopped(f"stop requested before {candidate_id} started")
            started = time.perf_counter()
            job = make_job(source, handle_dir=self.handle_dir, candidate_id=candidate_id,
                           hyperparameters=self.hyperparameters, epochs=self.epochs, seed=self.seed,
                           batch_size=self.batch_size, device=self.device, limits=self.limits,
                           cuda_graphs=self.cuda_graphs)
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
