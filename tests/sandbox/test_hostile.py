"""Hostile candidates against every sandbox: the process and docker backends, each with warm
workers (the default) and with one fresh worker per job.

Each case ends in its exact typed status, leaves no process behind, cannot raise its own
score or reach what it must not see, and the sandbox stays usable for the next candidate.
The docker sandboxes skip, saying why, where no Docker daemon answers or the image is
missing (CI starts the engine and builds the image first); after them no container
labelled `deltanas` is left.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from deltanas.sandbox import pool
from deltanas.sandbox.base import Job, JobSpec, Limits
from deltanas.tools.proxy import evaluate_source

from support import noise, write_handle

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 256, 128
LIMITS = Limits(timeout_s=60, memory_mb=2048, cpu_threads=1)
HANG = Limits(timeout_s=6, memory_mb=2048, cpu_threads=1, max_processes=32)
SECRET = "s3cret-token-of-the-driver"
PROJECT = Path(__file__).resolve().parents[2]

NET_HEADER = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])
'''
GOOD = NET_HEADER + '''
    def forward(self, x):
        return self.fc(x.flatten(1))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = noise(N_TRAIN, N_TEST, seed=1)
    return ds, write_handle(ds, tmp_path_factory.mktemp("handle"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    """Stands in for a run directory and the host's dataset cache: an archive, and the test
    labels as a plain .npy a candidate might try to read or to pass off as its predictions."""
    d = tmp_path_factory.mktemp("run")
    (d / "archive.sqlite").write_text("secret archive")
    np.save(d / "test_labels.npy", data[0].y_test)
    return d


def _docker_ready() -> str:
    from deltanas.sandbox.docker import DEFAULT_IMAGE, docker_available, image_available

    ok, why = docker_available()
    if not ok:
        return f"docker sandbox tests need a Docker daemon: {why}"
    if not image_available(DEFAULT_IMAGE):
        return f"docker sandbox tests need the image {DEFAULT_IMAGE} (`deltanas sandbox build`)"
    return ""


@pytest.fixture(scope="module", params=["process", "process-cold", "process-spare", "docker", "docker-cold"])
def sandbox(request, run_dir):
    os.environ["DELTANAS_TEST_SECRET"] = SECRET  # the driver's environment must not reach a job
    kind, _, mode = request.param.partition("-")
    warm = mode != "cold"
    spare = True if mode == "spare" else None  # on the CPU a warm worker readies no spare unless told to
    if kind == "docker":
        why = _docker_ready()
        if why:
            pytest.skip(why)
        from deltanas.sandbox.docker import DockerSandbox

        sb = DockerSandbox(run_dir / f".work-{request.param}", warm=warm, spare=spare)
    else:
        from deltanas.sandbox.process import ProcessSandbox

        sb = ProcessSandbox(run_dir / f".work-{request.param}", warm=warm, spare=spare)
    yield sb
    sb.close()
    os.environ.pop("DELTANAS_TEST_SECRET", None)
    if kind == "docker":
        import docker

        from deltanas.sandbox.docker import LABEL

        left = docker.from_env().containers.list(all=True, filters={"label": f"{LABEL}=1"})
        assert left == [], f"containers left behind: {[c.name for c in left]}"


def run(sandbox, data, source, limits=LIMITS, **kw):
    ds, handle = data
    return sandbox.run(Job(candidate_id="hostile", source=source, dataset_dir=str(handle), batch_size=64,
                           limits=limits, **kw))


def started(sandbox, data, limits) -> None:
    """Runs a good job under `limits` first, so a warm worker for them is up (and its spare
    readied) before a test times how fast a job is killed: what is timed is the kill, not
    the start of a worker, which takes several seconds on a loaded two-core machine."""
    assert run(sandbox, data, GOOD, limits=limits).status == "ok"


def probe(body: str) -> str:
    """A candidate that reports what it saw through its error line, then stops."""
    return "import os, socket\nseen = []\n" + body + "\nraise RuntimeError('SEEN ' + ' | '.join(seen))\n"


def fs_isolated(sandbox) -> bool:
    return sandbox.name == "docker" or sandbox.fs_isolated


def need_fs_isolation(sandbox) -> None:
    if not fs_isolated(sandbox):
        pytest.skip("the process backend without bubblewrap has no filesystem or PID isolation "
                    "(isolation() says so)")


# Tests of the warm worker, also with spare children readied ahead of the jobs (on the CPU only when asked for).
WARM_ONLY = pytest.mark.parametrize("sandbox", ["process", "process-spare", "docker", "docker-spare"], indirect=True)


# -- processes: the candidate prints "PROC pid pgid pid-namespace" for each of its processes ------------------------

PROC_LINE = 'print("PROC", os.getpid(), os.getpgid(0), os.readlink("/proc/self/ns/pid"), flush=True)'
_PROC_RE = re.compile(r"^PROC (\d+) (\d+) (\S+)$")


def procs(log_tail: str) -> list[tuple[int, int, str]]:
    """Well-formed PROC lines only: a fork bomb's children interleave their prints."""
    found = (_PROC_RE.match(line) for line in log_tail.splitlines())
    return [(int(m[1]), int(m[2]), m[3]) for m in found if m]


