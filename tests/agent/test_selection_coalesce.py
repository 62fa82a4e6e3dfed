import threading
import time

import pytest

from deltanas.agent.archive import CandidateRow
from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.loop.selection import select_parents
from deltanas.agent.stopping import RunStopped

from support import threads_inside


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

    def cancel(self):
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


class _Blocking(_Recorder):
    """Generates until released; a cancel releases it, unless it plays a backend that ignores cancels."""

    def __init__(self, honours_cancel: bool = True):
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self.honours_cancel = honours_cancel
        self.cancelled = self.closed = False

    def generate(self, prompts, sampling):
        self.calls.append(len(prompts))
        self.started.set()
        self.release.wait(30)
        if self.cancelled and self.honours_cancel:
            raise RunStopped("cancelled")
        return [Completion(text="late") for _ in prompts]

    def cancel(self):
        self.cancelled = True
        if self.honours_cancel:
            self.release.set()

    def close(self):
        self.closed = True


def _askers(llm, tag: str, n: int, sampling: Sampling = Sampling()) -> tuple[list[threading.Thread], dict]:
    outcome = {}

    def ask(i):
        try:
            outcome[i] = llm.generate([Prompt(messages=[{"role": "user", "content": f"q{i}"}])], sampling)
        except BaseException as e:  # noqa: BLE001 - the test looks at what each caller got
            outcome[i] = e

    ts = [threading.Thread(target=ask, args=(i,), name=f"{tag}-{i}") for i in range(n)]
    for t in ts:
        t.start()
    return ts, outcome


def test_close_wakes_every_waiter_with_run_stopped_and_none_polls_meanwhile():
    inner = _Blocking()
    llm = CoalescingBackend(inner, window_s=0.2)
    first, got_first = _askers(llm, "first", 3)
    assert inner.started.wait(5)
    later, got_later = _askers(llm, "later", 3)  # these wait for the batch in flight to end
    other, got_other = _askers(llm, "other", 2, Sampling(max_new_tokens=7))  # and these to lead the next one
    time.sleep(0.3)
    # every caller sleeps on a lock or a condition; none loops checking a future
    inside = threads_inside("agent/llm/coalesce.py")
    assert len(inside) == 8 and set(inside.values()) == {"wait"}, inside
    started = time.monotonic()
    llm.close()
    for t in first + later + other:
        t.join(5)
    assert time.monotonic() - started < 2
    assert not threads_inside("agent/llm/coalesce.py")
    outcomes = [*got_first.values(), *got_later.values(), *got_other.values()]
    assert len(outcomes) == 8 and all(isinstance(o, RunStopped) for o in outcomes), outcomes
    assert inner.closed and len(inner.calls) == 1  # the waiting batches never reached the backend
    with pytest.raises(RunStopped):
        llm.generate([Prompt(messages=[{"role": "user", "content": "after"}])], Sampling())


def test_cancel_wakes_the_waiters_even_where_the_backend_ignores_it():
    inner = _Blocking(honours_cancel=False)
    llm = CoalescingBackend(inner, window_s=0.01)
    first, got_first = _askers(llm, "first", 1)
    assert inner.started.wait(5)
    later, got_later = _askers(llm, "later", 4)
    time.sleep(0.1)
    llm.cancel()
    for t in later:
        t.join(2)
    assert all(isinstance(o, RunStopped) for o in got_later.values()) and len(got_later) == 4
    assert first[0].is_alive()  # the leader is inside the backend, which has not returned yet
    inner.release.set()
    first[0].join(5)
    assert isinstance(got_first[0], RunStopped)  # its answer came after the cancel: not used
