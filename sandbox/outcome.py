"""How a job reports back to the host: its typed status, its log lines, and the two files the
host reads, WORKDIR/out/predictions.npy and, last, WORKDIR/out/result.json.

The candidate runs in the worker's process and may patch json, numpy or torch, so the files are
written with os-level functions captured when this module is imported (before the candidate is),
by a serializer that lives here. The host trusts none of it except the predictions array, which
it validates and scores against labels it alone holds.
"""
from __future__ import annotations

import math
import os
import time

_STARTED = time.monotonic()  # the log's clock; a warm worker's child sets it again for its job

# Captured before candidate code can rebind them.
_open, _write, _close, _replace = os.open, os.write, os.close, os.replace
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


class Outcome(Exception):
    """Ends the job early with a typed status."""

    def __init__(self, status: str, error: str):
        super().__init__(error)
        self.status = status
        self.error = error


def describe(exc: BaseException) -> str:
    """An exception in one line of at most 500 characters."""
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text[:500]


def classify(exc: BaseException, phase: str) -> Outcome:
    """Maps an exception from candidate code to a status."""
    import errno

    if isinstance(exc, Outcome):
        return exc
    if isinstance(exc, SyntaxError):
        return Outcome("invalid", f"{phase}: SyntaxError: {exc.msg} (line {exc.lineno})")
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return Outcome("output_limit", f"{phase}: output file size limit reached")
    text = describe(exc)
    oom_type = type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError)
    oom_text = isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
    if oom_type or oom_text:
        return Outcome("oom", f"{phase}: {text}")
    return Outcome("crashed", f"{phase}: {text}")


def log(msg: str) -> None:
    print(f"[worker +{time.monotonic() - _STARTED:.2f}s] {msg}", flush=True)


def _json_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_value(v: object) -> str:
    if v is None or v is True or v is False:
        return {None: "null", True: "true", False: "false"}[v]
    if type(v) is int:
        return int.__repr__(v)
    if type(v) is float:
        return float.__repr__(v) if math.isfinite(v) else "null"
    return _json_str(str.__str__(v) if type(v) is str else repr(v))


def _write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".part"
    fd = _open(tmp, _O_NEW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[_write(fd, view):]
    finally:
        _close(fd)
    _replace(tmp, path)


def write_result(out_dir: str, fields: dict) -> None:
    body = ", ".join(_json_str(k) + ": " + _json_value(v) for k, v in fields.items())
    _write_bytes(out_dir + "/result.json", ("{" + body + "}\n").encode("utf-8"))


def write_predictions(out_dir: str, labels) -> None:
    """An .npy (format 1.0) of int16, built here rather than with np.save."""
    raw = labels.astype("<i2").tobytes()
    header = "{'descr': '<i2', 'fortran_order': False, 'shape': (%d,), }" % (len(raw) // 2)
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    prefix = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    _write_bytes(out_dir + "/predictions.npy", prefix + raw)
