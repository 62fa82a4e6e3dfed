"""Hostile candidates against the process sandbox: each ends in its exact typed status,
leaves no process behind, cannot raise its own score, and the sandbox stays usable."""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from deltanas.sandbox.base import Job, Limits
from deltanas.sandbox.process import ProcessSandbox
from deltanas.tools.proxy import evaluate_source

from support import Arrays, write_handle

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 256, 128
LIMITS = Limits(timeout_s=60, memory_mb=4096, cpu_threads=1)
HANG = Limits(timeout_s=6, memory_mb=4096, cpu_threads=1, max_processes=32)

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


def noise(seed: int = 1) -> Arrays:
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (N_TRAIN, 1, 28, 28)).astype(np.uint8)
    y_train = rng.integers(0, 10, N_TRAIN).astype(np.int64)
    x_test = rng.integers(0, 256, (N_TEST, 1, 28, 28)).astype(np.uint8)
    y_test = rng.integers(0, 10, N_TEST).astype(np.int64)
    return Arrays("noise", x_train, y_train, x_test, y_test, 10, [0.5], [0.25])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = noise()
    return ds, write_handle(ds, tmp_path_factory.mktemp("handle"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """One sandbox for the whole file: every hostile case must leave it usable."""
    sb = ProcessSandbox(tmp_path_factory.mktemp("work"))
    yield sb
    sb.close()


def run(sandbox, data, source, limits=LIMITS, **kw):
    ds, handle = data
    return sandbox.run(Job(candidate_id="hostile", source=source, dataset_dir=str(handle), batch_size=64,
                           limits=limits, **kw))


def gone(pid: int) -> bool:
    """Dead or a zombie waiting for init: either way it runs nothing."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(gone(int(p)) for p in os.listdir("/proc") if p.isdigit() and _pgid_of(int(p)) == pgid)


def _pgid_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


# A candidate prints "PROC pid pgid pid-namespace" for each of its processes: under bubblewrap
# it sees neither the test's tmp dir nor host pids, so the log is how it tells.
PROC_LINE = 'print("PROC", os.getpid(), os.getpgid(0), os.readlink("/proc/self/ns/pid"), flush=True)'


_PROC_RE = re.compile(r"^PROC (\d+) (\d+) (\S+)$")


def procs(log_tail: str) -> list[tuple[int, int, str]]:
    """Well-formed PROC lines only: a fork bomb's children interleave their prints."""
    found = (_PROC_RE.match(line) for line in log_tail.splitlines())
    return [(int(m[1]), int(m[2]), m[3]) for m in found if m]


def namespace_empty(ns: str, within: float = 5.0) -> bool:
    """No live host process left in the pid namespace `ns` (as /proc/PID/ns/pid names it)."""
    deadline = time.monotonic() + within
    while True:
        live = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.readlink(f"/proc/{p}/ns/pid") == ns and not gone(int(p)):
                        live.append(p)
                except OSError:
                    continue
        if not live or time.monotonic() > deadline:
            return not live
        time.sleep(0.1)


def all_ended(sandbox, rows) -> bool:
    if sandbox.fs_isolated:  # its own pid namespace: pids inside mean nothing here
        return all(namespace_empty(ns) for ns in {ns for _, _, ns in rows})
    return wait_gone([pid for pid, _, _ in rows]) and all(group_gone(g) for _, g, _ in rows)


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


def test_wrong_output_shape_is_invalid(sandbox, data):
    src = NET_HEADER + "\n    def forward(self, x):\n        return self.fc(x.flatten(1))[:, :3]\n"
    r = run(sandbox, data, src)
    assert r.status in ("invalid", "crashed")  # the loss may reject 3 logits for 10 labels first
    src = NET_HEADER + '''
    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out if self.training else out[:, :3]
'''
    r = run(sandbox, data, src)
    assert r.status == "invalid" and "logits must have shape" in r.error


def test_infinite_loop_at_import_is_killed_fast(sandbox, data):
    src = f"import os\n{PROC_LINE}\nwhile True:\n    pass\n"
    t0 = time.monotonic()
    r = run(sandbox, data, src, limits=HANG)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < HANG.timeout_s + 3
    rows = procs(r.log_tail)
    assert len(rows) == 1, r.log_tail
    assert all_ended(sandbox, rows)


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
    assert all_ended(sandbox, rows)


def test_unbounded_allocation_is_oom(sandbox, data):
    src = "hoard = []\nwhile True:\n    hoard.append(bytearray(64 << 20))\n"
    r = run(sandbox, data, src, limits=Limits(timeout_s=60, memory_mb=1536, cpu_threads=1))
    assert r.status == "oom", r.error
    src = GOOD.replace("super().__init__()", "super().__init__()\n        torch.empty(1 << 34, dtype=torch.uint8)")
    r = run(sandbox, data, src, limits=Limits(timeout_s=60, memory_mb=1536, cpu_threads=1))
    assert r.status == "oom", r.error


def test_a_gigabyte_of_stdout_hits_the_output_limit(data, tmp_path):
    sb = ProcessSandbox(tmp_path / "work", keep=True)
    src = "import sys\nline = 'x' * (1 << 20) + '\\n'\nfor _ in range(1024):\n    sys.stdout.write(line)\n"
    limits = Limits(timeout_s=60, memory_mb=4096, cpu_threads=1, max_output_bytes=200_000)
    r = run(sb, data, src, limits=limits)
    assert r.status == "output_limit", r.error
    (log,) = (tmp_path / "work").glob("*/log.txt")
    assert log.stat().st_size <= limits.max_output_bytes
    assert len(r.log_tail) <= 2048


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
    assert "cuda requested but not available" in r.error


def test_fake_metrics_and_monkeypatching_cannot_raise_the_score(sandbox, data):
    """Prints a perfect score, rebinds json/numpy writers, predicts class 0 throughout."""
    ds, handle = data
    src = '''
import json, os
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


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("bias", torch.eye(out_shape[0])[0] * 10)

    def forward(self, x):
        return self.bias.expand(len(x), -1) + self.w * 0
'''
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, handle_dir=handle, candidate_id="liar",
                          limits=LIMITS, batch_size=64)
    assert out.status == "ok", out.error
    assert out.accuracy == pytest.approx(float(np.mean(ds.y_test == 0)))
    assert out.accuracy < 0.5 and out.param_count == 1


def test_fake_result_and_wrong_shape_predictions_are_invalid(sandbox, data):
    ds, handle = data
    src = '''
import json, os
import numpy as np
json.dump({"status": "ok", "accuracy": 1.0, "param_count": 5}, open("out/result.json", "w"))
np.save("out/predictions.npy", np.zeros(5, dtype=np.int64))
os._exit(0)
'''
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, handle_dir=handle, candidate_id="forger",
                          limits=LIMITS)
    assert out.status == "invalid" and out.accuracy is None
    assert "shape" in out.error
    src = src.replace("np.zeros(5, dtype=np.int64)", f"np.full({N_TEST}, 99, dtype=np.int64)")
    out = evaluate_source(src, sandbox=sandbox, dataset=ds, handle_dir=handle, candidate_id="forger",
                          limits=LIMITS)
    assert out.status == "invalid" and "[0, 10)" in out.error


def test_network_is_unreachable_inside(sandbox, data):
    if not sandbox.network_isolated:
        pytest.skip("unshare cannot make a network namespace here; the job would have network")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    src = f'''
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3)
    verdict = "NET connected"
except OSError as e:
    verdict = "NET blocked " + type(e).__name__
raise RuntimeError(verdict)
'''
    r = run(sandbox, data, src)
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert r.status == "crashed"
    assert "NET blocked" in r.error


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
    assert all_ended(sandbox, rows)


def test_sandbox_still_works_after_all_that(sandbox, data):
    r = run(sandbox, data, GOOD)
    assert r.status == "ok", r.error + r.log_tail
    assert r.predictions_path and Path(r.predictions_path).is_file()
    assert sandbox._running == {}
