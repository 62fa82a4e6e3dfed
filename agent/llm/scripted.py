"""A backend that replays given completions: the graph's tests and dry runs use it."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.stopping import RunStopped


class ScriptExhausted(RuntimeError):
    """More prompts arrived than the script has completions for."""


class ScriptedBackend:
    name = "scripted"

    def __init__(self, completions: Sequence[str] | Callable[[Prompt], str], *, delay_s: float = 0.0):
        """`delay_s`: how long each batch takes, as a model's decoding would; `cancel` cuts it short."""
        if callable(completions):
            self._fn: Callable[[Prompt], str] | None = completions
            self._script: list[str] = []
        else:
            self._fn = None
            self._script = list(completions)
        self._next = 0
        self.delay_s = delay_s
        self._cancel = threading.Event()
        self.calls: list[list[Prompt]] = []  # every batch received, in order
        self.adapters: list[str] = []

    @property
    def remaining(self) -> int:
        return len(self._script) - self._next

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        if self._cancel.wait(self.delay_s):
            raise RunStopped("generation cancelled")
        self.calls.append(list(prompts))
        if self._fn is not None:
            return [self._completion(self._fn(p)) for p in prompts]
        if len(prompts) > self.remaining:
            raise ScriptExhausted(
                f"scripted backend has {self.remaining} completion(s) left but was asked for {len(prompts)} "
                f"(call {len(self.calls)}); give it more completions or a function")
        out = self._script[self._next:self._next + len(prompts)]
        self._next += len(prompts)
        return [self._completion(text) for text in out]

    @staticmethod
    def _completion(text: str) -> Completion:
        return Completion(text=text, completion_tokens=len(text.split()))

    def load_adapter(self, path: str) -> None:
        self.adapters.append(path)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self.cancel()
