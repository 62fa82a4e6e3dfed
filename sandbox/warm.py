"""The warm worker: stays up across candidates and runs each one in a fresh child process.

    python -m deltanas.sandbox.warm WORK_DIR DATASET_DIR DEVICE [--private-tmp]

It runs inside the same isolation as a one-shot worker (a bubblewrap view or a
container), pays Python's and torch's start-up once, loads the dataset once,
and then serves jobs one at a time. For each job it forks a child, which:

- drops the control channel, starts its own session and offers itself first to
  the out-of-memory killer;
- sends its output to the job's log.txt and takes the job's rlimits (data and
  address-space growth, file size, CPU time, processes, no core dumps);
- runs the one-shot worker's code on the job dir (`worker.serve`), on its
  copy-on-write view of the dataset. CUDA cannot survive a fork, so on a GPU
  the parent keeps the dataset in host memory and the child moves it over.

The parent never runs candidate code. It is a child subreaper, so whatever the
candidate leaves behind (daemons, double forks, a fork bomb) is re-parented to
it and killed before the next job starts; with --private-tmp (its /tmp and /dev/shm are the
sandbox's own) it also empties /tmp. If it cannot get back to a clean state, it
says so and exits, and the host starts a fresh worker.

Control: two FIFOs in WORK_DIR, `ctl.in` and `ctl.out`, made by the host,
which unlinks them once this worker is ready; the worker is not dumpable, so a
candidate of the same user cannot reopen them through /proc. Messages are JSON
lines. Out: {"ready": ...} or {"error": ...} once, then one reply per job:
{"job", "rc" (exit status; -N: signal N), "killed" ("" | "timeout" | "cancel"),
"clean"}. In: {"job": NAME, "timeout_s", "fsize", "cpu_s", "data_mb", "nproc",
"address_mb"} to start one, {"cancel": true} to kill the running one. The end
of `ctl.in` (the driver closed it or died) ends this worker and its child.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import sys
import time

from deltanas.sandbox import worker

JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
MAX_LINE = 64 * 1024
KILL_ROUNDS = 200  # sweeps of the leftover processes before the worker gives up on itself
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36


class Channel:
    """JSON lines over the two control FIFOs."""

    def __init__(self, work_dir: str):
        self.rfd = os.open(os.path.join(work_dir, "ctl.in"), os.O_RDONLY)
        self.wfd = os.open(os.path.join(work_dir, "ctl.out"), os.O_WRONLY)
        self.buf = b""

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(self.wfd, data):]

    def has_line(self) -> bool:
        return b"\n" in self.buf

    def pump(self) -> bool:
        """Reads what is there; False at the end of the stream (the driver is gone)."""
        chunk = os.read(self.rfd, 65536)
        if not chunk:
            return False
        self.buf += chunk
        if len(self.buf) > MAX_LINE and b"\n" not in self.buf:
            raise ValueError("control line too long")
        return True

    def take(self) -> dict:
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("control message is not an object")
        return msg

    def read(self) -> dict | None:
        while not self.has_line():
            if not self.pump():
                return None
        return self.take()

    def close_in_child(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def _prctl(option: int, value: int) -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _vm_kb(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _set_limits(msg: dict) -> None:
    """The job's rlimits, on top of what this process already maps (the child inherits
    the worker's torch and dataset; only growth beyond that is the candidate's)."""
    import resource

    mb = 1 << 20

    def cap(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_FSIZE, int(msg["fsize"]))
    cap(resource.RLIMIT_CPU, int(msg["cpu_s"]))
    cap(resource.RLIMIT_DATA, _vm_kb("VmData") * 1024 + int(msg["data_mb"]) * mb)
    if msg.get("address_mb"):
        cap(resource.RLIMIT_AS, _vm_kb("VmSize") * 1024 + int(msg["address_mb"]) * mb)
    if msg.get("nproc"):
        cap(resource.RLIMIT_NPROC, int(msg["nproc"]))


def _child(channel: Channel, job_dir: str, dataset_dir: str, data, msg: dict) -> None:
    """Runs in the forked child; never returns."""
    try:
        channel.close_in_child()
        os.setsid()
        worker._STARTED = time.monotonic()
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # not inherited: the child dies with this worker
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        log_fd = os.open(os.path.join(job_dir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null)
        tmp = os.path.join(job_dir, "tmp")
        os.environ.update(HOME=job_dir, TMPDIR=tmp)
        os.chdir(job_dir)
        _set_limits(msg)
        worker.serve(job_dir, dataset_dir, data)
    except BaseException:  # noqa: BLE001 - no result file: the host reports a crash
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(70)


def _descendants() -> tuple[list[int], list[int]]:
    """(live, zombie) processes below this one, found through /proc."""
    me = os.getpid()
    parent: dict[int, int] = {}
    state: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(name)], state[int(name)] = int(rest[1]), rest[0]
    below, frontier = [], [me]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        below += kids
        frontier += kids
    return [p for p in below if state[p] != "Z"], [p for p in below if state[p] == "Z"]


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def clean_up(private_tmp: bool) -> bool:
    """Kills every process the candidate left and reaps it; True when none is left."""
    for _ in range(KILL_ROUNDS):
        live, _zombies = _descendants()
        _reap()
        if not live:
            break
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)
    else:
        return False
    _reap()
    if private_tmp:  # the sandbox's own tmpfs mounts, which outlive a job
        wipe("/tmp")
        wipe("/dev/shm")
    return True


def wipe(root: str) -> None:
    """Empties `root` without crossing into another filesystem (a bind mount below it)."""
    try:
        dev = os.lstat(root).st_dev
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
            if st.st_dev != dev or os.path.ismount(e.path):
                continue
            if e.is_dir(follow_symlinks=False):
                wipe(e.path)
                os.rmdir(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            continue


def _wait_child(channel: Channel, pid: int, timeout_s: float) -> tuple[int | None, str]:
    """Waits for the child; returns (raw wait status or None, "" | "timeout" | "cancel" | "gone")."""
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(channel.rfd, select.POLLIN | select.POLLHUP)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, ""
            left = deadline - time.monotonic()
            if left <= 0:
                return None, "timeout"
            wait_ms = int(min(left, 1.0 if pidfd is not None else 0.01) * 1000) + 1
            for fd, _ev in poller.poll(wait_ms):
                if fd == channel.rfd:
                    if not channel.pump():
                        return None, "gone"
                    while channel.has_line():
                        if channel.take().get("cancel"):
                            return None, "cancel"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def serve_jobs(channel: Channel, work_dir: str, dataset_dir: str, data, private_tmp: bool) -> None:
    while True:
        msg = channel.read()
        if msg is None:
            return
        name = str(msg.get("job", ""))
        if not JOB_NAME.match(name) or not os.path.isdir(os.path.join(work_dir, name)):
            channel.send({"job": name, "rc": None, "killed": "", "clean": True, "error": "no such job"})
            continue
        job_dir = os.path.join(work_dir, name)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(channel, job_dir, dataset_dir, data, msg)
        status, killed = _wait_child(channel, pid, float(msg["timeout_s"]))
        if status is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status = os.waitpid(pid, 0)
        clean = clean_up(private_tmp)
        if killed == "gone":
            return
        channel.send({"job": name, "rc": os.waitstatus_to_exitcode(status), "killed": killed, "clean": clean})
        if not clean:
            return


def prepare_for_fork(dataset_dir: str):
    """Imports torch, loads the dataset into host memory and pays torch's lazy imports, without
    anything that does not survive fork(): no CUDA context (a GPU's dataset waits in host
    memory), no autograd engine threads, no intra-op thread pool."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without a CUDA context
    import torch

    torch.set_num_threads(1)  # each child sizes its own pool
    data = worker.load_data(dataset_dir, torch.device("cpu"))
    # The optimizer's first step imports torch._dynamo (~1 s); grads set by hand keep autograd out.
    conv = torch.nn.Conv2d(1, 2, 3)
    for p in conv.parameters():
        p.grad = torch.zeros_like(p)
    torch.optim.SGD(conv.parameters(), lr=0.0, momentum=0.9).step()
    with torch.no_grad():
        conv(torch.zeros(1, 1, 4, 4))
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before fork(); GPU jobs would fail in the child")
    return data


def main(argv: list[str]) -> None:
    private_tmp = "--private-tmp" in argv
    work_dir, dataset_dir, device = [a for a in argv if a != "--private-tmp"]
    worker.die_with_driver()
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    channel = Channel(work_dir)
    try:
        t0 = time.perf_counter()
        data = prepare_for_fork(dataset_dir)
        load_s = time.perf_counter() - t0
        import torch
    except BaseException as exc:  # noqa: BLE001 - the host reports it as the worker's failure
        channel.send({"error": worker._describe(exc)})
        return
    channel.send({"ready": True, "pid": os.getpid(), "torch": torch.__version__, "device": device,
                  "load_s": round(load_s, 3), "startup_s": round(time.monotonic() - worker._STARTED, 3)})
    serve_jobs(channel, work_dir, dataset_dir, data, private_tmp)
    clean_up(private_tmp)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.stderr.write("usage: python -m deltanas.sandbox.warm WORK_DIR DATASET_DIR DEVICE [--private-tmp]\n")
        sys.exit(2)
    main(sys.argv[1:])
    os._exit(0)
