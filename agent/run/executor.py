"""The evaluation executor: a bounded pool of sandbox slots shared by the graph's threads.

The graph runs a cycle's candidates concurrently; the executor decides how many
train at once (`sandbox.workers`) and owns the sandbox's lifetime, so that a
Ctrl-C or a crash of the driver kills every running candidate.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deltanas.agent.stopping import RunStopped
from deltanas.sandbox.base import JobSpec, Sandbox
from deltanas.tools.proxy import EvalOutcome, make_job, score_result


@dataclass(frozen=True)
class Target:
    """One dataset of the run: its arrays (the driver scores predictions against their labels, which
    never reach a job) and the settings of every job on its handle (`spec.dataset_dir`)."""

    data: Any  # tools.datasets.DatasetArrays
    spec: JobSpec


def targets(*pairs: tuple[Any, JobSpec]) -> dict[str, Target]:
    """{dataset name: Target} from (arrays, spec) pairs, in the run's order."""
    return {data.name: Target(data, spec) for data, spec in pairs}


def pick(targets: Mapping[str, Target], dataset: str | None) -> Target:
    """The target a job trains on: the named dataset, or the only one when None."""
    if dataset is None:
        if len(targets) != 1:
            raise ValueError(f"this executor trains on {len(targets)} datasets: name the job's")
        return next(iter(targets.values()))
    try:
        return targets[dataset]
    except KeyError:
        raise ValueError(f"dataset {dataset!r} is not one of this run's ({', '.join(targets)})") from None


class Executor(Protocol):
    """Trains candidates (from several threads at once) and scores them on the driver, each on one
    of the run's datasets (`dataset`; None where the run has one).
    `RayExecutor` (agent/run/executor_ray.py) is the other implementation."""

    def evaluate(self, source: str, candidate_id: str, out_dir: Path, dataset: str | None = None) -> EvalOutcome: ...

    def isolation(self) -> str:
        """Where candidates run and under which isolation, in a sentence or two."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """`workers` slots of one sandbox on this machine; every job takes its dataset's `spec`. The
    sandbox keeps a warm worker per dataset (sandbox/pool.py keys them by handle), so each dataset's
    tensors are loaded once per worker."""

    def __init__(self, sandbox: Sandbox, targets: Mapping[str, Target], *, workers: int,
                 stop: threading.Event | None = None):
        self.sandbox = sandbox
        self.targets = dict(targets)
        self._slots = threading.Semaphore(workers)
        self.stop = stop if stop is not None else threading.Event()
        self._closed = False

    def evaluate(self, source: str, candidate_id: str, out_dir: Path, dataset: str | None = None) -> EvalOutcome:
        target = pick(self.targets, dataset)
        with self._slots:
            # Callers queue on the slots; one that gets a slot after a stop must not start a job.
            if self.stop.is_set():
                raise RunStopped(f"stop requested before {candidate_id} started")
            started = time.perf_counter()
            job = make_job(target.spec, source, candidate_id)
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
            return score_result(result, source, dataset=target.data, out_dir=out_dir, started=started)

    def isolation(self) -> str:
        return self.sandbox.isolation()

    def close(self) -> None:
        self._closed = True
        self.stop.set()
        self.sandbox.close()
