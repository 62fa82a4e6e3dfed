"""Merges concurrent `generate` calls into one batched backend call.

The graph runs a cycle's candidates in parallel threads; their repair requests
arrive close together. One caller at a time becomes the leader, waits a short
window for the others, and sends every pending prompt with the same sampling
settings as a single batch. The other callers sleep on a condition until the
leader has answered them (or a caller with other settings may lead next), and
`cancel` or `close` wakes every one of them with RunStopped.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from deltanas.agent.llm.base import Completion, LLMBackend, Prompt, Sampling
from deltanas.agent.stopping import RunStopped

CLOSE_WAIT_S = 5.0  # how long `close` lets a cancelled batch leave the inner backend before freeing it


@dataclass(eq=False)
class _Request:
    prompts: list[Prompt]
    sampling: Sampling
    answer: list[Completion] | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None


def _cancelled() -> RunStopped:
    return RunStopped("generation cancelled: the run is stopping")


class CoalescingBackend:
    def __init__(self, inner: LLMBackend, *, window_s: float = 0.05):
        self.inner = inner
        self.name = inner.name
        # What the inner backend can do with a prompt's prefix and grammar (agent/loop/answer_format.py).
        self.supports_grammar = getattr(inner, "supports_grammar", False)
        self.supports_prefix = getattr(inner, "supports_prefix", False)
        self.window_s = window_s
        self._cond = threading.Condition()  # guards every field below and every request's outcome
        self._pending: list[_Request] = []
        self._in_flight: list[_Request] = []
        self._leading = False
        self._cancel = threading.Event()
        self.batches: list[int] = []  # prompts per backend call, for metrics and tests

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        req = _Request(list(prompts), sampling)
        with self._cond:
            if self._cancel.is_set():
                raise _cancelled()
            self._pending.append(req)
            while not req.done and self._leading:
                self._cond.wait()
            lead = not req.done
            if lead:
                self._leading = True
        if lead:
            self._lead(sampling)
        if req.error is not None:
            raise req.error
        return req.answer  # type: ignore[return-value]

    def _lead(self, sampling: Sampling) -> None:
        try:
            self._cancel.wait(self.window_s)  # the others' requests gather meanwhile
            with self._cond:
                batch = [r for r in self._pending if r.sampling == sampling]
                self._pending = [r for r in self._pending if r.sampling != sampling]
                self._in_flight = batch
            if batch:
                self._run(batch, sampling)
        finally:
            with self._cond:
                self._in_flight = []
                self._leading = False
                self._cond.notify_all()

    def _run(self, batch: list[_Request], sampling: Sampling) -> None:
        flat = [p for r in batch for p in r.prompts]
        self.batches.append(len(flat))
        try:
            out = self.inner.generate(flat, sampling)
            if len(out) != len(flat):
                raise RuntimeError(f"backend returned {len(out)} completions for {len(flat)} prompts")
        except BaseException as e:  # every waiter must wake up, whatever happened
            with self._cond:
                for r in batch:
                    if not r.done:
                        r.error = e
            return
        i = 0
        with self._cond:
            for r in batch:
                if not r.done:  # a cancel may have answered it already
                    r.answer = out[i:i + len(r.prompts)]
                i += len(r.prompts)

    def cancel(self) -> None:
        """Wake every caller with RunStopped now and tell the inner backend to stop its batch;
        later calls raise RunStopped at once."""
        self._cancel.set()
        with self._cond:
            for r in [*self._pending, *self._in_flight]:
                if not r.done:
                    r.error = _cancelled()
            self._pending = []
            self._cond.notify_all()
        self.inner.cancel()

    def constraint_stats(self) -> dict | None:
        stats = getattr(self.inner, "constraint_stats", None)
        return stats() if stats is not None else None

    def load_adapter(self, path: str) -> None:
        self.inner.load_adapter(path)

    def close(self) -> None:
        self.cancel()
        with self._cond:  # a backend that honours the cancel leaves within a decoding step
            self._cond.wait_for(lambda: not self._leading, timeout=CLOSE_WAIT_S)
        self.inner.close()
