"""A job's work dir on the host: written before the worker runs, read back into a `Result` after.

Both backends (process and docker) share this, so a worker's outcome maps to
the same status whichever isolation ran it. The layout of a work dir:

    model.py      the candidate source
    job.json      the job without its source
    tmp/          the job's TMPDIR (process backend)
    out/          result.json and predictions.npy, written by the worker
    log.txt       the worker's stdout and stderr

The read-back trusts nothing the worker wrote: result.json is size-capped and
must parse as a JSON object, its numbers are type-checked, and the predictions
.npy is loaded without pickle and validated against the dataset's meta.json.
"""
from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deltanas.sandbox.base import STATUSES, Job, Limits, Result
from deltanas.tools.scoring import InvalidPredictions, load_predictions, read_untrusted

RESULT_MAX_BYTES = 64 * 1024
LOG_TAIL_BYTES = 2048


def new_workdir(work_root: Path, candidate_id: str) -> Path:
    """A fresh, empty 0700 directory under `work_root`, named after the candidate."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", candidate_id)[:40] + "-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_root))


def prepare_workdir(workdir: Path, job: Job) -> None:
    """Writes the worker's inputs (model.py, job.json) and its empty out/ and tmp/."""
    (workdir / "out").mkdir()
    (workdir / "tmp").mkdir()
    (workdir / "model.py").write_text(job.source, encoding="utf-8")
    spec = {k: v for k, v in job.to_json().items() if k != "source"}
    (workdir / "job.json").write_text(json.dumps(spec), encoding="utf-8")

WORKDIR_SLACK_BYTES = 1 << 20


def file_size_cap(lim: Limits, meta: dict) -> int:
    """The per-file output cap of a job."""
    # The predictions file must fit under the same per-file cap as the log.
    return max(int(lim.max_output_bytes), 2 * int(meta["n_test"]) + 4096)


def workdir_cap(job: Job, meta: dict) -> int:
    """The most a job's work dir may hold while it runs: log.txt, predictions.npy and
    result.json, each under the per-file cap, plus its inputs and a little slack. Every
    backend watches it, since the per-file cap alone lets many small files fill the disk."""
    return 3 * file_size_cap(job.limits, meta) + len(job.source.encode()) + WORKDIR_SLACK_BYTES


class DatasetMetaCache:
    """Each dataset handle's meta.json, read once: every job of a search uses the same handle."""

    def __init__(self) -> None:
        self._by_dir: dict[str, dict] = {}

    def get(self, dataset_dir: str) -> dict:
        key = str(Path(dataset_dir).resolve())
        if key not in self._by_dir:
            self._by_dir[key] = json.loads((Path(key) / "meta.json").read_text(encoding="utf-8"))
        return self._by_dir[key]


def read_reported(workdir: Path) -> dict:
    """The worker's out/result.json as a dict; {} when missing, oversized or not a JSON object."""
    raw = _read_capped(workdir, "out/result.json", RESULT_MAX_BYTES)
    if raw is None:
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_back(predictions_root: Path, workdir: Path, job: Job, meta: dict, rc: int, killed: str) -> Result:
    """Maps a finished worker to a `Result`.

    `rc` is the worker's exit status (negative: death by that signal); `killed` says who
    ended it early ("", "timeout" or "closed"). An ok job's validated predictions are
    copied to a fresh file under `predictions_root`, which outlives the work dir.
    """
    raw_log = _read_capped(workdir, "log.txt", LOG_TAIL_BYTES, tail=True) or b""
    log_tail = raw_log.decode("utf-8", errors="replace")
    reported = read_reported(workdir)

    def fail(status: str, error: str) -> Result:
        return Result(status=status, error=error, log_tail=log_tail,  # type: ignore[arg-type]
                      param_count=_int_or_none(reported.get("param_count")),
                      train_seconds=_float_or_none(reported.get("train_seconds")))

    if killed == "timeout":
        return fail("timeout", f"killed after the {job.limits.timeout_s:g} s wall-clock limit")
    if killed == "closed":
        return fail("crashed", "killed because the sandbox was closed")
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXFSZ:
            return fail("output_limit", f"wrote past the {job.limits.max_output_bytes}-byte output limit")
        if sig == signal.SIGXCPU:
            return fail("timeout", "hit the CPU-time limit")
        if sig == signal.SIGKILL or "MemoryError" in log_tail:
            return fail("oom", "killed by SIGKILL, most likely by the kernel's out-of-memory killer")
        return fail("crashed", f"killed by {_signal_name(sig)}: {_last_error_line(log_tail)}".rstrip(": "))
    if rc != 0:
        return fail("crashed", f"worker exited with status {rc}: {_last_error_line(log_tail)}".rstrip(": "))
    if not reported:
        return fail("crashed", f"worker exited without a readable result: {_last_error_line(log_tail)}"
                    .rstrip(": "))
    status = reported.get("status")
    if status not in STATUSES:
        return fail("crashed", f"worker reported an unknown status {str(status)[:40]!r}")
    if status != "ok":
        return fail(status, str(reported.get("error") or "")[:500])
    try:
        preds = load_predictions(workdir / "out" / "predictions.npy", int(meta["n_test"]),
                                 int(meta["num_classes"]), file_size_cap(job.limits, meta), below=workdir)
    except InvalidPredictions as e:
        return fail("invalid", str(e))
    keep_path = Path(predictions_root) / f"{workdir.name}-{uuid.uuid4().hex[:8]}.npy"
    keep_path.parent.mkdir(exist_ok=True)
    np.save(keep_path, preds.astype(np.int16), allow_pickle=False)
    res = fail("ok", "")
    res.final_loss = _float_or_none(reported.get("final_loss"))
    res.predictions_path = str(keep_path)
    return res


def watch(ended: Callable[[float], bool], workdir: Path, cap: int, timeout_s: float, poll_s: float,
          closed: Callable[[], bool] = lambda: False) -> str:
    """Waits for a job: `ended(s)` waits at most s seconds and says whether the job ended.
    Returns "" once it has, or why it must be killed: "timeout", "output" (its work dir grew
    past `cap` bytes) or "closed" (the sandbox was closed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        if ended(min(poll_s, left)):
            return ""
        if tree_size(workdir, cap) > cap:
            return "output"
        if closed():
            return "closed"


def tree_size(root: Path, stop_above: int) -> int:
    """Bytes under `root`, counting stops early once past `stop_above`."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    total += e.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
            if total > stop_above:
                return total
    return total


def _read_capped(workdir: Path, rel: str, limit: int, tail: bool = False) -> bytes | None:
    """A file the job wrote, or None: see `read_untrusted` (no symlinks, regular files only)."""
    try:
        return read_untrusted(workdir / rel, limit, below=workdir, tail=tail)
    except InvalidPredictions:
        return None


def _last_error_line(log_tail: str) -> str:
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|Killed|Traceback)", ln):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _int_or_none(v: object) -> int | None:
    return v if type(v) is int and v >= 0 else None


def _float_or_none(v: object) -> float | None:
    return float(v) if type(v) in (int, float) and v == v and abs(v) != float("inf") else None
