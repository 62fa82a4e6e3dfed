"""The human gate (`search.review`): a novel candidate waits for a person before it trains.

The `review` node asks through LangGraph's `interrupt()`, so the question is saved in the
checkpoint: a run killed while it waits asks the same question again when it resumes, and
candidates answered before the kill are not asked twice. The node only asks; LangGraph
re-runs it whole when the answer comes.

An answer is a dict:
- `{"verdict": "yes"}`: train it as it is;
- `{"verdict": "no", "reason": "..."}`: do not train it; it is recorded as `rejected`;
- `{"verdict": "edit", "source": "<the whole new model.py>", "reason": "..."}`: train the
  person's version instead. It passes the checks a model's answer passes (it compiles, keeps
  the Net contract, leaves the training code alone unless `allow_train_changes`), then the
  novelty check again;
- `{"verdict": "revise", "reason": "<feedback>"}`: the feedback goes back to the model as a
  message (the `revise` node), and its new answer is applied, checked and asked about again;
  at most MAX_REVISIONS times for one candidate.

An answer that is not one of these is refused by `parse_answer` with a message that says
why, and the question is asked again with that message. The verdict and the reason go into
the candidate's trajectory as a `human_review` step, which marks it as human-labelled in
`export` and, for an edit, makes the person's diff the answer the LoRA updates learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from langgraph.types import interrupt

from deltanas.agent.loop import candidate_nodes as cn
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.state import CandidateState
from deltanas.tools import prompting
from deltanas.tools.diff_write import make_diff
from deltanas.tools.full_extract import apply_full_output
from deltanas.tools.trajectory import tool_step

VERDICTS = ("yes", "no", "edit", "revise")
MAX_REASON_CHARS = 2000
MAX_REVISIONS = 5
MAX_SOURCE_BYTES = 200_000


@dataclass(frozen=True)
class Edit:
    """A person's version of the candidate, checked like a model's answer."""

    source: str
    diff: str
    added: int
    removed: int


def parse_answer(answer: Any) -> dict[str, str]:
    """The answer as {"verdict", "reason"[, "source"]}; ValueError says what is wrong with it."""
    if not isinstance(answer, dict):
        raise ValueError(f"an answer is a dict with a verdict ({', '.join(VERDICTS)}), not {type(answer).__name__}")
    verdict = answer.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"the verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    reason = answer.get("reason") or ""
    if not isinstance(reason, str):
        raise ValueError("the reason must be text")
    out = {"verdict": verdict, "reason": reason.strip()[:MAX_REASON_CHARS]}
    if verdict == "revise" and not out["reason"]:
        raise ValueError("a revision needs feedback for the model: say what to change")
    if verdict == "edit":
        source = answer.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ValueError("an edit needs the whole new model.py as `source`")
        if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise ValueError(f"the edited model.py is over {MAX_SOURCE_BYTES} bytes")
        out["source"] = source
    return out


def check_edit(parent: str, source: str, allow_train_changes: bool) -> Edit:
    """The person's whole file against the parent, through the checks of a full-file answer
    (tools/full_extract.py); ValueError carries the check's message and hint."""
    res = apply_full_output(parent, f"```python\n{source}\n```", allow_train_changes=allow_train_changes)
    if not res.ok:
        raise ValueError(f"the edit was refused: {res.error.message}. {res.error.hint}".strip())
    return Edit(res.source, make_diff(parent, res.source), res.added, res.removed)


def question(state: CandidateState, deps: Deps, error: str | None) -> dict[str, Any]:
    """What the person is shown: the candidate's diff, its size and novelty, and its parent."""
    parent = deps.store.get(state["parent_id"])
    nov = state.get("novelty") or {}
    return {"kind": "review", "candidate_id": state["candidate_id"], "cycle": state["cycle"],
            "parent_id": state["parent_id"], "parent_accuracy": parent.accuracy if parent else None,
            "source": state["source"], "parent_source": parent.source if parent else "",
            "diff": state.get("diff") or "", "added": state.get("added"), "removed": state.get("removed"),
            "similarity": nov.get("max_similarity"), "nearest_id": nov.get("nearest_id"),
            "attempts": state.get("attempts", 0), "revisions": state.get("revisions", 0),
            "unchanged": state.get("revised_from") is not None and state.get("revised_from") == state.get("diff"),
            "can_revise": state.get("revisions", 0) < MAX_REVISIONS, "error": error}


def review(state: CandidateState, deps: Deps) -> dict[str, Any]:
    if state.get("review"):  # an edit comes back through the novelty check: asked already
        return {}
    parent = deps.store.get(state["parent_id"]).source
    error = None
    while True:  # each refused answer asks again, with the reason; resume values follow in order
        try:
            answer = parse_answer(interrupt(question(state, deps, error)))
            if answer["verdict"] == "revise" and state.get("revisions", 0) >= MAX_REVISIONS:
                raise ValueError(f"this candidate was revised {MAX_REVISIONS} times already: accept, edit or reject it")
            edit = (check_edit(parent, answer["source"], deps.config.search.allow_train_changes)
                    if answer["verdict"] == "edit" else None)
            break
        except ValueError as e:
            error = str(e)
    verdict = {"verdict": answer["verdict"], "reason": answer["reason"], "by": "human"}
    if edit is None:
        return {"messages": tool_step(state["messages"], "human_review", {}, verdict), "review": verdict}
    verdict["diff"] = edit.diff  # and the edit as the answer the mode asks for, which the LoRA updates learn:
    verdict["answer"] = (f"```python\n{edit.source}```" if deps.config.search.mode == "full"
                         else f"```diff\n{edit.diff}```")
    return {"messages": tool_step(state["messages"], "human_review", {}, verdict), "review": verdict,
            "source": edit.source, "diff": edit.diff, "added": edit.added, "removed": edit.removed,
            "novelty": None}


def revise(state: CandidateState, deps: Deps) -> dict[str, Any]:
    """The person's feedback to the model, as a user turn after its answer; its new answer goes
    through apply (and repair), novelty and review again."""
    deps.check_stop()
    turn = prompting.revise_message(feedback=state["review"]["reason"], mode=deps.config.search.mode)
    return {**cn.answer_again(state, deps, turn), "revisions": state.get("revisions", 0) + 1, "attempts": 0,
            "error": None, "revised_from": state.get("diff") or ""}
