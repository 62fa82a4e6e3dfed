"""bench/retry_duplicates.py end to end on real runs (the rule-based mutator proposes, the real
sandbox trains on the real digits set): both arms run from one seed, and the figures it prints
are recomputed here from the archives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltanas.agent.archive import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_benchmark_runs_both_arms_and_its_figures_match_the_archives(tmp_path):
    root = tmp_path / "rd"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "retry_duplicates.py"), "--llm", "mutate", "--seeds", "0",
           "--cycles", "1", "--candidates", "4", "--quick", "--from-cycle", "0", "--root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((root / "retry_duplicates.json").read_text())["totals"]
    for arm in ("on", "off"):
        store = Store(root / f"s0-{arm}" / "archive.sqlite", readonly=True)
        rows = [r for r in store.candidates() if r.kind != "baseline"]
        assert len(rows) == got[arm]["n"] == 4
        assert got[arm]["novel_valid"] == sum(r.status == "ok" and r.novel for r in rows)
        assert got[arm]["duplicates"] == sum(r.status == "duplicate" for r in rows)
        parent = {r.id: r.accuracy for r in store.candidates()}
        assert got[arm]["improved"] == sum(r.status == "ok" and r.accuracy > parent[r.parent_id] for r in rows)
        asked = [m for r in rows for m in store.get_trajectory(r.id) if m["role"] == "user"
                 and m["content"].startswith("Your answer could not be used. Error `duplicate`")]
        assert got[arm]["retries"] == len(asked)
    off = Store(root / "s0-off" / "archive.sqlite", readonly=True).candidates()
    assert got["off"]["retries"] == 0 and all(r.attempts == 0 for r in off if r.status == "duplicate")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("novel and valid"))
    assert line.split()[-2:] == [f"{got[arm]['novel_valid'] / 4:.1%}" for arm in ("on", "off")]
