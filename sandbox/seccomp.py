"""A seccomp filter through ctypes: the system calls a job never needs, refused with EPERM.

Landlock confines what a job may read and write, but leaves some doors open: connecting to a
pathname UNIX socket (before Landlock ABI 9), chmod and chown on any path, and, for a job that
keeps root, whatever root's capabilities reach without a path. Where bubblewrap is missing,
this filter closes them for the worker and every process it starts (a filter survives fork and
exec and cannot be lifted):

- `socket(AF_UNIX, ...)` of any type but SOCK_SEQPACKET: a new UNIX stream or datagram socket
  could connect to the host's daemons (the Docker socket among them). Socket pairs stay allowed:
  a warm worker talks to its spares through them. SOCK_SEQPACKET stays allowed because CUDA's
  start-up binds one (an abstract `@cuda-uvmfd-...` socket, for sharing its UVM file descriptor;
  refused, `cudaGetDeviceCount` fails with error 304, measured on an H100). A seqpacket socket
  cannot connect to a stream or datagram listener (EPROTOTYPE), and Landlock's scope (ABI 6+)
  keeps it from the abstract sockets outside the job;
- io_uring, which could make the refused calls without a system call;
- chmod and chown of any kind, device nodes (`mknod`), opening files by handle (which skips
  path checks), mounts, chroot, kernel modules, kexec, bpf, perf events, userfaultfd, the
  kernel keyring, ptrace, the clock, the hostname, swap, quotas, accounting, reboot, the kernel
  log, raw I/O ports.

Only x86_64 is described here (its syscall numbers, from arch/x86/entry/syscalls/syscall_64.tbl);
elsewhere `unavailable_reason` says so and the layer is not in force. Calls through the x32 and
i386 entry points are refused whole.

    install()  # in the child between fork and exec, after any uid drop and Landlock
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import socket

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
# classic BPF opcodes: load a word at an absolute offset, jump if equal / greater or equal, return
LD_ABS, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
ALU_AND = 0x54  # A &= k
NR_OFFSET, ARCH_OFFSET, ARG0_OFFSET, ARG1_OFFSET = 0, 4, 16, 24  # struct seccomp_data; args' low words (little-endian)

SOCKET = 41
REFUSED = {  # x86_64 numbers
    "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "ptrace": 101, "syslog": 103,
    "mknod": 133, "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "mknodat": 259, "fchownat": 260, "fchmodat": 268, "perf_event_open": 298,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "fchmodat2": 452,
}


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def unavailable_reason() -> str:
    """"" where the filter can be installed here; else why not, in a phrase."""
    if platform.system() != "Linux":
        return f"seccomp is Linux's ({platform.system()} here)"
    if platform.machine() != "x86_64":
        return f"the filter lists x86_64's system call numbers; this machine is {platform.machine()}"
    _prepared()
    return ""


def program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) rows: another architecture or the x32 entry is refused;
    each listed call is refused; socket() is refused for AF_UNIX unless its type, less the
    CLOEXEC and NONBLOCK flags, is SOCK_SEQPACKET; the rest is allowed."""
    deny = RET_ERRNO | errno.EPERM
    numbers = sorted(REFUSED.values())
    n = len(numbers)
    # rows (a jump's offset counts from the next row): 0 load arch, 1 x86_64 or deny, 2 load nr,
    # 3 x32: deny, 4..3+n a refused call: deny, 4+n socket, 5+n allow, 6+n load arg0,
    # 7+n AF_UNIX, 8+n allow, 9+n load arg1, 10+n drop its flags, 11+n SEQPACKET, 12+n allow,
    # 13+n deny
    deny_at = 13 + n
    rows = [(LD_ABS, 0, 0, ARCH_OFFSET), (JEQ, 0, deny_at - 2, AUDIT_ARCH_X86_64),
            (LD_ABS, 0, 0, NR_OFFSET), (JGE, deny_at - 4, 0, X32_SYSCALL_BIT)]
    for i, nr in enumerate(numbers):
        rows.append((JEQ, deny_at - (4 + i) - 1, 0, nr))
    flags = socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    rows += [(JEQ, 1, 0, SOCKET), (RET, 0, 0, RET_ALLOW),  # socket(): on to its first argument
             (LD_ABS, 0, 0, ARG0_OFFSET), (JEQ, 1, 0, socket.AF_UNIX), (RET, 0, 0, RET_ALLOW),
             (LD_ABS, 0, 0, ARG1_OFFSET), (ALU_AND, 0, 0, ~flags & 0xFFFFFFFF),
             (JEQ, 0, 1, socket.SOCK_SEQPACKET), (RET, 0, 0, RET_ALLOW),
             (RET, 0, 0, deny)]
    assert len(rows) == deny_at + 1 and deny_at < 256  # jump offsets are one byte
    return rows


@functools.lru_cache(maxsize=1)
def _prepared() -> tuple[ctypes.CDLL, _Program, ctypes.Array]:
    """libc and the filter, made once in the host process: the child between fork and exec then
    only calls prctl (no dlopen there, whose lock another thread may have held at the fork)."""
    rows = program()
    table = (_Instruction * len(rows))(*(_Instruction(*row) for row in rows))
    return ctypes.CDLL(None, use_errno=True), _Program(len(rows), table), table


def install() -> None:
    """Sets PR_SET_NO_NEW_PRIVS and installs the filter on the calling thread (between fork and
    exec, the process's only one). Raises OSError where the kernel refuses."""
    libc, prog, _table = _prepared()
    for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)):
        if libc.prctl(*args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl({args[0]}): {os.strerror(code)}")
