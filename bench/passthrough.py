"""The benchmarks' own flags and those after `--`, which go on to `deltanas run`."""
from __future__ import annotations


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the flags before `--`, the flags after it)."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]
