"""The graph's logic with a scripted LLM and an instant executor (routing, repair
bound, duplicates, trajectories, drain and resume). The real sandbox and the real
LLM are exercised in test_run_cli.py and their own suites."""
from __future__ import annotations

import difflib
import json

from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.config import load_config
from deltanas.agent.deps import DatasetInfo, Deps
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.runner import run_graph
from deltanas.agent.store import Store
from deltanas.tools.novelty import NoveltyIndex

from support import InstantExecutor, block_diff


def make_deps(tmp_path, llm, executor, **over) -> Deps:
    cfg = load_config(None, {"llm.spec": "mutate", "search.cycles": 2, "search.candidates": 3,
                             "baselines": ["lenet"], **over})
    run_dir = tmp_path / "run"
    (run_dir / "candidates").mkdir(parents=True, exist_ok=True)
    return Deps(config=cfg, llm=CoalescingBackend(llm, window_s=0.01), executor=executor,
                store=Store(run_dir / "archive.sqlite"), novelty=NoveltyIndex(),
                dataset=DatasetInfo("synthetic", (1, 28, 28), 10), run_dir=run_dir)


_tags = iter(range(1_000_000))


def good_answers(prompt):
    tag = f"g{next(_tags)}"
    return f"Here is my change:\n```diff\n{block_diff(prompt.base_source, tag)}```\nThis adds capacity."


def test_cycles_run_and_every_step_is_a_tool_call(tmp_path):
    counter = iter(range(10_000))
    llm = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, f'n{next(counter)}')}```")
    ex = InstantExecutor()
    deps = make_deps(tmp_path, llm, ex)
    out = run_graph(deps, InMemorySaver())
    assert out.status == "finished", out.error
    rows = [r for r in deps.store.candidates() if r.cycle >= 0]
    assert len(rows) == 6 and all(r.status == "ok" for r in rows)
    assert sorted(ex.calls) == sorted(["base-lenet"] + [r.id for r in rows])
    traj = deps.store.get_trajectory(rows[0].id)
    calls = [m["tool_calls"][0]["function"]["name"] for m in traj if m.get("tool_calls")]
    assert calls == ["propose_diff", "apply_diff", "check_novelty", "proxy_train"]
    assert traj[0]["role"] == "system" and traj[1]["role"] == "user"
    assert "synthetic" in traj[1]["content"]
    # the parent's measured accuracy is in the prompt
    base = deps.store.get("base-lenet")
    assert f"{100 * base.accuracy:.2f}" in traj[1]["content"] or f"{base.accuracy:.4f}" in traj[1]["content"]
    lines = (deps.run_dir / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["tools"][0]["function"]["name"] == "propose_diff"
    assert [c["summary"]["candidates"] for c in deps.store.cycles()] == [3, 3]
    # one batched call per cycle for the proposals
    assert deps.llm.batches[:1] == [3]


def test_repairs_are_bounded_and_feed_the_error_back(tmp_path):
    llm = ScriptedBackend(lambda p: "I think the network is fine as it is.")
    deps = make_deps(tmp_path, llm, InstantExecutor(), **{"search.cycles": 1, "search.candidates": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert all(r.status == "apply_failed" and r.error_code == "no_diff" and r.attempts == 2 for r in rows)
    traj = deps.store.get_trajectory(rows[0].id)
    repairs = [m for m in traj if m["role"] == "user"][1:]
    assert len(repairs) == 2 and all("no_diff" in m["content"] for m in repairs)
    # the model saw its own earlier answer before each repair turn
    last_prompt = llm.calls[-1][-1].messages
    assert [m["role"] for m in last_prompt][-2:] == ["assistant", "user"]


def test_repair_that_succeeds(tmp_path):
    state = {"n": 0}

    def answers(p):
        state["n"] += 1
        if p.messages[-1]["role"] == "user" and "no_diff" in p.messages[-1]["content"]:
            return good_answers(p)
        return "no idea"

    deps = make_deps(tmp_path, ScriptedBackend(answers), InstantExecutor(),
                     **{"search.cycles": 1, "search.candidates": 2})
    out = run_graph(deps, InMemorySaver())
    assert out.status == "finished", repr(out.error)
    rows = deps.store.candidates(cycle=0)
    assert all(r.status == "ok" and r.attempts == 1 for r in rows)


def test_copies_are_duplicates_and_not_trained(tmp_path):
    ex = InstantExecutor()
    llm = ScriptedBackend(lambda p: "```diff\n" + "".join(difflib.unified_diff(
        p.base_source.splitlines(True), (p.base_source + "\n\ndef _unused_helper():\n    return 0\n").splitlines(True),
        "a/model.py", "b/model.py")) + "```")
    deps = make_deps(tmp_path, llm, ex, **{"search.cycles": 1, "search.candidates": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert [r.status for r in rows] == ["duplicate", "duplicate"]
    assert ex.calls == ["base-lenet"]


def test_stop_drains_then_resume_finishes_without_duplicates(tmp_path):
    counter = iter(range(10_000))
    llm = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, f'r{next(counter)}')}```")
    holder = {}

    def stop_after_first_candidate(cid):
        if cid.startswith("c000"):
            holder["deps"].stop.set()

    ex = InstantExecutor(on_eval=stop_after_first_candidate)
    deps = make_deps(tmp_path, llm, ex, **{"search.cycles": 2, "search.candidates": 4})
    holder["deps"] = deps
    saver = InMemorySaver()
    assert run_graph(deps, saver).status == "stopped"
    done_before = [r.id for r in deps.store.candidates() if r.final]
    assert len(done_before) < 9
    deps.stop.clear()
    ex.on_eval = None
    out = run_graph(deps, saver)
    assert out.status == "finished", repr(out.error)
    rows = [r for r in deps.store.candidates() if r.cycle >= 0]
    assert len(rows) == 8 and all(r.final for r in rows)
    trained = [c for c in ex.calls if c != "base-lenet"]
    assert len(trained) == len(set(trained)) == 8  # no candidate trained twice
