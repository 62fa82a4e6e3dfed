"""The chat session's graph (agent/loop/chat.py) and its background trainer (agent/run/trainer.py):
a request is proposed against the parent it names or the best so far; each proposal waits for a
person (yes / no / revise / edit); accepted ones are archived as queued and trained by the trainer;
the feedback reaches the model as a message; a session killed at any question resumes at the same
one, with nothing asked of the model twice (the real SQLite checkpointer and archive)."""
from __future__ import annotations

import threading

import pytest

from deltanas.agent.learning.examples import export_records, preference_set, sft_example
from deltanas.agent.loop.chat import parse_request
from deltanas.agent.run.driver import run_chat, sqlite_saver
from deltanas.agent.run.trainer import Trainer

from support import block_diff, loop_deps


def _deps(tmp_path, answer=None, **over):
    return loop_deps(tmp_path, None, answer, **{"search.candidates": 2, **over})


def _only(out, kind):
    qs = [q for q in out.questions if q["kind"] == kind]
    assert out.status == "waiting" and qs, out
    return qs


def _train_all(deps) -> list:
    done = threading.Event()
    rows = []
    trainer = Trainer(deps, lambda row, err: (rows.append((row, err)), done.set()))
    want = len(trainer.sweep())
    while len(rows) < want:
        assert done.wait(30)
        done.clear()
    trainer.close(10)
    return rows


def test_a_request_is_proposed_reviewed_revised_and_trained(tmp_path):
    seen = []
    counter = iter(range(1000))

    def answer(prompt):
        seen.append(prompt)
        return f"```diff\n{block_diff(prompt.base_source, f'k{next(counter)}')}```"

    deps = _deps(tmp_path, answer)
    saver = sqlite_saver(deps)
    (q,) = _only(run_chat(deps, saver), "request")
    assert q["turn"] == 0 and q["error"] is None
    assert [c for c in deps.executor.calls] == ["base-lenet"]  # the baseline trained first

    # An unknown parent is refused with the reason, and asked again.
    (q,) = _only(run_chat(deps, saver, {q["id"]: {"text": "wider convs", "parent_id": "nope"}}), "request")
    assert "no candidate 'nope'" in q["error"]
    reviews = _only(run_chat(deps, saver, {q["id"]: {"text": "  try   wider convs ", "parent_id": None}}), "review")
    assert sorted(r["candidate_id"] for r in reviews) == ["h000-00", "h000-01"]
    assert all(r["parent_id"] == "base-lenet" and r["diff"] for r in reviews)
    assert "Goal: try wider convs." in seen[0].messages[-1]["content"]  # the request is the prompt's goal
    assert len(seen) == 2 and deps.executor.calls == ["base-lenet"]  # nothing trains before a yes

    a, b = sorted(reviews, key=lambda r: r["candidate_id"])
    # Revise: the feedback goes to the model as a message, and its new answer is asked about.
    out = run_chat(deps, saver, {a["id"]: {"verdict": "revise", "reason": "fewer channels please"}})
    assert len(seen) == 3 and "fewer channels please" in seen[2].messages[-1]["content"]
    assert seen[2].messages[-2]["role"] == "assistant"  # after its own first answer
    again = {r["candidate_id"]: r for r in _only(out, "review")}
    assert set(again) == {"h000-00", "h000-01"} and again["h000-00"]["revisions"] == 1
    assert again["h000-00"]["diff"] != a["diff"]
    out = run_chat(deps, saver, {again["h000-00"]["id"]: {"verdict": "yes"},
                                 again["h000-01"]["id"]: {"verdict": "no", "reason": "not this"}})
    (q,) = _only(out, "request")
    assert q["turn"] == 1
    rows = {r.id: r for r in deps.store.candidates() if r.id.startswith("h")}
    assert rows["h000-00"].status == "queued" and rows["h000-01"].status == "rejected"
    assert deps.executor.calls == ["base-lenet"]  # the graph itself trains nothing

    trained = _train_all(deps)
    assert [(r.id, r.status, e) for r, e in trained] == [("h000-00", "ok", None)]
    assert deps.executor.calls == ["base-lenet", "h000-00"]
    row = deps.store.get("h000-00")
    assert row.accuracy is not None and row.cycle == 0
    # The trajectory holds the request, the first answer, the feedback, the revised answer, the
    # verdict and the training; export marks it human-labelled, and the SFT pair ends on the revision.
    names = [c["function"]["name"] for m in deps.store.get_trajectory("h000-00") for c in m.get("tool_calls") or []]
    assert names == ["propose_diff", "apply_diff", "check_novelty", "human_review", "propose_diff", "apply_diff",
                     "check_novelty", "human_review", "proxy_train"]
    meta = {r["meta"]["candidate_id"]: r["meta"] for r in export_records(deps.store)}
    assert meta["h000-00"]["human"]["verdict"] == "yes" and meta["h000-01"]["human"]["reason"] == "not this"
    example = sft_example(deps.store.get_trajectory("h000-00"))
    assert "fewer channels please" in example["prompt"][-1]["content"]
    assert (tmp_path / "run" / "trajectories.jsonl").read_text().count("h000-0") == 1  # the finished one
    # Where DPO is on, the feedback is a preference: the revised answer over the one sent back.
    ids, prefs = preference_set(deps.store, "valid", 5, up_to_cycle=0)
    pair = prefs[ids.index("h000-00>revised-0")]
    assert pair["rejected"][0]["content"] == f"```diff\n{a['diff']}```"
    assert pair["chosen"] == example["completion"] and pair["chosen"] != pair["rejected"]
    assert pair["prompt"] == example["prompt"][:2]

    # The next request, on the best so far (h000-00 now), is served as turn 1.
    reviews = _only(run_chat(deps, saver, {q["id"]: {"text": "deeper", "parent_id": None}}), "review")
    best = max(deps.store.candidates(status="ok"), key=lambda r: r.accuracy)
    assert {r["parent_id"] for r in reviews} == {best.id} and reviews[0]["candidate_id"].startswith("h001-")


