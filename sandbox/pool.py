"""Warm workers, the host's side: start them, hand them jobs, retire them when in doubt.

A backend (process or docker) supplies a `launch(worker_dir, key)` that starts
`python -m deltanas.sandbox.warm` inside its isolation with `worker_dir` as the
worker's work dir, and returns a `Handle`. Everything else is shared:

- a worker is started for a `WorkerKey` (dataset, device and the limits that
  belong to the whole worker) and reused only for jobs of the same key;
- each job gets a fresh dir inside the worker's work dir, written and read back
  by sandbox/jobfiles.py exactly as for a one-shot job; afterwards the host
  empties the work dir, so nothing a candidate wrote reaches the next one;
- the worker enforces the job's wall-clock limit itself and keeps warm; the
  host keeps a later deadline of its own, watches the job dir's size, and kills
  the whole worker when it does not answer, dies, or reports that it could not
  clean up. A job whose worker was lost is never scored.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from deltanas.sandbox.base import Job, Result
from deltanas.sandbox.jobfiles import new_workdir, prepare_workdir, read_back, tree_size, workdir_cap

STARTUP_TIMEOUT_S = 180.0
REPLY_GRACE_S = 15.0  # the worker kills a job at its limit; the host gives it this long to say so
POLL_S = 0.25
MAX_REPLY = 64 * 1024


@dataclass(frozen=True)
class WorkerKey:
    """What a warm worker is started for; jobs of another key get another worker."""

    dataset_dir: str
    device: str
    memory_mb: int
    cpu_threads: int
    max_processes: int

    @classmethod
    def of(cls, job: Job) -> "WorkerKey":
        lim = job.limits
        return cls(str(Path(job.dataset_dir).resolve()), job.device, int(lim.memory_mb), int(lim.cpu_threads),
                   int(lim.max_processes))


def spare_flag(spare: bool | None) -> list[str]:
    """The warm worker's spare-child flag: forced on, forced off, or its own choice (on a GPU)."""
    return [] if spare is None else ["--spare" if spare else "--no-spare"]


class Handle(Protocol):
    """A started warm worker, as its backend sees it."""

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    def exit_reason(self) -> str:
        """Why it ended, in a few words (its exit status, the OOM killer, its last log line)."""
        ...


Launcher = Callable[[Path, WorkerKey], Handle]


class WorkerLost(RuntimeError):
    """The worker died, stopped answering or broke the protocol; it has been killed."""

    def __init__(self, reason: str, timed_out: bool = False):
        super().__init__(reason)
        self.timed_out = timed_out


