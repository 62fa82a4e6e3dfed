"""The learning loop: success rules, export records that datasets and TRL take as they
stand, and the LoRA update node, with real peft/trl training steps on SmolLM2."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.config import load_config
from deltanas.agent.learning.examples import export_records, sft_example, successful, training_set
from deltanas.agent.learning.lora import LoraSettings, adapter_complete, train_adapter
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.loop.deps import DatasetInfo, Deps
from deltanas.agent.run.driver import run_graph
from deltanas.agent.stopping import RunStopped
from deltanas.tools.novelty import NoveltyIndex

from support import InstantExecutor, block_diff

TINY = LoraSettings(r=4, alpha=8, epochs=1, grad_accum=1, max_length=256, lr=1e-4)


def make_deps(tmp_path, learner=None, **over) -> Deps:
    counter = iter(range(10_000))
    llm = ScriptedBackend(lambda p: f"```diff\n{block_diff(p.base_source, f'l{next(counter)}')}```")
    cfg = load_config(None, {"llm.spec": "mutate", "search.cycles": 2, "search.candidates": 3,
                             "baselines": ["lenet"], "learn.rule": "valid",
                             "learn.after_last_cycle": True, **over})
    run_dir = tmp_path / "run"
    (run_dir / "candidates").mkdir(parents=True, exist_ok=True)
    return Deps(config=cfg, llm=CoalescingBackend(llm, window_s=0.01), executor=InstantExecutor(),
                store=Store(run_dir / "archive.sqlite"), novelty=NoveltyIndex(),
                datasets={"synthetic": DatasetInfo("synthetic", (1, 28, 28), 10)}, run_dir=run_dir, learner=learner,
                learner_note="" if learner else "no learner in this test")


def recording_learner(log: list):
    """A learner that writes a complete adapter folder at once and records each call's examples."""
    def learner(examples, out_dir, stop, start_from=None):
        log.append(examples)
        out_dir.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "deltanas_adapter.json"):
            (out_dir / name).write_text("{}")
        return {"loss": 0.5, "steps": 1, "seconds": 0.1}
    return learner


# -- success rules ------------------------------------------------------------------------------------------------

def _row(cid, cycle, acc, status="ok", parent="base"):
    return CandidateRow(id=cid, cycle=cycle, idx=0, kind="delta", dataset="d", status=status, accuracy=acc,
                        parent_id=parent)


def test_success_rules(tmp_path):
    store = Store(tmp_path / "a.sqlite")
    store.upsert(CandidateRow(id="base", cycle=-1, idx=0, kind="baseline", dataset="d", status="ok", accuracy=0.5))
    for row in (_row("a", 0, 0.6), _row("b", 0, 0.4), _row("c", 0, None, "crashed"), _row("d", 1, 0.7),
                _row("e", 1, 0.55), _row("f", 1, 0.9, "duplicate")):
        store.upsert(row)
    ids = lambda rows: sorted(r.id for r in rows)  # noqa: E731
    assert ids(successful(store, "valid")) == ["a", "b", "d", "e"]
    assert ids(successful(store, "improved")) == ["a", "d", "e"]  # b fell below its parent's 0.5
    assert ids(successful(store, "top_k", top_k=1)) == ["a", "d"]
    assert ids(successful(store, "valid", up_to_cycle=0)) == ["a", "b"]
    with pytest.raises(ValueError, match="unknown success rule"):
        successful(store, "best")


def test_sft_example_trains_the_answer_that_worked():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", "type": "function", "function": {
                "name": "propose_diff", "arguments": {"diff": "bad"}}}]},
            {"role": "tool", "tool_call_id": "c0", "name": "propose_diff", "content": "{}"},
            {"role": "user", "content": "context_mismatch: fix it"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "propose_diff", "arguments": {"diff": "good"}}}]}]
    ex = sft_example(msgs)
    assert ex["completion"] == [{"role": "assistant", "content": "good"}]
    assert [m["role"] for m in ex["prompt"]] == ["system", "user", "assistant", "user"]
    assert ex["prompt"][2]["content"] == "bad"
    assert sft_example(msgs[:2]) is None