def _live() -> list[tuple[str, int, int, int]]:
    """(pid namespace, pid inside it, host pid, process group) of every live process."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] in ("Z", "X"):
                continue
            ns = os.readlink(f"/proc/{p}/ns/pid")
            nspid = re.search(r"^NSpid:\s+(.*)$", Path(f"/proc/{p}/status").read_text(), re.M)
            inner = int(nspid.group(1).split()[-1]) if nspid else int(p)
            out.append((ns, inner, int(p), int(stat[2])))
        except (OSError, ValueError, IndexError):
            continue
    return out


def all_ended(rows, within: float = 5.0) -> bool:
    """None of the candidate's processes is alive: matched by pid inside its namespace, or by
    host pid and process group where it shares the host's."""
    host_ns = os.readlink("/proc/self/ns/pid")
    wanted = {(ns, pid) for pid, _, ns in rows}
    groups = {pgid for _, pgid, ns in rows if ns == host_ns}
    deadline = time.monotonic() + within
    while True:
        live = [x for x in _live() if (x[0], x[1]) in wanted or (x[0] == host_ns and x[3] in groups)]
        if not live or time.monotonic() > deadline:
            return not live
        time.sleep(0.1)


# -- the suite ---------------------------------------------------------------------------------------------------

def test_syntax_error_is_invalid(sandbox, data):
    r = run(sandbox, data, "def broken(:\n    pass\n")
    assert r.status == "invalid" and "SyntaxError" in r.error


def test_import_time_exception_is_crashed(sandbox, data):
    r = run(sandbox, data, "raise ValueError('boom at import')\n")
    assert r.status == "crashed"
    assert "ValueError: boom at import" in r.error


def test_missing_net_is_invalid(sandbox, data):
    r = run(sandbox, data, "import torch\nNetwork = 1\n")
    assert r.status == "invalid" and "Net" in r.error


def test_wrong_output_shape_is_invalid_and_a_shape_mismatch_crashes(sandbox, data):
    src = NET_HEADER + '''
    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out if self.training else out[:, :3]
'''
    r = run(sandbox, data, src)
    assert r.status == "invalid" and "logits must have shape" in r.error
    src = NET_HEADER + "\n    def forward(self, x):\n        return self.fc(x.flatten(1)[:, :100])\n"
    r = run(sandbox, data, src)
    assert r.status == "crashed" and "train:" in r.error and "shape" in r.error, r.error


def test_infinite_loop_at_import_is_killed_fast(sandbox, data):
    src = f"import os\n{PROC_LINE}\nwhile True:\n    pass\n"
    started(sandbox, data, HANG)
    t0 = time.monotonic()
    r = run(sandbox, data, src, limits=HANG)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < HANG.timeout_s + 5
    rows = procs(r.log_tail)
    assert len(rows) == 1, r.log_tail
    assert all_ended(rows)


