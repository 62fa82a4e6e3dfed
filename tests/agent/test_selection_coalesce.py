import threading
import time

import pytest

from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.selection import select_parents
from deltanas.agent.store import CandidateRow


def _c(i, acc):
    return CandidateRow(id=f"c{i}", cycle=0, idx=i, kind="delta", dataset="mnist", status="ok", accuracy=acc)


def test_selection_is_deterministic_and_favours_the_better():
    pool = [_c(i, i / 10) for i in range(10)]
    a = select_parents(pool, 200, tournament_size=3, explore=0.1, seed="0-1")
    assert a == select_parents(list(reversed(pool)), 200, tournament_size=3, explore=0.1, seed="0-1")
    best_share = sum(p in ("c9", "c8", "c7") for p in a) / len(a)
    assert best_share > 0.5  # uniform would give 0.3
    assert len(set(a)) > 3  # still explores


def test_selection_of_empty_pool_is_an_error():
    with pytest.raises(ValueError, match="no trained network"):
        select_parents([], 3, tournament_size=3, explore=0.1, seed="x")


class _Recorder:
    name = "rec"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append(len(prompts))
        time.sleep(0.05)
        return [Completion(text=p.messages[0]["content"], completion_tokens=1) for p in prompts]

    def load_adapter(self, path):
        pass

    def close(self):
        pass


def test_concurrent_calls_become_one_batch_and_answers_stay_in_place():
    inner = _Recorder()
    llm = CoalescingBackend(inner, window_s=0.1)
    out = {}

    def ask(i):
        out[i] = llm.generate([Prompt(messages=[{"role": "user", "content": f"q{i}"}])], Sampling())

    ts = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert {i: o[0].text for i, o in out.items()} == {i: f"q{i}" for i in range(6)}
    assert sum(inner.calls) == 6 and len(inner.calls) < 6


def test_backend_error_reaches_every_waiter():
    class Boom(_Recorder):
        def generate(self, prompts, sampling):
            raise RuntimeError("server down")

    llm = CoalescingBackend(Boom(), window_s=0.01)
    with pytest.raises(RuntimeError, match="server down"):
        llm.generate([Prompt(messages=[{"role": "user", "content": "x"}])], Sampling())