class WarmWorker:
    """One started worker and its control channel."""

    def __init__(self, work_dir: Path, key: WorkerKey, launch: Callable[[Path, WorkerKey], Handle],
                 open_dir: Callable[[Path], None]):
        self.dir, self.key = work_dir, key
        self.dir.mkdir(mode=0o700)
        for name in ("ctl.in", "ctl.out"):
            os.mkfifo(self.dir / name, 0o600)
        open_dir(self.dir)
        # O_RDWR opens a FIFO without waiting for the other side (Linux); the read end is
        # non-blocking so that a silent worker never hangs the host.
        self._in = os.open(self.dir / "ctl.in", os.O_RDWR)
        self._out = os.open(self.dir / "ctl.out", os.O_RDONLY | os.O_NONBLOCK)
        self._buf = b""
        self._dead = False
        self.handle: Handle | None = None
        try:
            self.handle = launch(self.dir, key)
            hello = self._reply(time.monotonic() + STARTUP_TIMEOUT_S, lambda: None)
        except BaseException:
            self.release()
            raise
        if "error" in hello or not hello.get("ready"):
            self.release()
            raise WorkerLost(f"the warm worker failed to start: {str(hello.get('error'))[:300]}")
        for name in ("ctl.in", "ctl.out"):  # both ends are open: the paths can go
            (self.dir / name).unlink()

    def run(self, name: str, limits: dict, timeout_s: float, watch: Callable[[], bool]) -> tuple[int, str]:
        """Runs job dir `name`; returns (exit status, "" | "timeout" | "cancel"). `watch()` is
        called while it runs; True cancels the job (the worker kills it and keeps going)."""
        self._send({"job": name, "timeout_s": timeout_s, **limits})
        cancelled = [False]

        def tick() -> None:
            if not cancelled[0] and watch():
                cancelled[0] = True
                self._send({"cancel": True})

        try:
            reply = self._reply(time.monotonic() + timeout_s + REPLY_GRACE_S, tick)
        except WorkerLost:
            self.kill()
            raise
        if reply.get("job") != name or not isinstance(reply.get("rc"), int):
            self.kill()
            raise WorkerLost(f"the warm worker sent a reply that does not fit the job: {str(reply)[:200]}")
        if not reply.get("clean", False):
            self.kill()  # the result stands; the worker does not serve again
        return reply["rc"], str(reply.get("killed") or "")

    def healthy(self) -> bool:
        return self.handle is not None and not self._dead and self.handle.alive()

    def kill(self) -> None:
        """Ends the worker; safe from any thread (a job waiting on it sees it die)."""
        self._dead = True
        if self.handle is not None:
            self.handle.kill()

    def release(self) -> None:
        """Kills the worker and frees its channel and dir; only by the thread that holds it."""
        self.kill()
        for attr in ("_in", "_out"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        shutil.rmtree(self.dir, ignore_errors=True)

    def clear(self) -> None:
        """Empties the work dir between jobs."""
        for entry in os.scandir(self.dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass

    # -- the channel -------------------------------------------------------------------------------------------

    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._in, data):]
        except OSError as e:
            self.kill()
            raise WorkerLost(f"the warm worker's control channel failed: {e}") from None

    def _reply(self, deadline: float, tick: Callable[[], None]) -> dict:
        poller = select.poll()
        poller.register(self._out, select.POLLIN)
        while b"\n" not in self._buf:
            if self._dead:
                raise WorkerLost("the warm worker was killed")
            if time.monotonic() > deadline:
                raise WorkerLost("the warm worker did not answer in time", timed_out=True)
            events = poller.poll(int(POLL_S * 1000))
            if events:
                try:
                    chunk = os.read(self._out, 65536)
                except BlockingIOError:
                    chunk = None
                if chunk:
                    self._buf += chunk
                    if len(self._buf) > MAX_REPLY:
                        raise WorkerLost("the warm worker sent an oversized reply")
                    continue
                if chunk == b"" and self.handle is not None and any(ev & select.POLLHUP for _, ev in events):
                    raise WorkerLost(f"the warm worker died ({self.handle.exit_reason()})")
            if self.handle is not None and not self.handle.alive():
                raise WorkerLost(f"the warm worker died ({self.handle.exit_reason()})")
            tick()
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise WorkerLost("the warm worker sent a malformed reply")
        return msg


