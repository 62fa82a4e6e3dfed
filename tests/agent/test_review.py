"""The human gate (search.review, agent/loop/review.py): novel candidates wait for a person's
yes / no / edit as LangGraph interrupts; answers land in the archive and the trajectories; a bad
answer is asked again with the reason; a run killed while it waits asks the same questions on
resume and records every candidate once (the real SQLite checkpointer and archive)."""
from __future__ import annotations

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.archive import Store
from deltanas.agent.learning.examples import export_records, preference_set, sft_example
from deltanas.agent.loop.review import check_edit, parse_answer
from deltanas.agent.run.driver import run_graph, sqlite_saver
from deltanas.tools.diff_write import make_diff
from deltanas.tools.zoo import get_baseline

from support import loop_deps


def _deps(tmp_path, **over):
    return loop_deps(tmp_path, None, **{"search.review": True, "search.candidates": 3, **over})


def _trained(deps) -> list[str]:
    return [c for c in deps.executor.calls if not c.startswith("base-")]  # the baseline is measured first


def _edited(source: str) -> str:
    """The parent with one more layer line: what a person might type in the editor."""
    return source.replace("super().__init__()", "super().__init__()\n        self.extra = nn.Identity()", 1)


def test_novel_candidates_wait_and_each_verdict_is_recorded(tmp_path):
    deps = _deps(tmp_path)
    saver = InMemorySaver()
    out = run_graph(deps, saver)
    assert out.status == "waiting" and len(out.questions) == 3
    assert _trained(deps) == []  # nothing trained before its answer
    q = {x["candidate_id"]: x for x in out.questions}
    for x in q.values():
        assert x["kind"] == "review" and x["diff"].startswith("--- a/model.py") and x["added"] > 0
        assert x["parent_accuracy"] is not None and 0 <= x["similarity"] < 1 and x["error"] is None
    yes, no, edit = sorted(q)
    parent = q[edit]["parent_source"]
    mine = _edited(q[edit]["source"])  # the model's version, one line more

    # One answer at a time: the others keep waiting.
    out = run_graph(deps, saver, {q[yes]["id"]: {"verdict": "yes"}})
    assert out.status == "waiting" and {x["candidate_id"] for x in out.questions} == {no, edit}
    assert _trained(deps) == [yes]
    ids = {x["candidate_id"]: x["id"] for x in out.questions}
    out = run_graph(deps, saver, {ids[no]: {"verdict": "no", "reason": "  pooling twice is pointless "},
                                  ids[edit]: {"verdict": "edit", "source": mine, "reason": "one more"}})
    assert out.status == "finished", out
    assert sorted(_trained(deps)) == sorted([yes, edit])

    rows = {r.id: r for r in deps.store.candidates() if r.kind != "baseline"}
    assert rows[yes].status == "ok"
    assert rows[no].status == "rejected" and rows[no].error_message == "pooling twice is pointless"
    assert rows[no].accuracy is None and not (tmp_path / "run" / "candidates" / no / "model.py").exists()
    assert rows[edit].status == "ok" and rows[edit].source == mine
    assert rows[edit].diff == make_diff(parent, mine)

    # The verdicts are in the trajectories, and export marks them.
    by_id = {r["meta"]["candidate_id"]: r for r in export_records(deps.store)}
    assert by_id[no]["meta"]["human"] == {"verdict": "no", "reason": "pooling twice is pointless"}
    assert by_id[edit]["meta"]["human"]["verdict"] == "edit" and by_id[yes]["meta"]["human"]["verdict"] == "yes"
    # The person's edit is the answer an update learns; a rejection is a DPO `rejected` answer.
    example = sft_example(deps.store.get_trajectory(edit))
    assert example["completion"][0]["content"] == f"```diff\n{make_diff(parent, mine)}```"
    _, prefs = preference_set(deps.store, "valid", 5, up_to_cycle=0)
    assert any(p["rejected"][0]["content"] == rows[no].completion for p in prefs)


def test_a_bad_answer_is_asked_again_with_the_reason(tmp_path):
    deps = _deps(tmp_path, **{"search.candidates": 1})
    saver = InMemorySaver()
    (q,) = run_graph(deps, saver).questions
    parent = q["parent_source"]
    for bad, why in (({"verdict": "maybe"}, "must be one of"), ("yes", "is a dict"),
                     ({"verdict": "edit"}, "needs the whole new model.py"),
                     ({"verdict": "edit", "source": "def broken(:\n"}, "the edit was refused"),
                     ({"verdict": "edit", "source": parent}, "leaves model.py as it was")):
        out = run_graph(deps, saver, {q["id"]: bad})
        assert out.status == "waiting", bad
        (q,) = out.questions
        assert why in q["error"], (bad, q["error"])
    assert _trained(deps) == []
    out = run_graph(deps, saver, {q["id"]: {"verdict": "yes"}})
    assert out.status == "finished" and len(_trained(deps)) == 1


def test_a_run_killed_while_it_waits_asks_the_same_questions_and_records_each_candidate_once(tmp_path):
    deps = _deps(tmp_path)
    saver = sqlite_saver(deps)
    first = run_graph(deps, saver)
    assert first.status == "waiting"
    answered = first.questions[0]
    assert run_graph(deps, saver, {answered["id"]: {"verdict": "yes"}}).status == "waiting"
    deps.close()  # the process ends here, two questions open

    again = _deps(tmp_path)  # a new process on the same run directory
    saver = sqlite_saver(again)
    out = run_graph(again, saver)
    assert out.status == "waiting"
    assert sorted(x["id"] for x in out.questions) == sorted(x["id"] for x in first.questions[1:])
    assert _trained(again) == []  # the answered one trained before the kill, and is not redone
    out = run_graph(again, saver, {x["id"]: {"verdict": "no"} for x in out.questions})
    assert out.status == "finished"
    rows = [r for r in Store(tmp_path / "run" / "archive.sqlite", readonly=True).candidates() if r.kind != "baseline"]
    assert len(rows) == 3 and sorted(r.status for r in rows) == ["ok", "rejected", "rejected"]
    assert {r.error_message for r in rows if r.status == "rejected"} == {"rejected in review"}
    again.close()


def test_without_review_nothing_waits(tmp_path):
    deps = loop_deps(tmp_path, None, **{"search.candidates": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished" and len(_trained(deps)) == 2


@pytest.mark.parametrize("answer", [None, 3, [], {"verdict": None}, {"verdict": "no", "reason": 5},
                                    {"verdict": "edit", "source": "x" * 200_001}])
def test_parse_answer_refuses_what_is_not_an_answer(answer):
    with pytest.raises(ValueError):
        parse_answer(answer)


def test_an_edit_is_held_to_the_rules_a_model_answer_is():
    lenet = get_baseline("lenet").source
    touched = lenet.replace("clip_grad_norm_(self.parameters(), 3)", "clip_grad_norm_(self.parameters(), 30)")
    assert touched != lenet
    with pytest.raises(ValueError, match="refused"):  # the training code is the sandbox's to keep
        check_edit(lenet, touched, allow_train_changes=False)
    assert check_edit(lenet, touched, allow_train_changes=True).diff.count("\n-") == 1
    ok = check_edit(lenet, _edited(lenet), allow_train_changes=False)
    assert (ok.added, ok.removed) == (1, 0) and ok.diff == make_diff(lenet, _edited(lenet))