def test_children_ignoring_sigterm_or_leaving_the_group_are_killed(sandbox, data):
    src = f'''
import os, signal, time
for escape in (False, True):
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if escape:
            os.setsid()
        {PROC_LINE}
        while True:
            time.sleep(1)
time.sleep(3600)
'''
    r = run(sandbox, data, src, limits=HANG)
    assert r.status == "timeout"
    rows = procs(r.log_tail)
    assert len(rows) == 2, r.log_tail
    assert all_ended(rows)


def test_fork_bomb_ends_and_leaves_no_process(sandbox, data):
    """Bounded at 2**6 processes so that it is safe where RLIMIT_NPROC does not apply (root)."""
    src = f'''
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(6):
    try:
        os.fork()
    except OSError:
        break
{PROC_LINE}
while True:
    time.sleep(1)
'''
    r = run(sandbox, data, src, limits=HANG)
    assert r.status in ("timeout", "crashed")
    rows = procs(r.log_tail)
    assert rows, r.log_tail
    assert all_ended(rows)


def test_unbounded_allocation_is_oom(sandbox, data):
    src = "hoard = []\nwhile True:\n    hoard.append(bytearray(64 << 20))\n"
    r = run(sandbox, data, src, limits=Limits(timeout_s=60, memory_mb=1536, cpu_threads=1))
    assert r.status == "oom", r.error
    src = GOOD.replace("super().__init__()", "super().__init__()\n        torch.empty(1 << 34, dtype=torch.uint8)")
    r = run(sandbox, data, src, limits=Limits(timeout_s=60, memory_mb=1536, cpu_threads=1))
    assert r.status == "oom", r.error


def test_a_gigabyte_of_stdout_hits_the_output_limit(sandbox, data):
    src = "import sys\nline = 'x' * (1 << 20) + '\\n'\nfor _ in range(1024):\n    sys.stdout.write(line)\n"
    limits = Limits(timeout_s=60, memory_mb=2048, cpu_threads=1, max_output_bytes=200_000)
    r = run(sandbox, data, src, limits=limits)
    assert r.status == "output_limit", r.error
    assert len(r.log_tail) <= 2048


def test_many_small_files_hit_the_work_dir_cap(sandbox, data):
    """Each file stays under the per-file cap; the job's files as a whole do not."""
    src = ("import time\nfor i in range(100000):\n    open(f'f{i}', 'w').write('x' * 150_000)\ntime.sleep(60)\n")
    limits = Limits(timeout_s=30, memory_mb=2048, cpu_threads=1, max_output_bytes=200_000)
    r = run(sandbox, data, src, limits=limits)
    assert r.status == "output_limit", r.error


def test_nan_loss_is_diverged(sandbox, data):
    src = NET_HEADER + "\n    def forward(self, x):\n        return self.fc(x.flatten(1)) * float('nan')\n"
    r = run(sandbox, data, src)
    assert r.status == "diverged", r.error


