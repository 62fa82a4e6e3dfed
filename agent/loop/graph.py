"""The search loop as a LangGraph state machine.

    evaluate_baselines → cold_start (pairs from another run or LEMUR → adapters/cold-start;
                                     an extended run: the update deferred after its old last cycle)
        → select_parents → propose (one batched call)
        → candidate × N (Send) → gather_trajectories → lora_update → next cycle or END

    candidate:  apply ──ok──► novelty ──novel──► proxy_train ──ok──► record
                  │ fail          └─dup──────────────┼─────────────► record (repairs spent)
                  ▼               │                  │ crashed, invalid, diverged
                repair ◄──────────┴──────────────────┘
                  (≤ max_repairs in all, the error fed back; a near-copy with new
                   edit sites and layer kinds, search.retry_duplicates) ─► apply

    with search.review, a novel candidate asks a person first (agent/loop/review.py):
                novelty ──► review ──yes──► proxy_train
                              ├──edit──► novelty (the person's version, not asked again)
                              ├──revise─► revise (their feedback to the model) ──► apply
                              └──no────► record (rejected)

    a chat session (agent/loop/chat.py) reuses the candidate subgraph with every novel candidate
    reviewed, and `yes` archives it as queued for the session's background trainer.

`build_graph(deps)` returns an uncompiled StateGraph; the CLI compiles it with a
SQLite checkpointer, tests with an in-memory one.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from deltanas.agent.loop import candidate_nodes as cn
from deltanas.agent.loop import cycle_nodes as cy
from deltanas.agent.loop import review
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.state import CandidateOutput, CandidateState, RunState


def route_after_apply(state: CandidateState, max_repairs: int) -> Literal["novelty", "repair", "record", "__end__"]:
    if state.get("status"):  # already recorded before a resume
        return "__end__"
    if state.get("error") is None:
        return "novelty"
    return "repair" if state.get("attempts", 0) < max_repairs else "record"


def route_after_novelty(state: CandidateState, train_duplicates: bool = False, review: bool = False,
                        chat: bool = False, retry_duplicates: bool = False,
                        max_repairs: int = 0) -> Literal["review", "proxy_train", "queue", "repair", "record"]:
    if not (state["novelty"]["novel"] or train_duplicates):
        # a near-copy the model wrote goes back to it; a person's edit (reviewed) is theirs to keep
        again = retry_duplicates and not state.get("review") and state.get("attempts", 0) < max_repairs
        return "repair" if again else "record"
    if review and not state.get("review"):
        return "review"
    return "queue" if chat else "proxy_train"  # an edit comes back here reviewed


def route_after_review(state: CandidateState, chat: bool = False) -> Literal["proxy_train", "queue", "novelty",
                                                                          "revise", "record"]:
    yes = "queue" if chat else "proxy_train"  # a chat session trains in the background
    return {"yes": yes, "edit": "novelty", "revise": "revise", "no": "record"}[state["review"]["verdict"]]


def route_after_train(state: CandidateState, max_repairs: int) -> Literal["repair", "record"]:
    # a near-copy is trained for the record only, never repaired
    failed = (state.get("outcome") or {}).get("status") in cn.REPAIRABLE and not cn.is_duplicate(state)
    return "repair" if failed and state.get("attempts", 0) < max_repairs else "record"


def fan_out(state: RunState) -> list[Send]:
    return [Send("candidate", CandidateState(
        candidate_id=p["candidate_id"], cycle=p["cycle"], idx=p["idx"], parent_id=p["parent_id"],
        messages=p["messages"], completion=p["completion"], attempts=0, prompt_tokens=p["prompt_tokens"],
        completion_tokens=p["completion_tokens"], error=None, novelty=None, outcome=None,
        constrain=p.get("constrain", "none"), sites=p.get("sites"), turn=p.get("turn"), revisions=0))
        for p in state["proposals"]]


def route_next_cycle(state: RunState, cycles: int) -> Literal["select_parents", "__end__"]:
    """After the cold start and after each cycle's update: another cycle, or the end."""
    return "select_parents" if state["cycle"] < cycles else "__end__"


def build_candidate_graph(deps: Deps, chat: bool = False) -> StateGraph:
    """The candidate subgraph. `chat`: every novel candidate is reviewed, and an accepted one is
    archived as queued for the chat session's trainer instead of trained here."""
    s = deps.config.search
    review_on = s.review or chat
    g = StateGraph(CandidateState, output_schema=CandidateOutput)
    g.add_node("apply", partial(cn.apply, deps=deps))
    g.add_node("repair", partial(cn.repair, deps=deps))
    g.add_node("novelty", partial(cn.novelty, deps=deps))
    g.add_node("record", partial(cn.record, deps=deps))
    g.add_edge(START, "apply")
    g.add_conditional_edges("apply", partial(route_after_apply, max_repairs=s.max_repairs))
    g.add_edge("repair", "apply")
    train_duplicates = s.train_duplicates and not chat
    g.add_conditional_edges("novelty", partial(route_after_novelty, train_duplicates=train_duplicates,
                                               review=review_on, chat=chat, max_repairs=s.max_repairs,
                                               retry_duplicates=s.retry_duplicates and not train_duplicates))
    if review_on:
        g.add_node("review", partial(review.review, deps=deps))
        g.add_node("revise", partial(review.revise, deps=deps))
        g.add_conditional_edges("review", partial(route_after_review, chat=chat))
        g.add_edge("revise", "apply")
    if chat:
        g.add_node("queue", partial(cn.record, deps=deps, queued=True))
        g.add_edge("queue", END)
    else:
        g.add_node("proxy_train", partial(cn.proxy_train, deps=deps))
        g.add_conditional_edges("proxy_train", partial(route_after_train, max_repairs=s.max_repairs))
    g.add_edge("record", END)
    return g


def build_graph(deps: Deps) -> StateGraph:
    cycles = deps.config.search.cycles
    g = StateGraph(RunState)
    g.add_node("evaluate_baselines", partial(cy.evaluate_baselines, deps=deps))
    g.add_node("select_parents", partial(cy.select_parents, deps=deps))
    g.add_node("propose", partial(cy.propose, deps=deps))
    g.add_node("candidate", build_candidate_graph(deps).compile())
    g.add_node("gather_trajectories", partial(cy.gather_trajectories, deps=deps))
    g.add_node("lora_update", partial(cy.lora_update, deps=deps))
    g.add_node("cold_start", partial(cy.cold_start, deps=deps))
    g.add_edge(START, "evaluate_baselines")
    g.add_edge("evaluate_baselines", "cold_start")
    g.add_conditional_edges("cold_start", partial(route_next_cycle, cycles=cycles))
    g.add_edge("select_parents", "propose")
    g.add_conditional_edges("propose", fan_out, ["candidate"])
    g.add_edge("candidate", "gather_trajectories")
    g.add_edge("gather_trajectories", "lora_update")
    g.add_conditional_edges("lora_update", partial(route_next_cycle, cycles=cycles))
    return g
