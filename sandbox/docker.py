"""The `docker` sandbox: one container per job, every limit set here, a hard kill on the clock.

Each job gets a fresh work dir under `work_root`, written and read back by
sandbox/jobfiles.py as for the process backend, bind-mounted read-write at
/deltanas/work; the dataset handle is mounted read-only at /deltanas/data. The
container runs the same worker as the process backend,
`python -m deltanas.sandbox.worker /deltanas/work /deltanas/data`, with:

- no network (`network_mode="none"`), a read-only root filesystem and a
  size-capped, noexec tmpfs at /tmp;
- all capabilities dropped, no-new-privileges, a non-root user;
- pids, memory (swap included) and CPU limits, and RLIMIT_FSIZE at the output
  cap, which the worker turns into a SIGXFSZ death the host reads as
  output_limit; the work dir's total size is also watched while the job runs;
- a hard wall-clock kill: the host polls the container and kills it at the
  limit (a timeout on the HTTP wait is not a kill), and `timeout -s KILL`
  inside the container ends the job a little later even if the driver died.

Where Python comes from depends on the image's `deltanas.python` label:
`image` (built from sandbox/Dockerfile, deltanas installed inside) or `host`
(the offline image of sandbox/image.py: a bare Debian rootfs into which the
host's interpreter prefix, virtualenv and the `deltanas.sandbox` package folder
are mounted read-only at their own paths). Nothing else of the host is mounted:
not the run directory, not the archive, not the test labels.

Every container carries the label `deltanas=1`, its sandbox's run id and its
owner (host, pid, process start time). Containers of this sandbox are removed
after each job, on close() and at interpreter exit; containers whose owner died
(a crashed or killed driver) are swept when the next sandbox starts.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltanas.sandbox.base import Job, Result, masked_paths, within
from deltanas.sandbox.jobfiles import (DatasetMetaCache, file_size_cap, new_workdir, prepare_workdir, read_back,
                                       watch, workdir_cap)
from deltanas.sandbox.pool import WarmPool, WorkerKey, spare_flag
from deltanas.sandbox.sizing import SPARES
from deltanas.sandbox.worker import SANDBOX_INIT_ENV

DEFAULT_IMAGE = "deltanas-sandbox:base"
LABEL = "deltanas"
RUN_LABEL = "deltanas.run"
OWNER_LABEL = "deltanas.owner"
PYTHON_LABEL = "deltanas.python"  # "host": mount the host's Python; "image": the image has it
WORK_MOUNT = "/deltanas/work"
DATA_MOUNT = "/deltanas/data"
PACKAGE_VIEW = "/deltanas/pkg"  # PYTHONPATH root holding deltanas/sandbox (a namespace package)
SANDBOX_USER = "65534:65534"  # nobody:nogroup
TMPFS_MB = 64
POLL_S = 0.5
IN_CONTAINER_GRACE_S = 30  # the in-container kill lands this long after the host's
API_TIMEOUT_S = 60
WARM_BASE_MB = 1024  # a warm worker's own memory (Python, torch) on top of its jobs' limit and the dataset
WARM_SPARE_MB = 2048  # a spare child (CUDA libraries and context) waiting beside the running job
WARM_EXTRA_PIDS = 64  # the warm worker's own threads, on top of its jobs' process limit
ALIVE_CHECK_S = 1.0


class DockerUnavailable(RuntimeError):
    """No Docker daemon answers, or the sandbox image is missing."""


def _client(client=None):
    if client is not None:
        return client
    try:
        import docker
    except ImportError as e:
        raise DockerUnavailable("the `docker` Python package is not installed (pip install docker)") from e
    try:
        c = docker.from_env(timeout=API_TIMEOUT_S)
        c.ping()
    except Exception as e:  # noqa: BLE001 - the SDK raises several unrelated types for "no daemon"
        raise DockerUnavailable(f"no Docker daemon answers: {_one_line(e)}") from None
    return c


def docker_available() -> tuple[bool, str]:
    """(True, "Docker <version> answers at <url>") or (False, why not)."""
    try:
        c = _client()
        version = c.version().get("Version", "?")
        return True, f"Docker {version} answers at {c.api.base_url}"
    except DockerUnavailable as e:
        return False, str(e)
    except Exception as e:  # noqa: BLE001
        return False, f"the Docker daemon did not answer: {_one_line(e)}"


def image_available(image: str = DEFAULT_IMAGE, client=None) -> bool:
    try:
        _client(client).images.get(image)
    except Exception:  # noqa: BLE001 - ImageNotFound, or no daemon at all
        return False
    return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# -- owners: which containers belong to a live driver --------------------------------------------------------------

def _start_ticks(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid()) or '?'}"


def _owner_alive(tag: str) -> bool:
    """False only when the owner ran on this host and its process is gone (pid reuse
    is told apart by the start time); containers of other hosts are never touched."""
    try:
        host, pid, ticks = tag.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    return _start_ticks(pid_n) == ticks


def sweep(client=None, run_id: str | None = None) -> int:
    """Removes deltanas containers: those of `run_id`, or else those whose owner is dead.
    Returns how many were removed."""
    c = _client(client)
    filters = {"label": [f"{LABEL}=1"] + ([f"{RUN_LABEL}={run_id}"] if run_id else [])}
    removed = 0
    for container in c.containers.list(all=True, filters=filters):
        if run_id is None and _owner_alive(container.labels.get(OWNER_LABEL, "")):
            continue
        if _remove(container):
            removed += 1
    return removed


def _remove(container) -> bool:
    try:
        container.remove(force=True)
        return True
    except Exception as e:  # noqa: BLE001
        # Already gone (a 404, or a removal already in progress) is the outcome we want.
        return "No such container" in str(e) or "already in progress" in str(e)


# -- the sandbox ---------------------------------------------------------------------------------------------------

class DockerSandbox:
    """Runs each job in its own container. Thread-safe: jobs share only the client."""

    name = "docker"

    def __init__(self, work_root: Path, image: str = DEFAULT_IMAGE, client=None, keep: bool = False,
                 warm: bool = True, max_idle: int = 4, spare: bool | None = None,
                 masked: Sequence[str | Path] | None = None):
        """`warm`: jobs go to warm worker containers (a fresh forked child per job); False starts
        a new container per job. `spare`: a warm worker readies each job's child ahead of it
        (sandbox/warm.py); None: on a GPU only. `masked`: paths no job may read, where the host's
        Python is mounted (a data package in the venv); None: the folders that hold test labels."""
        self.work_root = Path(work_root).resolve()  # bind mounts need absolute paths (a run dir may be relative)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.image = image
        self.keep = keep
        self._masked = masked
        self._host_roots: list[Path] = []
        self.client = _client(client)
        try:
            img = self.client.images.get(image)
        except Exception as e:  # noqa: BLE001
            raise DockerUnavailable(f"sandbox image {image!r} is not available ({_one_line(e)}); "
                                    f"build it with `deltanas sandbox build`") from None
        self.python_from = (img.labels or {}).get(PYTHON_LABEL, "image")
        self.run_id = uuid.uuid4().hex[:12]
        self.owner = _owner_tag()
        self._meta = DatasetMetaCache()
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.swept_at_start = sweep(self.client)
        self._mounts_base = self._python_mounts()
        self.warm = warm
        self.spare = spare
        self._pool = WarmPool(self.work_root / "warm", self._launch, self._job_limits,
                              open_dir=self._open_worker_dir, max_idle=max_idle,
                              keep_root=self.work_root if keep else None)
        self.network_isolated = True
        atexit.register(self.close)

    def isolation(self) -> str:
        python = ("the host's Python, virtualenv and deltanas.sandbox folder mounted read-only, each folder "
                  "that holds test labels inside them covered" if self.python_from == "host"
                  else "Python and deltanas from the image")
        where = ("jobs run in warm worker containers, each job in a fresh forked child of the worker, "
                 if self.warm else "each job runs in its own container ")
        return (f"docker backend (image {self.image}, {python}): {where}with no "
                f"network, a read-only root filesystem, a {TMPFS_MB} MB tmpfs /tmp, all capabilities dropped, "
                f"no-new-privileges, user {SANDBOX_USER}, pids/memory/CPU limits, a per-file output cap and a "
                f"hard kill on the wall-clock limit; only the job's work dir (read-write) and the dataset handle "
                f"(read-only, no test labels) are mounted from the host.")

    # -- running -------------------------------------------------------------------------------------------------

    def run(self, job: Job) -> Result:
        if self._closed:
            raise RuntimeError("this DockerSandbox is closed")
        t0 = time.perf_counter()
        meta = self._meta.get(job.dataset_dir)
        # Inside, the one GPU handed over is always cuda:0.
        inner = dataclasses.replace(job, device="cuda:0") if job.device.startswith("cuda") else job
        if self.warm:
            _open_handle(str(Path(job.dataset_dir).resolve()))
            result = self._pool.run(job, inner, meta, self.work_root / "predictions",
                                    prepare=self._open_to_sandbox_user)
            result.total_seconds = time.perf_counter() - t0
            return result
        workdir = new_workdir(self.work_root, job.candidate_id)
        try:
            prepare_workdir(workdir, inner)
            self._open_to_sandbox_user(workdir)
            predictions = self.work_root / "predictions"
            try:
                rc, killed, oom = self._execute(workdir, job, meta)
            except Exception as e:  # noqa: BLE001 - e.g. a GPU the daemon cannot hand over
                if not _is_api_error(e):
                    raise
                return Result(status="crashed", error=_start_error(job.device, e),
                              total_seconds=time.perf_counter() - t0)
            if oom:
                result = read_back(predictions, workdir, job, meta, -9, "")
                result.status, result.error = "oom", f"killed by the {job.limits.memory_mb} MB memory limit"
                result.predictions_path = result.final_loss = None
            elif killed == "output":
                result = read_back(predictions, workdir, job, meta, 0, "")
                result.status = "output_limit"
                result.error = f"the work dir grew past {workdir_cap(job, meta)} bytes"
                result.predictions_path = result.final_loss = None
            else:
                result = read_back(predictions, workdir, job, meta, rc, killed)
        finally:
            if not self.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        result.total_seconds = time.perf_counter() - t0
        return result

    def prewarm(self, job: Job) -> None:
        """With warm workers: starts the container that jobs like `job` will use (WarmPool.prewarm)."""
        if self.warm:
            _open_handle(str(Path(job.dataset_dir).resolve()))
            self._pool.prewarm(job)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._pool.close()
        with self._lock:
            running = list(self._running)
        for cid in running:  # their run() calls see _closed and report "closed"
            try:
                _remove(self.client.containers.get(cid))
            except Exception:  # noqa: BLE001 - already removed by its own run()
                pass
        try:
            sweep(self.client, run_id=self.run_id)
        except Exception:  # noqa: BLE001 - a daemon gone at exit leaves nothing we can reach
            pass

    def _execute(self, workdir: Path, job: Job, meta: dict) -> tuple[int, str, bool]:
        """Runs the container to its end; returns (rc, who killed it: "" / "timeout" / "output" /
        "closed", whether the kernel's OOM killer fired in it). rc < 0 is death by signal."""
        container = self.client.containers.create(**self._container_args(job, meta, workdir))
        with self._lock:
            self._running.add(container.id)
        killed = ""
        try:
            container.start()

            def ended(seconds: float) -> bool:
                try:
                    container.wait(timeout=seconds)
                    return True
                except Exception as e:  # noqa: BLE001 - the HTTP wait timed out; the job runs on
                    if not _is_timeout(e):
                        raise
                    return False

            killed = watch(ended, workdir, workdir_cap(job, meta), job.limits.timeout_s, POLL_S,
                           lambda: self._closed)
            if not killed and self._closed:  # close() took the container down under us
                killed = "closed"
            if killed:
                _kill(container)
            state = self._final_state(container)
        except BaseException:  # Ctrl-C or a daemon error: the container must not outlive this call
            _remove(container)
            raise
        finally:
            with self._lock:
                self._running.discard(container.id)
        if not self.keep:
            _remove(container)
        code = int(state.get("ExitCode") or 0)
        # tini and `timeout` report a child killed by signal N as 128 + N.
        rc = -(code - 128) if 128 < code < 128 + 65 else code
        return rc, killed, bool(state.get("OOMKilled")) and not killed

    def _final_state(self, container) -> dict:
        for _ in range(20):
            try:
                container.reload()
            except Exception:  # noqa: BLE001 - removed by close() meanwhile: nothing more to learn
                return {}
            state = container.attrs.get("State") or {}
            if not state.get("Running"):
                return state
            time.sleep(0.1)
        return container.attrs.get("State") or {}

    def _container_args(self, job: Job, meta: dict, workdir: Path) -> dict[str, Any]:
        """A one-shot job's container: the worker under an in-container `timeout -s KILL`."""
        from docker.types import LogConfig, Ulimit

        lim = job.limits
        fsize = file_size_cap(lim, meta)
        hard_stop = int(lim.timeout_s) + IN_CONTAINER_GRACE_S
        script = (f'exec timeout -s KILL {hard_stop} "$0" -m deltanas.sandbox.worker {WORK_MOUNT} {DATA_MOUNT} '
                  f'>{WORK_MOUNT}/log.txt 2>&1')
        args = self._common_args(workdir, job.dataset_dir, job.device, lim.cpu_threads, job.seed)
        args.update(command=["/bin/sh", "-c", script, self._python()], log_config=LogConfig(type="none"),
                    pids_limit=int(lim.max_processes), mem_limit=f"{int(lim.memory_mb)}m",
                    memswap_limit=f"{int(lim.memory_mb)}m",
                    ulimits=[Ulimit(name="fsize", soft=fsize, hard=fsize), Ulimit(name="core", soft=0, hard=0),
                             Ulimit(name="data", soft=int(lim.memory_mb) << 20, hard=int(lim.memory_mb) << 20)])
        args["labels"]["deltanas.candidate"] = job.candidate_id[:60]
        return args

    def _common_args(self, workdir: Path, dataset_dir: str, device: str, cpu_threads: int, seed: int
                     ) -> dict[str, Any]:
        from docker.types import DeviceRequest, Mount

        data = str(Path(dataset_dir).resolve())
        _open_handle(data)
        threads = str(max(1, cpu_threads))
        env = {"HOME": "/tmp", "TMPDIR": "/tmp", "PATH": "/usr/local/bin:/usr/bin:/bin",
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONHASHSEED": str(seed),
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
        mounts = list(self._mounts_base)
        if self.python_from == "host":
            env["PYTHONPATH"] = PACKAGE_VIEW
        mounts += [Mount(WORK_MOUNT, str(workdir), type="bind", read_only=False),
                   Mount(DATA_MOUNT, data, type="bind", read_only=True)]
        # The host's venv may hold a data package that ships the test labels: an empty tmpfs
        # (a folder) or /dev/null (a file) covers each such path.
        hidden = within(masked_paths(self._masked), self._host_roots)
        mounts += [Mount(str(p), "/dev/null", type="bind", read_only=True) for p in hidden if not p.is_dir()]
        args: dict[str, Any] = dict(
            image=self.image, entrypoint=[], working_dir=WORK_MOUNT,
            user=self._user(), environment=env, mounts=mounts, init=True,
            network_mode="none", read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={TMPFS_MB}m,mode=1777",
                   **{str(p): "ro,nosuid,nodev,noexec,size=4k,mode=000" for p in hidden if p.is_dir()}},
            cap_drop=["ALL"], security_opt=["no-new-privileges"],
            nano_cpus=int(max(1, cpu_threads) * 1e9), stdin_open=False, tty=False,
            labels={LABEL: "1", RUN_LABEL: self.run_id, OWNER_LABEL: self.owner},
        )
        if device.startswith("cuda"):
            index = device.split(":", 1)[1] if ":" in device else "0"
            args["device_requests"] = [DeviceRequest(device_ids=[index], capabilities=[["gpu"]])]
        return args

    def _python(self) -> str:
        return sys.executable if self.python_from == "host" else "python"

    # -- warm workers ----------------------------------------------------------------------------------------

    def _launch(self, work_dir: Path, key: WorkerKey) -> "ContainerHandle":
        """A warm worker's container. It is removed by the daemon as soon as it exits, and the
        worker exits when the driver's end of its control channel closes (a crash included)."""
        from docker.types import LogConfig, Ulimit

        data_mb = sum(f.stat().st_size for f in Path(key.dataset_dir).iterdir() if f.is_file()) >> 20
        memory = int(key.memory_mb) + WARM_BASE_MB + data_mb
        inner = "cuda:0" if key.device.startswith("cuda") else key.device
        if self.spare or (self.spare is None and inner.startswith("cuda")):
            memory += SPARES * (WARM_SPARE_MB + data_mb)
        args = self._common_args(work_dir, key.dataset_dir, key.device, key.cpu_threads, seed=0)
        args["environment"][SANDBOX_INIT_ENV] = "1"  # its parent is the container's init
        args.update(command=[self._python(), "-m", "deltanas.sandbox.warm", WORK_MOUNT, DATA_MOUNT, inner,
                             "--private-tmp", *spare_flag(self.spare)],
                    log_config=LogConfig(type="none"), auto_remove=True,
                    pids_limit=int(key.max_processes) + WARM_EXTRA_PIDS, mem_limit=f"{memory}m",
                    memswap_limit=f"{memory}m", ulimits=[Ulimit(name="core", soft=0, hard=0)])
        args["labels"]["deltanas.role"] = "warm-worker"
        with self._lock:
            if self._closed:
                raise RuntimeError("this DockerSandbox is closed")
        try:
            container = self.client.containers.create(**args)
        except Exception as e:  # noqa: BLE001
            if _is_api_error(e):
                raise DockerUnavailable(_start_error(key.device, e)) from None
            raise
        try:
            container.start()
        except BaseException as e:
            _remove(container)
            if _is_api_error(e):
                raise DockerUnavailable(_start_error(key.device, e)) from None
            raise
        return ContainerHandle(container)

    def _job_limits(self, job: Job, meta: dict) -> dict:
        """The rlimits the warm worker puts on the job's child; the container's cgroup caps the
        worker as a whole."""
        lim = job.limits
        out = {"fsize": file_size_cap(lim, meta), "data_mb": int(lim.memory_mb),
               "cpu_s": int(lim.timeout_s * max(1, lim.cpu_threads)) + 10}
        if not job.device.startswith("cuda"):
            out["address_mb"] = int(lim.memory_mb) + 2048
        return out

    def _open_to_sandbox_user(self, workdir: Path) -> None:
        """The job's user must write the work dir and out/; the inputs stay read-only to it."""
        uid, gid = (int(v) for v in self._user().split(":"))
        for d in (workdir, workdir / "out", workdir / "tmp"):
            if os.geteuid() == 0:
                os.chown(d, uid, gid)
            os.chmod(d, 0o700)
        for f in (workdir / "model.py", workdir / "job.json"):
            os.chmod(f, 0o644)

    def _open_worker_dir(self, work_dir: Path) -> None:
        """A warm worker's dir and its control FIFOs belong to the job's user."""
        uid, gid = (int(v) for v in self._user().split(":"))
        for p in (work_dir, work_dir / "ctl.in", work_dir / "ctl.out"):
            if os.geteuid() == 0:
                os.chown(p, uid, gid)

    def _user(self) -> str:
        # As root, the job runs as nobody; as a docker-group user, as that user (never as root),
        # so the host can read what the job wrote.
        return SANDBOX_USER if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}"

    def _python_mounts(self) -> list:
        from docker.types import Mount

        if self.python_from != "host":
            return []
        import deltanas.sandbox as pkg

        sources = {Path(p).resolve() for p in {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix}}
        roots = sorted(p for p in sources if not any(p != q and q in p.parents for q in sources))
        for root in roots:
            for inner in (WORK_MOUNT, DATA_MOUNT, PACKAGE_VIEW):
                if Path(inner) == root or root in Path(inner).parents or Path(inner) in root.parents:
                    raise DockerUnavailable(f"the host Python at {root} overlaps the sandbox path {inner}")
        mounts = [Mount(str(r), str(r), type="bind", read_only=True) for r in roots]
        self._host_roots = roots
        package = Path(pkg.__file__).resolve().parent
        mounts.append(Mount(f"{PACKAGE_VIEW}/deltanas/sandbox", str(package), type="bind", read_only=True))
        return mounts