def test_cuda_without_cuda_is_a_clear_crash(sandbox, data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run(sandbox, data, GOOD, device="cuda:0")
    assert r.status == "crashed"
    assert "cuda" in r.error.lower()


def test_fake_metrics_and_monkeypatching_cannot_raise_the_score(sandbox, data):
    """Prints a perfect score, rebinds json/numpy/os writers and the worker's own functions,
    and predicts class 0 throughout."""
    ds, handle = data
    src = '''
import json, os, sys
import numpy
import torch
import torch.nn as nn

print("accuracy: 1.0")
print('{"status": "ok", "accuracy": 1.0}')
FAKE = '{"status": "ok", "accuracy": 1.0, "param_count": 1}'
json.dumps = lambda *a, **k: FAKE
json.dump = lambda obj, fp, *a, **k: fp.write(FAKE)
json.JSONEncoder.encode = lambda self, o: FAKE
def fake_save(file, arr, *a, **k):
    numpy.lib.format.write_array(open(file, "wb"), numpy.arange(7))
numpy.save = fake_save
os.write = lambda fd, data: len(data)
worker = sys.modules.get("deltanas.sandbox.worker")
if worker is not None:
    worker.score = lambda *a, **k: 1.0
    worker.predict = lambda *a, **k: numpy.arange(7)
torch.Tensor.argmax = lambda self, *a, **k: torch.zeros(len(self), dtype=torch.int64)


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("bias", torch.eye(out_shape[0])[0] * 10)

    def forward(self, x):
        return self.bias.expand(len(x), -1) + self.w * 0
'''
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, candidate_id="liar",
                          spec=JobSpec(str(handle), limits=LIMITS, batch_size=64))
    # Either the patched worker fails the job, or its honest predictions are scored on the host.
    if out.status == "ok":
        assert out.accuracy == pytest.approx(float(np.mean(ds.y_test == 0)))
    else:
        assert out.status == "invalid" and out.accuracy is None, out.error
    assert out.accuracy is None or out.accuracy < 0.5


def test_forged_result_files_are_invalid(sandbox, data):
    ds, handle = data
    src = '''
import json, os
import numpy as np
json.dump({"status": "ok", "accuracy": 1.0, "param_count": 5}, open("out/result.json", "w"))
np.save("out/predictions.npy", np.zeros(5, dtype=np.int64))
os._exit(0)
'''
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, candidate_id="forger",
                          spec=JobSpec(str(handle), limits=LIMITS))
    assert out.status == "invalid" and out.accuracy is None
    assert "shape" in out.error
    src = src.replace("np.zeros(5, dtype=np.int64)", f"np.full({N_TEST}, 99, dtype=np.int64)")
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, candidate_id="forger",
                          spec=JobSpec(str(handle), limits=LIMITS))
    assert out.status == "invalid" and "[0, 10)" in out.error


def test_predictions_linked_to_the_hosts_labels_are_refused(sandbox, data, run_dir):
    """The host must not follow a link the job planted: here, to the true test labels."""
    ds, handle = data
    labels = run_dir / "test_labels.npy"
    src = f'''
import json, os
os.symlink({str(labels)!r}, "out/predictions.npy")
os.symlink({str(labels)!r}, "log.txt") if not os.path.exists("log.txt") else None
open("out/result.json", "w").write('{{"status": "ok", "param_count": 1}}')
os._exit(0)
'''
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, candidate_id="linker",
                          spec=JobSpec(str(handle), limits=LIMITS))
    assert out.status == "invalid" and out.accuracy is None, (out.status, out.accuracy, out.error)
    assert "plain file" in out.error
    src = src.replace('os.symlink({!r}, "out/predictions.npy")'.format(str(labels)), 'os.mkfifo("out/predictions.npy")')
    t0 = time.monotonic()
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, candidate_id="fifo",
                          spec=JobSpec(str(handle), limits=LIMITS))
    assert out.status == "invalid" and "not a regular file" in out.error
    assert time.monotonic() - t0 < 30


def test_network_is_unreachable_inside(sandbox, data):
    if not sandbox.network_isolated:
        pytest.skip("unshare cannot make a network namespace here; the job would have network")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    r = run(sandbox, data, probe(f'''
seen.append("ifaces=" + ",".join(sorted(n for _, n in socket.if_nameindex())))
for host, port in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("172.17.0.1", 53)):
    try:
        socket.create_connection((host, port), timeout=3)
        seen.append(host + " connected")
    except OSError as e:
        seen.append(host + " blocked")
'''))
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert r.status == "crashed"
    assert "SEEN ifaces=lo | 127.0.0.1 blocked | 1.1.1.1 blocked | 172.17.0.1 blocked" in r.error, r.error


