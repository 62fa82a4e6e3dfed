"""The Ray executor: the same warm sandbox workers, run as Ray actors on one machine or a cluster.

Each actor owns one sandbox (`process` or `docker`, as `[sandbox]` says, with its warm
workers) and trains one candidate at a time, holding one GPU when `sandbox.device` is
cuda, else `sandbox.cpu_threads` CPUs; it counts as ready once its sandbox's warm worker
is up, so the first job does not wait for it. The driver keeps everything else: it builds the
job, scores the returned predictions against the test labels (which never leave it),
writes the candidate's files and is the single owner of the archive. An actor returns
the sandbox's `Result` and the predictions' bytes, nothing more.

Actors read the dataset handle (train arrays, test images, no labels) at the driver's
path. On one machine that is the same folder. On a cluster every node must see it at
that path, e.g. DELTANAS_CACHE on a shared filesystem; an actor that finds it missing, or
with other contents than the driver's, refuses to start, so a job never trains or
predicts on other data than the driver scores against.

A candidate whose actor dies mid-job (the process killed, its node lost, Ray's memory
monitor) is retried at once on another actor; when that one dies too, it ends as `crashed`
with both reasons, and is recorded like any other outcome. Each dead actor is replaced in
the background (a fresh actor takes 10-30 s to be ready); one that cannot be started leaves
the executor an actor short, and only when no actor is left do callers get that error (the
run fails, and can be resumed).
`close()` closes every actor's sandbox, which kills the running jobs, then kills the
actors; the callers still waiting raise RunStopped, so those candidates are redone on
resume, never recorded as failures.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltanas.agent.config import ConfigError, SandboxConfig
from deltanas.agent.run.executor import Target, pick
from deltanas.agent.stopping import RunStopped
from deltanas.sandbox.base import Candidate, Job, JobSpec, Limits, Result
from deltanas.tools.proxy import EvalOutcome, make_job, score_result

HANDLE_FILES = ("meta.json", "train_x.npy", "train_y.npy", "test_x.npy")
START_TIMEOUT_S = 300.0  # an actor waits this long for its resources and its sandbox
CLOSE_GRACE_S = 15.0  # close(): how long the actors get to kill their jobs before they are killed
MAX_ATTEMPTS = 2  # a candidate whose actor dies is run once more, on another actor
ACTOR_DIR = re.compile(r"^deltanas-ray-(\d+)-")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("sandbox.executor = 'ray' needs Ray: pip install 'deltanas[ray]' (or 'ray>=2.9')") from None
    return ray


def handle_fingerprint(handle_dir: str | Path) -> str:
    """A digest of the handle's files, so an actor can tell that it reads the driver's data."""
    digest = hashlib.blake2b(digest_size=16)
    for name in HANDLE_FILES:
        digest.update(name.encode())
        with open(Path(handle_dir) / name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


class HandleUnavailable(RuntimeError):
    """The dataset handle is not on the actor's node, or differs from the driver's."""


class SandboxActor:
    """The body of one Ray actor (wrapped by `ray.remote` in the driver, so that this module
    imports without Ray). Threaded (max_concurrency 2): `close` runs beside `run`."""

    def __init__(self, backend: dict, specs: list[JobSpec], fingerprints: list[str], n_test: int):
        """`specs`: one per dataset of the run, each with its handle's `fingerprints` entry; `n_test`:
        the largest test split, which caps a reply's predictions."""
        self.backend, self.specs, self.fingerprints, self.n_test = backend, specs, fingerprints, n_test
        self.device = specs[0].device
        self.sandbox = None
        self.work_root: Path | None = None
        self.closed = False

    def setup(self) -> dict[str, Any]:
        """Checks the dataset handles and builds the sandbox; errors reach the driver as they are."""
        import ray

        from deltanas.sandbox.choose import sandbox_for
        from deltanas.sandbox.docker import DockerUnavailable

        node = ray.get_runtime_context().get_node_id()
        for spec, fingerprint in zip(self.specs, self.fingerprints):
            handle = Path(spec.dataset_dir)
            if not (handle / "meta.json").is_file():
                raise HandleUnavailable(f"the dataset handle {handle} is not on Ray node {node}; on a cluster it "
                                        f"must be at the same path on every node (DELTANAS_CACHE on a shared "
                                        f"filesystem)")
            if handle_fingerprint(handle) != fingerprint:
                raise HandleUnavailable(f"the dataset handle {handle} on Ray node {node} differs from the driver's")
        self.device = _actor_device(self.device)
        _sweep_dead_actor_dirs()
        self.work_root = Path(tempfile.mkdtemp(prefix=f"deltanas-ray-{os.getpid()}-"))
        try:
            self.sandbox = sandbox_for(self.backend["type"], self.work_root, image=self.backend["image"],
                                       warm=self.backend["warm"], max_idle=len(self.specs))
        except DockerUnavailable as e:
            raise ConfigError(str(e)) from None
        # Its warm workers (one per dataset) start now, not on the first job: an actor is ready when it can train.
        for spec in self.specs:
            spec = dataclasses.replace(spec, device=self.device)
            self.sandbox.prewarm(Job.of(spec, Candidate(candidate_id="prewarm", source="")))
        return {"pid": os.getpid(), "node": node, "device": self.device, "isolation": self.sandbox.isolation()}

    def run(self, job: dict) -> tuple[dict, bytes | None, bool]:
        """(the sandbox's Result, the predictions' bytes when ok, whether close() ended it)."""
        limits = Limits(**job.pop("limits"))
        result = self.sandbox.run(Job(**{**job, "device": self.device, "limits": limits}))
        data = None
        if result.predictions_path:
            path = Path(result.predictions_path)
            try:
                with open(path, "rb") as f:  # one byte over the driver's cap, so it can say "too large"
                    data = f.read(16 * self.n_test + 4096 + 1)
            except OSError:
                data = None
            path.unlink(missing_ok=True)
        return dataclasses.replace(result, predictions_path=None).to_json(), data, self.closed

    def close(self) -> None:
        self.closed = True
        if self.sandbox is not None:
            self.sandbox.close()
        if self.work_root is not None:
            shutil.rmtree(self.work_root, ignore_errors=True)


