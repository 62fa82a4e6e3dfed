"""bench/summary.py: every figure's script runs at its small CPU size and gives its number beside its
baseline; a script that fails or overruns fails the summary, named. This is the run CI keeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = ROOT / "bench" / "summary.py"
SCRIPTS = {"proxy_epoch.py", "sandbox_overhead.py", "generation_batch.py", "novelty_scale.py", "tokens.py",
           "compare_modes.py", "cpu_demo.py", "ray_scaling.py", "valid_rate.py", "grammar_cost.py"}


def summary(*args: str, timeout: float = 1200) -> tuple[int, dict]:  # every script, each within its own limit
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SUMMARY), "--json", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    failing = tmp_path_factory.mktemp("bench") / "failing_bench.py"
    failing.write_text("import sys\nprint('the figure broke here')\nsys.exit(1)\n")
    return summary("--extra", str(failing))


@pytest.mark.slow
def test_every_figure_row_has_its_number_and_baseline(full_run):
    _, res = full_run
    rows = [r for r in res["rows"] if r["script"] in SCRIPTS]
    assert {r["script"] for r in rows} == SCRIPTS
    assert len(rows) == 11  # proxy_epoch gives two figures: the epoch and candidates per device-hour
    for r in rows:
        assert r["status"] == "ok", (r["script"], r["status"], r["tail"])
        assert isinstance(r["measured"], float) and r["measured"] > 0, r
        assert isinstance(r["met"], bool) and r["target"] and r["seconds"] > 0, r
        if r["script"] == "cpu_demo.py":  # its figure is a budget, not a comparison
            assert r["baseline"] is None and r["data"]["per_status"], r
        elif r["script"] in ("compare_modes.py", "valid_rate.py"):  # rates: 0% is a number
            assert isinstance(r["baseline"], float) and 0 <= r["baseline"] <= 100, r
        else:
            assert isinstance(r["baseline"], float) and r["baseline"] > 0, r


@pytest.mark.slow
def test_the_scripts_own_figures_hold_together(full_run):
    _, res = full_run
    data = {r["script"]: r["data"] for r in res["rows"]}
    # novelty: the index agrees with the exact scan on every check at or above the threshold, and beats the scan
    nov = data["novelty_scale.py"]
    assert nov["n"] == 2000 and 0 < nov["lsh_ms"] < nov["scan_ms"]
    ours = nov["indexes"][nov["ours"]]
    assert ours["above_threshold"] > 0 and ours["missed"] == 0 and ours["differ"] == 0
    assert len(nov["indexes"]) == 5
    # ray: every candidate recorded, with and without an actor killed mid-candidate, and the dead one replaced
    ray_rows = data["ray_scaling.py"]["rows"]
    assert [r["recorded"] for r in ray_rows] == [2, 2] and ray_rows[-1]["kill"] and ray_rows[-1]["replaced"] >= 1
    # tokens: each baseline's delta answer is shorter than its whole file
    tok = data["tokens.py"]
    assert set(tok["per_baseline"]) == {"lenet", "resnet"}
    assert all(0 < b["delta_tokens"] < b["full_tokens"] for b in tok["per_baseline"].values())
    assert abs(tok["ratio"] - tok["delta_tokens"] / tok["full_tokens"]) < 1e-9
    # proxy epoch: both sides timed; on the CPU the worker chooses float32 (no autocast)
    pe = data["proxy_epoch.py"]
    (resnet,) = pe["resnet18"]
    assert resnet["ours_first_s"] > 0 and resnet["baseline_first_s"] > 0 and "float32" in resnet["ours_note"]
    assert pe["small"]["lenet"]["per_hour"] > 0 and pe["baseline_small"]["lenet"]["per_hour"] > 0
    # sandbox overhead: a warm worker costs less per candidate than a cold one
    proc = data["sandbox_overhead.py"]["backends"]["process"]
    assert 0 < proc["warm_median_s"] < proc["cold_median_s"]
    # batched generation: the same tokens both ways (greedy)
    gen = data["generation_batch.py"]
    assert gen["one_tokens"] == gen["batch_tokens"] > 0
    modes = data["compare_modes.py"]
    assert modes["delta"]["candidates"] == modes["full"]["candidates"] == 2


@pytest.mark.slow
def test_a_failing_script_fails_the_summary_by_name(full_run):
    rc, res = full_run
    assert rc == 1 and res["failed"] == ["failing_bench.py"]
    (row,) = [r for r in res["rows"] if r["script"] == "failing_bench.py"]
    assert row["status"] == "failed (exit 1)" and row["measured"] is None
    assert "the figure broke here" in row["tail"]


def test_a_script_past_its_limit_is_killed_and_named(tmp_path):
    sleeper = tmp_path / "sleeping_bench.py"
    sleeper.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    rc, res = summary("--only=", "--extra", str(sleeper), "--timeout", "3", timeout=60)
    assert rc == 1 and res["failed"] == ["sleeping_bench.py"]
    (row,) = res["rows"]
    assert row["status"] == "timed out (3 s)" and row["seconds"] < 30 and "started" in row["tail"]


def test_an_extra_script_fills_its_row_from_its_json(tmp_path):
    good = tmp_path / "good_bench.py"
    good.write_text("import json, sys\nassert '--json' in sys.argv\nprint(json.dumps({'measured': 2, 'baseline': 8}))\n")
    rc, res = summary("--only=", "--extra", str(good), timeout=60)
    assert rc == 0 and res["failed"] == []
    (row,) = res["rows"]
    assert (row["status"], row["measured"], row["baseline"]) == ("ok", 2.0, 8.0)


def test_an_unknown_script_name_is_refused():
    proc = subprocess.run([sys.executable, str(SUMMARY), "--only", "nonesuch"], capture_output=True, text=True)
    assert proc.returncode == 2 and "nonesuch" in proc.stderr