def test_writes_outside_the_work_dir_are_refused(sandbox, data, run_dir):
    """Read-only mounts refuse; a path the job's view lacks lands, at most, in its private /tmp."""
    need_fs_isolation(sandbox)
    venv_cfg = Path(os.sys.prefix) / "pyvenv.cfg"
    targets = ["/usr/evil", str(venv_cfg) + ".evil", str(Path(data[1]) / "evil"), str(PROJECT / "evil"),
               "/deltanas/pkg/evil.py", str(run_dir / "archive.sqlite")]
    r = run(sandbox, data, probe(f'''
for target in {targets!r}:
    try:
        open(target, "a").write("x")
        seen.append("wrote")
    except OSError as e:
        seen.append("refused")
seen.append("uid " + str(os.getuid()))
'''))
    assert r.status == "crashed", r.error + r.log_tail
    # The read-only mounts refuse; the others either refuse or land in the job's private /tmp
    # (where the host's path lies under /tmp), never on the host.
    assert "SEEN refused | refused | refused | " in r.error, r.error
    assert (run_dir / "archive.sqlite").read_text() == "secret archive"
    assert not any(Path(t).exists() for t in targets[:4])
    if sandbox.name == "docker":
        assert "uid 0" not in r.error


def test_host_files_cannot_be_read(sandbox, data, run_dir):
    """The archive, the host's test labels and the project's code are not there; the dataset
    handle holds no test labels."""
    need_fs_isolation(sandbox)
    paths = {"archive": run_dir / "archive.sqlite", "labels": run_dir / "test_labels.npy",
             "agent": PROJECT / "agent" / "archive.py", "project": PROJECT / "pyproject.toml"}
    r = run(sandbox, data, probe(f'''
for name, path in {({k: str(v) for k, v in paths.items()})!r}.items():
    try:
        open(path, "rb").read(10)
        seen.append(name + " READ")
    except OSError:
        seen.append(name + " absent")
seen.append("data " + ",".join(sorted(os.listdir({"/deltanas/data" if sandbox.name == "docker" or sandbox.warm
                                                   else str(Path(data[1]).resolve())!r}))))
'''))
    assert r.status == "crashed", r.error + r.log_tail
    assert "archive absent | labels absent | agent absent | project absent" in r.error, r.error
    assert "data meta.json,test_x.npy,train_x.npy,train_y.npy" in r.error, r.error


def test_the_drivers_environment_does_not_reach_the_job(sandbox, data):
    r = run(sandbox, data, probe('''
seen.append("env " + ("LEAKED" if any("s3cret" in v for v in os.environ.values()) else "clean"))
for pid in ("1", str(os.getppid())):
    try:
        seen.append(pid + (" LEAKED" if b"s3cret" in open(f"/proc/{pid}/environ", "rb").read() else " clean"))
    except OSError:
        seen.append(pid + " denied")
'''))
    assert r.status == "crashed"
    assert "env clean" in r.error and "LEAKED" not in r.error, r.error


# -- warm workers: what one candidate does must not reach the next -------------------------------------------------

def test_a_leftover_daemon_cannot_forge_the_next_candidates_result(sandbox, data):
    need_fs_isolation(sandbox)
    ds, handle = data
    clean = run(sandbox, data, GOOD)
    assert clean.status == "ok", clean.error
    poisoner = f'''
import os, time
import numpy as np
open("/tmp/planted", "w").write("x")
open("/dev/shm/planted", "w").write("x")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        base = os.path.dirname(os.getcwd())
        while True:
            for d in os.listdir(base):
                try:
                    np.save(os.path.join(base, d, "out", "predictions.npy"), np.zeros({N_TEST}, dtype=np.int16))
                    open(os.path.join(base, d, "out", "result.json"), "w").write('{{"status": "ok"}}')
                except OSError:
                    pass
            time.sleep(0.005)
    os._exit(0)
time.sleep(0.5)
raise SystemExit(0)
'''
    r = run(sandbox, data, poisoner)
    # Its own outcome is its own to forge, but only with predictions it made: here all zeros.
    assert r.accuracy is None or r.accuracy == pytest.approx(float(np.mean(ds.y_test == 0)))
    check = "import os\nassert not any(os.path.exists(p) for p in ('/tmp/planted', '/dev/shm/planted'))\n"
    after = run(sandbox, data, check + GOOD)
    assert after.status == "ok", after.error + after.log_tail
    assert np.array_equal(np.load(after.predictions_path), np.load(clean.predictions_path))


