"""`deltanas report`: per-cycle metrics recomputed from the archive, PNG plots, markdown."""
from __future__ import annotations

import json
import subprocess
import sys
from statistics import mean

from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.archive import Store
from deltanas.agent.config import load_config
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.loop.deps import DatasetInfo, Deps
from deltanas.agent.run.driver import run_graph
from deltanas.tools.novelty import NoveltyIndex

from support import InstantExecutor, block_diff


def test_report_recomputes_from_the_archive_and_writes_plots(tmp_path):
    counter = iter(range(10_000))

    def answers(p):  # every third answer is no diff at all, so the rates differ from 100%
        n = next(counter)
        return "no idea" if n % 3 == 0 else f"```diff\n{block_diff(p.base_source, f'r{n}')}```"

    cfg = load_config(None, {"llm.spec": "mutate", "search.cycles": 2, "search.candidates": 3,
                             "baselines": ["lenet"], "search.max_repairs": 0})
    run_dir = tmp_path / "run"
    (run_dir / "candidates").mkdir(parents=True)
    deps = Deps(config=cfg, llm=CoalescingBackend(ScriptedBackend(answers), window_s=0.01),
                executor=InstantExecutor(), store=Store(run_dir / "archive.sqlite"), novelty=NoveltyIndex(),
                datasets={"synthetic": DatasetInfo("synthetic", (1, 28, 28), 10)}, run_dir=run_dir, learner_note="none")
    assert run_graph(deps, InMemorySaver()).status == "finished"
    deps.store.close()

    r = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "report", str(run_dir), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    store = Store(run_dir / "archive.sqlite", readonly=True)
    for m in metrics["cycles"]:
        rows = store.candidates(cycle=m["cycle"])
        ok = [x.accuracy for x in rows if x.status == "ok"]
        assert m["candidates"] == len(rows) == 3
        assert m["valid_rate"] == len(ok) / 3
        assert m["applied_rate"] == sum(x.status != "apply_failed" for x in rows) / 3
        assert m["mean_accuracy"] == (mean(ok) if ok else None)
        assert m["completion_tokens"] == mean(x.completion_tokens for x in rows)
        assert m["lora"]["status"] == ("deferred" if m["cycle"] == 1 else "skipped")  # no update after the last
    assert 0 < metrics["overall"]["valid_rate"] < 1
    for name in ("valid_rate.png", "accuracy.png", "accuracy_hist.png", "diff_lines.png"):
        assert (run_dir / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report" / "summary.md").read_text()
    assert md.count("\n| ") >= 3 and "valid" in md and "lenet" in md
    r = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "report", str(run_dir)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "per-cycle metrics" in r.stdout
    r = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "report", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no archive.sqlite" in r.stderr
