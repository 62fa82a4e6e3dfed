"""A multi-dataset pool in one run (`--dataset digits,synthetic`): the config, the executor that
trains each job on its dataset with a warm worker per dataset, and a real run over two offline
datasets of different shapes (digits 1x28x28, synthetic 3x32x32), with a third that is missing."""
from __future__ import annotations

import json

import pytest

from deltanas.agent.archive import Store
from deltanas.agent.cli import main
from deltanas.agent.config import PAPER_DATASETS, ConfigError, load_config
from deltanas.agent.loop.cycle_nodes import baseline_id, slot_datasets
from deltanas.tools.zoo import get_baseline


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A dataset cache of the test's own: only what is shipped offline (MNIST, digits, synthetic) is there."""
    monkeypatch.setenv("DELTANAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DELTANAS_OFFLINE", "1")
    return tmp_path / "cache"


def test_the_dataset_key_names_a_pool():
    cfg = load_config(None, {"data.dataset": " digits , synthetic "})
    assert cfg.data.dataset == "digits,synthetic" and cfg.data.datasets == ("digits", "synthetic")
    assert load_config(None).data.datasets == ("mnist",)
    with pytest.raises(ConfigError, match="named twice"):
        load_config(None, {"data.dataset": "mnist,digits,mnist"})
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        load_config(None, {"data.dataset": "mnist,imagenet"})
    with pytest.raises(ConfigError, match="no dataset named"):
        load_config(None, {"data.dataset": " , "})
    assert load_config(None, preset="paper").data.datasets == PAPER_DATASETS
    assert set(PAPER_DATASETS) == {"cifar10", "cifar100", "mnist", "svhn", "imagenette", "celeba-gender"}


