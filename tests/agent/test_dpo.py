"""Learning from failure too (issue 17): preference pairs from the archive, and DPO (trl's
DPOTrainer with peft) through the run's own update node on the tiny GGUF model, beside SFT."""
from __future__ import annotations

import json
import math

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.learning.examples import preference_set
from deltanas.agent.learning.lora import LoraSettings, adapter_complete, train_adapter
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.run.build import make_learner
from deltanas.agent.run.driver import run_graph

from support import block_diff, loop_deps


def chat(user: str) -> list[dict]:
    return [{"role": "system", "content": "S"}, {"role": "user", "content": user},
            {"role": "assistant", "content": "answer"}]


def test_preference_pairs_match_a_first_try_success_with_a_failure_of_the_same_parent(tmp_path):
    store = Store(tmp_path / "a.sqlite")
    store.upsert(CandidateRow(id="p", cycle=-1, idx=0, kind="baseline", dataset="d", status="ok", accuracy=0.5))
    store.upsert(CandidateRow(id="q", cycle=-1, idx=1, kind="baseline", dataset="d", status="ok", accuracy=0.5))
    rows = [("g1", 0, "ok", 0, "p", "good one", "u1"), ("g2", 0, "ok", 0, "p", "good two", "u2"),
            ("g3", 0, "ok", 1, "p", "repaired", "u1"),  # succeeded after a repair: not a first answer
            ("b1", 0, "apply_failed", 0, "p", "no diff here", "u9"), ("b2", 0, "duplicate", 0, "p", "a copy", "u2"),
            ("b3", 0, "crashed", 0, "q", "other parent", "u1"),  # another parent: never paired with p's
            ("b4", 1, "timeout", 0, "p", "later cycle", "u1"),  # a later cycle than asked for
            ("b5", 0, "apply_failed", 0, "p", "", "u1")]  # no answer at all
    for i, (cid, cycle, status, attempts, parent, text, user) in enumerate(rows):
        store.upsert(CandidateRow(id=cid, cycle=cycle, idx=i, kind="delta", dataset="d", status=status,
                                  accuracy=0.6 if status == "ok" else None, parent_id=parent, attempts=attempts,
                                  completion=text))
        store.put_trajectory(cid, chat(user))
    ids, prefs = preference_set(store, "valid", 5, up_to_cycle=0)
    # g1's prompt matches no failure's (b1 was sent u9): it takes b1 all the same, as the same parent's;
    # g2 finds b2, sent the same prompt; g3 and b3, b4, b5 stay out
    assert sorted(ids) == ["g1>b1", "g2>b2"]
    by_id = dict(zip(ids, prefs))
    assert by_id["g2>b2"] == {"prompt": chat("u2")[:2], "chosen": [{"role": "assistant", "content": "good two"}],
                              "rejected": [{"role": "assistant", "content": "a copy"}]}
    assert by_id["g1>b1"]["prompt"] == chat("u1")[:2] and by_id["g1>b1"]["rejected"][0]["content"] == "no diff here"
    assert preference_set(store, "valid", 5, up_to_cycle=-1) == ([], [])


def make_deps(tmp_path, learner, **over):
    counter = iter(range(10_000))

    def answer(p):  # every other answer is no diff at all: one valid and one failed answer per parent
        k = next(counter)
        return "I would not change it." if k % 2 else f"```diff\n{block_diff(p.base_source, f'd{k}')}```"

    return loop_deps(tmp_path, learner, answer, dataset=("synthetic", (1, 28, 28), 10), **{
        "llm.spec": "hf:tinycoder", "llm.device": "cpu", "search.candidates": 4, "search.max_repairs": 0,
        "learn.r": 4, "learn.alpha": 8, "learn.max_length": 256, "learn.epochs": 1.0, **over})


@pytest.mark.slow
def test_sft_then_dpo_trains_a_real_adapter_through_the_update_node(tmp_path):
    cfg = make_deps(tmp_path / "cfg", None, **{"learn.method": "sft+dpo"}).config
    learner, why = make_learner(cfg)
    assert learner is not None, why
    deps = make_deps(tmp_path, learner, **{"learn.method": "sft+dpo"})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    rows = deps.store.candidates(cycle=0)
    assert sorted(r.status for r in rows) == ["apply_failed", "apply_failed", "ok", "ok"]
    (a,) = deps.store.adapters()
    assert a["status"] == "trained" and "sft+dpo: 2 preference pairs" in a["note"], a
    assert a["examples"] == 2 + 2 and math.isfinite(a["loss"])
    assert len(a["example_ids"]) == 4 and sum(">" in i for i in a["example_ids"]) == 2
    out = deps.run_dir / "adapters" / "cycle-0"
    meta = json.loads((out / "deltanas_adapter.json").read_text())
    assert adapter_complete(out) and meta["method"] == "dpo" and meta["start_from"]  # DPO from the SFT adapter
    assert not list((deps.run_dir / "adapters").glob(".*"))  # the SFT step's folder is gone
    assert deps.llm.inner.adapters == [str(out)]


def test_dpo_without_failures_is_skipped_saying_why(tmp_path):
    calls = []
    deps = make_deps(tmp_path, lambda *a, **k: calls.append(a), **{"learn.method": "dpo"})
    deps.llm = CoalescingBackend(ScriptedBackend(
        lambda p, c=iter(range(100)): f"```diff\n{block_diff(p.base_source, f'e{next(c)}')}```"), window_s=0.01)
    assert run_graph(deps, InMemorySaver()).status == "finished"
    (a,) = deps.store.adapters()
    assert a["status"] == "skipped" and "0 preference pairs" in a["note"] and not calls


def test_an_unknown_training_method_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="unknown training method 'ppo'"):
        train_adapter("no-such-model", [{"prompt": []}], tmp_path / "x", LoraSettings(), method="ppo")
