"""The candidate subgraph's nodes: apply → (repair → apply)* → novelty → proxy_train → record.

Each node returns an update and never mutates the state it is given. Every step
is appended to the candidate's trajectory as a tool call with its result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from deltanas.agent.archive import CandidateRow
from deltanas.agent.llm.base import Prompt
from deltanas.agent.loop.answer_format import families_for, format_for, sites_for
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.state import CandidateState
from deltanas.tools import prompting
from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.full_extract import apply_full_output
from deltanas.tools.novelty import NoveltyResult
from deltanas.tools.trajectory import chat_view, proposal_step, tool_step


def _parent_source(state: CandidateState, deps: Deps) -> str:
    return deps.store.get(state["parent_id"]).source


def apply(state: CandidateState, deps: Deps) -> dict[str, Any]:
    existing = deps.store.get(state["candidate_id"])
    if existing is not None and existing.final:  # finished before a crash or resume
        return {"status": existing.status, "finished": [existing.id]}
    s = deps.config.search
    applier = apply_full_output if s.mode == "full" else apply_model_output
    res = applier(_parent_source(state, deps), state["completion"], allow_train_changes=s.allow_train_changes)
    messages = tool_step(state["messages"], "apply_diff", {"target": "model.py"}, res.to_json())
    if res.ok:  # a fuzzily placed answer is kept as applied: its context from the parent
        return {"messages": messages, "source": res.source, "diff": getattr(res, "corrected", "") or res.diff,
                "added": res.added, "removed": res.removed, "error": None}
    return {"messages": messages, "diff": res.diff, "added": res.added, "removed": res.removed,
            "error": {"code": res.error.code.value, "message": res.error.message, "hint": res.error.hint}}


# Training outcomes a revised diff can fix: the network broke (shapes, a crash), broke the Net
# contract, or its loss blew up. Timeouts, memory and output limits are left as they are.
REPAIRABLE = ("crashed", "invalid", "diverged")
_LOG_LINES = 15


def _failure(state: CandidateState, threshold: float) -> dict[str, str]:
    """The error the repair turn feeds back: the apply error, a near-copy, or the failed training."""
    if state.get("error"):
        return state["error"]
    if is_duplicate(state):
        n = state["novelty"]
        return {"code": "duplicate",
                "message": f"the patched model.py is a near-copy of {n['nearest_id']} (similarity "
                           f"{n['max_similarity']:.2f}; a new network is below {threshold:.2f})",
                "hint": ""}
    o = state["outcome"]
    tail = "\n".join((o.get("log_tail") or "").strip().splitlines()[-_LOG_LINES:])
    hint = ("The patched model.py applied, but training it failed. Fix the change so the network "
            "builds and trains: check that each layer's input channels and sizes match what the layer "
            "before it gives.")
    return {"code": o["status"], "message": o.get("error") or o["status"],
            "hint": f"{hint}\nThe end of the training log:\n{tail}" if tail else hint}


def is_duplicate(state: CandidateState) -> bool:
    return bool(state.get("novelty")) and not state["novelty"]["novel"]


def repair(state: CandidateState, deps: Deps) -> dict[str, Any]:
    """Feed the failure back to the model (an apply error, a near-copy, or a training run that
    failed) and take its new answer, against the same parent. A near-copy is asked for edits at
    new sites, of new layer kinds, where the search draws them; other failures keep the draw."""
    deps.check_stop()
    attempt = state.get("attempts", 0) + 1
    err = _failure(state, deps.novelty.threshold)
    s = deps.config.search
    update, hint = {}, err["hint"]
    if is_duplicate(state):
        llm, parent, key = _asked(state, deps), _parent_source(state, deps), chat_draw(state)
        sites = sites_for(deps.config, llm, parent, key, state["idx"], attempt)
        families = families_for(deps.config, llm, parent, key, state["idx"], attempt)
        hint = prompting.duplicate_hint(parent_source=parent, sites=sites, families=families)
        update = {"draw": attempt, "sites": sites}
    turn = prompting.repair_message(code=err["code"], message=err["message"], hint=hint,
                                    attempt=attempt, max_attempts=s.max_repairs, mode=s.mode)
    state = {**state, **update}
    return {**answer_again(state, deps, turn), **update, "attempts": attempt}


def _asked(state: CandidateState, deps: Deps):
    """The model a candidate's answers come from: a chat's, or the cycle's proposer."""
    return deps.llm if state.get("turn") is not None else deps.proposer(state["cycle"])