@WARM_ONLY
def test_killing_the_worker_fails_only_that_job(sandbox, data):
    r = run(sandbox, data, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(30)\n")
    assert r.status == "crashed" and "worker died" in r.error, r.error
    assert r.accuracy is None and r.predictions_path is None
    assert run(sandbox, data, GOOD).status == "ok"


@WARM_ONLY
def test_killing_or_stopping_the_next_jobs_child_ahead_of_time_costs_nothing(sandbox, data):
    """With a spare child waiting for the next job, a candidate that kills or stops every sibling
    process it can see hits the spare: the next job still runs, on a fresh child if need be."""
    for sig in ("SIGSTOP", "SIGKILL"):
        r = run(sandbox, data, f'''
import os, signal
me, parent = os.getpid(), os.getppid()
for name in os.listdir("/proc"):
    if name.isdigit() and int(name) != me:
        try:
            with open(f"/proc/{{name}}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            os.kill(int(name), signal.{sig})
''' + GOOD)
        assert r.status == "ok", r.error + r.log_tail
        assert ("spare child: readied ahead of its job" in r.log_tail) == (sandbox.spare is True), r.log_tail
        after = run(sandbox, data, GOOD)
        assert after.status == "ok", after.error + after.log_tail
        assert np.array_equal(np.load(after.predictions_path), np.load(r.predictions_path))


@WARM_ONLY
def test_a_job_holds_no_socket_to_the_next_jobs_child(sandbox, data):
    """A spare waits for its job on a socket; no candidate may hold one, or it could hand a spare a
    job of its own making."""
    r = run(sandbox, data, probe('''
socks = []
for fd in os.listdir("/proc/self/fd"):
    try:
        if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
            socks.append(fd)
    except OSError:
        pass
seen.append("sockets " + (",".join(socks) if socks else "none"))
'''))
    assert r.status == "crashed" and "sockets none" in r.error, r.error


@WARM_ONLY
def test_stopping_the_worker_ends_in_a_timeout(sandbox, data, monkeypatch):
    monkeypatch.setattr(pool, "REPLY_GRACE_S", 2.0)
    started(sandbox, data, HANG)
    t0 = time.monotonic()
    r = run(sandbox, data, "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nimport time\ntime.sleep(60)\n",
            limits=HANG)
    assert r.status == "timeout", r.error
    assert time.monotonic() - t0 < HANG.timeout_s + 2.0 + 5
    assert run(sandbox, data, GOOD).status == "ok"


@WARM_ONLY
def test_the_workers_control_channel_is_out_of_reach(sandbox, data):
    need_fs_isolation(sandbox)
    r = run(sandbox, data, probe('''
opened = []
for fd in range(3, 64):
    try:
        os.close(os.open(f"/proc/{os.getppid()}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK))
        opened.append(str(fd))
    except OSError as e:
        pass
seen.append("fds " + ("OPENED " + ",".join(opened) if opened else "denied"))
seen.append("ctl " + ("FOUND" if any(n.startswith("ctl.") for n in os.listdir("..")) else "gone"))
'''))
    assert r.status == "crashed"
    assert "fds denied | ctl gone" in r.error, r.error


def test_sandbox_still_works_after_all_that(sandbox, data):
    r = run(sandbox, data, GOOD)
    assert r.status == "ok", r.error + r.log_tail
    assert r.predictions_path and Path(r.predictions_path).is_file()
