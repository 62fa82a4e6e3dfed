"""The format bootstrap (issue 17): mutator pairs checked independently here (the diff reproduces
the variant, the variant builds and runs forward, the run would call it novel), `deltanas bootstrap`
on careless input, the folder as a cold-start source, and a real adapter (peft + trl on the tiny
GGUF model) that a run adopts and that later updates start from."""
from __future__ import annotations

import json
import os
from collections import Counter
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.cli import main
from deltanas.agent.config import load_config
from deltanas.agent.learning import bootstrap, cold_start_pairs
from deltanas.agent.learning.bootstrap import forward_error, mutator_pairs
from deltanas.agent.learning.cold_start_pairs import bootstrap_pairs, source_kind
from deltanas.agent.learning.lora import LoraSettings, adapter_complete, train_adapter
from deltanas.agent.run.driver import run_graph
from deltanas.tools import prompting
from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.novelty import NoveltyIndex
from deltanas.tools.zoo import DEFAULT_PRM, list_baselines

from support import loop_deps

ROOT = Path(__file__).resolve().parents[2]


def build_and_run(source: str, in_shape, classes: int, batch: int = 3) -> torch.Tensor:
    module = types.ModuleType("t")
    exec(compile(source, "model.py", "exec"), module.__dict__)
    net = module.Net((batch, *in_shape), (classes,), dict(DEFAULT_PRM), torch.device("cpu")).eval()
    with torch.no_grad():
        return net(torch.randn(batch, *in_shape))


def test_mutator_pairs_apply_run_forward_are_novel_and_reproducible():
    made = mutator_pairs(16, dataset="cifar10", seed=3, distinct=lambda b, v: NoveltyIndex().check(v, b).novel)
    assert len(made.pairs) == 16 and made.tried >= 16
    index = NoveltyIndex()
    zoo = {b.name for b in list_baselines()}
    # the networks take turns: none takes more than its share, though one whose edits are seldom
    # novel may miss a turn
    shares = Counter(p.id.split(":")[1] for p in made.pairs)
    assert set(shares) <= zoo and len(shares) >= 6 and max(shares.values()) <= 3, shares
    for p in made.pairs:
        assert p.purpose == "format" and p.source == "mutator" and p.variant_accuracy is None
        answer = cold_start_pairs.answer(p)
        res = apply_model_output(p.base_source, answer)  # the answer the model is taught, through the run's applier
        assert res.ok, res.error
        assert res.source == p.variant_source
        assert build_and_run(p.variant_source, (3, 32, 32), 10).shape == (3, 10)
        assert index.check(p.variant_source, p.base_source).novel
        assert p.variant_name and p.base_name.split("+")[0] in zoo
    again = mutator_pairs(16, dataset="cifar10", seed=3, distinct=lambda b, v: NoveltyIndex().check(v, b).novel)
    assert [p.id for p in again.pairs] == [p.id for p in made.pairs]
    other = mutator_pairs(16, dataset="cifar10", seed=4)
    assert {p.id for p in other.pairs} != {p.id for p in made.pairs}


def test_parallel_streams_give_the_same_pairs_whatever_the_cores():
    one = bootstrap.parallel_pairs(8, novelty=(0.9, 128, 7), streams=4, workers=1, dataset="mnist", seed=7)
    two = bootstrap.parallel_pairs(8, novelty=(0.9, 128, 7), streams=4, workers=2, dataset="mnist", seed=7)
    assert len(one.pairs) == 8 and [p.id for p in one.pairs] == [p.id for p in two.pairs]
    assert one.tried == two.tried and one.skipped == two.skipped
    assert len({p.digest for p in one.pairs}) == 8
    index = NoveltyIndex()
    assert all(index.check(p.variant_source, p.base_source).novel for p in one.pairs)


def test_forward_check_names_what_is_wrong():
    ok = list_baselines()[0].source
    assert forward_error(ok, (1, 28, 28), 10) is None
    wrong = ok + "\n_Net = Net\nclass Net(_Net):\n    def forward(self, x):\n        return super().forward(x)[:, :3]\n"
    assert forward_error(wrong, (1, 28, 28), 10) == "wrong output shape"
    assert forward_error("class Net:\n    pass\n", (1, 28, 28), 10) == "TypeError"
    assert forward_error(ok.replace("class Net", "class Other"), (1, 28, 28), 10) == "AttributeError"


def test_mutator_pairs_stop_at_their_tries_with_a_count():
    made = mutator_pairs(50, baselines=["lenet"], seed=0, max_tries=10,
                         distinct=lambda b, v: False)  # nothing is novel enough
    assert made.pairs == [] and made.tried == 10
    assert made.skipped["too similar to the base to be novel"] + made.skipped["identical to the base"] \
        + made.skipped["the same pair again"] + made.skipped["no mutation applies"] \
        + made.skipped["a parent that does not run forward"] == 10


def run_cli(*argv: str) -> int:
    return main(list(argv))


