"""Landlock through ctypes: a process gives up every file access but an allow-list, without root.

Landlock (Linux 5.13+) lets an unprivileged process restrict itself and every process it
starts later: once enforced, the domain survives fork and exec and cannot be lifted. The
kernel numbers what it can restrict by ABI version:

    1  the base filesystem rights (execute, read, write, make and remove files and dirs)
    2  REFER: moving or linking a file into another directory
    3  TRUNCATE
    4  TCP bind and connect
    5  IOCTL_DEV: ioctl on device files
    6  scopes: abstract UNIX sockets and signals to processes outside the domain
    7  audit logging flags (no new right)

A ruleset here handles the rights that the running kernel knows, as the kernel's own
sample does: on an older kernel the newer ones stay allowed; ABI 8 and later add nothing
used here (ABI 9's control of pathname UNIX sockets would be worth adding). Landlock does
not cover connecting to a pathname UNIX socket (before ABI 9), UDP, nor stat, chdir,
chmod, chown or utime on any path (the kernel's "current limitations").

    with Ruleset(read=[...], write=[...]) as rules:   # in the parent
        subprocess.Popen(cmd, preexec_fn=rules.enforce)  # the child: two syscalls
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

# The unified syscall table gives these numbers on x86_64 and aarch64 alike (asm-generic/unistd.h).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
KNOWN_MACHINES = ("x86_64", "aarch64")
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}  # all FS rights up to each
ON_FILES = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the rights a file rule may hold
READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
LIST = FS_READ_DIR
# Write without execute: nothing the job writes can be run as a program. No MAKE_CHAR or
# MAKE_BLOCK either (device nodes); IOCTL_DEV is for the device files put in the write list.
WRITE = (FS_READ_FILE | FS_READ_DIR | FS_WRITE_FILE | FS_TRUNCATE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR
         | FS_MAKE_REG | FS_MAKE_SYM | FS_MAKE_FIFO | FS_MAKE_SOCK | FS_REFER | FS_IOCTL_DEV)

MAX_ALLOWED = 20_000  # allowed_except lists at most this many entries


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)): 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def _syscall(number: int, *args) -> int:
    """A raw syscall; raises OSError with the kernel's errno."""
    ret = _libc().syscall(ctypes.c_long(number), *args)
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[int, str]:
    if platform.system() != "Linux":
        return 0, f"Landlock is a Linux feature ({platform.system()} here)"
    if platform.machine() not in KNOWN_MACHINES:
        return 0, f"the Landlock syscall numbers are only wired for {', '.join(KNOWN_MACHINES)}"
    try:
        return _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)), ""
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return 0, "kernel has no Landlock (ENOSYS: older than 5.13 or built without it)"
        if e.errno == errno.EOPNOTSUPP:
            return 0, "Landlock is built in but off (EOPNOTSUPP: add landlock to the lsm= boot parameter)"
        return 0, f"the Landlock ABI query failed ({errno.errorcode.get(e.errno, e.errno)})"


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (`unavailable_reason` says why)."""
    return _probe()[0]


def unavailable_reason() -> str:
    """Why Landlock cannot be used here, in a phrase; "" where it can."""
    return _probe()[1]


class Ruleset:
    """An allow-list built in this process and enforced in a child between fork and exec.

    `read` paths (and what lies below them) may be read and executed, `write` paths read
    and written (files made, removed, truncated, never executed), `listed` folders listed
    (see `on_the_way`), nothing else. On ABI 4+ all TCP bind and connect is denied; on ABI
    6+ the domain may neither reach abstract UNIX sockets nor signal processes outside it.
    Paths that do not exist are skipped. Raises OSError where Landlock is unavailable.
    """

    def __init__(self, read: Iterable[str | Path], write: Iterable[str | Path], listed: Iterable[str | Path] = ()):
        abi = abi_version()
        if abi < 1:
            raise OSError(errno.ENOSYS, f"Landlock is unavailable: {unavailable_reason()}")
        self.abi = abi
        self.handled = FS_BY_ABI[max(v for v in FS_BY_ABI if v <= abi)]
        attr = _RulesetAttr(self.handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
        self.fd = _syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
        try:
            for paths, access in ((read, READ), (write, WRITE), (listed, LIST)):
                for path in paths:
                    self._allow(Path(path), access)
        except BaseException:
            self.close()
            raise

    def _allow(self, path: Path, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return  # what this process cannot open, a job of this user or a lesser one cannot either
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            rule = _PathBeneathAttr(access & self.handled & (~0 if is_dir else ON_FILES), fd)
            _syscall(SYS_ADD_RULE, ctypes.c_int(self.fd), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule),
                     ctypes.c_uint32(0))
        finally:
            os.close(fd)

    def enforce(self) -> None:
        """Restricts the calling process (and its future children) to this ruleset. Two
        syscalls, safe between fork and exec (`preexec_fn`)."""
        if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"PR_SET_NO_NEW_PRIVS: {os.strerror(code)}")
        _syscall(SYS_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Ruleset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restrict(read: Iterable[str | Path], write: Iterable[str | Path]) -> int:
    """Sets PR_SET_NO_NEW_PRIVS and restricts the calling process to `read` and `write` (see
    `Ruleset`), for good. Returns the ABI version in force."""
    with Ruleset(read, write) as rules:
        rules.enforce()
        return rules.abi


def allowed_except(root: Path, masked: Sequence[Path], limit: int = MAX_ALLOWED) -> list[Path]:
    """The paths to allow so that `root` is allowed except the `masked` subtrees in it.

    Landlock only adds rights, so a folder cannot be allowed minus a part of it. Instead,
    along the way from `root` down to each masked path, every entry (file or folder) that
    is neither masked nor on the way to one is allowed. Symlinks are skipped: access through
    one is judged where it leads, and allowing it would allow its target. Raises ValueError
    past `limit` entries (a masked path deep in a wide tree). The folders on the way must
    still be listed (Python finds its modules so): `on_the_way`.
    """
    root = Path(root).resolve()
    if any(Path(m) == root or Path(m) in root.parents for m in masked):
        return []
    inside = [str(m) for m in masked if root in Path(m).parents]
    if not inside:
        return [root]
    allowed: list[Path] = []
    seen = 0
    stack = [(str(root), inside)]
    while stack:
        folder, below = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        seen += len(entries)
        if seen > limit:
            raise ValueError(f"hiding {', '.join(below)} inside {root} takes more than {limit} rules")
        for entry in entries:
            if entry.path in below or entry.is_symlink():
                continue
            deeper = [m for m in below if m.startswith(entry.path + os.sep)]
            if deeper and entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, deeper))
            else:
                allowed.append(Path(entry.path))
    return sorted(allowed)


def on_the_way(root: Path, masked: Sequence[Path]) -> list[Path]:
    """The folders from `root` down to each masked path in it, the masked ones excluded: for
    `Ruleset(listed=...)`. A right on a folder holds for all below it, so a masked folder can
    be listed too (its names, not its contents)."""
    root = Path(root).resolve()
    if any(Path(m) == root or Path(m) in root.parents for m in masked):
        return []
    return sorted({p for m in masked if root in Path(m).parents for p in Path(m).parents
                   if p == root or root in p.parents})