class ContainerHandle:
    """A warm worker's container, as the pool sees it."""

    def __init__(self, container):
        self.container = container
        self._checked, self._alive = 0.0, True

    def alive(self) -> bool:
        if time.monotonic() - self._checked >= ALIVE_CHECK_S:
            self._checked = time.monotonic()
            try:
                self.container.reload()
                self._alive = (self.container.attrs.get("State") or {}).get("Running", False)
            except Exception:  # noqa: BLE001 - removed: it exited (auto-remove) or was killed
                self._alive = False
        return self._alive

    def kill(self) -> None:
        _remove(self.container)

    def exit_reason(self) -> str:
        try:
            self.container.reload()
        except Exception:  # noqa: BLE001
            return "its container exited and was removed"
        state = self.container.attrs.get("State") or {}
        if state.get("OOMKilled"):
            return "its container hit the memory limit"
        return f"its container exited with status {state.get('ExitCode')}"


def _open_handle(path: str) -> None:
    """The job's user must read the dataset handle. It holds no test labels by contract,
    so making it world-readable gives nothing away."""
    root = Path(path)
    if os.geteuid() != 0:
        return  # the job runs as this same user
    if root.stat().st_mode & 0o005 != 0o005:
        root.chmod(root.stat().st_mode | 0o005)
    for f in root.iterdir():
        if f.is_file() and f.stat().st_mode & 0o004 == 0:
            f.chmod(f.stat().st_mode | 0o004)


def _start_error(device: str, e: BaseException) -> str:
    text = (str(getattr(e, "explanation", "") or e).strip().splitlines() or [type(e).__name__])[0][:300]
    if device.startswith("cuda") and ("gpu" in text.lower() or "device" in text.lower()):
        return (f"the job asks for GPU {device}, but Docker cannot hand it to a container (is the NVIDIA "
                f"container toolkit installed?): {text}")
    return f"the job's container could not start: {text}"


def _is_api_error(e: BaseException) -> bool:
    from docker.errors import APIError

    return isinstance(e, APIError)


def _is_timeout(e: BaseException) -> bool:
    """docker-py's wait(timeout=...) raises ReadTimeout, or ConnectionError wrapping one."""
    import requests

    return isinstance(e, requests.exceptions.ReadTimeout) or (
        isinstance(e, requests.exceptions.ConnectionError) and "timed out" in str(e).lower())


def _kill(container) -> None:
    try:
        container.kill()
    except Exception:  # noqa: BLE001 - it exited between the last poll and the kill
        pass
    try:
        container.wait(timeout=30)
    except Exception:  # noqa: BLE001
        pass