def test_bootstrap_command_writes_the_runs_own_prompts_and_refuses_to_mix(tmp_path, capsys):
    out = tmp_path / "bs"
    assert run_cli("bootstrap", "--pairs", "6", "--output", str(out), "--no-adapter", "--dataset", "mnist") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    lines = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert manifest["examples"] == len(lines) == 6 and manifest["by_source"] == {"mutator format": 6}
    assert manifest["mutator"]["made"] == 6 and manifest["adapter"] is None
    cfg = load_config(None)
    for line in lines:
        # exactly the chat a run on MNIST sends for this parent, and an answer its applier takes
        assert line["prompt"] == prompting.propose_messages(
            parent_source=line["base_source"], dataset="mnist", in_shape=(1, 28, 28), num_classes=10,
            parent_accuracy=None, goal=cfg.search.goal, mode="delta")
        res = apply_model_output(line["base_source"], line["completion"][0]["content"])
        assert res.ok and res.source == line["variant_source"]
    assert source_kind(out) == "bootstrap"

    # the same request again: kept, not made twice
    before = (out / "examples.jsonl").read_bytes()
    assert run_cli("bootstrap", "--pairs", "6", "--output", str(out), "--no-adapter") == 0
    assert "made before; kept" in capsys.readouterr().out and (out / "examples.jsonl").read_bytes() == before
    # another request into the same folder, a folder of something else, an unknown dataset, a bad count
    assert run_cli("bootstrap", "--pairs", "7", "--output", str(out), "--no-adapter") == 2
    assert "another request" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert run_cli("bootstrap", "--pairs", "2", "--output", str(tmp_path / "other"), "--no-adapter") == 2
    assert "not a bootstrap folder" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert run_cli("bootstrap", "--pairs", "2", "--output", str(tmp_path / "x"), "--dataset", "mars",
                   "--no-adapter") == 2
    assert "unknown dataset 'mars'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("bootstrap", "--pairs", "0")
    assert run_cli("bootstrap", "--pairs", "2", "--output", str(tmp_path / "y"), "--llm", "mutate") == 2
    assert "no weights to adapt" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            out.append(int(stat.parent.name))
    return out


