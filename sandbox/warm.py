"""The warm worker: stays up across candidates and runs each one in a fresh child process.

    python -m deltanas.sandbox.warm WORK_DIR DATASET_DIR DEVICE [--private-tmp] [--spare | --no-spare]

It runs inside the same isolation as a one-shot worker (a bubblewrap view or a
container), pays Python's and torch's start-up once, loads the dataset once,
and then serves jobs one at a time. Each job runs in a fresh forked child, which:

- drops the control channel, starts its own session and offers itself first to
  the out-of-memory killer;
- sends its output to the job's log.txt and takes the job's rlimits (data and
  address-space growth, file size, CPU time, processes, no core dumps);
- runs the one-shot worker's code on the job dir (`worker.serve`), on its
  copy-on-write view of the dataset. CUDA cannot survive a fork, so on a GPU
  the parent keeps the dataset in host memory and the child moves it over.

On a GPU (or with --spare) the child is a spare, forked ahead of its job: while
jobs train, the next SPARES children already create their CUDA context, move
the dataset to the device and run warm-up steps, then wait for their job on a
socket. So a job's overhead no longer includes the CUDA start-up and the first
use of cuDNN and cuBLAS (1.5-2.0 s on an H200, longer than a small CNN's whole
job of 0.4-0.6 s, hence three of them: behind such jobs one spare at a time was
still readying when its job came, and 32 of them ran at 3,429 per hour with two
spares, 4,439 with three and 4,546 with four; bench/RESULTS.md). Unless its job
is already waiting, a spare also warms a ResNet-class network's step at the
last job's batch size and at the epoch's last, smaller batch
(`device_setup.warm_up_wide`): cuDNN loads kernels per shape on first use. A spare is
forked from this parent, never from a candidate, is not dumpable (another
candidate cannot ptrace it), and is left alone by the clean-up after a job. If a
candidate kills one, the next job goes to another or to a fresh child.

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

from deltanas.sandbox import device_setup, outcome, proctree, training, worker
from deltanas.sandbox.sizing import SPARES

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


def _detach(channel: Channel) -> None:
    """The first steps of a forked child: off the control channel and the other spares' sockets
    (a candidate must not be able to hand a spare a job of its own making), its own session, dies
    with this worker, first in line for the out-of-memory killer, default signal handling."""
    channel.close_in_child()
    for end in list(_SPARE_ENDS):
        end.close()
    _SPARE_ENDS.clear()
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # not inherited: the child dies with this worker
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


def _after_fork() -> None:
    """In a freshly forked child, before any other thread of it starts: torch's CPU thread pool,
    rebuilt once on this thread. After fork() torch rebuilds it on first use, and two threads that
    get there together race: on a machine with two GPUs, backward's two device threads did, and
    one aborted the child ("Invalid thread pool!", SIGABRT) in a spare's warm-up (2 H200s,
    torch 2.11, 2026-11-29)."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


def _child(channel: Channel, job_dir: str, dataset_dir: str, data, msg: dict) -> None:
    """Runs in the forked child; never returns."""
    try:
        _detach(channel)
        _after_fork()
        _run_job(job_dir, dataset_dir, data, msg)
    except BaseException:  # noqa: BLE001 - no result file: the host reports a crash
        _print_exc()
    os._exit(70)


def _print_exc() -> None:
    try:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass


def _run_job(job_dir: str, dataset_dir: str, data, msg: dict, note: str = "") -> None:
    """The job in this child: output to its log, its dir and limits, then the worker's code."""
    outcome._STARTED = time.monotonic()
    log_fd = os.open(os.path.join(job_dir, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(null)
    os.environ.update(HOME=job_dir, TMPDIR=os.path.join(job_dir, "tmp"))
    os.chdir(job_dir)
    _set_limits(msg)
    if note:
        outcome.log(note)
    worker.serve(job_dir, dataset_dir, data)


_SPARE_ENDS: set = set()  # this worker's ends of its spares' sockets


class Spare:
    """A child forked ahead of its job (see the module's docstring). The parent keeps one end of
    a socket pair; the job's message goes down it."""

    def __init__(self, channel: Channel, dataset_dir: str, data, device: str, batch: int | None):
        import socket

        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            parent_end.close()
            self._serve(channel, child_end, dataset_dir, data, device, batch)
        child_end.close()
        self.sock = parent_end
        _SPARE_ENDS.add(parent_end)

    def _close(self) -> None:
        _SPARE_ENDS.discard(self.sock)
        self.sock.close()

    @staticmethod
    def _serve(channel: Channel, sock, dataset_dir: str, data, device: str, batch: int | None) -> None:
        """The spare's life: ready its device (for jobs of `batch` images per step, the last
        job's), wait for a job, run it; never returns."""
        try:
            _detach(channel)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)  # stdout and stderr stay the worker's log until the job's takes over
            os.close(null)
            import faulthandler

            faulthandler.enable()  # a fatal signal while readying leaves its Python stack there
            _after_fork()
            t0 = time.monotonic()
            data, ready = _ready_device(data, device, batch, lambda: bool(select.select([sock], [], [], 0)[0]))
            readied = time.monotonic()
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(MAX_LINE)
                if not chunk or len(buf) > MAX_LINE:
                    os._exit(0)  # the worker is gone, or never sent a job
                buf += chunk
            sock.close()
            msg = json.loads(buf)
            note = (f"spare child: readied ahead of its job in {readied - t0:.2f}s ({ready}), "
                    f"then waited {time.monotonic() - readied:.2f}s for it")
            _run_job(msg["dir"], dataset_dir, data, msg, note)
        except BaseException:  # noqa: BLE001 - no result file: the host reports a crash
            _print_exc()
        os._exit(70)

    def alive(self) -> bool:
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0

    def start(self, job_dir: str, msg: dict) -> bool:
        """Hands the job over; False if the spare is gone (killed by an earlier candidate)."""
        import socket

        if not self.alive():
            self._close()
            return False
        try:
            os.kill(self.pid, signal.SIGCONT)  # an earlier candidate may have stopped it
            self.sock.sendall((json.dumps({**msg, "dir": job_dir}) + "\n").encode(), socket.MSG_NOSIGNAL)
        except OSError:
            return False
        finally:
            self._close()
        return True

    def discard(self) -> None:
        try:
            self._close()
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (OSError, ChildProcessError):
            pass


def _batch_size(job_dir: str) -> int | None:
    """The batch size in a job's job.json (written by the host; read before the job runs)."""
    try:
        with open(os.path.join(job_dir, "job.json"), encoding="utf-8") as f:
            value = json.load(f).get("batch_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _ready_device(data, device: str, batch: int | None, job_waiting):
    """In a spare: the CUDA context, the dataset on the device and the warm-up steps, before any
    job; returns (the data, what was done). The wide warm-up (for a ResNet-class network at
    `batch`, the step's batch size it expects) comes last, and only while `job_waiting()` is
    false: behind jobs shorter than a spare's readying (a small CNN's) it would delay them more
    than it saves. On failure the host copy is kept and the job's own set-up meets (and reports)
    the error."""
    try:
        import torch

        dev = torch.device(device)
        if dev.type != "cuda":
            return data, "nothing to ready on the CPU"
        t0 = time.perf_counter()
        device_setup.use_device(dev)
        torch.empty(1, device=dev)
        t1 = time.perf_counter()
        on_device = data.to(dev)
        torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        device_setup.warm_up(dev)
        t3 = time.perf_counter()
        if job_waiting():
            return on_device, (f"on {dev}: CUDA context {t1 - t0:.2f}s, dataset {t2 - t1:.2f}s, "
                               f"warm-up steps {t3 - t2:.2f}s, no wide warm-up (its job was waiting)")
        wide = device_setup.warm_up_wide(dev, batch, len(on_device.y_train), len(on_device.x_test))
        t4 = time.perf_counter()
        return on_device, (f"on {dev}: CUDA context {t1 - t0:.2f}s, dataset {t2 - t1:.2f}s, "
                           f"warm-up steps {t3 - t2:.2f}s, wide ({wide}) {t4 - t3:.2f}s")
    except BaseException as exc:  # noqa: BLE001 - see the docstring
        return data, f"readying {device} failed: {outcome.describe(exc)}"


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def clean_up(private_tmp: bool, keep: frozenset[int] = frozenset()) -> bool:
    """Kills every process the candidate left and reaps it; True when none is left. `keep`: the
    spares waiting for the next jobs (forked by this worker, not by the candidate)."""
    for _ in range(KILL_ROUNDS):
        live = [pid for pid, state in proctree.descendants(os.getpid(), keep).items() if state != "Z"]
        _reap()
        if not live:
            break
        for pid in live:
            proctree.sigkill(pid)
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


def serve_jobs(channel: Channel, work_dir: str, dataset_dir: str, data, private_tmp: bool,
               device: str | None = None) -> None:
    """Runs jobs until the driver closes the channel. `device`: keep SPARES children ready on it."""
    spares: list[Spare] = []
    try:
        _serve_jobs(channel, work_dir, dataset_dir, data, private_tmp, device, spares)
    finally:
        for spare in spares:
            spare.discard()


def _serve_jobs(channel, work_dir, dataset_dir, data, private_tmp, device, spares: list) -> None:
    batch = None  # the last job's batch size: the next spares warm its shapes

    def top_up() -> None:
        while device and len(spares) < SPARES:
            spares.append(Spare(channel, dataset_dir, data, device, batch))

    top_up()
    while True:
        msg = channel.read()
        if msg is None:
            return
        name = str(msg.get("job", ""))
        if not JOB_NAME.match(name) or not os.path.isdir(os.path.join(work_dir, name)):
            channel.send({"job": name, "rc": None, "killed": "", "clean": True, "error": "no such job"})
            continue
        job_dir = os.path.join(work_dir, name)
        batch = _batch_size(job_dir) or batch
        pid = None
        while spares and pid is None:  # the oldest spare is the readiest
            spare = spares.pop(0)
            if spare.start(job_dir, msg):
                pid = spare.pid
            else:
                spare.discard()
        if pid is None:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(channel, job_dir, dataset_dir, data, msg)
        top_up()  # the next jobs' children ready while this one runs
        status, killed = _wait_child(channel, pid, float(msg["timeout_s"]))
        if status is None:
            proctree.sigkill(pid, group=True)
            proctree.sigkill(pid)
            _, status = os.waitpid(pid, 0)
        clean = clean_up(private_tmp, keep=frozenset(sp.pid for sp in spares))
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
    data = training.load_data(dataset_dir, torch.device("cpu"))
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
    flags = {a for a in argv if a.startswith("--")}
    work_dir, dataset_dir, device = [a for a in argv if not a.startswith("--")]
    private_tmp = "--private-tmp" in flags
    spare = "--spare" in flags or (device.startswith("cuda") and "--no-spare" not in flags)
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
        channel.send({"error": outcome.describe(exc)})
        return
    channel.send({"ready": True, "pid": os.getpid(), "torch": torch.__version__, "device": device, "spare": spare,
                  "load_s": round(load_s, 3), "startup_s": round(time.monotonic() - outcome._STARTED, 3)})
    serve_jobs(channel, work_dir, dataset_dir, data, private_tmp, device if spare else None)
    clean_up(private_tmp)


if __name__ == "__main__":
    if len([a for a in sys.argv[1:] if not a.startswith("--")]) != 3:
        sys.stderr.write("usage: python -m deltanas.sandbox.warm WORK_DIR DATASET_DIR DEVICE [--private-tmp] "
                         "[--spare | --no-spare]\n")
        sys.exit(2)
    main(sys.argv[1:])
    os._exit(0)
