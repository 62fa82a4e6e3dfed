"""bench/learnability.py: which answers it trains on and scores (real archives in SQLite), its
interval on known data, and the whole measurement on the tiny GGUF model with a real adapter."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltanas.agent.archive import CandidateRow, Store

from support import load_bench

ROOT = Path(__file__).resolve().parents[2]


def make_run(path: Path, tag: str) -> Path:
    """A run's archive: a baseline at 0.5; in cycle 0 (the mutator's) one better variant; in cycle 1
    two answers that beat their parent, one that did not, a near-copy and a crash."""
    path.mkdir(parents=True)
    store = Store(path / "archive.sqlite")
    store.upsert(CandidateRow(id="base", cycle=-1, idx=0, kind="baseline", dataset="d", status="ok", accuracy=0.5))
    rows = [("m0", 0, "ok", 0.7), ("up1", 1, "ok", 0.6), ("up2", 1, "ok", 0.5), ("down", 1, "ok", 0.4),
            ("copy", 1, "duplicate", None), ("crash", 1, "crashed", None)]
    for i, (cid, cycle, status, acc) in enumerate(rows):
        store.upsert(CandidateRow(id=cid, cycle=cycle, idx=i, kind="delta", dataset="d", status=status, accuracy=acc,
                                  parent_id="base", novel=status == "ok", completion=f"{tag} {cid}"))
        store.put_trajectory(cid, [{"role": "system", "content": "Propose a diff."},
                                   {"role": "user", "content": f"{tag}: improve model.py ({cid})"},
                                   {"role": "assistant", "content": f"```diff\n+ {tag} {cid}\n```"}])
    return path


def test_it_trains_on_improving_answers_and_scores_every_answer_that_trained(tmp_path):
    la = load_bench("learnability")
    run = make_run(tmp_path / "r", "a")
    train = la.training([run], from_cycle=1, limit=10, seed=0)
    assert sorted(e["completion"][0]["content"] for e in train) == ["```diff\n+ a up1\n```", "```diff\n+ a up2\n```"]
    assert len(la.training([run], from_cycle=0, limit=10, seed=0)) == 3  # the mutator's too
    assert len(la.training([run], from_cycle=1, limit=1, seed=0)) == 1
    held = la.held_out([run], from_cycle=1)
    assert sorted((e["completion"][0]["content"], better) for e, better in held) == [
        ("```diff\n+ a down\n```", False), ("```diff\n+ a up1\n```", True),
        ("```diff\n+ a up2\n```", True)]  # as good as the parent counts as improving, as `learn` has it


def test_the_interval_is_right_on_known_data():
    la = load_bench("learnability")
    assert la.bootstrap([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)
    diff, lo, hi = la.bootstrap([0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], n=2000)
    assert diff == 0.0 and lo < 0 < hi


@pytest.mark.slow
def test_the_measurement_runs_on_a_real_model_and_adapter(tmp_path):
    runs = [make_run(tmp_path / f"r{k}", f"run {k}") for k in range(3)]
    out = tmp_path / "la.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "learnability.py"), "--model", "tinycoder", "--train", str(runs[0]),
           str(runs[1]), "--held-out", str(runs[2]), "--epochs", "1", "--lr", "1e-3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = json.loads(out.read_text())["results"]
    assert res["n"] == {"train": 4, "good": 2, "other": 1} and res["steps"] == 4
    assert all(math.isfinite(v) for v in res["shift"].values())
    assert res["shift"]["train"] > 0  # the update raised the likelihood of what it trained on
    assert res["difference"][1] <= res["difference"][0] <= res["difference"][2]
    assert "improving − other" in proc.stdout
    again = subprocess.run([*cmd[:6], str(runs[2]), "--held-out", str(runs[2])], capture_output=True, text=True,
                           env=env)
    assert again.returncode == 2 and "both trained on and held out" in again.stderr
