"""The proxy-train client: one candidate source in, one scored outcome out.

The graph's `proxy_train` node and `deltanas eval` both call `evaluate_source`.
It builds the sandbox Job from the run's `JobSpec` and the candidate, runs it, and
scores the returned predictions here on the host against the test labels, which
never enter the sandbox. Whatever the
candidate printed or wrote, its accuracy is what its predictions earn.

Hyperparameters are filtered by the module's `supported_hyperparameters()`,
read from the source's syntax tree (candidate code never runs on the host).
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deltanas.sandbox.base import DEFAULT_HYPERPARAMETERS, Candidate, Job, JobSpec, Result, Sandbox
from deltanas.tools import pyast
from deltanas.tools.scoring import InvalidPredictions, load_predictions, score_predictions

@dataclass
class EvalOutcome:
    status: str
    accuracy: float | None
    param_count: int | None
    train_seconds: float | None
    total_seconds: float
    error: str
    log_tail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def declared_hyperparameters(source: str) -> set[str] | None:
    """The names a module's `supported_hyperparameters()` returns, when it returns a literal
    set, list or tuple of strings; None when there is no such function or it is not literal."""
    try:
        tree = pyast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "supported_hyperparameters":
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.Return) and stmt.value is not None:
                    try:
                        value = ast.literal_eval(stmt.value)
                    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                        return None
                    if isinstance(value, (set, frozenset, list, tuple)) and all(isinstance(v, str) for v in value):
                        return set(value)
                    return None
    return None


def select_hyperparameters(source: str, given: dict | None) -> dict[str, float]:
    """The defaults overlaid with `given`, narrowed to what the module declares it supports."""
    chosen = {**DEFAULT_HYPERPARAMETERS, **(given or {})}
    supported = declared_hyperparameters(source)
    if supported is None:
        return chosen
    return {k: v for k, v in chosen.items() if k in supported}


def evaluate_source(source: str, *, sandbox: Sandbox, dataset, spec: JobSpec, candidate_id: str,
                    out_dir: Path | None = None) -> EvalOutcome:
    """Proxy-trains `source` in `sandbox` under the run's `spec` and scores it on the host.

    `dataset` is a `deltanas.tools.datasets.DatasetArrays` (y_test and num_classes
    are read); `spec.dataset_dir` is its prepared handle, the only data the sandbox sees.
    """
    t0 = time.perf_counter()
    job = make_job(spec, source, candidate_id)
    return score_result(sandbox.run(job), source, dataset=dataset, out_dir=out_dir, started=t0)


def make_job(spec: JobSpec, source: str, candidate_id: str) -> Job:
    """The sandbox job for `source`: what runs wherever the sandbox is (here or a Ray actor), with
    the hyperparameters the source declares it takes."""
    narrowed = replace(spec, hyperparameters=select_hyperparameters(source, spec.hyperparameters))
    return Job.of(narrowed, Candidate(candidate_id=candidate_id, source=source))


def score_result(result: Result, source: str, *, dataset, out_dir: Path | None, started: float) -> EvalOutcome:
    """The trusted half, always on the host that holds the test labels: scores the job's
    predictions file (then removes it) and writes the candidate's files to `out_dir`."""
    status, error, accuracy = result.status, result.error, None
    preds_path = Path(result.predictions_path) if result.predictions_path else None
    try:
        if status == "ok":
            n_test = len(dataset.y_test)
            if preds_path is None:
                raise InvalidPredictions("the sandbox returned no predictions")
            preds = load_predictions(preds_path, n_test, int(dataset.num_classes), max_bytes=16 * n_test + 4096)
            accuracy = score_predictions(preds, dataset.y_test)
    except InvalidPredictions as e:
        status, error = "invalid", str(e)
    outcome = EvalOutcome(status=status, accuracy=accuracy, param_count=result.param_count,
                          train_seconds=result.train_seconds, total_seconds=time.perf_counter() - started,
                          error=error, log_tail=result.log_tail)
    if out_dir is not None:
        write_outcome(Path(out_dir), source, outcome, preds_path if accuracy is not None else None)
    if preds_path is not None and preds_path.exists():
        preds_path.unlink()
    return outcome


def write_outcome(out_dir: Path, source: str, outcome: EvalOutcome, predictions: Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.py").write_text(source, encoding="utf-8")
    (out_dir / "log.txt").write_text(outcome.log_tail, encoding="utf-8")
    if predictions is not None:
        shutil.copyfile(predictions, out_dir / "predictions.npy")
    tmp = out_dir / "result.json.part"
    tmp.write_text(json.dumps(outcome.to_json(), indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / "result.json")  # last, so its presence means the others are complete
