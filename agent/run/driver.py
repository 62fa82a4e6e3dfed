"""Runs the compiled graph against the run directory's checkpointer.

The graph works in a background thread; the calling thread keeps the terminal
view and the signals. The first Ctrl-C (or SIGTERM) drains: no new candidate
starts, those in flight finish and are archived. A second Ctrl-C kills: the
sandboxes are killed and generation cancelled (`Deps.kill`), so every node in
flight raises RunStopped within seconds; the archive already holds every finished
candidate, and a resume redoes the rest.
"""
from __future__ import annotations

import signal
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from deltanas.agent.archive import StoreError
from deltanas.agent.loop.deps import Deps, RunStopped
from deltanas.agent.loop.chat import build_chat_graph
from deltanas.agent.loop.graph import build_graph
from deltanas.agent.run.rundir import CHECKPOINT_FILE

THREAD = {"configurable": {"thread_id": "search"}}
CHAT_THREAD = {"configurable": {"thread_id": "chat"}}
KILL_GRACE_S = 5.0  # after a kill, how long the graph's threads get to unwind and checkpoint


@dataclass
class RunOutcome:
    status: Literal["finished", "stopped", "failed", "waiting"]
    error: BaseException | None = None
    stuck: bool = False
    """Killed, and the graph's threads were still busy after KILL_GRACE_S. Python joins worker
    threads at exit, so the process must leave without waiting for them."""
    questions: list[dict[str, Any]] = field(default_factory=list)
    """"waiting": the questions the graph asks (agent/loop/review.py), each with its `id`; pass
    answers keyed by those ids to `run_graph(answers=...)`. They stay in the checkpoint."""


def sqlite_saver(deps: Deps) -> SqliteSaver:
    path = deps.run_dir / CHECKPOINT_FILE
    try:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("integrity check failed")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot open the checkpoint database ({e}); it is corrupt. The archive "
                         f"is separate: move this file away to restart the graph from the archive") from None
    return SqliteSaver(conn)


def run_graph(deps: Deps, checkpointer: BaseCheckpointSaver,
              answers: dict[str, Any] | None = None) -> RunOutcome:
    """Start or continue the search; returns when it finishes, stops, fails or waits for answers
    to its questions (`answers`: question id -> answer, for some or all of them)."""
    graph = build_graph(deps).compile(checkpointer=checkpointer)
    cfg: dict[str, Any] = {**THREAD, "recursion_limit": 1_000_000,
                           "max_concurrency": max(4, deps.config.search.candidates)}
    snapshot = graph.get_state(cfg)
    if snapshot.next:  # interrupted or waiting: continue the pending tasks (a question is asked again)
        start: Any = Command(resume=answers) if answers else None
    elif snapshot.values:  # finished; a resume with more --cycles extends it from where it ended
        if snapshot.values.get("cycle", 0) >= deps.config.search.cycles:
            return RunOutcome("finished")
        start = {"cycle": snapshot.values["cycle"]}
    else:
        start = {"cycle": 0, "finished": []}
    return _invoke(graph, start, cfg, deps)


def _invoke(graph, start: Any, cfg: dict[str, Any], deps: Deps) -> RunOutcome:
    try:
        graph.invoke(start, cfg)
    except RunStopped:
        return RunOutcome("stopped")
    except Exception as e:  # the archive is intact; the run can be resumed
        if deps.stop.is_set():
            return RunOutcome("stopped")
        return RunOutcome("failed", e)
    snapshot = graph.get_state(cfg)
    if snapshot.interrupts:
        return RunOutcome("waiting", questions=[{**i.value, "id": i.id} for i in snapshot.interrupts])
    return RunOutcome("stopped" if deps.stop.is_set() and snapshot.next else "finished")


def run_chat(deps: Deps, checkpointer: BaseCheckpointSaver, answers: dict[str, Any] | None = None) -> RunOutcome:
    """Start or continue a chat session (agent/loop/chat.py) in the run's checkpoint, on its own
    thread id: it returns "waiting" with the session's open questions, a request's or candidates'.
    `answers` (question id -> answer) may answer some of them."""
    graph = build_chat_graph(deps).compile(checkpointer=checkpointer)
    cfg: dict[str, Any] = {**CHAT_THREAD, "recursion_limit": 1_000_000,
                           "max_concurrency": max(4, deps.config.search.candidates)}
    if graph.get_state(cfg).next:
        start: Any = Command(resume=answers) if answers else None
    else:
        start = {"turn": 0, "finished": []}
    return _invoke(graph, start, cfg, deps)


def run_with_signals(deps: Deps, checkpointer: BaseCheckpointSaver, *, tick: Callable[[], None] | None = None,
                     on_drain: Callable[[], None] | None = None, on_kill: Callable[[], None] | None = None,
                     period_s: float = 0.5, answers: dict[str, Any] | None = None,
                     run: Callable[..., RunOutcome] = run_graph) -> RunOutcome:
    """`run` (the search, or `run_chat`) in a worker thread, with Ctrl-C draining (then killing)
    and `tick` called periodically. Returns within `period_s` + KILL_GRACE_S of a second interrupt."""
    box: dict[str, RunOutcome] = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", run(deps, checkpointer, answers)),
                              name="deltanas-graph", daemon=True)
    interrupts = 0
    killed = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        nonlocal interrupts
        interrupts += 1
        deps.stop.set()
        if interrupts == 1:
            if on_drain:
                on_drain()
        elif interrupts == 2:  # later ones find the kill under way
            deps.kill()
            killed.set()
            if on_kill:
                on_kill()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        while worker.is_alive() and not killed.is_set():
            worker.join(period_s)
            if tick and not killed.is_set():
                tick()
        if killed.is_set():
            worker.join(KILL_GRACE_S)  # the nodes raise RunStopped; let the checkpointer see it
            return RunOutcome("stopped", stuck=worker.is_alive())
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return box.get("out", RunOutcome("failed", RuntimeError("the graph thread ended without a result")))