def test_an_answer_placed_with_wrong_context_is_learned_as_it_applied(tmp_path):
    """The model's hunk names a context line the parent does not have: the applier's fuzzy tier
    places it, the archive keeps the diff as applied, and the SFT target is that diff, so the
    update teaches the parent's real lines rather than the invented one."""
    from support import RELU_TO_GELU, loop_deps

    invented = RELU_TO_GELU.replace("             nn.MaxPool2d(2),", "             nn.MaxPool2d(kernel_size=2),")
    assert invented != RELU_TO_GELU
    answer = "```diff\n--- a/model.py\n+++ b/model.py\n" + invented
    deps = loop_deps(tmp_path, None, lambda p: answer, **{"search.candidates": 1, "llm.constrain": "none"})
    deps.novelty = NoveltyIndex(threshold=0.99)  # one small edit: novel enough here
    assert run_graph(deps, InMemorySaver()).status == "finished"
    row = deps.store.get("c000-000")
    assert row.status == "ok", (row.status, row.error_message)
    applied = [json.loads(m["content"]) for m in deps.store.get_trajectory(row.id)
               if m.get("role") == "tool" and m.get("name") == "apply_diff"]
    assert applied[-1]["fuzzy"] == 1 and "kernel_size=2)" not in applied[-1]["corrected"]
    assert row.diff == applied[-1]["corrected"] and "nn.GELU()" in row.diff
    ex = sft_example(deps.store.get_trajectory(row.id))
    assert ex["completion"][0]["content"] == f"```diff\n{row.diff}```"
    assert "kernel_size=2)" not in ex["completion"][0]["content"] and "nn.MaxPool2d(2)," in ex["completion"][0]["content"]


