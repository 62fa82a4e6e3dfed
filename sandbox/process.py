"""The `process` sandbox: the worker in its own process group, under rlimits, with a hard kill.

Each job gets a fresh 0700 work dir under `work_root` holding `model.py`,
`job.json`, the worker's log and its `out/`. The worker starts in a new session
(so its process group is the job), with:

- RLIMIT_DATA at `memory_mb` (torch maps about 3.3 GB of libraries, so an
  address-space cap at `memory_mb` would stop torch from importing; on CPU jobs
  RLIMIT_AS is set with that much headroom, as a backstop for shared mappings);
- RLIMIT_FSIZE at `max_output_bytes`, which caps every file the job writes,
  the log included: a flood of stdout dies with SIGXFSZ;
- RLIMIT_CORE 0, RLIMIT_CPU a little above what the wall-clock limit allows;
- RLIMIT_NPROC, when not running as root (the kernel does not apply it to root);
- no network, through `unshare --user --map-root-user --net`, where that works.

On the wall-clock limit the whole process tree and group get SIGKILL. The host
reads back only a size-capped result.json (as JSON) and the predictions .npy
(without pickle, validated), and never trusts the worker's word on accuracy.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from deltanas.sandbox.base import Job, Result
from deltanas.sandbox.jobfiles import DatasetMetaCache, file_size_cap, new_workdir, prepare_workdir, read_back

TORCH_ADDRESS_HEADROOM_MB = 8192  # measured: importing torch maps ~3.3 GB, training adds a little
CPU_LIMIT_GRACE_S = 10
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
              "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
NETNS_PREFIX = ("unshare", "--user", "--map-root-user", "--net")


def namespaces_available() -> bool:
    """True when `unshare` can give a child its own (empty) network namespace here."""
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run([*NETNS_PREFIX, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _user_task_count(uid: int) -> int:
    """Processes plus threads of `uid`: RLIMIT_NPROC counts both, across the whole user."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        uid_m = re.search(r"^Uid:\s+(\d+)", status, re.M)
        thr_m = re.search(r"^Threads:\s+(\d+)", status, re.M)
        if uid_m and int(uid_m.group(1)) == uid:
            total += int(thr_m.group(1)) if thr_m else 1
    return total


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, found through /proc, so that a child which left
    the process group (setsid) is still killed while its parent is alive."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_job(pid: int, tree: bool = True) -> None:
    """SIGKILL the job's tree and its whole process group (pgid == pid: new session).

    Pass tree=False once the leader is reaped: its pid may name another process by then.
    """
    for child in _descendants(pid) if tree else []:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessSandbox:
    """Runs jobs as local child processes. Thread-safe: each `run` is its own process group."""

    name = "process"

    def __init__(self, work_root: Path, python: str = sys.executable, use_namespaces: bool | None = None,
                 keep: bool = False):
        self.work_root = Path(work_root)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.keep = keep
        available = namespaces_available() if use_namespaces is not False else False
        if use_namespaces and not available:
            raise RuntimeError("use_namespaces=True, but `unshare --user --map-root-user --net true` fails here")
        self.network_isolated = available
        self.is_root = os.geteuid() == 0
        self._running: dict[int, subprocess.Popen] = {}
        self._closed_pids: set[int] = set()
        self._lock = threading.Lock()
        self._meta = DatasetMetaCache()

    def isolation(self) -> str:
        net = ("its own network namespace (no network)" if self.network_isolated
               else "NO network isolation (unshare unavailable or disabled)")
        nproc = ("RLIMIT_NPROC is not enforced because the host runs as root" if self.is_root
                 else "RLIMIT_NPROC caps its processes")
        return (f"process backend: each job runs in its own process group with rlimits on data memory, file size, "
                f"CPU time and core dumps and a hard SIGKILL of the group on timeout, in {net}; {nproc}; there is "
                f"no filesystem isolation (the job can read whatever this user can) and no PID namespace (a process "
                f"that leaves both the group and the process tree can outlive the job).")

    # -- running -----------------------------------------------------------------------------------------------

    def run(self, job: Job) -> Result:
        t0 = time.perf_counter()
        meta = self._meta.get(job.dataset_dir)
        workdir = new_workdir(self.work_root, job.candidate_id)
        try:
            prepare_workdir(workdir, job)
            rc, killed = self._execute(workdir, job, meta)
            result = read_back(self.work_root / "predictions", workdir, job, meta, rc, killed)
        finally:
            if not self.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        result.total_seconds = time.perf_counter() - t0
        return result

    def close(self) -> None:
        with self._lock:
            running = list(self._running.items())
        for pid, proc in running:
            with self._lock:
                self._closed_pids.add(pid)
            kill_job(pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def _execute(self, workdir: Path, job: Job, meta: dict) -> tuple[int, str]:
        """Runs the worker to its end; returns its exit status and who killed it ("", "timeout", "closed")."""
        lim = job.limits
        cmd = [self.python, "-m", "deltanas.sandbox.worker", str(workdir), str(Path(job.dataset_dir).resolve())]
        if self.network_isolated:
            cmd = [*NETNS_PREFIX, *cmd]
        limits = self._rlimits(job, meta)
        with open(workdir / "log.txt", "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=workdir, env=self._env(workdir, job), start_new_session=True,
                                    preexec_fn=lambda: _apply_rlimits(limits))
        with self._lock:
            self._running[proc.pid] = proc
        try:
            try:
                rc, killed = proc.wait(timeout=lim.timeout_s), ""
            except subprocess.TimeoutExpired:
                kill_job(proc.pid)
                rc, killed = proc.wait(), "timeout"
            except BaseException:  # Ctrl-C in the driver: take the job down with it
                kill_job(proc.pid)
                proc.wait()
                raise
        finally:
            kill_job(proc.pid, tree=False)  # group members left behind by a worker that exited
            with self._lock:
                self._running.pop(proc.pid, None)
                closed = proc.pid in self._closed_pids
                self._closed_pids.discard(proc.pid)
        return rc, killed or ("closed" if closed else "")

    def _rlimits(self, job: Job, meta: dict) -> list[tuple[int, int]]:
        lim = job.limits
        mb = 1 << 20
        fsize = file_size_cap(lim, meta)
        cpu = int(lim.timeout_s * max(1, lim.cpu_threads)) + CPU_LIMIT_GRACE_S
        out = [(resource.RLIMIT_DATA, lim.memory_mb * mb), (resource.RLIMIT_FSIZE, fsize),
               (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu)]
        if not job.device.startswith("cuda"):  # CUDA reserves huge address ranges; DATA still applies
            out.append((resource.RLIMIT_AS, (lim.memory_mb + TORCH_ADDRESS_HEADROOM_MB) * mb))
        if not self.is_root:
            out.append((resource.RLIMIT_NPROC, _user_task_count(os.geteuid()) + lim.max_processes))
        return out

    def _env(self, workdir: Path, job: Job) -> dict[str, str]:
        # Only what Python, torch and CUDA need: API keys in the driver's env stay out.
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        threads = str(max(1, job.limits.cpu_threads))
        env.update(HOME=str(workdir), TMPDIR=str(workdir / "tmp"), OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, PYTHONHASHSEED=str(job.seed), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")
        return env


def _apply_rlimits(limits: list[tuple[int, int]]) -> None:
    """Runs in the child between fork and exec: only setrlimit calls."""
    for which, value in limits:
        soft, hard = resource.getrlimit(which)
        cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (cap, cap))
