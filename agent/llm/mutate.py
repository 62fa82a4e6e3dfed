"""The no-LLM baseline: each answer is a rule-based structural mutation of the parent.

It answers the way a model would (a short sentence and a fenced diff, or the
whole file in full mode), so the rest of the loop cannot tell it apart. Its
trajectories serve as cold-start training pairs.
"""
from __future__ import annotations

import random
import threading
import time

from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.stopping import RunStopped
from deltanas.tools.diff_write import make_diff
from deltanas.tools.mutator import NoMutation, mutate_source


class MutateBackend:
    name = "mutate"

    def __init__(self, *, seed: int = 0, min_steps: int = 2, max_steps: int = 4):
        self.seed = seed
        # One small edit of a 60-line network keeps MinHash-Jaccard near 0.95, above the paper's
        # 0.90 novelty threshold; stacking a few edits makes most answers novel.
        self.min_steps, self.max_steps = min_steps, max_steps
        self._counter = 0  # one random stream per answer, so a run is reproducible
        self.adapters: list[str] = []
        self._cancel = threading.Event()

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        base = self.seed if sampling.seed is None else sampling.seed
        out = []
        for prompt in prompts:
            if self._cancel.is_set():
                raise RunStopped("generation cancelled")
            rng = random.Random(f"{base}:{self._counter}")
            self._counter += 1
            out.append(self._answer(prompt, rng))
        return out

    def _answer(self, prompt: Prompt, rng: random.Random) -> Completion:
        started = time.perf_counter()
        if not prompt.base_source.strip():
            text, meta = "I cannot propose a change: the prompt carries no source to mutate.", {"error": "no_source"}
        else:
            applied, new = [], prompt.base_source
            for _ in range(rng.randint(self.min_steps, self.max_steps)):
                try:
                    name, new = mutate_source(new, rng)
                except NoMutation as e:
                    reason = str(e)
                    break
                applied.append(name)
            if not applied:
                text, meta = f"I cannot propose a change: {reason}.", {"error": "no_mutation"}
            else:
                mutation = " + ".join(applied)
                meta = {"mutation": mutation}
                if prompt.mode == "full":
                    body = new if new.endswith("\n") else new + "\n"
                    text = f"Mutation `{mutation}`. The whole new model.py:\n\n```python\n{body}```\n"
                else:
                    text = f"Mutation `{mutation}`:\n\n```diff\n{make_diff(prompt.base_source, new)}```\n"
        # words stand in for tokens, so the delta-versus-full size comparison still has numbers
        return Completion(text=text, completion_tokens=len(text.split()),
                          seconds=time.perf_counter() - started, meta=meta)

    def load_adapter(self, path: str) -> None:
        self.adapters.append(path)  # nothing to load: recorded so a run's log shows the hot-swap happened

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self.cancel()