class WarmPool:
    """Idle warm workers by key; `run` takes one (or starts one), runs the job, gives it back."""

    def __init__(self, root: Path, launch: Launcher, job_limits: Callable[[Job, dict], dict],
                 open_dir: Callable[[Path], None] = lambda p: None, max_idle: int = 4,
                 keep_root: Path | None = None):
        """`keep_root`: where finished job dirs are moved to (for debugging) instead of deleted."""
        self.root = Path(root)
        self.keep_root = keep_root
        self.root.mkdir(parents=True, exist_ok=True)
        self.launch, self.job_limits, self.open_dir = launch, job_limits, open_dir
        # Workers start from this one long-lived thread: a worker dies with the thread that
        # started it (PR_SET_PDEATHSIG, bwrap --die-with-parent), not with the job's thread.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltanas-worker-start")
        self.max_idle = max_idle
        self._idle: list[WarmWorker] = []
        self._busy: set[WarmWorker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.started = 0

    def run(self, job: Job, inner: Job, meta: dict, predictions_root: Path,
            prepare: Callable[[Path], None] = lambda p: None) -> Result:
        """`inner` is the job as the worker sees it (the device renamed inside a container)."""
        try:
            w = self._take(WorkerKey.of(job))
        except Exception as e:  # noqa: BLE001 - a job the sandbox cannot start is a recorded crash
            if self._closed:
                return Result(status="crashed", error="killed because the sandbox was closed")
            text = (str(getattr(e, "explanation", "") or e).strip().splitlines() or [type(e).__name__])[0]
            return Result(status="crashed", error=f"could not start a sandbox worker: {text[:400]}")
        ok = False
        workdir = None
        try:
            workdir = new_workdir(w.dir, job.candidate_id)
            prepare_workdir(workdir, inner)
            prepare(workdir)
            cap = workdir_cap(job, meta)
            try:
                rc, killed = w.run(workdir.name, self.job_limits(job, meta), job.limits.timeout_s,
                                   lambda: tree_size(w.dir, cap) > cap)
            except WorkerLost as lost:
                if self._closed:
                    return read_back(predictions_root, workdir, job, meta, -9, "closed")
                if lost.timed_out:
                    return read_back(predictions_root, workdir, job, meta, -9, "timeout")
                res = read_back(predictions_root, workdir, job, meta, 1, "")
                res.status, res.error = "crashed", f"{lost} during the job"
                res.predictions_path = res.final_loss = None
                return res
            if killed == "cancel":
                res = read_back(predictions_root, workdir, job, meta, 0, "closed" if self._closed else "")
                if not self._closed:
                    res.status, res.error = "output_limit", f"the job's files grew past {cap} bytes"
                    res.predictions_path = res.final_loss = None
                ok = w.healthy()
                return res
            ok = w.healthy()
            return read_back(predictions_root, workdir, job, meta, rc, killed)
        finally:
            if self.keep_root is not None and workdir is not None and workdir.exists():
                shutil.move(str(workdir), str(Path(self.keep_root) / workdir.name))
            self._give_back(w, ok)

    def prewarm(self, job: Job) -> None:
        """Starts the worker that jobs like `job` will take, unless one waits already, so that the
        first of them does not pay its start-up. Raises what the start raised."""
        self._give_back(self._take(WorkerKey.of(job)), True)

    def close(self) -> None:
        """Kills every worker; jobs running on one end as "closed"."""
        with self._lock:
            self._closed = True
            idle, busy = list(self._idle), list(self._busy)
            self._idle.clear()
        for w in busy:
            w.kill()  # its job's thread releases it
        for w in idle:
            w.release()
        self._starter.shutdown(wait=False)

    def _take(self, key: WorkerKey) -> WarmWorker:
        with self._lock:
            if self._closed:
                raise RuntimeError("this sandbox is closed")
            for w in self._idle:
                if w.key == key:
                    self._idle.remove(w)
                    self._busy.add(w)
                    return w
        def launch(work_dir: Path, k: WorkerKey) -> Handle:
            return self._starter.submit(self.launch, work_dir, k).result()

        w = WarmWorker(self.root / f"w-{uuid.uuid4().hex[:10]}", key, launch, self.open_dir)
        with self._lock:
            self.started += 1
            if self._closed:
                w.release()
                raise RuntimeError("this sandbox is closed")
            self._busy.add(w)
        return w

    def _give_back(self, w: WarmWorker, ok: bool) -> None:
        retired: list[WarmWorker] = []
        with self._lock:
            self._busy.discard(w)
            if ok and not self._closed and w.healthy():
                w.clear()
                self._idle.append(w)
                while len(self._idle) > self.max_idle:
                    retired.append(self._idle.pop(0))
            else:
                retired.append(w)
        for r in retired:
            r.release()
