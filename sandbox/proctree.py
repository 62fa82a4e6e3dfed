"""Processes as /proc shows them: the tree below a process, a user's task count, and a SIGKILL
that lets go of a process already gone.

The process sandbox uses it on the host and the warm worker inside the sandbox, so it needs the
standard library alone. A process's name in /proc is whatever the candidate set, so it is read
with any bytes replaced.
"""
from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator


def _proc_files(name: str) -> Iterator[tuple[int, str]]:
    """(pid, text of /proc/PID/NAME) for every process still there when its turn comes."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, name), encoding="utf-8", errors="replace") as f:
                yield int(entry.name), f.read()
        except OSError:
            continue


def descendants(root: int, keep: frozenset[int] = frozenset()) -> dict[int, str]:
    """Every process below `root`, with its state letter ("Z": a zombie), except those in `keep`
    and theirs. A child that left the process group (setsid) is found while its parent lives."""
    children: dict[int, list[int]] = {}
    state: dict[int, str] = {}
    for pid, stat in _proc_files("stat"):
        _name, paren, fields = stat.rpartition(")")  # the name before it may hold spaces and ")"
        rest = fields.split()
        if not paren or len(rest) < 2:
            continue
        children.setdefault(int(rest[1]), []).append(pid)
        state[pid] = rest[0]
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in keep:
                found[child] = state[child]
                stack.append(child)
    return found


def user_task_count(uid: int) -> int:
    """Processes plus threads of `uid`: RLIMIT_NPROC counts both, across the whole user."""
    total = 0
    for _pid, status in _proc_files("status"):
        uid_m = re.search(r"^Uid:\s+(\d+)", status, re.M)
        thr_m = re.search(r"^Threads:\s+(\d+)", status, re.M)
        if uid_m and int(uid_m.group(1)) == uid:
            total += int(thr_m.group(1)) if thr_m else 1
    return total


def sigkill(pid: int, *, group: bool = False) -> None:
    """SIGKILL to `pid`, or with `group` to its process group; nothing if it is gone or not ours."""
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