def test_ctrl_c_leaves_nothing_half_written_and_the_same_command_goes_on(tmp_path):
    out = tmp_path / "bs"
    cmd = [sys.executable, "-m", "deltanas.agent.cli", "bootstrap", "--pairs", "600", "--output", str(out),
           "--no-adapter"]
    # As from a terminal: a test run started in the background (`cmd &`) would pass SIGINT on ignored.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120  # a loaded machine imports slowly: wait for the mutator's processes
    while not _children(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert _children(proc.pid), "the mutator's processes never started"
    time.sleep(2)  # at work
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists() and not list(tmp_path.rglob(".*.tmp"))
    assert run_cli("bootstrap", "--pairs", "3", "--output", str(out), "--no-adapter", "--baselines", "lenet") == 0
    assert json.loads((out / "manifest.json").read_text())["examples"] == 3


def test_a_bootstrap_folder_as_a_cold_start_source_keeps_the_runs_rules(tmp_path):
    made = mutator_pairs(5, dataset="mnist", seed=1, distinct=lambda b, v: NoveltyIndex().check(v, b).novel)
    lines = [bootstrap.example_line(p) for p in made.pairs]
    better = made.pairs[0]
    lines.append({**cold_start_pairs.pair_record(better), "id": "run:x:1", "source": "run", "purpose": "improvement",
                  "dataset": "cifar10", "base_accuracy": 0.5, "variant_accuracy": 0.6})
    lines.append({**cold_start_pairs.pair_record(better), "id": "run:x:2", "source": "run", "purpose": "improvement",
                  "dataset": "svhn", "base_accuracy": 0.5, "variant_accuracy": 0.6})
    tampered = dict(lines[1])
    tampered["variant_source"] = tampered["base_source"]  # a no-op: the run refuses it
    lines.append({**tampered, "id": "mutator:x:tampered"})
    bootstrap.write_folder(tmp_path / "bs", lines, {"request": {}, "examples": len(lines)})
    with open(tmp_path / "bs" / "examples.jsonl", "a") as f:
        f.write("not json\n{\"id\": 1}\n")

    got = bootstrap_pairs(tmp_path / "bs", dataset="cifar10")
    assert got.kind == "bootstrap" and got.networks == 8
    assert [p.id for p in got.pairs] == ["run:x:1", *(p.id for p in made.pairs)]  # improvement first
    assert all(p.dataset == "cifar10" for p in got.pairs)  # format pairs are asked of the run's dataset
    assert got.skipped == {"lines that are not a pair record": 2, "identical to the base": 1,
                           "improvement pairs measured on another dataset than cifar10": 1}
    assert [p.id for p in bootstrap_pairs(tmp_path / "bs", dataset="cifar10", limit=2).pairs] == \
        ["run:x:1", made.pairs[0].id]
    (tmp_path / "empty").mkdir()
    bootstrap.write_folder(tmp_path / "empty", [], {"request": {}})
    with pytest.raises(ValueError, match="holds no pairs"):
        bootstrap_pairs(tmp_path / "empty", dataset="mnist")


# -- a real adapter, adopted by a run ------------------------------------------------------------------------------

def make_deps(tmp_path, learner, **over):
    return loop_deps(tmp_path, learner, **{"llm.spec": "hf:tinycoder", **over})


@pytest.mark.slow
def test_a_real_bootstrap_adapter_is_adopted_and_later_updates_start_from_it(tmp_path, capsys):
    out = tmp_path / "bs"
    assert run_cli("bootstrap", "--pairs", "3", "--output", str(out), "--llm", "hf:tinycoder", "--device", "cpu",
                   "--baselines", "lenet") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert adapter_complete(out / "adapter")
    assert manifest["adapter"]["steps"] == 3 and manifest["adapter"]["base_model"] == "tinycoder"
    assert manifest["adapter"]["device"].startswith("cpu (")
    assert run_cli("bootstrap", "--pairs", "3", "--output", str(out), "--llm", "hf:tinycoder", "--device", "cpu",
                   "--baselines", "lenet") == 0
    assert "trained before; kept" in capsys.readouterr().out

    # bench/format_rate.py: the same held-out prompts to the base model and with the adapter
    figures = tmp_path / "format.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "format_rate.py"), "--llm", "hf:tinycoder",
                           "--adapter", str(out / "adapter"), "--prompts", "2", "--max-new-tokens", "8",
                           "--device", "cpu", "--json", str(figures)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(figures.read_text())["rows"]
    assert list(rows) == ["base model (baseline)", f"adapter {out / 'adapter'}"]
    for r in rows.values():
        assert r["answers"] == 2 and r["applied"] + sum(r["errors"].values()) == 2
        assert r["applied_rate"] == r["applied"] / 2 and r["applied_ci95"][0] <= r["applied_rate"] <= r["applied_ci95"][1]
        assert r["applied_without_fuzz"] + r["applied_fuzzy"] == r["applied"]  # each applied answer is one or other
        assert [a["fuzzy"] > 0 for a in r["outcomes"]].count(True) == r["applied_fuzzy"]
    assert "base model (baseline)" in proc.stdout and "without the applier's fuzzy tier" in proc.stdout

    calls = []

    def learner(examples, out_dir, stop, start_from=None):
        calls.append((out_dir.name, start_from))
        # the real trainer, from the adopted adapter: peft loads it trainable and trl trains on
        return train_adapter("tinycoder", examples[-1:], out_dir, LoraSettings(max_length=1024), device="cpu",
                             start_from=start_from)

    deps = make_deps(tmp_path, learner, **{"learn.cold_start_from": [str(out)]})
    result = run_graph(deps, InMemorySaver())
    assert result.status == "finished", result.error
    cold, first = deps.store.adapters()
    assert cold["status"] == "reused" and cold["path"] == "adapters/cold-start" and cold["examples"] == 3
    assert "bootstrap adapter" in cold["note"]
    assert adapter_complete(deps.run_dir / "adapters" / "cold-start")  # a copy: the run stands alone
    assert deps.llm.inner.adapters[0] == str(deps.run_dir / "adapters" / "cold-start")
    assert len(deps.store.pairs()) == 3  # its pairs join every later update, as other sources' do
    assert calls == [("cycle-0", deps.run_dir / "adapters" / "cold-start")]
    assert first["status"] == "trained"
    meta = json.loads((deps.run_dir / "adapters" / "cycle-0" / "deltanas_adapter.json").read_text())
    assert meta["start_from"] == str(deps.run_dir / "adapters" / "cold-start")
    config = json.loads((deps.run_dir / "adapters" / "cycle-0" / "adapter_config.json").read_text())
    assert config["r"] == json.loads((out / "adapter" / "adapter_config.json").read_text())["r"]


def test_an_adapter_for_another_model_is_not_adopted_its_pairs_are(tmp_path):
    made = mutator_pairs(2, dataset="mnist", seed=2, baselines=["lenet"],
                         distinct=lambda b, v: NoveltyIndex().check(v, b).novel)
    out = tmp_path / "bs"
    bootstrap.write_folder(out, [bootstrap.example_line(p) for p in made.pairs], {"request": {}})
    (out / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / "adapter" / name).write_text("{}")
    (out / "adapter" / "deltanas_adapter.json").write_text(json.dumps({"base_model": "some-other-model"}))
    calls = []

    def learner(examples, out_dir, stop, start_from=None):
        calls.append((out_dir.name, len(examples), start_from))
        out_dir.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "deltanas_adapter.json"):
            (out_dir / name).write_text("{}")
        return {"loss": 1.0, "steps": 1, "seconds": 0.1}

    deps = make_deps(tmp_path, learner, **{"learn.cold_start_from": [str(out)]})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    assert calls[0] == ("cold-start", 2, None)  # trained afresh on the folder's pairs
    assert calls[1][0] == "cycle-0" and calls[1][2] is None
    assert deps.store.adapters()[0]["status"] == "trained"
    assert deps.store.get_meta("cold_start:adopted") is None
