"""bench/learning_curve.py end to end on real runs (the rule-based mutator proposes, the real
sandbox trains on the real digits set), its figures recomputed here from the archives, its
interval on known data, and `deltanas report --against` on the same runs."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from deltanas.agent.archive import Store
from deltanas.agent.cli import main

from support import load_bench

ROOT = Path(__file__).resolve().parents[2]


def test_the_interval_is_right_on_known_data():
    lc = load_bench("learning_curve")
    sure = lc.bootstrap_diff({s: {"learn": [1, 1, 1], "control": [0, 0, 0]} for s in range(3)}, draws=500)
    assert sure["diff"] == 1.0 and sure["ci95"] == [1.0, 1.0]
    none = lc.bootstrap_diff({s: {"learn": [0, 1], "control": [0, 1]} for s in range(3)}, draws=2000)
    assert none["diff"] == 0.0 and none["ci95"][0] < 0 < none["ci95"][1]
    mixed = lc.bootstrap_diff({0: {"learn": [1, 1, 0, 1], "control": [0, 0, 1, 0]},
                               1: {"learn": [1, 0, 1, 1], "control": [0, 1, 0, 0]}}, draws=2000)
    assert mixed["diff"] == pytest.approx(0.5) and mixed["ci95"][0] <= 0.5 <= mixed["ci95"][1]


def test_the_interval_is_taken_against_the_control_for_each_learning_arm():
    lc = load_bench("learning_curve")
    per_seed = {s: {"dpo": [1, 1], "learn": [0, 0], "control": [0, 1]} for s in range(3)}
    assert lc.bootstrap_diff(per_seed, draws=200, arm="dpo")["diff"] == 0.5
    assert lc.bootstrap_diff(per_seed, draws=200)["diff"] == -0.5


@pytest.mark.parametrize("arms", ["learn", "learn,dpo", "control", "learn,control,learn", "control,rl"])
def test_arms_without_a_control_or_a_learner_are_refused_before_any_run(tmp_path, arms):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curve.py"), "--arms", arms, "--root",
                           str(tmp_path), "--no-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--arms: control and one or more of learn, dpo, sft+dpo" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_benchmark_runs_both_arms_and_its_figures_match_the_archives(tmp_path, capsys):
    root = tmp_path / "lc"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "learning_curve.py"), "--llm", "mutate", "--seeds", "0,1",
           "--cycles", "2", "--candidates", "2", "--dataset", "digits", "--root", str(root), "--parallel", "2", "--",
           "--baselines", "lenet", "--limit-train", "400", "--limit-test", "200"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((root / "learning_curve.json").read_text())
    assert (root / "learning_curve.png").stat().st_size > 10_000
    assert set(report["curves"]) == {"learn", "control"} and report["window"] == [0, 1]
    for arm in ("learn", "control"):
        for point in report["curves"][arm]:
            rows = []
            for seed in (0, 1):
                store = Store(root / f"seed-{seed}" / arm / "archive.sqlite", readonly=True)
                rows += [r for r in store.candidates(cycle=point["cycle"]) if r.final]
                store.close()
            assert len(rows) == 4
            valid = sum(r.status == "ok" for r in rows) / len(rows)
            assert point["valid_rate"] == pytest.approx(valid)
            assert point["valid_rate_lo"] <= point["valid_rate"] <= point["valid_rate_hi"]
    # the control's updates are recorded as skipped, for that reason alone
    store = Store(root / "seed-0" / "control" / "archive.sqlite", readonly=True)
    assert all("learn.updates = false" in a["note"] for a in store.adapters())
    store.close()
    # the mutator does not learn: from the same seeds both arms propose the same candidates
    assert report["difference"]["valid"]["diff"] == 0.0
    assert "learn − control over cycles 0, 1 (0-based)" in proc.stdout

    # --no-run reads the finished archives again and gives the same figures; it runs nothing
    again = subprocess.run(cmd[:cmd.index("--")] + ["--no-run"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((root / "learning_curve.json").read_text())["curves"] == report["curves"]
    # a run stopped inside cycle 1: that cycle leaves its curve, and the difference is taken over cycle 0
    db = sqlite3.connect(root / "seed-1" / "control" / "archive.sqlite")
    with db:
        db.execute("UPDATE cycles SET finished_at = NULL WHERE cycle = 1")
    db.close()
    cut = subprocess.run(cmd[:cmd.index("--")] + ["--no-run"], capture_output=True, text=True, env=env, timeout=300)
    assert cut.returncode == 0, cut.stderr[-2000:]
    partial = json.loads((root / "learning_curve.json").read_text())
    assert [p["runs"] for p in partial["curves"]["control"]] == [2, 1] and partial["compared"] == [0]
    assert partial["curves"]["control"][0] == report["curves"]["control"][0]
    assert "every run had finished only cycles 0 of them" in cut.stdout
    assert "learn − control over cycles 0 (0-based)" in cut.stdout
    missing = subprocess.run(cmd[:cmd.index("--root") + 1] + [str(tmp_path / "none"), "--no-run"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode != 0 and "has no archive" in missing.stderr

    # the report draws both runs in one figure
    out = tmp_path / "report"
    assert main(["report", str(root / "seed-0" / "learn"), "--against", str(root / "seed-0" / "control"),
                 "--output", str(out)]) == 0
    assert (out / "compare.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "## Against control" in summary and summary.count("| control |") == 2
    assert main(["report", str(root / "seed-0" / "learn"), "--against", str(tmp_path / "nowhere")]) == 2
    assert "no archive.sqlite" in capsys.readouterr().err
