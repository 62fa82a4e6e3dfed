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
- RLIMIT_NPROC, unless the job runs as root (the kernel does not apply it to root);
- where bubblewrap (`bwrap`) works, a filesystem view of its own: read-only
  /usr (and the /lib, /lib64, /bin links into it), the interpreter prefixes and
  the `deltanas.sandbox` package folder alone (at /deltanas/pkg), the dataset
  handle read-only (it holds no test labels), the work dir read-write, a fresh
  tmpfs /tmp, /proc and /dev; and new namespaces of every kind (no network, its
  own pids: the whole namespace dies with its init). Not in the view: the
  dataset cache with the test labels, $HOME, the run directory, the project;
- without bwrap, each of these where it works (`layers()` says which are in force):
  Landlock (sandbox/landlock.py): the job may read and execute /usr, the interpreter
  prefixes minus the `masked` paths in them, the `deltanas.sandbox` folder and the
  dataset handle, read /proc and the CPU's entries in /sys, and write only its work
  dir and /dev/null; no TCP, and (ABI 6+) no abstract UNIX socket or signal beyond
  its own processes. As root, the job runs as `job_user` (nobody): files only root
  may read stay closed even where Landlock is missing, root's capabilities are gone,
  and RLIMIT_NPROC applies. A network namespace of its own (no network), inside a
  user namespace of its own where the job is not root's to drop;
- on a GPU, that GPU alone in CUDA_VISIBLE_DEVICES, as `cuda:0`: its CUDA start-up
  does not touch the machine's other GPUs, and its memory and its threads are
  those of one device (not a security boundary: the device files are there).

On the wall-clock limit, or once the work dir as a whole grows past its cap (many files,
each under RLIMIT_FSIZE, could otherwise fill the disk), the whole process tree and group
get SIGKILL. The host
reads back only a size-capped result.json (as JSON) and the predictions .npy
(without pickle, validated), and never trusts the worker's word on accuracy.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Iterator

from deltanas.sandbox import landlock, proctree, seccomp
from deltanas.sandbox.base import Job, Result, masked_paths, within
from deltanas.sandbox.jobfiles import (DatasetMetaCache, file_size_cap, new_workdir, prepare_workdir, read_back,
                                       watch, workdir_cap)
from deltanas.sandbox.pool import spare_flag
from deltanas.sandbox.pool import WarmPool, WorkerKey
from deltanas.sandbox.worker import SANDBOX_INIT_ENV

TORCH_ADDRESS_HEADROOM_MB = 8192  # measured: importing torch maps ~3.3 GB, training adds a little
WARM_ADDRESS_HEADROOM_MB = 2048  # a warm child starts with torch mapped; this is for what it maps anew
CPU_LIMIT_GRACE_S = 10
POLL_S = 0.25  # how often a one-shot job's work dir is measured
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
              "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
BWRAP_FLAGS = ("--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL")
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin")  # libc, ld.so and what torch links against; /etc is not needed
PACKAGE_VIEW = "/deltanas/pkg"  # PYTHONPATH root holding deltanas/sandbox alone (a namespace package)
WARM_WORK, WARM_DATA = "/deltanas/work", "/deltanas/data"  # a warm worker's dirs inside bwrap
TMPFS_MB = 64  # the job's private /tmp under bwrap
NOBODY = (65534, 65534)  # the (uid, gid) a job of root's runs as, without bwrap
# What a job opens beyond the system dirs and Python, under Landlock (traced on a CPU job):
# /proc for the warm worker's accounting (self/status, its descendants' stat) and torch's
# (self/maps, cpuinfo); /sys/devices/system/cpu, where glibc and the thread pools count the
# CPUs; /dev/urandom for torch's seed; /dev/null. Not /etc (ld.so falls back to the default
# library dirs; pwd lookups fail, so the env names the user: _base_env), nor /tmp or /dev/shm,
# which the host shares.
LANDLOCK_READ = ("/proc", "/sys/devices/system/cpu", "/dev/urandom")
# CUDA_PROC: CUDA's start-up names its threads in /proc/<pid>/task/<tid>/comm, and cuInit fails with
# error 304 where it cannot (measured on an H100 under Landlock; NVIDIA's OpenShell sandbox found
# the same, its PR #710). Landlock cannot allow a job its own /proc entries alone (a rule binds an
# inode made before the job's pid exists), so a GPU job may write in all of /proc, where it is not
# root: the kernel's own checks then keep it to its own entries and those of its uid's processes,
# never /proc/sys. A root job's /proc stays read-only, and CUDA cannot start under Landlock.
LANDLOCK_WRITE = ("/dev/null",)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: dlopen in a forked child may deadlock


