"""A chat session as a LangGraph state machine, on the search's own nodes and archive.

    evaluate_baselines → ask ──request──► propose_request → candidate × N (Send) → end_turn → ask
                          ▲ (a question: the person's next request)

    candidate: the search's candidate subgraph (agent/loop/graph.py) with every novel candidate
    reviewed: yes archives it as `queued` and the session's trainer (agent/run/trainer.py) trains
    it in the background; revise sends the person's feedback to the model; edit, no as in review.

`ask` waits in LangGraph's `interrupt()` for a request, `{"text": ..., "parent_id": ... | None,
"n": ... | None}`: what to try, on which parent (None: the best so far), with how many proposals.
A request that cannot be served (no text, an unknown or untrained parent) is refused with a
message, and asked again. The questions, the request's and each candidate's, live in the
checkpoint: a session killed at any point resumes at the same question, and the proposals are
archived before any is asked about, so none is asked of the model twice.

Chat candidates are `h<turn>-<idx>`, archived in the cycle the autonomous loop is at (so `/run`
cycles may take them as parents, and `status`, `report` and the LoRA updates count them).
"""
from __future__ import annotations

import operator
from functools import partial
from typing import Annotated, Any, TypedDict

from langgraph.graph import START, StateGraph
from langgraph.types import interrupt

from deltanas.agent.archive import CandidateRow
from deltanas.agent.loop import answer_format
from deltanas.agent.loop import cycle_nodes as cy
from deltanas.agent.loop.candidate_nodes import CHAT_DRAW_BASE
from deltanas.agent.loop.cycle_nodes import chat_id
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.graph import build_candidate_graph, fan_out
from deltanas.agent.loop.state import Proposal

MAX_REQUEST_CHARS = 2000
MAX_PROPOSALS = 8


class ChatState(TypedDict, total=False):
    cycle: int  # evaluate_baselines' key; unused here
    baselines_ready: bool
    turn: int  # the request being served (0-based)
    request: dict[str, Any] | None
    proposals: list[Proposal]
    finished: Annotated[list[str], operator.add]


def loop_cycle(deps: Deps) -> int:
    """The cycle the autonomous loop is at: one past the last it finished."""
    done = [c["cycle"] for c in deps.store.cycles() if c.get("summary") is not None]
    return max(done) + 1 if done else 0


def best(deps: Deps, dataset: str | None = None) -> CandidateRow | None:
    """The most accurate trained candidate on `dataset` (None: the run's first; accuracies are
    compared within a dataset only)."""
    dataset = dataset or next(iter(deps.datasets))
    trained = [r for r in deps.store.candidates(status="ok") if r.accuracy is not None and r.dataset == dataset]
    return max(trained, key=lambda r: (r.accuracy, -r.created_at), default=None)


def parse_request(answer: Any, deps: Deps, default_n: int) -> dict[str, Any]:
    """The request as {"text", "parent_id", "n"}, its parent resolved; ValueError says why not."""
    if not isinstance(answer, dict):
        raise ValueError(f"a request is a dict with its text, not {type(answer).__name__}")
    text = answer.get("text")
    if not isinstance(text, str) or not " ".join(text.split()):
        raise ValueError("say what to try, in words")
    text = " ".join(text.split())
    if len(text) > MAX_REQUEST_CHARS:
        raise ValueError(f"the request is {len(text)} characters; at most {MAX_REQUEST_CHARS}")
    n = answer.get("n") or default_n
    if not isinstance(n, int) or not 1 <= n <= MAX_PROPOSALS:
        raise ValueError(f"ask for 1 to {MAX_PROPOSALS} proposals")
    pid = answer.get("parent_id")
    if pid is None:
        top = best(deps)
        if top is None:
            raise ValueError("nothing has trained yet to start from")
        pid = top.id
    row = deps.store.get(pid) if isinstance(pid, str) else None
    if row is None:
        raise ValueError(f"no candidate {pid!r} in this run")
    if row.status != "ok" or not row.source:
        raise ValueError(f"{pid} did not train ({row.status}); a parent must have trained")
    return {"text": text, "parent_id": pid, "n": n}


def ask(state: ChatState, deps: Deps) -> dict[str, Any]:
    turn = state.get("turn", 0)
    error = None
    while True:  # a refused request is asked again with the reason
        try:
            request = parse_request(interrupt({"kind": "request", "turn": turn, "error": error}), deps,
                                    deps.config.search.candidates)
            break
        except ValueError as e:
            error = str(e)
    return {"request": request, "proposals": []}


def _stored(deps: Deps, turn: int, n: int) -> list[Proposal] | None:
    rows = [r for r in (deps.store.get(chat_id(turn, i)) for i in range(n)) if r is not None]
    if len(rows) < n:
        return None
    return [Proposal(candidate_id=r.id, cycle=r.cycle, idx=r.idx, parent_id=r.parent_id,
                     messages=deps.store.get_trajectory(r.id) or [], completion=r.completion or "",
                     prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                     constrain=r.constrain or "none", sites=r.sites, turn=turn) for r in rows]


def propose_request(state: ChatState, deps: Deps) -> dict[str, Any]:
    """One batched call: n answers to the person's request against its parent, archived at once
    as `proposed` (a resume takes them from the archive, not from the model)."""
    turn, req = state.get("turn", 0), state["request"]
    stored = _stored(deps, turn, req["n"])
    if stored is not None:
        return {"proposals": stored}
    deps.check_stop()
    parent = deps.store.get(req["parent_id"])
    cycle, draw = loop_cycle(deps), CHAT_DRAW_BASE + turn
    asks = [answer_format.proposal(deps.config, deps.llm, parent, deps.info(parent.dataset), draw, idx, req["text"])
            for idx in range(req["n"])]
    proposals = cy.ask_model(deps, deps.llm, [chat_id(turn, i) for i in range(req["n"])], cycle,
                             [parent] * req["n"], asks, turn=turn)
    return {"proposals": proposals}


def end_turn(state: ChatState, deps: Deps) -> dict[str, Any]:
    """Every proposal of the request is answered: rewrite trajectories.jsonl, and on to the next."""
    cy.write_trajectories(deps)
    return {"turn": state.get("turn", 0) + 1, "request": None, "proposals": []}


def build_chat_graph(deps: Deps) -> StateGraph:
    g = StateGraph(ChatState)
    g.add_node("evaluate_baselines", partial(cy.evaluate_baselines, deps=deps))
    g.add_node("ask", partial(ask, deps=deps))
    g.add_node("propose_request", partial(propose_request, deps=deps))
    g.add_node("candidate", build_candidate_graph(deps, chat=True).compile())
    g.add_node("end_turn", partial(end_turn, deps=deps))
    g.add_edge(START, "evaluate_baselines")
    g.add_edge("evaluate_baselines", "ask")
    g.add_edge("ask", "propose_request")
    g.add_conditional_edges("propose_request", fan_out, ["candidate"])
    g.add_edge("candidate", "end_turn")
    g.add_edge("end_turn", "ask")
    return g
