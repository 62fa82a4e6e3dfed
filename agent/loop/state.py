"""Graph state: small, JSON-serialisable, and free of clients or handles.

Large artefacts (logs, predictions) live in the run directory and the archive;
the state carries ids, code and diff strings, error codes and metrics.
"""
from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict


class Proposal(TypedDict):
    candidate_id: str
    cycle: int
    idx: int
    parent_id: str
    messages: list[dict[str, Any]]  # the trajectory so far: system, user, the model's first answer
    completion: str
    prompt_tokens: int
    completion_tokens: int
    constrain: str  # how the answer was held to the format: grammar | prefix | none
    sites: list[int] | None  # the parent lines (0-based) the search placed the edits at, if it chose them
    turn: int | None  # a chat session's request that asked for it (agent/loop/chat.py); None in a run


class RunState(TypedDict, total=False):
    cycle: int  # the cycle in progress (0-based)
    baselines_ready: bool
    parent_ids: list[str]
    proposals: list[Proposal]
    finished: Annotated[list[str], operator.add]  # candidate ids recorded, across all cycles


class CandidateState(TypedDict, total=False):
    candidate_id: str
    cycle: int
    idx: int
    parent_id: str
    messages: list[dict[str, Any]]
    completion: str  # the latest raw model answer
    constrain: str
    sites: list[int] | None
    draw: int  # the retry that last drew the edit sites and layer kinds (a near-copy's); 0: the first answer's
    turn: int | None  # the chat request it answers; None in an autonomous run
    attempts: int  # repairs made so far
    revisions: int  # revisions a person asked for (agent/loop/review.py)
    revised_from: str | None  # the diff the last revision was asked of, to tell the person when it came back the same
    prompt_tokens: int
    completion_tokens: int
    source: str  # the patched source, once a diff applied
    diff: str
    added: int
    removed: int
    error: dict[str, str] | None  # {"code", "message", "hint"} of the last failed apply
    novelty: dict[str, Any] | None
    outcome: dict[str, Any] | None  # the proxy-train outcome
    review: dict[str, Any] | None  # a person's verdict under search.review (agent/loop/review.py)
    status: str  # set when the candidate is finished
    finished: Annotated[list[str], operator.add]


class CandidateOutput(TypedDict):
    finished: Annotated[list[str], operator.add]