def test_slots_and_ids_spread_a_cycle_over_the_pool():
    assert slot_datasets(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert slot_datasets(["a"], 3) == ["a", "a", "a"]
    assert baseline_id("lenet", "mnist", pool=False) == "base-lenet"
    assert baseline_id("lenet", "mnist", pool=True) == "base-lenet.mnist"


def test_a_pool_that_finds_no_dataset_says_how_to_provide_them(offline_cache):
    from deltanas.agent.run.build import available_datasets

    cfg = load_config(None, {"data.dataset": "cifar10,svhn"})
    with pytest.raises(ConfigError, match="none of the pool's datasets is here") as e:
        available_datasets(cfg)
    assert "cifar10" in str(e.value) and "svhn" in str(e.value)
    narrowed, found, missing = available_datasets(load_config(None, {"data.dataset": "cifar10,digits"}))
    assert narrowed.data.datasets == ("digits",) and list(found) == ["digits"]
    assert len(missing) == 1 and missing[0].startswith("cifar10: ")


@pytest.mark.slow
def test_one_sandbox_keeps_a_warm_worker_per_dataset(offline_cache, tmp_path):
    """Jobs on two datasets, in turn, through one executor slot: each dataset's warm worker is
    started once and reused, and each job is scored against its own dataset's labels."""
    from deltanas.agent.run.build import load_run_datasets, make_executor, run_targets

    cfg = load_config(None, {"data.dataset": "digits,synthetic", "data.limit_train": 400, "data.limit_test": 200,
                             "sandbox.type": "process", "sandbox.workers": 1, "sandbox.timeout_s": 120})
    import threading

    executor = make_executor(cfg, run_targets(cfg, load_run_datasets(cfg)), tmp_path / "work", threading.Event())
    source = get_baseline("lenet").source
    try:
        outs = [(d, executor.evaluate(source, f"c{i}", tmp_path / f"c{i}", dataset=d))
                for i, d in enumerate(["digits", "synthetic", "digits", "synthetic"])]
        with pytest.raises(ValueError, match="name the job's"):
            executor.evaluate(source, "c9", tmp_path / "c9")
        with pytest.raises(ValueError, match="not one of this run's"):
            executor.evaluate(source, "c9", tmp_path / "c9", dataset="mnist")
        assert executor.sandbox._pool.started == 2  # one warm worker per dataset, each loaded once
    finally:
        executor.close()
    for d, out in outs:
        assert out.status == "ok", (d, out.error, out.log_tail)
        assert 0.0 <= out.accuracy <= 1.0
    # lenet's parameter count follows the input shape: 1x28x28 on digits, 3x32x32 on synthetic
    assert outs[0][1].param_count == outs[2][1].param_count != outs[1][1].param_count


@pytest.mark.slow
def test_a_pool_run_over_two_offline_datasets(offline_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--llm", "mutate", "--cycles", "2", "--candidates", "4", "--dataset",
                 "digits,cifar10,synthetic", "--limit-train", "400", "--limit-test", "200", "--baselines",
                 "lenet,alexnet", "--sandbox", "process", "--plain", "--run-dir", str(run), "--timeout", "120"]) == 0
    err = capsys.readouterr().err
    assert "missing from the pool: cifar10" in err and "the pool runs on digits,synthetic" in err
    assert 'dataset = "digits,synthetic"' in (run / "config.toml").read_text()  # what ran, not what was asked

    store = Store(run / "archive.sqlite", readonly=True)
    rows = {r.id: r for r in store.candidates()}
    bases = {cid: r for cid, r in rows.items() if r.kind == "baseline"}
    assert sorted(bases) == sorted(f"base-{n}.{d}" for n in ("lenet", "alexnet") for d in ("digits", "synthetic"))
    assert all(bases[f"base-{n}.{d}"].dataset == d for n in ("lenet", "alexnet") for d in ("digits", "synthetic"))
    for cycle in (0, 1):
        mine = sorted((r for r in rows.values() if r.cycle == cycle), key=lambda r: r.idx)
        assert [r.dataset for r in mine] == ["digits", "synthetic", "digits", "synthetic"]  # balanced
        for r in mine:
            parent = rows[r.parent_id]
            assert parent.dataset == r.dataset  # parents are chosen within the child's dataset
            prompt = store.get_trajectory(r.id)[1]["content"]
            shape = "(1, 28, 28)" if r.dataset == "digits" else "(3, 32, 32)"
            assert f"Dataset: {r.dataset}. Input shape {shape}" in prompt, prompt[:600]
        summary = next(c["summary"] for c in store.cycles() if c["cycle"] == cycle)
        assert summary["mean_accuracy"] is None and set(summary["per_dataset"]) == {"digits", "synthetic"}
        for d, s in summary["per_dataset"].items():
            accs = [r.accuracy for r in mine if r.dataset == d and r.status == "ok"]
            assert s["candidates"] == 2
            assert s["best_accuracy"] == (max(accs) if accs else None)
    trained = [r for r in rows.values() if r.status == "ok" and r.kind != "baseline"]
    assert len(trained) >= 4, [(r.id, r.status, r.error_message) for r in rows.values()]

    # status and report compare within a dataset: the best of each
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["best"] is None and set(status["best_by_dataset"]) == {"digits", "synthetic"}
    for d, b in status["best_by_dataset"].items():
        assert b["accuracy"] == max(r.accuracy for r in rows.values() if r.dataset == d and r.accuracy is not None)
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    text = (run / "report" / "summary.md").read_text()
    assert "On digits: " in text and "On synthetic: " in text and "| dataset | id |" in text

    # verify ranks within each dataset: one summary per dataset
    assert main(["verify", str(run), "--top", "1", "--sample", "1", "--epochs", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [s["dataset"] for s in found] == ["digits", "synthetic"]
    for s in found:
        ids = [v["candidate_id"] for v in store.verifications(2)]
        assert s["retrained"] == sum(1 for i in ids if rows[i].dataset == s["dataset"]) == 2

    # the resume finds every baseline and cycle where it left them, and adds a third cycle on both datasets
    assert main(["run", "--resume", str(run), "--cycles", "3", "--plain"]) == 0
    again = Store(run / "archive.sqlite", readonly=True).candidates()
    assert sum(1 for r in again if r.kind == "baseline") == 4
    assert sorted(r.dataset for r in again if r.cycle == 2) == ["digits", "digits", "synthetic", "synthetic"]


@pytest.mark.slow
def test_eval_trains_a_file_on_each_dataset_of_a_pool(offline_cache, tmp_path, capsys):
    model = tmp_path / "lenet.py"
    model.write_text(get_baseline("lenet").source)
    assert main(["eval", str(model), "--dataset", "digits,synthetic", "--limit-train", "300", "--sandbox", "process",
                 "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [f["dataset"] for f in found] == ["digits", "synthetic"]
    assert all(f["status"] == "ok" and 0.0 <= f["accuracy"] <= 1.0 for f in found), found
    assert found[0]["param_count"] != found[1]["param_count"]  # each built on its dataset's input shape
