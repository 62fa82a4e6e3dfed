"""Every wheel deltanas needs on a machine with no package index, from this environment's versions.

    python scripts/offline_wheels.py --out wheels --python 3.12 --have have.txt
    python scripts/offline_wheels.py --out wheels --dry-run            # the list, nothing fetched

An offline GPU box or cluster node often has torch and much else already, and no way to fetch the
rest. This walks deltanas's requirements (and `--extra` ones) through the distributions installed
here, transitively, with each requirement's environment markers read for the target Python on
Linux x86_64. It leaves out what `--have` names (a file with one name per line, or `pip list` /
`pip freeze` output from the target), and fetches each of the rest, pinned to the version installed
here, as a binary wheel for the target (`pip download --no-deps`), with deltanas's own wheel
beside them. On the target, with no index:

    python3 -m pip install --no-index --no-deps --target DIR wheels/*.whl && export PYTHONPATH=DIR

A requirement that is not installed here is listed as such (install it here, or bring its wheel).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# manylinux tags pip accepts only when named one by one (pip matches the glibc version exactly)
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40)), "linux_x86_64"]


def marker_env(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def wanted(req: Requirement, python: str, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = marker_env(python)
    return any(req.marker.evaluate({**env, "extra": e}) for e in ({""} | extras))


def have_names(path: Path | None) -> set[str]:
    """Names from one per line, `pip list` (name, version) or `pip freeze` (name==version)."""
    if path is None:
        return set()
    names = set()
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and not line.lstrip().startswith(("#", "Package", "---")):
            names.add(canonicalize_name(m.group(1)))
    return names


def closure(root: str, python: str, extras: set[str], have: set[str]) -> tuple[dict[str, str], list[str]]:
    """({name: version installed here} for every distribution `root` needs on the target and the
    target lacks, [requirements not installed here])."""
    pins: dict[str, str] = {}
    missing: list[str] = []
    seen: set[str] = set()
    todo = [req for req in (Requirement(r) for r in md.requires(root) or []) if wanted(req, python, extras)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if name in have:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.append(str(req))
            continue
        pins[name] = dist.version
        for sub in (Requirement(r) for r in dist.requires or []):
            if wanted(sub, python, set(req.extras)):  # a dependency's extras as this requirement asked for them
                todo.append(sub)
    return dict(sorted(pins.items())), sorted(missing)


def fetch(pins: dict[str, str], out: Path, python: str) -> list[str]:
    """Download each pin's wheel for the target; the names that have none."""
    failed = []
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in pins.items():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               python, "--implementation", "cp", *plat, "-d", str(out), f"{name}=={version}"]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            failed.append(f"{name}=={version}")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("wheels"))
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                    help="the target's Python, major.minor (default: this one)")
    ap.add_argument("--have", type=Path, help="what the target has: one name per line, or its pip list / freeze")
    ap.add_argument("--extra", action="append", default=[], help="deltanas extras to include too (ray, vllm, test)")
    ap.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", a.python):
        ap.error(f"--python takes major.minor, e.g. 3.12 (got {a.python!r})")
    if a.have is not None and not a.have.is_file():
        ap.error(f"--have: {a.have} is not a file")
    pins, missing = closure("deltanas", a.python, set(a.extra), have_names(a.have))
    for name, version in pins.items():
        print(f"{name}=={version}")
    for req in missing:
        print(f"not installed here, so not fetched: {req}", file=sys.stderr)
    if a.dry_run:
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    failed = fetch(pins, a.out, a.python)
    own = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                          "-w", str(a.out)], capture_output=True, text=True)
    if own.returncode != 0:
        failed.append(f"deltanas (its own wheel): {own.stderr.strip()[-300:]}")
    for f in failed:
        print(f"no wheel for Python {a.python} on Linux x86_64: {f}", file=sys.stderr)
    print(f"{len(pins) - len(failed)} wheels and deltanas's own in {a.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