# -- export -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_loads_in_datasets_and_trains_in_trl(tmp_path):
    deps = make_deps(tmp_path, **{"search.cycles": 1})
    (deps.run_dir / "config.toml").write_text('[llm]\nspec = "mutate"\n')
    assert run_graph(deps, InMemorySaver()).status == "finished"
    deps.store.close()
    out = tmp_path / "t.jsonl"
    cli = [sys.executable, "-m", "deltanas.agent.cli", "export", str(deps.run_dir)]
    r = subprocess.run([*cli, "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 trajectories")
    r = subprocess.run([*cli, "--format", "hf", "--output", str(tmp_path / "hf"), "--successful-only",
                        "--cycle", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "--format", "hf", "--output", str(tmp_path / "hf")], capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr  # never written over

    from datasets import load_dataset, load_from_disk

    ds = load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == 3
    wanted = successful(Store(deps.run_dir / "archive.sqlite", readonly=True), "improved", cycle=0)
    hf = load_from_disk(str(tmp_path / "hf"))
    assert 0 < len(hf) == len(wanted) and {m["candidate_id"] for m in hf["meta"]} == {r.id for r in wanted}
    first = ds[0]["messages"]
    assert [m["role"] for m in first[:3]] == ["system", "user", "assistant"]
    call = first[2]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "propose_diff"
    assert "diff" in json.loads(call["function"]["arguments"])  # OpenAI style: a JSON string
    assert {m["role"] for m in first} == {"system", "user", "assistant", "tool"}
    assert ds[0]["meta"]["status"] == "ok"

    # TRL's SFTTrainer takes the records as they stand (messages + tools). The model is the tiny
    # one: this is the records' test (a full SmolLM2 step takes 80 s on a 2-core CPU; its LoRA
    # steps are tested below).
    from trl import SFTConfig, SFTTrainer

    from deltanas.agent.llm.hf import CHATML_TEMPLATE, load_pretrained

    tok, net = load_pretrained("tinycoder", "cpu")
    tok.chat_template = tok.chat_template or CHATML_TEMPLATE  # tinycoder's GGUF carries none
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=1,
                     max_length=512, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = SFTTrainer(model=net, args=args, train_dataset=ds.remove_columns(["meta"]), processing_class=tok)
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)


# -- the LoRA update node -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lora_update_trains_a_real_adapter_and_hot_swaps_it(tmp_path):
    def learner(examples, out_dir, stop, start_from=None):
        return train_adapter("smollm2", examples, out_dir, TINY, device="cpu", stop=stop)

    deps = make_deps(tmp_path, learner, **{"search.candidates": 2})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    adapters = deps.store.adapters()
    assert [a["cycle"] for a in adapters] == [0, 1] and all(a["status"] == "trained" for a in adapters), adapters
    assert adapters[0]["examples"] == 2 and adapters[1]["examples"] == 4  # cumulative over cycles
    assert all(math.isfinite(a["loss"]) and a["steps"] >= 1 for a in adapters)
    for k in (0, 1):
        assert adapter_complete(deps.run_dir / "adapters" / f"cycle-{k}")
    assert deps.llm.inner.adapters == [str(deps.run_dir / "adapters" / f"cycle-{k}") for k in (0, 1)]
    assert not list((deps.run_dir / "adapters").glob(".*"))  # no partial folder left

    # the hf backend generates with it
    from deltanas.agent.llm.base import Prompt, Sampling
    from deltanas.agent.llm.hf import HFBackend

    hf = HFBackend("smollm2", device="cpu")
    hf.load_adapter(str(deps.run_dir / "adapters" / "cycle-1"))
    out = hf.generate([Prompt(messages=[{"role": "user", "content": "Say hi"}])],
                      Sampling(max_new_tokens=4, temperature=0.0))
    assert hf.active_adapter == "cycle-1" and out[0].completion_tokens > 0


def test_update_skipped_without_successes_or_learner_and_recorded(tmp_path):
    deps = make_deps(tmp_path, learner=None, **{"search.cycles": 1})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    (a,) = deps.store.adapters()
    assert a["status"] == "skipped" and a["note"] == "no learner in this test"
    calls = []
    deps2 = make_deps(tmp_path / "2", learner=lambda *a, **k: calls.append(a),
                      **{"search.cycles": 1, "learn.min_examples": 50})
    assert run_graph(deps2, InMemorySaver()).status == "finished"
    (a,) = deps2.store.adapters()
    assert a["status"] == "skipped" and "fewer than learn.min_examples = 50" in a["note"] and calls == []


def test_a_failed_update_is_recorded_and_the_run_goes_on(tmp_path):
    def broken(examples, out_dir, stop, start_from=None):
        raise RuntimeError("CUDA out of memory in the trainer")

    deps = make_deps(tmp_path, broken)
    out = run_graph(deps, InMemorySaver())
    assert out.status == "finished", out.error
    assert [a["status"] for a in deps.store.adapters()] == ["failed", "failed"]
    assert "out of memory" in deps.store.adapters()[0]["note"]
    assert len([r for r in deps.store.candidates() if r.cycle == 1]) == 3


def test_an_interrupted_update_leaves_nothing_half_written_and_resume_redoes_it(tmp_path):
    """The first update is stopped midway (as Ctrl-C or a kill would): its partial folder is
    never used, and the resumed run trains the adapter again and goes on."""
    stop_now = threading.Event()
    trained = []

    leftover = []

    def learner(examples, out_dir, stop, start_from=None):
        partial = out_dir.parent / f".{out_dir.name}.partial-x"
        leftover.append(partial.exists())  # the node clears what a killed update left
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "adapter_config.json").write_text("{}")
        if not trained and not stop_now.is_set():
            stop_now.set()
            raise RunStopped("stopped during the update")  # its partial folder stays, as after a kill
        shutil.rmtree(partial)
        out_dir.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors", "deltanas_adapter.json"):
            (out_dir / name).write_text("{}")
        trained.append(len(examples))
        return {"loss": 1.0, "steps": 1, "seconds": 0.1}

    deps = make_deps(tmp_path, learner)
    saver = InMemorySaver()
    first = run_graph(deps, saver)
    assert first.status == "stopped"
    assert deps.store.adapters() == [] and not (deps.run_dir / "adapters" / "cycle-0").exists()
    again = run_graph(deps, saver)
    assert again.status == "finished", again.error
    assert [a["status"] for a in deps.store.adapters()] == ["trained", "trained"] and trained == [3, 6]
    assert leftover == [False, False, False]
    assert not list((deps.run_dir / "adapters").glob(".*"))
    assert len(training_set(deps.store, "valid", 5, up_to_cycle=1)[1]) == 6
    assert len(export_records(deps.store)) == 6


def test_cold_start_cycles_are_proposed_by_the_mutator_and_teach_the_first_update(tmp_path):
    from deltanas.agent.llm.mutate import MutateBackend

    seen = []
    deps = make_deps(tmp_path, recording_learner(seen), **{"learn.cold_start_cycles": 1})
    deps.cold_llm = CoalescingBackend(MutateBackend(seed=0), window_s=0.01)
    assert run_graph(deps, InMemorySaver()).status == "finished"
    assert deps.store.get_meta("proposer:0") == "mutate" and deps.store.get_meta("proposer:1") == "scripted"
    assert len(deps.llm.inner.calls) >= 1  # the model proposed cycle 1 only
    assert all(p.messages[1]["content"] for batch in deps.llm.inner.calls for p in batch)
    ok0 = [r for r in deps.store.candidates(cycle=0) if r.status == "ok"]
    assert ok0 and len(seen[0]) == len(ok0)  # the first update learnt from the mutator's successes
    assert all("```" in ex["completion"][0]["content"] or "---" in ex["completion"][0]["content"] for ex in seen[0])
    # the model got the first adapter before it proposed anything
    assert deps.llm.inner.adapters[0].endswith("cycle-0")


