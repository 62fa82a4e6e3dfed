"""One batched interface for every language-model backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from deltanas.tools.prompting import Message


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; the defaults are the paper's."""

    temperature: float = 0.35
    top_k: int = 50
    top_p: float = 0.9
    max_new_tokens: int = 1024
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A chat prompt plus the source the answer must be a diff against.

    `base_source` lets the rule-based `mutate` backend work without parsing the
    chat text. `prefix` is the start of the answer, written for the model (the
    diff's header); the completion's text includes it. `grammar` (llguidance's
    Lark, tools/diff_grammar.py) constrains the whole answer, prefix included,
    on backends that support it, and requires `hunks` hunks.
    """

    messages: list[Message]
    base_source: str = ""
    mode: str = "delta"  # "delta" or "full"
    prefix: str = ""
    grammar: str | None = None
    hunks: int = 0  # hunks the grammar requires, one per edit site (for a backend's closing rule)


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)


@runtime_checkable
class LLMBackend(Protocol):
    name: str

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        """One completion per prompt, in order, as one batched call where the backend allows."""
        ...

    def load_adapter(self, path: str) -> None:
        """Switch generation to the LoRA adapter saved at `path`."""
        ...

    def cancel(self) -> None:
        """End generation now, from any thread (the run's second Ctrl-C): a `generate` call in
        flight raises RunStopped within a few seconds, and so does every later one. Never blocks."""
        ...

    def close(self) -> None:
        """Free the model; a `generate` call still in flight is cancelled first."""
        ...