def test_a_session_killed_at_a_question_resumes_there(tmp_path):
    deps = _deps(tmp_path)
    (q,) = _only(run_chat(deps, sqlite_saver(deps)), "request")
    reviews = _only(run_chat(deps, sqlite_saver(deps), {q["id"]: {"text": "anything", "n": 3}}), "review")
    first = sorted(reviews, key=lambda r: r["candidate_id"])[0]
    out = run_chat(deps, sqlite_saver(deps), {first["id"]: {"verdict": "yes"}})
    calls = len(deps.llm.inner.calls) if hasattr(deps.llm, "inner") else None
    # A new process: the same archive and checkpoint file, a new model client.
    again = _deps(tmp_path)
    out = run_chat(again, sqlite_saver(again))
    left = sorted(r["candidate_id"] for r in _only(out, "review"))
    assert left == ["h000-01", "h000-02"]  # the answered one is not asked again
    assert again.store.get("h000-00").status == "queued"
    if calls is not None:
        assert again.llm.inner.calls == []  # the proposals came from the archive, not the model
    ids = {r["candidate_id"]: r["id"] for r in out.questions}
    out = run_chat(again, sqlite_saver(again), {ids["h000-01"]: {"verdict": "no"}, ids["h000-02"]: {"verdict": "no"}})
    assert _only(out, "request")[0]["turn"] == 1
    assert [r.id for r, _ in _train_all(again)] == ["h000-00"]
    assert sum(1 for r in again.store.candidates() if r.id.startswith("h")) == 3


@pytest.mark.parametrize("bad, why", [
    ("try it", "is a dict"), ({"text": "   "}, "say what to try"), ({"text": "x" * 3000}, "at most 2000"),
    ({"text": "ok", "n": 99}, "1 to 8"), ({"text": "ok", "parent_id": 7}, "no candidate 7"),
])
def test_bad_requests_are_refused_with_a_reason(tmp_path, bad, why):
    deps = _deps(tmp_path)
    run_chat(deps, sqlite_saver(deps))  # the baseline, so a best exists
    with pytest.raises(ValueError, match=why):
        parse_request(bad, deps, 2)


def test_a_revision_needs_feedback_and_is_bounded(tmp_path):
    deps = _deps(tmp_path, **{"search.candidates": 1})
    saver = sqlite_saver(deps)
    (q,) = _only(run_chat(deps, saver), "request")
    (r,) = _only(run_chat(deps, saver, {q["id"]: {"text": "go"}}), "review")
    (r,) = _only(run_chat(deps, saver, {r["id"]: {"verdict": "revise", "reason": " "}}), "review")
    assert "needs feedback" in r["error"]
    for n in range(5):
        (r,) = _only(run_chat(deps, saver, {r["id"]: {"verdict": "revise", "reason": f"again {n}"}}), "review")
        assert r["revisions"] == n + 1
    assert not r["can_revise"]
    (r,) = _only(run_chat(deps, saver, {r["id"]: {"verdict": "revise", "reason": "more"}}), "review")
    assert "revised 5 times" in r["error"]


def test_a_revision_that_comes_back_the_same_is_marked_so(tmp_path):
    """A small model may ignore the feedback and answer the same diff: the question says so."""
    deps = _deps(tmp_path, lambda p: f"```diff\n{block_diff(p.base_source, 'same')}```", **{"search.candidates": 1})
    saver = sqlite_saver(deps)
    (q,) = _only(run_chat(deps, saver), "request")
    (r,) = _only(run_chat(deps, saver, {q["id"]: {"text": "go"}}), "review")
    assert r["unchanged"] is False
    (again,) = _only(run_chat(deps, saver, {r["id"]: {"verdict": "revise", "reason": "something else"}}), "review")
    assert again["diff"] == r["diff"] and again["unchanged"] is True and again["revisions"] == 1


def test_answers_the_grammar_stopped_early_in_a_chat_turn_are_recorded_and_said(tmp_path, caplog):
    """As in a cycle (tests/agent/test_graph.py): a chat request whose answers the grammar ended early
    says so, and the archive keeps which answers and why, under the turn."""
    import dataclasses

    from deltanas.agent.llm.scripted import ScriptedBackend

    class Stopped(ScriptedBackend):
        def generate(self, prompts, sampling):
            out = super().generate(prompts, sampling)
            if len(out) == 2:  # the request's batch, not a near-copy's retry
                out[1].meta["grammar_error"] = 'Parser Error: token "ĊĠĠ" does not satisfy the grammar'
            return out

    deps = dataclasses.replace(_deps(tmp_path), llm=Stopped(lambda p: f"```diff\n{block_diff(p.base_source, 'k')}```"))
    saver = sqlite_saver(deps)
    (q,) = _only(run_chat(deps, saver), "request")
    with caplog.at_level("WARNING"):
        _only(run_chat(deps, saver, {q["id"]: {"text": "wider", "parent_id": None}}), "review")
    said = 'Parser Error: token "ĊĠĠ" does not satisfy the grammar'
    assert deps.store.get_meta("grammar_errors:h0") == {"h000-01": said}
    assert "chat turn 0: the answer grammar stopped 1 of 2 answers early" in caplog.text
    assert deps.store.get_meta("grammar_errors:0") is None
