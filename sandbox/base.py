"""The contract between the search loop and wherever candidate code runs.

A `Sandbox` takes a `Job` and returns a `Result`. A job is the run's `JobSpec` (the
dataset handle, hyperparameters, epochs, seed, batch size, device, limits: built once
per run, agent/run/build.py `job_spec`) plus a `Candidate` (its id and source).
Backends: `process` and `docker`. Both run `deltanas.sandbox.worker` inside the
isolation and read back only size-limited JSON and a `.npy` of test predictions;
test labels never enter.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

Status = Literal[
    "ok",  # trained and predicted; accuracy is computed on the host
    "timeout",  # hit the wall-clock limit and was killed
    "oom",  # ran out of memory (host RAM limit or CUDA OOM)
    "crashed",  # raised or died during build/train/predict
    "invalid",  # does not meet the Net contract (no Net, bad output shape, no params)
    "diverged",  # loss became NaN/inf
    "output_limit",  # wrote more output than allowed
]
STATUSES: tuple[str, ...] = Status.__args__  # type: ignore[attr-defined]


DEFAULT_HYPERPARAMETERS: dict[str, float] = {"lr": 0.01, "momentum": 0.9, "dropout": 0.2}
"""What a candidate trains with where the run does not say (its `[train]` section does)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 300.0  # wall-clock, the worker's start-up included
    memory_mb: int = 8192
    cpu_threads: int = 2
    max_output_bytes: int = 1_000_000
    max_processes: int = 256
    gpu_memory_mb: int | None = None  # the job's share of its GPU (torch's allocator); None: no cap


@dataclass(frozen=True)
class JobSpec:
    """Every setting of a training job but the candidate: the same for all the jobs of a run."""

    dataset_dir: str  # a prepared handle: train_x.npy, train_y.npy, test_x.npy, meta.json; no test labels
    hyperparameters: dict[str, float] = field(default_factory=dict)
    epochs: int = 1
    seed: int = 0
    batch_size: int = 128
    device: str = "cpu"  # "cpu" or "cuda:<index>"
    limits: Limits = field(default_factory=Limits)
    cuda_graphs: bool = True  # on a GPU, replay the training steps as a CUDA graph where safe (sandbox/graphs.py)


@dataclass(frozen=True)
class Candidate:
    candidate_id: str
    source: str


@dataclass(frozen=True)
class Job(JobSpec, Candidate):
    """One candidate under the run's settings. Its fields, the candidate's first, are the keys of the
    job.json the worker reads (`Settings.from_job` in sandbox/training.py)."""

    @classmethod
    def of(cls, spec: JobSpec, candidate: Candidate) -> Job:
        return cls(**{f.name: getattr(part, f.name) for part in (candidate, spec) for f in fields(part)})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    status: Status
    error: str = ""  # one-line reason for a non-ok status
    param_count: int | None = None
    train_seconds: float | None = None
    total_seconds: float | None = None
    final_loss: float | None = None
    log_tail: str = ""
    predictions_path: str | None = None  # host path of the predictions .npy (ok only)
    accuracy: float | None = None  # filled by the host's trusted scoring, never by the worker

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Sandbox(Protocol):
    """Runs one candidate job in isolation. Implementations must hard-kill on timeout."""

    name: str

    def isolation(self) -> str:
        """A plain sentence saying which isolation is in force and which is missing."""
        ...

    def run(self, job: Job) -> Result: ...

    def prewarm(self, job: Job) -> None:
        """Starts now what jobs like `job` will run in (a warm worker), so that the first of them
        does not wait for it; nothing where workers are not kept warm."""
        ...

    def close(self) -> None:
        """Kill anything still running and clean up. Safe to call twice."""
        ...


def masked_paths(given: Sequence[str | Path] | None) -> list[Path]:
    """The paths a sandbox hides from every job, resolved, those that exist. None: the folders
    that hold test labels (the dataset caches, the folders datasets were read from, the data
    packages), read now, so a dataset loaded after the sandbox was made is hidden too."""
    if given is None:
        from deltanas.tools.datasets import label_paths  # host side only: the view has no deltanas.tools

        given = label_paths()
    return [Path(p).resolve() for p in given if Path(p).exists()]


def within(paths: Sequence[Path], roots: Sequence[Path]) -> list[Path]:
    """Those of `paths` that a view showing `roots` would show (a root itself or inside one)."""
    return [p for p in paths if any(p == r or r in p.parents for r in roots)]
