"""A chat session's background trainer: the candidates a person accepted train while the prompt
stays free.

The archive is the queue. An accepted candidate is archived as `queued` (agent/loop/chat.py);
`sweep()` hands every queued row to the worker threads, which proxy-train it through the run's
executor and record it with its outcome, exactly as the search's own nodes do
(candidate_nodes.proxy_train, then record). A session that ends, or is killed, with candidates
still queued or in flight leaves them `queued`: the next session's first sweep trains them, and a
candidate whose training had already finished is read back from its result.json, not retrained.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from deltanas.agent.archive import CandidateRow
from deltanas.agent.loop import candidate_nodes as cn
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.state import CandidateState
from deltanas.agent.stopping import RunStopped

log = logging.getLogger(__name__)


def state_of(row: CandidateRow, messages: list[dict]) -> CandidateState:
    """The candidate subgraph's state for an archived, accepted candidate."""
    return CandidateState(
        candidate_id=row.id, cycle=row.cycle, idx=row.idx, parent_id=row.parent_id, messages=messages,
        completion=row.completion or "", constrain=row.constrain or "none", sites=row.sites,
        attempts=row.attempts, prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
        source=row.source, diff=row.diff, added=row.added, removed=row.removed, error=None, outcome=None,
        novelty={"novel": bool(row.novel), "max_similarity": row.similarity, "nearest_id": row.nearest_id,
                 "minhash": row.minhash.hex() if row.minhash else None},
        review={"verdict": "yes"})


class Trainer:
    def __init__(self, deps: Deps, on_done: Callable[[CandidateRow | None, BaseException | None], None],
                 workers: int = 1):
        """`on_done(row, error)` is called from a worker thread as each candidate finishes."""
        self.deps = deps
        self.on_done = on_done
        self._todo: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[str] = []  # queued here, not finished
        self._threads = [threading.Thread(target=self._work, name=f"deltanas-trainer-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def sweep(self) -> list[str]:
        """Takes every `queued` candidate of the archive not taken yet; returns the new ones."""
        new = []
        with self._lock:
            for row in self.deps.store.candidates(status="queued"):
                if row.id not in self._pending:
                    self._pending.append(row.id)
                    new.append(row.id)
        for cid in new:
            self._todo.put(cid)
        return new

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def _work(self) -> None:
        while (cid := self._todo.get()) is not None:
            try:
                row = self._train(cid)
            except RunStopped:
                continue  # left queued: the next session trains it
            except Exception as e:  # noqa: BLE001 - the archive keeps it queued; say so and go on
                log.exception("training %s failed", cid)
                row = self.deps.store.get(cid)
                self.on_done(row, e)
                continue
            finally:
                with self._lock:
                    if cid in self._pending:
                        self._pending.remove(cid)
            if row is not None:
                self.on_done(row, None)

    def _train(self, cid: str) -> CandidateRow | None:
        row = self.deps.store.get(cid)
        if row is None or row.status != "queued":
            return None
        state = state_of(row, self.deps.store.get_trajectory(cid) or [])
        state = {**state, **cn.proxy_train(state, self.deps)}
        cn.record(state, self.deps)
        return self.deps.store.get(cid)

    def close(self, timeout: float | None = None) -> bool:
        """Lets the workers finish what they hold, then end; True when they all ended in `timeout`."""
        for _ in self._threads:
            self._todo.put(None)
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)
