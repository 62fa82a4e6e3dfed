"""The graph's logic with a scripted LLM and an instant executor (routing, repair
bound, duplicates, trajectories, drain and resume). The real sandbox and the real
LLM are exercised in test_run_cli.py and their own suites."""
from __future__ import annotations

import difflib
import json
import os
import re
import signal
import threading
import time

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.archive import Store
from deltanas.agent.config import load_config
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.loop.deps import DatasetInfo, Deps
from deltanas.agent.run import driver
from deltanas.agent.run.driver import run_graph, run_with_signals, sqlite_saver
from deltanas.tools.novelty import NoveltyIndex

from support import InstantExecutor, block_diff, threads_inside


def make_deps(tmp_path, llm, executor, **over) -> Deps:
    cfg = load_config(None, {"llm.spec": "mutate", "search.cycles": 2, "search.candidates": 3,
                             "baselines": ["lenet"], **over})
    run_dir = tmp_path / "run"
    (run_dir / "candidates").mkdir(parents=True, exist_ok=True)
    return Deps(config=cfg, llm=CoalescingBackend(llm, window_s=0.01), executor=executor,
                store=Store(run_dir / "archive.sqlite"), novelty=NoveltyIndex(),
                datasets={"synthetic": DatasetInfo("synthetic", (1, 28, 28), 10)}, run_dir=run_dir)


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


class SlowRepairs(ScriptedBackend):
    """Proposes at once; a repair takes two minutes of decoding, which only a cancel cuts short."""

    def __init__(self, answers):
        super().__init__(answers)
        self.repairing = threading.Event()

    def generate(self, prompts, sampling):
        repair = len(prompts[0].messages) > 2  # the chat goes on after the model's first answer
        self.delay_s = 120.0 if repair else 0.0
        if repair:
            self.repairing.set()
        return super().generate(prompts, sampling)


@pytest.fixture
def sigterm_guard():
    """The tests below SIGTERM themselves; one that arrived after run_with_signals restored the
    handlers must not end the test run."""
    outer = signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    signal.signal(signal.SIGTERM, outer)


def test_one_interrupt_drains_two_cut_a_slow_repair_and_a_resume_records_each_candidate_once(tmp_path,
                                                                                            sigterm_guard):
    counter = iter(range(10_000))

    def answers(p):
        return f"```diff\n{block_diff(p.base_source, f's{next(counter)}')}```"

    over = {"search.cycles": 2, "search.candidates": 3}
    holder: dict = {}

    def session(llm, executor):
        holder["deps"] = deps = make_deps(tmp_path, llm, executor, **over)
        return deps, sqlite_saver(deps)  # the CLI's checkpointer: each session reopens the run's file

    def interrupt(cid):  # the first SIGTERM arrives while c000-000 trains
        if cid == "c000-000":
            os.kill(os.getpid(), signal.SIGTERM)
            assert holder["deps"].stop.wait(5)

    deps, saver = session(ScriptedBackend(answers), InstantExecutor(on_eval=interrupt))
    assert run_with_signals(deps, saver, period_s=0.05).status == "stopped"
    assert deps.store.get("c000-000").status == "ok"  # in flight at the interrupt: finished, archived
    assert not deps.store.candidates(cycle=1)

    slow = SlowRepairs(answers)
    deps, saver = session(slow, FailingOnceExecutor())  # every first training crashes: repairs
    when: dict = {}

    def interrupt_twice():
        assert slow.repairing.wait(30)
        time.sleep(0.2)  # the other candidates' repairs queue behind the batch in flight
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        when["repairs_answered"] = sum(len(batch[0].messages) > 2 for batch in slow.calls)
        when["second"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    out = run_with_signals(deps, saver, period_s=0.05)
    returned = time.monotonic()
    assert out.status == "stopped" and not out.stuck
    # the first interrupt let the repair in flight go on; the second cut it
    assert when["repairs_answered"] == 0 and when["second"] < returned < when["second"] + 10
    assert not threads_inside("agent/llm/coalesce.py")
    recorded = {r.id for r in deps.store.candidates() if r.final and r.cycle >= 0}

    ex = InstantExecutor()
    deps, saver = session(ScriptedBackend(answers), ex)
    assert run_with_signals(deps, saver, period_s=0.05).status == "finished"
    rows = [r for r in deps.store.candidates() if r.cycle >= 0]
    assert sorted(r.id for r in rows) == [f"c00{c}-00{i}" for c in range(2) for i in range(3)]
    assert all(r.status == "ok" for r in rows), [(r.id, r.status) for r in rows]
    trained = [c for c in ex.calls if not c.startswith("base-")]
    assert len(trained) == len(set(trained)) and not set(trained) & recorded  # nothing doubled


class Deaf(ScriptedBackend):
    """A backend that ignores cancel: its generation ends only when the test lets it."""

    def __init__(self, answers):
        super().__init__(answers)
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, prompts, sampling):
        self.started.set()
        self.release.wait(30)
        return super().generate(prompts, sampling)

    def cancel(self):
        pass


