"""What the graph's nodes are given: clients and handles, injected, never in state."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deltanas.agent.archive import Store
from deltanas.agent.config import Config
from deltanas.agent.llm.base import LLMBackend, Sampling
from deltanas.agent.run.executor import Executor
from deltanas.agent.stopping import RunStopped
from deltanas.tools.novelty import NoveltyIndex


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_shape: tuple[int, int, int]
    num_classes: int


@dataclass
class Deps:
    config: Config
    llm: LLMBackend
    executor: Executor
    store: Store
    novelty: NoveltyIndex
    datasets: dict[str, DatasetInfo]
    """The run's datasets in order: one, or a pool (agent/config.py `DataConfig.datasets`)."""
    run_dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    learner: Callable[..., dict[str, Any]] | None = None
    """`learner(examples, out_dir, stop, start_from=None)` trains a LoRA adapter on examples into a folder,
    afresh or from the adapter at `start_from` (agent/learning/lora.py); None: no update, see `learner_note`."""
    learner_note: str = ""
    cold_llm: LLMBackend | None = None
    """Proposes the first `learn.cold_start_cycles` cycles (the mutate backend): their successful
    candidates are the cold-start pairs the first LoRA update trains on."""

    def info(self, name: str | None) -> DatasetInfo:
        """One of the run's datasets by name (a row's `dataset`)."""
        try:
            return self.datasets[name]  # type: ignore[index]
        except KeyError:
            raise ValueError(f"dataset {name!r} is not one of this run's ({', '.join(self.datasets)})") from None

    def dataset_of(self, cand_id: str) -> str:
        """The dataset an archived candidate trained (or trains) on: a child's is its parent's."""
        row = self.store.get(cand_id)
        if row is None or row.dataset is None:
            raise ValueError(f"{cand_id} is not in the archive, or names no dataset")
        return row.dataset

    def proposer(self, cycle: int) -> LLMBackend:
        if self.cold_llm is not None and cycle < self.config.learn.cold_start_cycles:
            return self.cold_llm
        return self.llm

    @property
    def sampling(self) -> Sampling:
        c = self.config.llm
        return Sampling(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                        max_new_tokens=c.max_new_tokens, seed=self.config.search.seed)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise RunStopped("stop requested")

    def _llms(self) -> list[LLMBackend]:
        return [b for b in (self.llm, self.cold_llm) if b is not None]

    def kill(self) -> None:
        """The second Ctrl-C: end the work in flight now. Generation is cancelled and the sandboxes
        killed, so every node raises RunStopped within seconds; what was cut short is redone on resume.
        Called from the signal handler: it waits for nothing but the sandboxes' kill."""
        self.stop.set()
        for llm in self._llms():
            llm.cancel()
        self.executor.close()

    def close(self) -> None:
        """Free the sandboxes and the models once the graph has ended (or been killed)."""
        self.executor.close()
        for llm in self._llms():
            llm.close()

    def candidate_dir(self, cand_id: str) -> Path:
        return self.run_dir / "candidates" / cand_id
