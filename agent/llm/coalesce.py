"""Merges concurrent `generate` calls into one batched backend call.

The graph runs a cycle's candidates in parallel threads; their repair requests
arrive close together. One caller at a time becomes the leader, waits a short
window for the others, and sends every pending prompt with the same sampling
settings as a single batch.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from deltanas.agent.llm.base import Completion, LLMBackend, Prompt, Sampling


class CoalescingBackend:
    def __init__(self, inner: LLMBackend, *, window_s: float = 0.05):
        self.inner = inner
        self.name = inner.name
        # What the inner backend can do with a prompt's prefix and grammar (agent/constraint.py).
        self.supports_grammar = getattr(inner, "supports_grammar", False)
        self.supports_prefix = getattr(inner, "supports_prefix", False)
        self.window_s = window_s
        self._pending: list[tuple[list[Prompt], Sampling, Future]] = []
        self._lock = threading.Lock()
        self._leader = threading.Lock()
        self.batches: list[int] = []  # prompts per backend call, for metrics and tests

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        fut: Future = Future()
        with self._lock:
            self._pending.append((list(prompts), sampling, fut))
        while not fut.done():
            if not self._leader.acquire(timeout=0.01):
                continue
            try:
                if fut.done():
                    break
                time.sleep(self.window_s)
                with self._lock:
                    batch = [p for p in self._pending if p[1] == sampling]
                    self._pending = [p for p in self._pending if p[1] != sampling]
                self._run(batch, sampling)
            finally:
                self._leader.release()
        return fut.result()

    def _run(self, batch: list[tuple[list[Prompt], Sampling, Future]], sampling: Sampling) -> None:
        flat = [p for prompts, _, _ in batch for p in prompts]
        self.batches.append(len(flat))
        try:
            out = self.inner.generate(flat, sampling)
            if len(out) != len(flat):
                raise RuntimeError(f"backend returned {len(out)} completions for {len(flat)} prompts")
        except BaseException as e:  # every waiter must wake up, whatever happened
            for _, _, f in batch:
                f.set_exception(e)
            return
        i = 0
        for prompts, _, f in batch:
            f.set_result(out[i:i + len(prompts)])
            i += len(prompts)

    def constraint_stats(self) -> dict | None:
        stats = getattr(self.inner, "constraint_stats", None)
        return stats() if stats is not None else None

    def load_adapter(self, path: str) -> None:
        self.inner.load_adapter(path)

    def close(self) -> None:
        self.inner.close()