def test_a_kill_returns_even_when_a_backend_ignores_it_and_says_so(tmp_path, sigterm_guard, monkeypatch):
    """The session then exits without waiting for the stuck thread (Python would join it at exit)."""
    monkeypatch.setattr(driver, "KILL_GRACE_S", 0.5)
    deaf = Deaf(good_answers)
    deps = make_deps(tmp_path, deaf, InstantExecutor(), **{"search.cycles": 1, "search.candidates": 2})
    when: dict = {}

    def interrupt_twice():
        assert deaf.started.wait(30)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        when["second"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    try:
        out = run_with_signals(deps, InMemorySaver(), period_s=0.05)
        took = time.monotonic() - when["second"]
    finally:
        deaf.release.set()
    assert out.status == "stopped" and out.stuck and took < 2


class FailingOnceExecutor(InstantExecutor):
    """Training crashes for each candidate's first version (a shape error), as a sandbox reports it."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def evaluate(self, source, candidate_id, out_dir, dataset=None):
        if candidate_id.startswith("base-") or candidate_id in self.seen:
            return super().evaluate(source, candidate_id, out_dir, dataset)
        self.seen.add(candidate_id)
        with self.lock:
            self.calls.append(candidate_id)
        from deltanas.tools.proxy import EvalOutcome

        return EvalOutcome(status="crashed", accuracy=None, param_count=None, train_seconds=None, total_seconds=0.01,
                           error="RuntimeError: mat1 and mat2 shapes cannot be multiplied",
                           log_tail="Traceback...\nRuntimeError: mat1 and mat2 shapes cannot be multiplied (8x800 and 512x120)")


def test_a_training_failure_is_repaired_with_the_error_fed_back(tmp_path):
    counter = iter(range(10_000))
    llm = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, f't{next(counter)}')}```")
    ex = FailingOnceExecutor()
    deps = make_deps(tmp_path, llm, ex, **{"search.cycles": 1, "search.candidates": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert all(r.status == "ok" and r.attempts == 1 for r in rows), [(r.status, r.attempts) for r in rows]
    assert sorted(ex.calls).count(rows[0].id) == 2  # trained, repaired, trained again
    traj = deps.store.get_trajectory(rows[0].id)
    repair_turn = [m for m in traj if m["role"] == "user"][1]["content"]
    assert "crashed" in repair_turn and "mat1 and mat2 shapes" in repair_turn
    calls = [m["tool_calls"][0]["function"]["name"] for m in traj if m.get("tool_calls")]
    assert calls == ["propose_diff", "apply_diff", "check_novelty", "proxy_train",
                     "propose_diff", "apply_diff", "check_novelty", "proxy_train"]


def test_a_training_failure_past_the_repair_budget_is_recorded_as_it_failed(tmp_path):
    counter = iter(range(10_000))
    llm = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, f'u{next(counter)}')}```")
    deps = make_deps(tmp_path, llm, FailingOnceExecutor(),
                     **{"search.cycles": 1, "search.candidates": 1, "search.max_repairs": 0})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    (row,) = deps.store.candidates(cycle=0)
    assert row.status == "crashed" and row.attempts == 0 and "mat1 and mat2" in row.error_message


def test_each_candidate_records_how_its_answer_was_constrained(tmp_path):
    from deltanas.tools.diff_grammar import DIFF_PREFIX

    class GrammarScripted(ScriptedBackend):
        supports_grammar = True
        supports_prefix = True

    seen = []

    def answer(p):
        seen.append(p)
        return f"```diff\n{block_diff(p.base_source, f'v{len(seen)}')}```"

    deps = make_deps(tmp_path, GrammarScripted(answer), InstantExecutor(),
                     **{"search.cycles": 1, "search.candidates": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert [r.constrain for r in rows] == ["grammar", "grammar"]
    assert all(r.sites and r.sites == sorted(r.sites) for r in rows)
    first = seen[:2]
    assert all(p.grammar and p.prefix == DIFF_PREFIX for p in first)
    lines = first[0].base_source.splitlines()
    for i in rows[0].sites:  # the prompt names every line the grammar holds the answer to
        assert f"line {i + 1}: `{lines[i].strip()}`" in first[0].messages[-1]["content"]
    ideas = [p.messages[-1]["content"].split("This candidate's idea")[1].split("\n")[0] for p in first]
    assert ideas[0] != ideas[1]  # each candidate its own kinds of layer, which its grammar holds it to
    # a plain scripted backend takes neither prefix nor grammar: its answers are recorded as free
    deps2 = make_deps(tmp_path / "b", ScriptedBackend(answer), InstantExecutor(),
                      **{"search.cycles": 1, "search.candidates": 1})
    assert run_graph(deps2, InMemorySaver()).status == "finished"
    assert [r.constrain for r in deps2.store.candidates(cycle=0)] == ["none"]



def test_answers_the_grammar_stopped_early_are_recorded_and_said(tmp_path, caplog):
    """A tokenizer the grammar misreads ends answers after a few tokens (seen on a GPU machine): the
    run says so, and the archive keeps which answers and why, rather than a bare apply failure."""
    class Stopped(ScriptedBackend):
        def generate(self, prompts, sampling):
            out = super().generate(prompts, sampling)
            out[0].meta["grammar_error"] = 'Parser Error: token "ĊĠĠ" does not satisfy the grammar'
            return out

    deps = make_deps(tmp_path, Stopped(lambda p: "```diff\n--- a/model.py\n+++ b/model.py\n@@"), InstantExecutor(),
                     **{"search.cycles": 1, "search.candidates": 2, "search.max_repairs": 0})
    with caplog.at_level("WARNING"):
        assert run_graph(deps, InMemorySaver()).status == "finished"
    assert deps.store.get_meta("grammar_errors:0") == {"c000-000": 'Parser Error: token "ĊĠĠ" does not satisfy the grammar'}
    assert "the answer grammar stopped 1 of 2 answers early" in caplog.text


def test_a_baseline_of_your_own_starts_the_search_and_one_that_fails_stops_it_clearly(tmp_path):
    from deltanas.tools.zoo import get_baseline

    mine = tmp_path / "mynet.py"
    mine.write_text(get_baseline("lenet").source.replace("16, kernel_size=5", "24, kernel_size=5").replace(
        "nn.Conv2d(16, 32", "nn.Conv2d(24, 32"))
    counter = iter(range(10_000))
    llm = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, f'w{next(counter)}')}```")
    deps = make_deps(tmp_path, llm, InstantExecutor(), **{"search.cycles": 1, "search.candidates": 2,
                                                          "baselines": [str(mine)]})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    assert deps.store.get("base-mynet").source == mine.read_text()
    assert {r.parent_id for r in deps.store.candidates(cycle=0)} == {"base-mynet"}

    class Broken(InstantExecutor):
        def evaluate(self, source, candidate_id, out_dir, dataset=None):
            from deltanas.tools.proxy import EvalOutcome

            return EvalOutcome(status="crashed", accuracy=None, param_count=None, train_seconds=None,
                               total_seconds=0.1, error="RuntimeError: shapes do not match", log_tail="")

    deps2 = make_deps(tmp_path / "b", llm, Broken(), **{"search.cycles": 1, "baselines": [str(mine)]})
    out = run_graph(deps2, InMemorySaver())
    assert out.status == "failed" and "mynet.py did not train" in str(out.error) and "shapes do not match" in str(out.error)
    assert deps2.store.get("base-mynet") is None  # a resume after the fix trains it again


def test_duplicates_can_be_trained_for_the_record_and_never_become_parents(tmp_path):
    same = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, 'same')}```")
    ex = InstantExecutor()
    deps = make_deps(tmp_path, same, ex, **{"search.cycles": 2, "search.candidates": 2,
                                            "search.train_duplicates": True})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    dup = [r for r in rows if r.status == "duplicate"]
    assert dup and all(r.accuracy is not None for r in dup)  # trained, and recorded as duplicates
    assert all(r.id in ex.calls for r in dup)
    assert not {r.parent_id for r in deps.store.candidates(cycle=1)} & {r.id for r in dup}


def _copy_diff(source: str) -> str:
    """A diff whose network is the parent's: a near-copy under the novelty rule."""
    return "```diff\n" + "".join(difflib.unified_diff(
        source.splitlines(True), (source + "\n\ndef _unused_helper():\n    return 0\n").splitlines(True),
        "a/model.py", "b/model.py")) + "```"


class _Grammared(ScriptedBackend):
    """A scripted model the search treats as decoding under a grammar: edit sites and layer kinds
    are drawn for it (the grammar itself is built, and not followed by the script)."""
    supports_grammar = True


def test_a_near_copy_goes_back_to_the_model_with_new_edit_sites_and_then_trains(tmp_path):
    from deltanas.agent.loop.answer_format import sites_for

    seen = []

    def answer(p):
        seen.append(p)
        asked_again = "Error `duplicate`" in p.messages[-1]["content"]
        return f"```diff\n{block_diff(p.base_source, f'n{next(_tags)}')}```" if asked_again else _copy_diff(p.base_source)

    ex = InstantExecutor()
    deps = make_deps(tmp_path, _Grammared(answer), ex, **{"search.cycles": 1, "search.candidates": 2,
                                                          "llm.constrain": "grammar", "llm.sites": "sampled",
                                                          "search.retry_widen": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert [(r.status, r.attempts) for r in rows] == [("ok", 1), ("ok", 1)]
    assert sorted(ex.calls) == ["base-lenet", "c000-000", "c000-001"]  # the near-copies were never trained
    parent = deps.store.get("base-lenet").source
    for r in rows:
        chat = deps.store.get_trajectory(r.id)
        turn = next(m["content"] for m in chat if m["role"] == "user" and "Error `duplicate`" in m["content"])
        assert re.search(r"near-copy of base-lenet \(similarity 0\.9\d; a new network is below 0\.90\)", turn)
        first = sites_for(deps.config, deps.llm, parent, 0, r.idx)
        assert first and r.sites and r.sites != first  # drawn again for the retry, and recorded
        assert len(r.sites) == len(first) + deps.config.search.retry_widen == 6  # and more of them
        lines = parent.splitlines()
        assert all(f"line {i + 1}: `{lines[i].strip()}`" in turn for i in r.sites)
    retries = [p for p in seen if "Error `duplicate`" in p.messages[-1]["content"]]
    assert len(retries) == 2 and all(p.grammar for p in retries)  # the two retries may come in either order
    assert sorted(p.hunks for p in retries) == sorted(len(r.sites) for r in rows)


def test_near_copies_are_retried_within_max_repairs_and_recorded_when_they_stay(tmp_path):
    calls = []
    llm = ScriptedBackend(lambda p: calls.append(p) or _copy_diff(p.base_source))
    deps = make_deps(tmp_path, llm, InstantExecutor(), **{"search.cycles": 1, "search.candidates": 2,
                                                         "search.max_repairs": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert [(r.status, r.attempts) for r in rows] == [("duplicate", 2), ("duplicate", 2)]
    assert len(calls) == 2 * 3

    calls.clear()
    off = make_deps(tmp_path / "off", llm, InstantExecutor(), **{"search.cycles": 1, "search.candidates": 2,
                                                                 "search.retry_duplicates": False})
    assert run_graph(off, InMemorySaver()).status == "finished"
    assert [(r.status, r.attempts) for r in off.store.candidates(cycle=0)] == [("duplicate", 0), ("duplicate", 0)]
    assert len(calls) == 2