def _actor_device(device: str) -> str:
    """Ray hands the actor one GPU through CUDA_VISIBLE_DEVICES. Jobs name it by its index on
    the node, the way both sandboxes pass a GPU on (docker device requests use node indices)."""
    if not device.startswith("cuda"):
        return device
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if len(ids) == 1 and ids[0].isdigit():
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        return f"cuda:{ids[0]}"
    return "cuda:0"  # GPUs named by UUID: the one visible device


def _sweep_dead_actor_dirs() -> None:
    """Work dirs of actors on this node that were killed before they could remove them."""
    root = Path(tempfile.gettempdir())
    for entry in root.glob("deltanas-ray-*"):
        m = ACTOR_DIR.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Actor:
    handle: Any
    pid: int
    node: str
    isolation: str


class RayExecutor:
    """`workers` sandbox actors behind the `Executor` protocol; see the module docstring."""

    def __init__(self, sandbox_cfg: SandboxConfig, targets: Mapping[str, Target], work_root: Path, *, workers: int,
                 stop: threading.Event | None = None, address: str | None = None):
        ray = import_ray()
        # Actors read the handles at the driver's path, so they are named in full.
        self.targets = {name: Target(t.data, dataclasses.replace(t.spec, dataset_dir=str(
            Path(t.spec.dataset_dir).resolve()))) for name, t in targets.items()}
        spec = next(iter(self.targets.values())).spec
        self.work_root = Path(work_root)  # the driver's side: predictions on their way to scoring
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.stop = stop if stop is not None else threading.Event()
        self.address = address
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            try:
                # Unset: a new local instance (never one that some other driver happens to run).
                ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                         log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - whatever Ray says, the user needs it as is
                raise ConfigError(f"sandbox.executor = 'ray': could not start or join Ray "
                                  f"({address or 'a local instance'}): {e}") from None
        gpu = spec.device.startswith("cuda")
        self.resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": spec.limits.cpu_threads}
        self._check_resources(ray, workers)
        self._remote = ray.remote(SandboxActor).options(max_concurrency=2, max_restarts=0, **self.resources)
        backend = {"type": sandbox_cfg.type, "image": sandbox_cfg.image, "warm": sandbox_cfg.warm}
        specs = [t.spec for t in self.targets.values()]
        self._actor_args = (backend, specs, [handle_fingerprint(s.dataset_dir) for s in specs],
                            max(len(t.data.y_test) for t in self.targets.values()))
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Actor] = queue.Queue()
        self._actors: dict[int, _Actor] = {}
        self._busy: dict[str, _Actor] = {}
        self._inflight = 0
        self._closed = False
        self._starting: list = []  # replacements not ready yet (their Ray handles)
        self._start_error = ""  # why the last replacement could not start
        self.replaced = 0  # dead actors whose replacement was started
        pending = [self._remote.remote(*self._actor_args) for _ in range(workers)]
        try:
            for handle in pending:
                self._add(self._ready(handle))
        except ActorStartError as e:
            for handle in pending:
                ray.kill(handle, no_restart=True)
            if self.owns_ray:
                ray.shutdown()
            raise ConfigError(str(e)) from None

    # -- the Executor protocol ---------------------------------------------------------------------------------

    def evaluate(self, source: str, candidate_id: str, out_dir: Path, dataset: str | None = None) -> EvalOutcome:
        import ray
        from ray.exceptions import RayActorError

        target = pick(self.targets, dataset)
        job = make_job(target.spec, source, candidate_id)
        lost: list[str] = []
        started = None
        with self._lock:
            self._inflight += 1
        try:
            while len(lost) < MAX_ATTEMPTS:
                actor = self._take(candidate_id)
                started = started or time.perf_counter()
                try:
                    reply, data, closed = ray.get(actor.handle.run.remote(job.to_json()))
                except RayActorError as e:
                    self._release(candidate_id)
                    if self._closed or self.stop.is_set():
                        raise RunStopped(f"the run stopped while {candidate_id} trained") from None
                    lost.append(f"actor pid {actor.pid} on node {actor.node[:12]} died: {_first_line(e)}")
                    self._replace(actor)
                    continue
                except BaseException:
                    self._release(candidate_id)
                    self._idle.put(actor)
                    raise
                self._release(candidate_id)
                self._idle.put(actor)
                if closed:
                    raise RunStopped(f"the run stopped while {candidate_id} trained")
                return score_result(self._received(reply, data), source, dataset=target.data, out_dir=out_dir,
                                    started=started)
            lost_result = Result(status="crashed", error=f"lost its Ray actor {MAX_ATTEMPTS} times: "
                                 + "; ".join(lost))
            return score_result(lost_result, source, dataset=target.data, out_dir=out_dir, started=started)
        finally:
            with self._lock:
                self._inflight -= 1

    def isolation(self) -> str:
        with self._lock:
            actors = list(self._actors.values())
        nodes = len({a.node for a in actors})
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        each = "one GPU" if "num_gpus" in self.resources else f"{self.resources['num_cpus']} CPU(s)"
        inner = actors[0].isolation if actors else "no actor is running"
        return f"ray executor: {len(actors)} actor(s) on {nodes} node(s) of {where}, each with {each}; in each, {inner}"

    def close(self) -> None:
        """Kills the running jobs and the actors (and the Ray instance this executor started)."""
        import ray

        with self._lock:
            if self._closed:
                return
            self._closed = True
            actors = list(self._actors.values())
            self._actors.clear()
            starting = list(self._starting)
        self.stop.set()
        refs = [a.handle.close.remote() for a in actors]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_GRACE_S)
        for handle in [a.handle for a in actors] + starting:
            ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self._inflight and time.monotonic() < deadline:  # the callers see their actors die first
            time.sleep(0.05)
        if self.owns_ray:
            ray.shutdown()
        shutil.rmtree(self.work_root, ignore_errors=True)

    # -- introspection (the live view, tests) --------------------------------------------------------------------

    def busy(self) -> dict[str, int]:
        """Candidate id -> the pid of the actor training it."""
        with self._lock:
            return {cid: a.pid for cid, a in self._busy.items()}

    def actor_pids(self) -> list[int]:
        with self._lock:
            return sorted(a.pid for a in self._actors.values())

    # -- actors ----------------------------------------------------------------------------------------------------

    def _check_resources(self, ray, workers: int) -> None:
        have = ray.cluster_resources()
        kind, per = ("GPU", 1) if "num_gpus" in self.resources else ("CPU", self.resources["num_cpus"])
        if have.get(kind, 0) < workers * per:
            where = f"the Ray cluster at {self.address}" if self.address else "the local Ray instance"
            raise ConfigError(f"sandbox.workers = {workers} Ray actors need {workers * per:g} {kind}(s) "
                              f"({per} each{', sandbox.cpu_threads' if kind == 'CPU' else ''}); {where} has "
                              f"{have.get(kind, 0):g}")

    def _ready(self, handle) -> _Actor:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            info = ray.get(handle.setup.remote(), timeout=START_TIMEOUT_S)
        except GetTimeoutError:
            ray.kill(handle, no_restart=True)
            raise ActorStartError(f"a Ray sandbox actor ({self.resources}) did not start in {START_TIMEOUT_S:g}s: "
                                  f"are those resources free in the cluster?") from None
        except RayTaskError as e:
            ray.kill(handle, no_restart=True)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise ActorStartError(f"a Ray sandbox actor could not start: {_first_line(cause)}") from None
        except RayActorError as e:
            raise ActorStartError(f"a Ray sandbox actor died while starting: {_first_line(e)}") from None
        return _Actor(handle, int(info["pid"]), str(info["node"]), str(info["isolation"]))

    def _add(self, actor: _Actor) -> None:
        with self._lock:
            self._actors[actor.pid] = actor
        self._idle.put(actor)

    def _take(self, candidate_id: str) -> _Actor:
        while True:
            # Callers queue for actors; one served after a stop must not start a job.
            if self.stop.is_set() or self._closed:
                raise RunStopped(f"stop requested before {candidate_id} started")
            try:
                actor = self._idle.get(timeout=0.2)
            except queue.Empty:
                with self._lock:
                    if not self._actors and not self._starting and self._start_error:
                        raise RuntimeError(f"every Ray actor was lost and none could be replaced: "
                                           f"{self._start_error}")
                continue
            with self._lock:
                if actor.pid not in self._actors:  # closed meanwhile
                    continue
                self._busy[candidate_id] = actor
            return actor

    def _release(self, candidate_id: str) -> None:
        with self._lock:
            self._busy.pop(candidate_id, None)

    def _replace(self, dead: _Actor) -> None:
        """A dead actor's place goes to a fresh one, started in the background (module docstring)."""
        import ray

        with self._lock:
            self._actors.pop(dead.pid, None)
            if self._closed:
                return
            handle = self._remote.remote(*self._actor_args)
            self._starting.append(handle)
            self.replaced += 1
        ray.kill(dead.handle, no_restart=True)
        threading.Thread(target=self._start_replacement, args=(handle,), name="deltanas-ray-replace",
                         daemon=True).start()

    def _start_replacement(self, handle) -> None:
        import ray

        fresh, error = None, ""
        try:
            fresh = self._ready(handle)
        except Exception as e:  # noqa: BLE001 - kept for the callers, who fail only with no actor left
            error = str(e) if isinstance(e, ActorStartError) else _first_line(e)
        with self._lock:
            self._starting.remove(handle)
            if fresh is not None and not self._closed:
                self._actors[fresh.pid] = fresh
                self._idle.put(fresh)
                return
            if not self._closed:
                self._start_error = error
        if fresh is not None:  # closed meanwhile
            ray.kill(fresh.handle, no_restart=True)

    def _received(self, reply: dict, data: bytes | None) -> Result:
        """The actor's Result, its predictions written here for the trusted scoring."""
        result = Result(**reply)
        if data is not None:
            path = self.work_root / f"{uuid.uuid4().hex}.npy"
            path.write_bytes(data)
            result.predictions_path = str(path)
        return result


class ActorStartError(RuntimeError):
    """An actor did not come up: no resources, no dataset handle on its node, no sandbox there."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith("Traceback"):
            return f"{type(e).__name__}: {line.strip()[:300]}"
    return type(e).__name__