CHAT_DRAW_BASE = 1_000_000  # a chat request's draws are keyed past any cycle's


def chat_draw(state: CandidateState) -> int:
    """The cycle number that keys a candidate's draws (edit sites, layer kinds): its cycle, or for
    a chat candidate one of its own request's."""
    turn = state.get("turn")
    return state["cycle"] if turn is None else CHAT_DRAW_BASE + turn


def answer_again(state: CandidateState, deps: Deps, turn: dict[str, str]) -> dict[str, Any]:
    """The model's next answer to the trajectory plus `turn` (an error or a person's feedback), held
    to the same parent, and to the edit sites and layer kinds of the candidate's current draw. A
    chat candidate asks the run's model (never the cold-start mutator), with a seed of its own for
    each new answer."""
    messages = [*state["messages"], turn]
    chat = state.get("turn") is not None
    llm = _asked(state, deps)
    parent = _parent_source(state, deps)
    fmt = None
    if state.get("constrain", "none") != "none":
        families = families_for(deps.config, llm, parent, chat_draw(state), state["idx"], state.get("draw", 0))
        fmt = format_for(deps.config, llm, parent, state.get("sites"), families)
    prompt = Prompt(messages=chat_view(messages), base_source=parent, mode=deps.config.search.mode,
                    prefix=fmt.prefix if fmt else "", grammar=fmt.grammar if fmt else None,
                    hunks=fmt.hunks if fmt else 0)
    sampling = deps.sampling
    if chat:  # each revision a new draw, the same after a resume
        sampling = dataclasses.replace(sampling, seed=_seed(sampling.seed, state["candidate_id"],
                                                             sum(1 for m in messages if m["role"] == "user")))
    comp = llm.generate([prompt], sampling)[0]
    return {"messages": proposal_step(messages, comp.text), "completion": comp.text,
            "outcome": None, "novelty": None, "source": None, "review": None,  # the failed version is not this one
            "prompt_tokens": state.get("prompt_tokens", 0) + comp.prompt_tokens,
            "completion_tokens": state.get("completion_tokens", 0) + comp.completion_tokens}


