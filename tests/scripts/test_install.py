"""scripts/install.sh's bubblewrap step, run alone (the script, sourced, defines it and stops)
against stub `id` and package managers on an otherwise empty PATH: nothing is installed."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install.sh"
STUB = '#!/bin/sh\necho "{name} $*" >> "$CALLS"\nexit ${{FAKE_RC:-0}}\n'


def step(tmp_path: Path, uid: int, tools: tuple[str, ...] = ("apt-get",), rc: int = 0) -> tuple[list[str], list[str]]:
    """(the lines install_bubblewrap prints, the package-manager calls it made)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("id", *tools):
        body = '#!/bin/sh\necho "$FAKE_UID"\n' if name == "id" else STUB.format(name=name)
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    env = {"PATH": str(bin_dir), "CALLS": str(calls), "FAKE_UID": str(uid), "FAKE_RC": str(rc)}
    r = subprocess.run(["/bin/bash", "-c", f'source "{SCRIPT}" && install_bubblewrap; echo "rc=$?"'],
                       capture_output=True, text=True, env=env, timeout=30)
    lines = r.stdout.splitlines()
    assert lines[-1] == "rc=0" and r.stderr == "", r.stdout + r.stderr
    return lines[:-1], calls.read_text().splitlines()


def test_root_with_apt_installs_it_and_says_so(tmp_path):
    lines, calls = step(tmp_path, uid=0)
    assert calls == ["apt-get install -y -qq bubblewrap"]
    assert len(lines) == 1 and lines[0].startswith("[install] bubblewrap (bwrap) with apt-get")


@pytest.mark.parametrize("pm,call", [("dnf", "dnf install -y -q bubblewrap"), ("apk", "apk add -q bubblewrap")])
def test_root_with_dnf_or_apk(tmp_path, pm, call):
    lines, calls = step(tmp_path, uid=0, tools=(pm,))
    assert calls == [call] and len(lines) == 1


def test_a_failing_package_manager_does_not_fail_the_install(tmp_path):
    lines, calls = step(tmp_path, uid=0, rc=100)
    assert calls == ["apt-get install -y -qq bubblewrap", "apt-get update -qq"]  # the retry after an update
    assert len(lines) == 2 and "could not install bubblewrap" in lines[1]


@pytest.mark.parametrize("uid,tools,hint", [(1000, ("apt-get",), "sudo apt install bubblewrap"),
                                            (0, (), "your distribution's bubblewrap package")])
def test_without_root_or_a_package_manager_one_line_of_advice(tmp_path, uid, tools, hint):
    lines, calls = step(tmp_path, uid=uid, tools=tools)
    assert calls == []
    assert len(lines) == 1 and lines[0].startswith(f"[install] bubblewrap not found: install it ({hint})")
    assert "own filesystem view" in lines[0] and "refuses to run model-written code" in lines[0]


def test_nothing_to_do_where_bwrap_is_there(tmp_path):
    lines, calls = step(tmp_path, uid=0, tools=("apt-get", "bwrap"))
    assert lines == [] and calls == []


def test_the_script_calls_it():
    assert "\ninstall_bubblewrap\n" in SCRIPT.read_text()