def python_roots(python: str = sys.executable) -> list[Path]:
    """The directories the interpreter needs: its prefixes (the virtualenv's and the base one)
    and the folders of `python` itself, without any that lies inside another."""
    exe = Path(python)
    sources = {Path(p).resolve() for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    sources |= {exe.parent.parent.absolute(), exe.resolve().parent.parent}
    return sorted(p for p in sources if not any(p != q and q in p.parents for q in sources))


def import_dirs() -> list[Path]:
    """The folder deltanas.sandbox was imported from where it is a plain folder on sys.path outside
    Python's prefixes (`pip install --target DIR` with PYTHONPATH=DIR): DIR, which the worker's
    Python reads as it reads site-packages (torch imports what it finds there, dill for one);
    [] for an install in the environment."""
    import deltanas.sandbox as pkg

    top = Path(pkg.__file__).resolve().parent.parent.parent
    on_path = {Path(p).resolve() for p in sys.path if p}
    inside = any(top == r or r in top.parents for r in python_roots())
    return [top] if top in on_path and not inside else []


def bwrap_view(python: str, binds: list[tuple[Path, str, bool]], devices: list[str] = (),
               masked: Sequence[Path] = ()) -> list[str]:
    """The bwrap command prefix: the system dirs, `python`'s prefixes, the sandbox package at
    PACKAGE_VIEW, and each (host path, path inside, read-only) of `binds`; the first one that
    is writable is the working directory. Each `masked` path inside what the view shows is
    covered by an empty, read-only tmpfs (a folder) or /dev/null (a file)."""
    import deltanas.sandbox as pkg

    args = ["bwrap", *BWRAP_FLAGS]
    for d in SYSTEM_DIRS:
        p = Path(d)
        if p.is_symlink():  # merged-/usr systems: /lib -> usr/lib
            args += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            args += ["--ro-bind", d, d]
    # /tmp first: a bind may live under the host's /tmp and is mounted over the tmpfs. Each
    # tmpfs gets a size cap where bwrap can set one (tmpfs pages are memory), as in docker.
    size = ["--size", str(TMPFS_MB << 20)] if _bwrap_has_size() else []
    args += [*size, "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm"]
    for dev in devices:
        args += ["--dev-bind", dev, dev]
    if devices:  # the CUDA driver reads the GPU's PCI details there
        args += ["--ro-bind", "/sys", "/sys"]
    for root in python_roots(python):
        args += ["--ro-bind", str(root), str(root)]
    package = Path(pkg.__file__).resolve().parent
    args += ["--ro-bind", str(package), f"{PACKAGE_VIEW}/deltanas/sandbox"]
    for hidden in within(masked, [Path(d) for d in SYSTEM_DIRS] + python_roots(python)):
        # e.g. a data package inside the venv that ships the test set as CSV
        if hidden.is_dir():
            args += [*size, "--perms", "0000", "--tmpfs", str(hidden), "--remount-ro", str(hidden)]
        else:
            args += ["--ro-bind", "/dev/null", str(hidden)]
    for src, dst, read_only in binds:
        args += ["--ro-bind" if read_only else "--bind", str(src), dst]
    # The view's own root and /dev are tmpfs that outlive a job in a warm worker: read-only, so
    # that no job can plant a module on PYTHONPATH (or anything else) for the next.
    args += ["--remount-ro", "/", "--remount-ro", "/dev"]
    writable = [dst for _, dst, read_only in binds if not read_only]
    if writable:
        args += ["--chdir", writable[0]]
    return args


@functools.lru_cache(maxsize=1)
def _bwrap_has_size() -> bool:
    """bwrap 0.5+ takes --size for a tmpfs."""
    try:
        out = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in out.stdout + out.stderr


def bwrap_available(python: str = sys.executable) -> bool:
    """True when bwrap can start `python` in the sandbox's view here (it needs unprivileged
    user namespaces, or root)."""
    if shutil.which("bwrap") is None:
        return False
    cmd = [*bwrap_view(python, []), python, "-c", "import deltanas.sandbox.worker"]
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={"PYTHONPATH": PACKAGE_VIEW, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def user_name(uid: int) -> str:
    """`uid`'s login name on this host, or the number where it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def one_gpu(device: str, visible: str | None) -> tuple[str | None, str]:
    """(CUDA_VISIBLE_DEVICES for a worker on `device`, the device's name inside: cuda:0).
    `cuda:N` counts among the driver's visible GPUs (`visible`, its CUDA_VISIBLE_DEVICES), as
    torch does in the driver. Off the GPU, or with N beyond that list (the worker then reports
    the missing device): (visible, device) unchanged."""
    if not device.startswith("cuda"):
        return visible, device
    index = device.partition(":")[2] or "0"
    if not index.isdigit():
        return visible, device
    ids = [v.strip() for v in visible.split(",")] if visible is not None else None
    if ids is None:
        return index, "cuda:0"
    if int(index) < len(ids) and ids[int(index)]:
        return ids[int(index)], "cuda:0"
    return visible, device


def _cuda_devices() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("nvidia*") if not p.is_dir())


def kill_job(pid: int, tree: bool = True) -> None:
    """SIGKILL the job's tree and its whole process group (pgid == pid: new session).

    Pass tree=False once the leader is reaped: its pid may name another process by then.
    """
    for child in proctree.descendants(pid) if tree else []:
        proctree.sigkill(child)
    proctree.sigkill(pid, group=True)


class ProcessSandbox:
    """Runs jobs as local child processes. Thread-safe: each `run` is its own process group."""

    name = "process"

    def __init__(self, work_root: Path, python: str = sys.executable, use_namespaces: bool | None = None,
                 keep: bool = False, use_bwrap: bool | None = None, warm: bool = True, max_idle: int = 4,
                 spare: bool | None = None, masked: Sequence[str | Path] | None = None,
                 use_landlock: bool | None = None, drop_uid: bool | None = None, job_user: tuple[int, int] = NOBODY,
                 use_seccomp: bool | None = None):
        """`use_bwrap` (and `use_namespaces`, the fallback without it): None uses it where it
        works, True requires it, False turns it off. `warm`: jobs go to warm workers (a fresh
        forked child per job); False starts a new worker process per job. `spare`: a warm worker
        readies each job's child ahead of it (sandbox/warm.py); None: on a GPU only. `masked`:
        paths no job may read; None: the folders that hold test labels (`label_paths`), read
        again at each worker's start, so a dataset loaded later is hidden too. Without bwrap:
        `use_landlock`, `drop_uid` (as root, jobs run as `job_user`, a (uid, gid)), `use_namespaces`
        (a network namespace) and `use_seccomp` (sandbox/seccomp.py's filter) each take None, True
        or False as `use_bwrap` does."""
        self.work_root = Path(work_root)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.moved_work_root: tuple[Path, Path, str] | None = None  # (asked, used, why): `_open_work_root`
        self.python = python
        self.keep = keep
        self._masked = masked
        self.fs_isolated = bwrap_available(python) if use_bwrap is not False else False
        if use_bwrap and not self.fs_isolated:
            raise RuntimeError("use_bwrap=True, but bubblewrap is missing or cannot start the worker's view here")
        self.is_root = os.geteuid() == 0
        self._choose_layers(use_bwrap, use_landlock, drop_uid, job_user, use_namespaces, use_seccomp)
        self._running: dict[int, subprocess.Popen] = {}
        self._closed_pids: set[int] = set()
        self._lock = threading.Lock()
        self._meta = DatasetMetaCache()
        self.warm = warm
        self.spare = spare
        self._pool = WarmPool(self.work_root / "warm", self._launch, self._job_limits, open_dir=self._hand_over,
                              max_idle=max_idle, keep_root=self.work_root if keep else None)

    @property
    def masked(self) -> list[Path]:
        """The paths hidden from every job, resolved, those that exist."""
        return masked_paths(self._masked)

    def _choose_layers(self, use_bwrap: bool | None, use_landlock: bool | None, drop_uid: bool | None,
                       job_user: tuple[int, int], use_namespaces: bool | None, use_seccomp: bool | None) -> None:
        """Without bwrap: takes each layer (Landlock, the uid drop, a network namespace, the
        seccomp filter) that a worker starts under, with those taken before it. `_why` says why a
        layer is not in force."""
        self._confinement = Confinement()
        self.network_isolated = self.fs_isolated  # --unshare-all includes the network
        if self.fs_isolated:
            self._why = {name: "not needed: bubblewrap's view is in force" for name in ("landlock", "uid drop", "seccomp")}
            return
        self._why = {"bubblewrap": "turned off (use_bwrap=False)" if use_bwrap is False
                     else "bwrap is missing or cannot start the worker's view here"}
        if use_landlock is False:
            self._why["landlock"] = "turned off (use_landlock=False)"
        elif not landlock.abi_version():
            self._why["landlock"] = landlock.unavailable_reason()
        elif why := self._probe(Confinement(landlock=True)):
            self._why["landlock"] = why
        else:
            self._confinement = Confinement(landlock=True)
        if drop_uid is False:
            self._why["uid drop"] = "turned off (drop_uid=False)"
        elif not self.is_root:
            self._why["uid drop"] = f"not needed: the host runs as uid {os.geteuid()}, not root"
        else:
            self._open_work_root(job_user)
            if why := self._probe(dataclasses.replace(self._confinement, user=job_user)):
                self._restore_work_root()
                closed = _closed_on_the_way(job_user, [Path(self.python).resolve(), *self._read_roots(),
                                                       self.work_root])
                self._why["uid drop"] = f"uid {job_user[0]} cannot start the worker: " + (closed or why)
            else:
                self._confinement = dataclasses.replace(self._confinement, user=job_user)
        if use_namespaces is False:
            self._why["network namespace"] = "turned off (use_namespaces=False)"
        elif why := self._probe(dataclasses.replace(self._confinement, netns=True)):
            self._why["network namespace"] = why
        else:
            self._confinement = dataclasses.replace(self._confinement, netns=True)
            self.network_isolated = True
        if use_seccomp is False:
            self._why["seccomp"] = "turned off (use_seccomp=False)"
        elif why := seccomp.unavailable_reason() or self._probe(dataclasses.replace(self._confinement, seccomp=True)):
            self._why["seccomp"] = why
        else:
            self._confinement = dataclasses.replace(self._confinement, seccomp=True)
        for name, asked in (("landlock", use_landlock), ("uid drop", drop_uid), ("network namespace", use_namespaces),
                            ("seccomp", use_seccomp)):
            if asked and name in self._why:
                raise RuntimeError(f"{name} was required, but it is not in force here: {self._why[name]}")

    def _open_work_root(self, user: tuple[int, int]) -> None:
        """As root, with a run folder that `user` cannot walk to (under /root, or a 0700
        temporary dir): the jobs' work dirs move to a folder of their own under the system's
        temporary dir, 0711, so that the uid drop, which a GPU job under Landlock needs, stays
        possible. Removed on `close` unless `keep`. `moved_work_root` says where, and why."""
        closed = _closed_on_the_way(user, [self.work_root])
        if not closed or _closed_on_the_way(user, [Path(self.python).resolve()]):
            return  # nothing to move, or the uid drop fails whatever the work root
        moved = Path(tempfile.mkdtemp(prefix="deltanas-jobs-"))
        moved.chmod(0o711)
        self.moved_work_root = (self.work_root, moved, closed)
        self.work_root = moved
        if _closed_on_the_way(user, [moved]):
            self._restore_work_root()

    def _restore_work_root(self) -> None:
        """Back to the run's own work root, where the uid drop is not taken after all."""
        if self.moved_work_root:
            shutil.rmtree(self.work_root, ignore_errors=True)
            self.work_root = self.moved_work_root[0]
            self.moved_work_root = None

    def _probe(self, confinement: Confinement) -> str:
        """"" when a worker's Python starts here under `confinement` and reaches the work root;
        else why not, in a phrase."""
        code = "import os, sys, deltanas.sandbox.warm; os.stat(sys.argv[1])"
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        try:
            with self._confined(self.work_root.resolve(), None, "cpu", [], confinement) as (preexec, fds, _):
                r = subprocess.run([self.python, "-c", code, str(self.work_root.resolve())], preexec_fn=preexec,
                                   pass_fds=fds, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=60)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return f"it cannot be set up here ({type(e).__name__}: {e})"
        if r.returncode == 0:
            return ""
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return f"the worker does not start under it ({last[:200]})"

    @property
    def job_user(self) -> tuple[int, int] | None:
        """The (uid, gid) jobs run as, where the uid drop is in force."""
        return self._confinement.user

    @property
    def landlock_abi(self) -> int:
        """The Landlock ABI jobs run under; 0 where Landlock is not in force."""
        return landlock.abi_version() if self._confinement.landlock else 0

    def layers(self) -> list[dict]:
        """Each isolation layer, in force or not: [{"name", "in_force", "why"}], where `why` says
        what it does, or why it is not in force. Names: bubblewrap, landlock, uid drop,
        network namespace, seccomp, rlimits."""
        abi, user = self.landlock_abi, self.job_user
        ll = (f"ABI {abi}: reads only the system dirs, Python (without the folders that hold test labels), "
              f"the deltanas.sandbox folder, the dataset handle, /proc and the CPU's entries in /sys; writes only "
              f"its work dir (a GPU job also its GPU's device files, "
              + ("and /proc where CUDA names its threads)" if self._job_uid() is not None
                 else "but not /proc: as root, CUDA cannot start under Landlock)")
              + ("; no TCP" if abi >= 4 else "")
              + ("; no abstract UNIX socket or signal beyond its own processes" if abi >= 6 else ""))
        if self.is_root and user is None and not self._confinement.seccomp:
            ll += ("; as root, the job can still chmod root's files and reach root's UNIX sockets: Landlock "
                   "does not cover them")
        nproc = "RLIMIT_NPROC caps its processes" if self._job_uid() is not None else "no RLIMIT_NPROC: it runs as root"
        rows = [("bubblewrap", "a filesystem view of its own (read-only system dirs, Python without the folders "
                               "that hold test labels, the dataset handle, its work dir read-write) and new "
                               "namespaces of every kind"),
                ("landlock", ll),
                ("uid drop", f"runs as uid {user[0]}, gid {user[1]}, no other groups: what only root may read is "
                             f"closed to it, and root's capabilities are gone" + self._moved_note() if user else ""),
                ("network namespace", "bubblewrap's own" if self.fs_isolated else "its own, with no network"),
                ("seccomp", "refuses new UNIX sockets (the way to the host's daemons), io_uring, chmod, chown, "
                            "device nodes, opening files by handle, mounts, kernel modules, bpf, ptrace and the "
                            "like, for the worker and all it starts"),
                ("rlimits", f"data memory, file size, CPU time, no core dumps; {nproc}")]
        return [{"name": name, "in_force": name not in self._why, "why": self._why.get(name, what)}
                for name, what in rows]

    def _moved_note(self) -> str:
        if not self.moved_work_root:
            return ""
        asked, used, why = self.moved_work_root
        return f"; its work dirs are in {used}, not {asked}, because {why}"

    def gpu_blocker(self, device: str) -> str:
        """Why a job on `device` cannot start CUDA in this sandbox, in a sentence; "" where it can.
        Under Landlock a root job's /proc stays read-only (CUDA_PROC), and cuInit would fail
        with error 304 in every job."""
        if not device.startswith("cuda") or self.fs_isolated or not self._confinement.landlock:
            return ""
        if self._job_uid() is not None:
            return ""
        return ("CUDA cannot start in this sandbox: its jobs run as root under Landlock, which keeps /proc "
                "read-only, and CUDA writes its thread names there (uid drop: "
                + self._why.get("uid drop", "not in force") + "). Run deltanas as a user other than root, put "
                "Python where uid 65534 can read it (so jobs drop to it), or install bubblewrap.")

    def isolation(self) -> str:
        nproc = ("RLIMIT_NPROC is not enforced because the job runs as root" if self._job_uid() is None
                 else "RLIMIT_NPROC caps its processes")
        common = ("each job runs in its own process group with rlimits on data memory, file size, CPU time and "
                  "core dumps and a hard SIGKILL of its process tree and group on timeout")
        if self.warm:
            common = ("workers stay warm across jobs and run each job in a fresh forked child; " + common
                      .replace("its own process group", "its own session"))
        if self.fs_isolated:
            return (f"process backend under bubblewrap: {common}; {nproc}; filesystem isolation: the job sees only "
                    f"read-only /usr, the Python prefixes (each folder inside them that holds test labels, such as "
                    f"a data package, covered) and the deltanas.sandbox folder, the dataset handle "
                    f"(read-only, no test labels), its work dir (read-write) and a private /tmp, /proc and /dev "
                    f"(not the dataset cache, $HOME, the run directory or the project); new namespaces of every "
                    f"kind: no network, and its own PID namespace, which dies whole with the job.")
        layer = {row["name"]: row for row in self.layers()}
        net = ("its own network namespace (no network)" if self.network_isolated
               else f"NO network isolation ({layer['network namespace']['why']})")
        who = f"uid {self.job_user[0]}" if self.job_user else "this user"
        fs = (f"filesystem isolation through Landlock {layer['landlock']['why']}" if self.landlock_abi else
              f"NO filesystem isolation (Landlock: {layer['landlock']['why']}; the job can read whatever {who} can"
              + ("" if self.job_user else ", the dataset cache with its test labels included") + ")")
        uid = layer["uid drop"]
        if self._confinement.seccomp:
            fs += f"; a seccomp filter that {layer['seccomp']['why']}"
        return (f"process backend WITHOUT bubblewrap: {common}, in {net}; {nproc}; {fs}; the job "
                + (uid["why"] if uid["in_force"] else f"keeps the host's uid (uid drop: {uid['why']})")
                + "; and no PID namespace (a process that leaves both the group and the process tree can outlive "
                  "the job).")

    # -- running -----------------------------------------------------------------------------------------------

    def run(self, job: Job) -> Result:
        t0 = time.perf_counter()
        if why := self.gpu_blocker(job.device):
            return Result(status="crashed", error=why, total_seconds=time.perf_counter() - t0)
        meta = self._meta.get(job.dataset_dir)
        inner = dataclasses.replace(job, device=self._one_gpu(job.device)[1])
        if self.warm:
            result = self._pool.run(job, inner, meta, self.work_root / "predictions", prepare=self._hand_over)
            result.total_seconds = time.perf_counter() - t0
            return result
        workdir = new_workdir(self.work_root, job.candidate_id)
        try:
            prepare_workdir(workdir, inner)
            self._hand_over(workdir)
            rc, killed = self._execute(workdir, job, meta)
            if killed == "output":
                result = read_back(self.work_root / "predictions", workdir, job, meta, 0, "")
                result.status = "output_limit"
                result.error = f"the work dir grew past {workdir_cap(job, meta)} bytes"
                result.predictions_path = result.final_loss = None
            else:
                result = read_back(self.work_root / "predictions", workdir, job, meta, rc, killed)
        finally:
            if not self.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        result.total_seconds = time.perf_counter() - t0
        return result

    def prewarm(self, job: Job) -> None:
        """With warm workers: starts the one that jobs like `job` will use (see WarmPool.prewarm)."""
        if self.warm and not self.gpu_blocker(job.device):
            self._pool.prewarm(job)

    def close(self) -> None:
        self._pool.close()
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
        if self.moved_work_root and not self.keep:
            shutil.rmtree(self.work_root, ignore_errors=True)

    def _execute(self, workdir: Path, job: Job, meta: dict) -> tuple[int, str]:
        """Runs the worker to its end; returns its exit status and who killed it ("", "timeout", "output", "closed")."""
        lim = job.limits
        workdir = workdir.resolve()  # bwrap binds it at this same path
        data = Path(job.dataset_dir).resolve()
        limits = self._rlimits(job, meta)
        with self._confined(workdir, data, job.device, limits) as (preexec, fds, data_arg):
            cmd = [self.python, "-m", "deltanas.sandbox.worker", str(workdir), data_arg]
            if self.fs_isolated:
                devices = _cuda_devices() if job.device.startswith("cuda") else []
                binds = [(workdir, str(workdir), False), (data, str(data), True)]
                cmd = [*bwrap_view(self.python, binds, devices, self.masked), *cmd]
            with open(workdir / "log.txt", "wb") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=workdir, env=self._env(workdir, job), start_new_session=True,
                                        preexec_fn=preexec, pass_fds=fds)
        with self._lock:
            self._running[proc.pid] = proc
        try:
            try:
                rc, killed = self._wait(proc, workdir, lim.timeout_s, workdir_cap(job, meta))
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
        if self.fs_isolated and 128 < rc < 128 + 65:  # bwrap's init reports a death by signal N as 128 + N
            rc = -(rc - 128)
        return rc, killed or ("closed" if closed else "")

    @staticmethod
    def _wait(proc: subprocess.Popen, workdir: Path, timeout_s: float, cap: int) -> tuple[int, str]:
        """Waits for the job, watching its work dir; on the deadline or past `cap` bytes the job
        is killed, and the second item says which ("timeout" / "output")."""
        def ended(seconds: float) -> bool:
            try:
                proc.wait(timeout=seconds)
                return True
            except subprocess.TimeoutExpired:
                return False

        killed = watch(ended, workdir, cap, timeout_s, POLL_S)
        if killed:
            kill_job(proc.pid)
        return proc.wait(), killed

    # -- warm workers --------------------------------------------------------------------------------------------

    def _launch(self, work_dir: Path, key: WorkerKey) -> "ProcessHandle":
        work_dir = work_dir.resolve()
        data = Path(key.dataset_dir)
        warm = [self.python, "-m", "deltanas.sandbox.warm"]
        inner = self._one_gpu(key.device)[1]
        log_path = work_dir.parent / f"{work_dir.name}.log"  # outside the dir the jobs can see
        env = self._base_env(work_dir, key.cpu_threads, seed=0, device=key.device)
        # The job's children inherit the worker's Landlock domain; its dir must be writable to them.
        with self._confined(work_dir, data, key.device, [(resource.RLIMIT_CORE, 0)]) as (preexec, fds, data_arg):
            if self.fs_isolated:  # inside, the worker's dirs sit at fixed paths, away from its private /tmp
                devices = _cuda_devices() if key.device.startswith("cuda") else []
                binds = [(work_dir, WARM_WORK, False), (data, WARM_DATA, True)]
                cmd = [*bwrap_view(self.python, binds, devices, self.masked), *warm, WARM_WORK, WARM_DATA, inner,
                       "--private-tmp"]
            else:
                cmd = [*warm, str(work_dir), data_arg, inner]
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([*cmd, *spare_flag(self.spare)], stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=work_dir, env=env, start_new_session=True,
                                        preexec_fn=preexec, pass_fds=fds)
        return ProcessHandle(proc, log_path, self.fs_isolated)

    def _job_limits(self, job: Job, meta: dict) -> dict:
        """The rlimits a warm worker puts on the job's child (memory: growth beyond the worker)."""
        lim = job.limits
        out = {"fsize": file_size_cap(lim, meta), "data_mb": int(lim.memory_mb),
               "cpu_s": int(lim.timeout_s * max(1, lim.cpu_threads)) + CPU_LIMIT_GRACE_S}
        if not job.device.startswith("cuda"):
            out["address_mb"] = int(lim.memory_mb) + WARM_ADDRESS_HEADROOM_MB
        if self._job_uid() is not None:
            out["nproc"] = proctree.user_task_count(self._job_uid()) + lim.max_processes
        return out

    def _rlimits(self, job: Job, meta: dict) -> list[tuple[int, int]]:
        lim = job.limits
        mb = 1 << 20
        fsize = file_size_cap(lim, meta)
        cpu = int(lim.timeout_s * max(1, lim.cpu_threads)) + CPU_LIMIT_GRACE_S
        out = [(resource.RLIMIT_DATA, lim.memory_mb * mb), (resource.RLIMIT_FSIZE, fsize),
               (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu)]
        if not job.device.startswith("cuda"):  # CUDA reserves huge address ranges; DATA still applies
            out.append((resource.RLIMIT_AS, (lim.memory_mb + TORCH_ADDRESS_HEADROOM_MB) * mb))
        if self._job_uid() is not None:
            out.append((resource.RLIMIT_NPROC, proctree.user_task_count(self._job_uid()) + lim.max_processes))
        return out

    def _job_uid(self) -> int | None:
        """The uid jobs run as, where RLIMIT_NPROC applies to it (the kernel exempts root)."""
        if self.job_user is not None:
            return self.job_user[0]
        return None if self.is_root else os.geteuid()

    @contextlib.contextmanager
    def _confined(self, work_dir: Path, data: Path | None, device: str, limits: list[tuple[int, int]],
                  confinement: Confinement | None = None) -> Iterator[tuple[Callable[[], None], tuple[int, ...], str]]:
        """How to start a worker: (its preexec_fn, the fds to pass it, the dataset dir as it names
        it). The Landlock ruleset and the dataset's fd live until the worker has started.

        A dropped uid may not be able to walk to the dataset handle (under root's 0700 $HOME, as
        the dataset cache is): it gets the handle as an open fd, /proc/self/fd/N."""
        c = self._confinement if confinement is None else confinement
        with contextlib.ExitStack() as stack:
            rules = stack.enter_context(self._ruleset(work_dir, data, device)) if c.landlock else None
            fds, data_arg = (), str(data) if data is not None else ""
            if c.user is not None and data is not None:
                fd = os.open(data, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                fds, data_arg = (fd,), f"/proc/self/fd/{fd}"
            yield functools.partial(_confine, limits, c, rules), fds, data_arg

    def _read_roots(self) -> list[Path]:
        """What a job reads besides its dataset: the system dirs, Python's prefixes, deltanas.sandbox,
        and a PYTHONPATH folder deltanas was installed in (`import_dirs`), each less the masked paths."""
        import deltanas.sandbox as pkg

        return [*(Path(d) for d in SYSTEM_DIRS), *python_roots(self.python), Path(pkg.__file__).resolve().parent,
                *import_dirs()]

    def _ruleset(self, work_dir: Path, data: Path | None, device: str) -> landlock.Ruleset:
        """The job's Landlock allow-list: read `_read_roots` minus the masked paths in them, the
        dataset handle (it may lie in a masked dataset cache; it holds no labels) and
        LANDLOCK_READ; write `work_dir` and /dev/null."""
        masked, roots = self.masked, [root for root in self._read_roots() if root.exists()]
        read = [p for root in roots for p in landlock.allowed_except(root, masked)]
        read += [*LANDLOCK_READ, *([data] if data is not None else [])]
        write = [work_dir, *LANDLOCK_WRITE]
        if device.startswith("cuda"):  # the driver reads the GPU's PCI details in /sys and drives its device files
            read.append("/sys")
            write += _cuda_devices()
            if self._job_uid() is not None:
                write.append("/proc")  # see CUDA_PROC
        listed = [p for root in roots for p in landlock.on_the_way(root, masked)]
        return landlock.Ruleset(read, write, listed=listed)

    def _hand_over(self, path: Path) -> None:
        """With the uid drop: gives the job's user a work dir (a job's, or a warm worker's with its
        control FIFOs) and its out/ and tmp/; the inputs stay root's, readable. Root reads
        back and removes what the job wrote."""
        if self.job_user is None:
            return
        for p in (path, path / "out", path / "tmp", path / "ctl.in", path / "ctl.out"):
            if p.exists():
                os.chown(p, *self.job_user)
        for p in (path / "model.py", path / "job.json"):
            if p.exists():
                p.chmod(0o644)

    def _env(self, workdir: Path, job: Job) -> dict[str, str]:
        env = self._base_env(workdir, job.limits.cpu_threads, job.seed, device=job.device)
        env["TMPDIR"] = str(workdir / "tmp")
        return env

    @staticmethod
    def _one_gpu(device: str) -> tuple[str | None, str]:
        return one_gpu(device, os.environ.get("CUDA_VISIBLE_DEVICES"))

    def _base_env(self, workdir: Path, cpu_threads: int, seed: int, device: str) -> dict[str, str]:
        # Only what Python, torch and CUDA need: API keys in the driver's env stay out.
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        visible = self._one_gpu(device)[0]
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        threads = str(max(1, cpu_threads))
        # The job's user by name: getpass.getuser() (torch asks it for its cache folders) reads these
        # before the passwd file, which Landlock keeps from the job (a GPU job died on the lookup).
        name = user_name(self._confinement.user[0] if self._confinement.user is not None else os.getuid())
        env.update(HOME=str(workdir), TMPDIR=str(workdir), USER=name, LOGNAME=name, OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, PYTHONHASHSEED=str(seed), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")
        if self.fs_isolated:
            env.update(PYTHONPATH=PACKAGE_VIEW, **{SANDBOX_INIT_ENV: "1"})
        return env


class ProcessHandle:
    """A warm worker started as a local process (under bwrap or unshare where available)."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, via_bwrap: bool):
        self.proc, self.log_path, self.via_bwrap = proc, log_path, via_bwrap

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_job(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        kill_job(self.proc.pid, tree=False)
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def exit_reason(self) -> str:
        rc = self.proc.poll()
        if rc is not None and self.via_bwrap and 128 < rc < 128 + 65:
            rc = -(rc - 128)
        try:
            tail = self.log_path.read_bytes()[-400:].decode("utf-8", "replace").strip().splitlines()
        except OSError:
            tail = []
        what = "still running" if rc is None else (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
        return what + (f"; last output: {tail[-1][:200]}" if tail else "")


def _apply_rlimits(limits: list[tuple[int, int]]) -> None:
    """Runs in the child between fork and exec: only setrlimit calls."""
    for which, value in limits:
        soft, hard = resource.getrlimit(which)
        cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (cap, cap))


@dataclasses.dataclass(frozen=True)
class Confinement:
    """The layers a worker starts under without bwrap."""

    landlock: bool = False
    user: tuple[int, int] | None = None  # the (uid, gid) root drops the job to
    netns: bool = False
    seccomp: bool = False


def _confine(limits: list[tuple[int, int]], c: Confinement, rules: landlock.Ruleset | None) -> None:
    """Runs in the child between fork and exec: the rlimits, then each layer of `c`, the uid
    drop before Landlock (whose rules the host opened as root), the seccomp filter last."""
    _apply_rlimits(limits)
    if rules is not None:  # first in line for the OOM killer: under Landlock a warm worker's child cannot say so
        try:
            _write_own("oom_score_adj", "1000")
        except OSError:
            pass
    if c.netns:  # root makes it before the drop; anyone else needs a user namespace for it
        _unshare_net(user_ns=c.user is None)
    if c.user is not None:
        os.setgroups([])
        os.setgid(c.user[1])
        os.setuid(c.user[0])
    if rules is not None:
        rules.enforce()
    if c.seccomp:
        seccomp.install()


def _unshare_net(user_ns: bool) -> None:
    """Moves this process into a network namespace of its own (loopback only). With `user_ns`,
    inside a user namespace of its own too, its ids mapped to themselves: root keeps no
    capability outside it."""
    uid, gid = os.getuid(), os.getgid()
    if _LIBC.unshare(CLONE_NEWNET | (CLONE_NEWUSER if user_ns else 0)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare: {os.strerror(code)}")
    if user_ns:
        _write_own("setgroups", "deny")  # an unprivileged gid_map needs it
        _write_own("uid_map", f"{uid} {uid} 1")
        _write_own("gid_map", f"{gid} {gid} 1")


def _write_own(name: str, text: str) -> None:
    fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _closed_on_the_way(user: tuple[int, int], paths: list[Path]) -> str:
    """The first folder on the way to one of `paths` that `user` may not walk through, as
    "PATH (mode 0700) is on the way to TARGET"; "" if none is."""
    uid, gid = user
    for target in paths:
        for folder in [*reversed(Path(target).parents), Path(target)]:
            try:
                st = folder.stat()
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
            if not st.st_mode & bit:
                return f"{folder} (mode {stat.S_IMODE(st.st_mode):04o}) is on the way to {target}"
    return ""