def _seed(base: int | None, *parts: object) -> int:
    digest = hashlib.sha256(repr((base, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def novelty(state: CandidateState, deps: Deps) -> dict[str, Any]:
    sig = deps.novelty.signature(state["source"])
    res = deps.novelty.check(state["source"], _parent_source(state, deps), state["parent_id"], sig=sig)
    if not res.novel and res.nearest_id == state["candidate_id"]:
        # A repair's new version is near its own failed one, which is in the index: that is no copy.
        # (Only the nearest is known; a sibling just below that similarity is not seen here.)
        res = NoveltyResult(novel=res.parent_similarity < deps.novelty.threshold,
                            parent_similarity=res.parent_similarity, max_similarity=res.parent_similarity,
                            nearest_id=state["parent_id"])
    if res.novel:  # index it now, so that a sibling in this cycle cannot duplicate it
        deps.novelty.add(state["candidate_id"], sig)
    return {"messages": tool_step(state["messages"], "check_novelty", {}, res.to_json()),
            "novelty": {**res.to_json(), "minhash": sig.hashvalues.tobytes().hex()}}


def _earlier_outcome(out_dir: Path, source: str) -> dict[str, Any] | None:
    """The result of this exact source if it was trained before an interruption."""
    try:
        if (out_dir / "model.py").read_text() != source:
            return None
        found = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "status" in found else None


def proxy_train(state: CandidateState, deps: Deps) -> dict[str, Any]:
    cid = state["candidate_id"]
    out_dir = deps.candidate_dir(cid)
    dataset = deps.dataset_of(state["parent_id"])  # a child trains, and is compared, on its parent's dataset
    outcome = _earlier_outcome(out_dir, state["source"])
    if outcome is None:
        deps.check_stop()
        outcome = deps.executor.evaluate(state["source"], cid, out_dir, dataset=dataset).to_json()
    result = {k: v for k, v in outcome.items() if k != "log_tail"}
    args = {"dataset": dataset, "epochs": deps.config.train.epochs}
    return {"messages": tool_step(state["messages"], "proxy_train", args, result), "outcome": outcome}


def _final_status(state: CandidateState) -> tuple[str, str | None, str | None]:
    if (state.get("review") or {}).get("verdict") == "no":
        return "rejected", "rejected", state["review"]["reason"] or "rejected in review"
    if is_duplicate(state):  # trained or not, never a parent
        n = state["novelty"]
        return "duplicate", "duplicate", f"similarity {n['max_similarity']:.3f} to {n['nearest_id']}"
    if state.get("outcome"):
        o = state["outcome"]
        return o["status"], (None if o["status"] == "ok" else o["status"]), o.get("error") or None
    err = state.get("error") or {"code": "no_diff", "message": "no answer"}
    return "apply_failed", err["code"], err["message"]


def record(state: CandidateState, deps: Deps, queued: bool = False) -> dict[str, Any]:
    """Write the finished candidate: one archive row (an upsert by id) and its files. `queued`: a
    chat candidate a person accepted, archived as `queued` for the session's trainer
    (agent/run/trainer.py), which trains it and records it again with its outcome."""
    cid = state["candidate_id"]
    status, code, message = ("queued", None, None) if queued else _final_status(state)
    nov = state.get("novelty") or {}
    out = state.get("outcome") or {}
    prev = deps.store.get(cid)
    deps.store.put_trajectory(cid, state["messages"])
    deps.store.upsert(CandidateRow(
        id=cid, cycle=state["cycle"], idx=state["idx"], kind=deps.config.search.mode,
        parent_id=state["parent_id"], dataset=deps.dataset_of(state["parent_id"]), status=status, error_code=code,
        error_message=message, source=state.get("source"), diff=state.get("diff"),
        completion=prev.completion if prev else state["completion"], added=state.get("added"),
        removed=state.get("removed"), attempts=state.get("attempts", 0), novel=nov.get("novel"),
        similarity=nov.get("max_similarity"), nearest_id=nov.get("nearest_id"),
        minhash=bytes.fromhex(nov["minhash"]) if nov.get("novel") else None,
        accuracy=out.get("accuracy"), param_count=out.get("param_count"), train_seconds=out.get("train_seconds"),
        eval_seconds=out.get("total_seconds"), prompt_tokens=state.get("prompt_tokens", 0),
        completion_tokens=state.get("completion_tokens", 0), gen_seconds=prev.gen_seconds if prev else 0.0,
        created_at=prev.created_at if prev else time.time(), finished_at=time.time(),
        constrain=state.get("constrain") or (prev.constrain if prev else None),
        sites=state.get("sites", prev.sites if prev else None)))
    d = deps.candidate_dir(cid)
    d.mkdir(parents=True, exist_ok=True)
    if state.get("diff"):
        (d / "diff.patch").write_text(state["diff"])
    if not out:  # a trained candidate's result.json was written by the proxy client
        (d / "result.json").write_text(json.dumps({"status": status, "error_code": code, "error": message}))
    return {"status": status, "finished": [cid]}
