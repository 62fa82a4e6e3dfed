"""The /proc walkers both the process sandbox and the warm worker use."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from deltanas.sandbox import proctree

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

# A child that starts a grandchild in a session of its own, prints its pid and waits.
TREE = ("import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n")


def test_descendants_follow_a_child_that_left_the_group_and_spare_what_is_kept():
    child = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        below = proctree.descendants(os.getpid())
        assert {child.pid, grandchild} <= set(below) and below[grandchild] != "Z"
        assert child.pid not in proctree.descendants(os.getpid(), keep=frozenset({child.pid}))
        assert grandchild not in proctree.descendants(os.getpid(), keep=frozenset({child.pid}))
        assert set(proctree.descendants(child.pid)) == {grandchild}
        proctree.sigkill(grandchild)
        proctree.sigkill(child.pid)
        assert child.wait(10) == -9
    finally:
        child.kill()
        child.wait()


def test_a_zombie_is_marked_and_a_gone_process_is_let_go():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while proctree.descendants(os.getpid()).get(child.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proctree.descendants(os.getpid())[child.pid] == "Z"
    child.wait()
    assert child.pid not in proctree.descendants(os.getpid())
    proctree.sigkill(child.pid)  # gone: nothing raised
    proctree.sigkill(child.pid, group=True)


def test_user_task_count_counts_this_process_threads():
    assert proctree.user_task_count(os.getuid()) >= 1
    assert proctree.user_task_count(2**31 - 2) == 0
