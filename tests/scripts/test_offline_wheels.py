"""scripts/offline_wheels.py: the wheels an offline machine needs, read from this environment (no
download here: --dry-run prints the list the download would fetch)."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "offline_wheels.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def pins(out: str) -> dict[str, str]:
    return dict(line.split("==") for line in out.split())


def test_the_list_is_what_the_target_lacks_pinned_to_this_environment(tmp_path):
    have = tmp_path / "have.txt"  # a target with torch and friends, as `pip list` prints it
    have.write_text("Package    Version\n---------- -------\ntorch      2.11.0\nnumpy 2.5.2\ntransformers 5.17\n"
                    "peft==0.21\naccelerate\nscipy\n")
    r = run("--python", "3.12", "--have", str(have), "--dry-run")
    assert r.returncode == 0, r.stderr
    got = pins(r.stdout)
    # deltanas's own requirements, and what they need in turn: the second-hand ones the device
    # machine lacked and cost a call each (sniffio, distro, websockets, under langsmith and langgraph)
    for name in ("langgraph", "langgraph-checkpoint-sqlite", "trl", "llguidance", "datasketch", "unidiff",
                 "pydantic-core", "sniffio", "distro", "websockets"):
        assert got.get(name) == md.version(name), name
    assert not {"torch", "numpy", "transformers", "peft", "accelerate", "scipy"} & set(got)
    everything = pins(run("--python", "3.12", "--dry-run").stdout)  # no --have: the target has nothing
    assert {"torch", "numpy", "transformers"} <= set(everything) and set(got) < set(everything)


def test_markers_are_read_for_the_target_python():
    old = run("--python", "3.10", "--dry-run")
    new = run("--python", "3.12", "--dry-run")
    assert old.returncode == new.returncode == 0
    assert "tomli" not in pins(new.stdout)  # `tomli; python_version < '3.11'`
    assert "tomli" in pins(old.stdout) or "not installed here, so not fetched: tomli" in old.stderr


def test_bad_arguments_are_refused_clearly(tmp_path):
    r = run("--python", "12", "--dry-run")
    assert r.returncode == 2 and "major.minor" in r.stderr
    r = run("--have", str(tmp_path / "nope.txt"), "--dry-run")
    assert r.returncode == 2 and "is not a file" in r.stderr