def test_an_adapter_is_reused_when_nothing_new_was_learnt(tmp_path):
    seen = []
    deps = make_deps(tmp_path, recording_learner(seen), **{"search.cycles": 3})
    counter = iter(range(10_000))
    deps.llm = CoalescingBackend(ScriptedBackend(
        lambda p: (n := next(counter)) < 3 and f"```diff\n{block_diff(p.base_source, f'u{n}')}```" or "no idea"),
        window_s=0.01)
    assert run_graph(deps, InMemorySaver()).status == "finished"
    adapters = deps.store.adapters()
    assert [a["status"] for a in adapters] == ["trained", "reused", "reused"] and [len(e) for e in seen] == [3]
    assert adapters[2]["path"] == "adapters/cycle-0" and adapters[2]["note"] == "trained on the same examples: adapters/cycle-0"
    assert adapters[0]["example_ids"] == [r.id for r in deps.store.candidates(cycle=0)]


def test_the_update_after_the_last_cycle_waits_for_an_extension(tmp_path):
    """By default no adapter is trained that no cycle proposes with: the update after the last
    cycle is recorded as deferred, and a run extended with more cycles trains it before its next
    cycle proposes anything."""
    seen = []
    saver = InMemorySaver()
    deps = make_deps(tmp_path, recording_learner(seen), **{"learn.after_last_cycle": False})
    assert run_graph(deps, saver).status == "finished"
    assert [(a["cycle"], a["status"]) for a in deps.store.adapters()] == [(0, "trained"), (1, "deferred")]
    assert "learn.after_last_cycle" in deps.store.adapters()[1]["note"] and [len(e) for e in seen] == [3]
    assert deps.llm.inner.adapters == [str(deps.run_dir / "adapters" / "cycle-0")]
    deps.store.close()

    more = make_deps(tmp_path, recording_learner(seen), **{"learn.after_last_cycle": False, "search.cycles": 3})
    assert run_graph(more, saver).status == "finished"
    assert [(a["cycle"], a["status"]) for a in more.store.adapters()] == [
        (0, "trained"), (1, "trained"), (2, "deferred")]
    assert [len(e) for e in seen] == [3, 6]  # cycles 0 and 1 taught the deferred update
    assert more.llm.inner.adapters == [str(more.run_dir / "adapters" / "cycle-1")]
    assert len(more.store.candidates(cycle=2)) == 3 and more.llm.inner.calls  # cycle 2 proposed with it


@pytest.mark.slow
def test_a_stop_ends_a_real_update_within_seconds_even_midway_through_a_micro_batch(tmp_path):
    """On a CPU one optimizer step of long examples takes many seconds; the stop is checked before
    each decoder layer, so the update ends within seconds of it and leaves nothing behind."""
    import time

    examples = [{"prompt": [{"role": "user", "content": f"Say zebra {n} times."}],
                 "completion": [{"role": "assistant", "content": "zebra " * 600}]} for n in (600, 601, 602, 603)]
    settings = LoraSettings(r=4, alpha=8, epochs=1, grad_accum=4, max_length=1024, lr=1e-4)
    out_dir = tmp_path / "adapters" / "cycle-0"
    stop = threading.Event()
    got = {}

    def update():
        try:
            got["info"] = train_adapter("smollm2", examples, out_dir, settings, device="cpu", stop=stop)
        except RunStopped as e:
            got["stopped"] = e

    t = threading.Thread(target=update)
    t.start()
    while t.is_alive() and not list(out_dir.parent.glob(".*")):  # the model is loaded, training begins
        time.sleep(0.05)
    time.sleep(2.0)
    stop.set()
    set_at = time.monotonic()
    t.join(60)
    assert "stopped" in got and time.monotonic() - set_at < 5, got
    assert not out_dir.exists() and not list(out_dir.parent.glob(".*"))
