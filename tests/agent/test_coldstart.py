"""Cold-start pairs from outside the run: LEMUR databases and checkouts built here with
LEMUR's own schema and layout, another run's real archive, the training example the run
would send, careless inputs, and the cold_start node in a whole graph run."""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.learning import cold_start_pairs
from deltanas.agent.learning.cold_start_pairs import Pair, archive_pairs, gather, lemur_pairs, pair_example, source_kind
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.run.build import restore_adapter
from deltanas.agent.run.driver import run_graph
from deltanas.agent.run.report import markdown, run_metrics
from deltanas.agent.stopping import RunStopped
from deltanas.tools import prompting
from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.full_extract import apply_full_output
from deltanas.tools.novelty import NoveltyIndex
from deltanas.tools.zoo import get_baseline

from support import loop_deps


def edit(source: str, *subs: tuple[str, str]) -> str:
    for old, new in subs:
        assert old in source, old
        source = source.replace(old, new, 1)
    return source


# "LEMUR networks": the zoo's LeNet and real edits of it, each a valid LEMUR module.
LENET = get_baseline("lenet").source
BN = edit(LENET, ("            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),\n            nn.ReLU(inplace=True),",
                  "            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),\n            nn.BatchNorm2d(16),\n"
                  "            nn.GELU(),"),
              ("            nn.Conv2d(16, 32, kernel_size=5),\n            nn.ReLU(inplace=True),",
               "            nn.Conv2d(16, 32, kernel_size=5),\n            nn.BatchNorm2d(32),\n            nn.GELU(),"))
WIDE = edit(BN, ("nn.Linear(32 * 5 * 5, 120),\n            nn.ReLU(inplace=True),",
                 "nn.Linear(32 * 5 * 5, 256),\n            nn.GELU(),"),
            ("nn.Linear(120, 84),\n            nn.ReLU(inplace=True),", "nn.Linear(256, 128),\n            nn.GELU(),"),
            ("nn.Linear(84, num_classes)", "nn.Linear(128, num_classes)"))
FASTER = edit(LENET, ("lr=prm['lr']", "lr=prm['lr'] * 2"))  # changes train_setup: a run refuses that
RESNET = get_baseline("resnet").source  # too far from LeNet for a 40-line diff
BROKEN = "import torch\n\nclass Net(nn.Module:\n    pass\n"

EPOCH1 = "img-classification", "mnist", 1
# name -> code, [(task, dataset, epoch, accuracy), ...]
NETWORKS = {
    "LeNet": (LENET, [(*EPOCH1, 0.90), (*EPOCH1, 0.88)]),
    "LeNet-copy": (LENET, [(*EPOCH1, 0.80)]),
    "LeNet-bn": (BN, [(*EPOCH1, 0.93), (*EPOCH1, 0.95), ("img-classification", "mnist", 2, 0.999),
                      ("img-classification", "cifar-10", 1, 0.61)]),
    "LeNet-wide": (WIDE, [(*EPOCH1, 0.97)]),
    "LeNet-faster": (FASTER, [(*EPOCH1, 0.99)]),
    "ResNet": (RESNET, [(*EPOCH1, 0.985), ("img-classification", "cifar-10", 1, 0.70)]),
    "Broken": (BROKEN, [(*EPOCH1, 0.5)]),
    "LeNet-cifar": (WIDE.replace("256", "300"), [("img-classification", "cifar-10", 1, 0.65)]),
}


def lemur_db(path, networks=NETWORKS, ghost: bool = True):
    """A database with the tables of nn-dataset's ab/nn/util/db/Init.py, filled the way its
    json_train_to_db fills them: one stat row per trial, one nn row per network."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for table in ("nn", "transform", "metric"):
        conn.execute(f"CREATE TABLE {table} (name TEXT PRIMARY KEY, code TEXT NOT NULL, id TEXT NOT NULL)")
    conn.execute("CREATE TABLE prm (uid TEXT NOT NULL, name TEXT NOT NULL, value OBJECT NOT NULL)")
    conn.execute("""CREATE TABLE stat (id TEXT PRIMARY KEY, accuracy REAL, epoch INTEGER, duration INTEGER,
        task, dataset, nn, transform, metric, prm,
        FOREIGN KEY (nn) REFERENCES nn (name) ON DELETE CASCADE,
        FOREIGN KEY (transform) REFERENCES transform (name) ON DELETE CASCADE,
        FOREIGN KEY (metric) REFERENCES metric (name) ON DELETE CASCADE,
        FOREIGN KEY (prm) REFERENCES prm (uid) ON DELETE CASCADE)""")
    conn.execute("CREATE INDEX idx_accuracy_desc ON stat (accuracy DESC)")
    for name, (code, stats) in networks.items():
        conn.execute("INSERT INTO nn VALUES (?, ?, ?)", (name, code, hashlib.md5(code.encode()).hexdigest()))
        for i, (task, dataset, epoch, acc) in enumerate(stats):
            conn.execute("INSERT INTO stat VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (f"{name}-{i}", acc, epoch, 66316807608, task, dataset, name, "norm_256", "acc", f"u{i}"))
    if ghost:  # statistics whose network code is missing
        conn.execute("INSERT INTO stat VALUES ('g', 0.96, 1, 1, 'img-classification', 'mnist', 'Ghost', 'norm_256', "
                     "'acc', 'u')")
    conn.commit()
    conn.close()
    return path


def trial(acc: float, i: int) -> dict:
    """A trial as nn-dataset's stat files hold it (fields of a real ab/nn/stat/train/*/1.json)."""
    return {"accuracy": acc, "batch": 64, "dropout": 0.18, "duration": 66316807608, "epoch_max": 1, "lr": 0.0014,
            "momentum": 0.9, "transform": "norm_256", "uid": f"{i:032x}", "train_loss": 1.2, "test_loss": 1.3}


def lemur_checkout(root, networks=NETWORKS, ghost: bool = True):
    """ab/nn/nn/<Name>.py and ab/nn/stat/train/<task>_<dataset>_acc_<Name>/<epoch>.json, as in nn-dataset."""
    nn_dir, stat_dir = root / "ab" / "nn" / "nn", root / "ab" / "nn" / "stat" / "train"
    nn_dir.mkdir(parents=True)
    for name, (code, stats) in networks.items():
        (nn_dir / f"{name}.py").write_text(code)
        files: dict = {}
        for i, (task, dataset, epoch, acc) in enumerate(stats):
            files.setdefault((task, dataset, epoch), []).append(trial(acc, i))
        for (task, dataset, epoch), trials in files.items():
            folder = stat_dir / f"{task}_{dataset}_acc_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{epoch}.json").write_text(json.dumps(trials, indent=4))
    if ghost:
        folder = stat_dir / "img-classification_mnist_acc_Ghost"
        folder.mkdir(parents=True)
        (folder / "1.json").write_text(json.dumps([trial(0.96, 0)]))
    return root


def names(pairs):
    return [(p.base_name, p.variant_name) for p in pairs]


# -- LEMUR --------------------------------------------------------------------------------------------------------

def test_lemur_database_pairs_each_network_with_its_closest_weaker_one(tmp_path):
    db = lemur_db(tmp_path / "db" / "ab.nn.db")
    assert source_kind(db) == source_kind(tmp_path) == "lemur-db"
    got = lemur_pairs(db, dataset="mnist")
    # WIDE is 10 lines from BN and 16 from LeNet: its partner is BN. LeNet-faster only differs from the
    # others in train_setup, which the run refuses, and ResNet is too far from everything.
    assert names(got.pairs) == [("LeNet-bn", "LeNet-wide"), ("LeNet", "LeNet-bn")]
    wide, bn = got.pairs
    assert (wide.base_accuracy, wide.variant_accuracy) == (0.95, 0.97)  # the best trial at epoch 1 only
    assert (bn.base_accuracy, bn.variant_accuracy) == (0.90, 0.95)  # LeNet, not its weaker copy
    assert (wide.base_source, wide.variant_source) == (BN, WIDE)
    assert wide.id.startswith("lemur:LeNet-wide:") and wide.dataset == "mnist"
    assert got.networks == 5  # of 7 with code: Broken and the copy left out
    assert got.skipped["not valid Python"] == 1
    assert got.skipped["same code as another network"] == 1
    assert got.skipped["without code in table nn"] == 1
    assert got.skipped["refused by the applier (protected_region)"] == 3  # LeNet-faster against each weaker one
    assert "2 pairs from 5 networks" in got.summary() and "1 not valid Python" in got.summary()
    assert lemur_pairs(db, dataset="mnist", limit=1).pairs == got.pairs[:1]
    assert lemur_pairs(db, dataset="mnist", max_diff_lines=8).pairs == [bn]  # BN→WIDE needs 10 lines
    # on cifar-10 the scores differ: LeNet-cifar (0.65) over LeNet-bn (0.61); ResNet (0.70) pairs with nothing
    (cifar,) = lemur_pairs(db, dataset="cifar10").pairs
    assert names([cifar]) == [("LeNet-bn", "LeNet-cifar")] and (cifar.base_accuracy, cifar.dataset) == (0.61, "cifar10")


def test_lemur_dataset_names_and_epochs_are_the_ones_asked_for(tmp_path):
    nets = {"A": (LENET, [("img-classification", "cifar-10", 1, 0.5)]),
            "B": (BN, [("img-classification", "cifar-10", 1, 0.6), ("img-classification", "cifar-10", 5, 0.1)])}
    db = lemur_db(tmp_path / "ab.nn.db", nets, ghost=False)
    (pair,) = lemur_pairs(db, dataset="cifar10").pairs  # the run's name for LEMUR's cifar-10
    assert names([pair]) == [("A", "B")] and pair.dataset == "cifar10"
    assert lemur_pairs(db, dataset="cifar-10").pairs[0].id == pair.id
    # at epoch 5 only B has a score: no pair, and no error
    got = lemur_pairs(db, dataset="cifar10", epoch=5)
    assert got.pairs == [] and got.networks == 1


def test_lemur_checkout_gives_the_same_pairs_as_its_database(tmp_path):
    root = lemur_checkout(tmp_path / "nn-dataset")
    assert source_kind(root) == "lemur-checkout"
    assert source_kind(root / "ab" / "nn") == "lemur-checkout"
    got = lemur_pairs(root, dataset="mnist")
    from_db = lemur_pairs(lemur_db(tmp_path / "ab.nn.db"), dataset="mnist")
    assert [p.id for p in got.pairs] == [p.id for p in from_db.pairs] and len(got.pairs) == 2
    assert got.pairs[0].variant_source == WIDE and got.pairs[0].base_accuracy == 0.95
    assert got.skipped["without a readable nn/<Name>.py"] == 1  # Ghost has statistics but no model file
    # a stat file that is broken is counted and passed over while others can be read
    (root / "ab/nn/stat/train/img-classification_mnist_acc_LeNet-wide/1.json").write_text('{"accuracy": 0.97}')
    again = lemur_pairs(root, dataset="mnist")
    assert names(again.pairs) == [("LeNet", "LeNet-bn")]
    assert again.skipped["stat files unreadable or not a JSON list"] == 1


# -- another run --------------------------------------------------------------------------------------------------

def test_archive_pairs_from_another_run_read_only(tmp_path):
    run = tmp_path / "other-run"
    run.mkdir()
    store = Store(run / "archive.sqlite")
    store.upsert(CandidateRow(id="base-lenet", cycle=-1, idx=0, kind="baseline", dataset="mnist", status="ok",
                              source=LENET, accuracy=0.90))
    rows = [("c000-000", BN, 0.95, "ok", "base-lenet"),  # better: a pair
            ("c000-001", WIDE, 0.85, "ok", "base-lenet"),  # worse than its parent
            ("c000-002", WIDE, None, "crashed", "base-lenet"),
            ("c000-003", RESNET, 0.99, "ok", "base-lenet"),  # better, but a 49-line diff
            ("c001-000", WIDE, 0.97, "ok", "c000-000"),  # better than its parent c000-000: a pair
            ("c001-001", WIDE, 0.99, "ok", "gone")]  # its parent is not in the archive
    for i, (cid, src, acc, status, parent) in enumerate(rows):
        store.upsert(CandidateRow(id=cid, cycle=int(cid[1:4]), idx=i, kind="delta", dataset="mnist", status=status,
                                  parent_id=parent, source=src, accuracy=acc))
    store.close()
    before = (run / "archive.sqlite").read_bytes()
    got = archive_pairs(run, dataset="mnist")
    assert names(got.pairs) == [("c000-000", "c001-000"), ("base-lenet", "c000-000")]
    assert got.pairs[0].id.startswith("run:c001-000:") and got.pairs[0].base_accuracy == 0.95
    assert got.skipped == {"not better than the parent": 1, "diffs over 40 lines": 1,
                           "without a parent in the archive": 1}
    assert [p.id for p in archive_pairs(run / "archive.sqlite", dataset="mnist").pairs] == [p.id for p in got.pairs]
    assert source_kind(run) == source_kind(run / "archive.sqlite") == "run"
    assert (run / "archive.sqlite").read_bytes() == before  # opened read-only
    with pytest.raises(ValueError, match="no candidates on 'cifar10'; the archive holds mnist"):
        archive_pairs(run, dataset="cifar10")


# -- the training example -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["delta", "full"])
def test_pair_example_is_the_runs_prompt_and_its_answer_reproduces_the_variant(mode):
    pair = Pair(id="t", origin="x", dataset="mnist", base_source=BN, variant_source=WIDE, base_accuracy=0.95,
                variant_accuracy=0.97)
    ex = pair_example(pair, in_shape=(1, 28, 28), num_classes=10, mode=mode)
    assert ex["prompt"] == prompting.propose_messages(
        parent_source=BN, dataset="mnist", in_shape=(1, 28, 28), num_classes=10, parent_accuracy=0.95,
        goal="improve the first-epoch test accuracy", mode=mode)
    assert "95.00%" in ex["prompt"][1]["content"]
    (answer,) = ex["completion"]
    assert answer["role"] == "assistant"
    applier = apply_full_output if mode == "full" else apply_model_output
    res = applier(BN, answer["content"])
    assert res.ok, res.error
    assert res.source == WIDE
    assert answer["content"].startswith("```diff\n--- a/model.py\n+++ b/model.py\n@@" if mode == "delta"
                                        else "```python\n")
    assert json.loads(json.dumps(ex)) == ex  # stored as JSON in the archive


# -- careless and hostile inputs ----------------------------------------------------------------------------------

def test_bad_sources_are_refused_with_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*no such file or folder; expected a run directory"):
        source_kind(tmp_path / "nope")
    text = tmp_path / "ab.nn.db"
    text.write_text("these are my notes, not a database\n")
    with pytest.raises(ValueError, match=r"ab\.nn\.db: not a SQLite database"):
        lemur_pairs(text)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="neither a deltanas archive .* nor a LEMUR database"):
        source_kind(empty)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(ValueError, match=r"other\.db: a SQLite database, but .*its tables: people"):
        lemur_pairs(other)
    wrong = tmp_path / "wrong.db"
    with sqlite3.connect(wrong) as c:
        c.execute("CREATE TABLE nn (name TEXT, source TEXT)")
        c.execute("CREATE TABLE stat (nn TEXT, accuracy REAL)")
    with pytest.raises(ValueError, match=r"wrong\.db: table nn lacks column\(s\) code"):
        lemur_pairs(wrong)
    db = lemur_db(tmp_path / "good.db")
    with pytest.raises(ValueError, match=r"good\.db: no statistics for task 'img-classification', dataset 'svhn', "
                                         r"epoch 1; it has: img-classification cifar-10 1"):
        lemur_pairs(db, dataset="svhn")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="a folder, but no archive.sqlite"):
        source_kind(folder)
    run = tmp_path / "run"
    run.mkdir()
    Store(run / "archive.sqlite").close()
    with pytest.raises(ValueError, match="a deltanas run, not LEMUR data"):
        lemur_pairs(run)
    garbage = tmp_path / "corrupt.db"
    garbage.write_bytes(b"SQLite format 3\x00" + b"\xff" * 5000)
    with pytest.raises(ValueError, match=r"corrupt\.db: cannot read the database"):
        source_kind(garbage)


def test_a_checkout_with_only_broken_stat_files_is_an_error_naming_them(tmp_path):
    root = lemur_checkout(tmp_path / "co", {"A": (LENET, [(*EPOCH1, 0.5)]), "B": (BN, [(*EPOCH1, 0.6)])},
                          ghost=False)
    for name in ("A", "B"):
        (root / f"ab/nn/stat/train/img-classification_mnist_acc_{name}/1.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match=r"no statistics for task .*unreadable: .*acc_A/1\.json.*expected a JSON list"):
        lemur_pairs(root)
    with pytest.raises(ValueError, match="it has: img-classification mnist"):
        lemur_pairs(root, dataset="svhn")


def test_gather_reports_each_source_dedups_and_caps(tmp_path):
    db = lemur_db(tmp_path / "ab.nn.db")
    checkout = lemur_checkout(tmp_path / "co")
    pairs, reports = gather([str(tmp_path / "missing"), str(db), str(checkout)], dataset="mnist")
    assert len(pairs) == 2  # the checkout holds the same two pairs: each is kept once
    assert [r["pairs"] for r in reports] == [0, 2, 0]
    assert reports[0]["error"].startswith("cannot read: ") and "missing" in reports[0]["error"]
    assert reports[2]["kind"] == "lemur-checkout" and reports[2]["error"] is None
    assert "missing: cannot read" in cold_start_pairs.describe(reports)
    pairs, reports = gather([str(db), str(checkout)], dataset="mnist", limit=1)
    assert len(pairs) == 1 and reports[1]["summary"] == "not read: 1 pairs were found before it"
    # a variant too close to its base to be novel is not taught
    # (BN→WIDE is 0.898 similar, so WIDE takes its next closest base, LeNet, 0.773 similar)
    idx = NoveltyIndex(threshold=0.87)
    pairs, reports = gather([str(db)], dataset="mnist", distinct=lambda a, b: idx.check(b, a).novel)
    assert names(pairs) == [("LeNet", "LeNet-wide"), ("LeNet", "LeNet-bn")]
    assert reports[0]["skipped"]["too similar to the base to be novel"] == 1


def test_the_pairs_table_opens_in_old_archives_and_keeps_order(tmp_path):
    path = tmp_path / "archive.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as c:
        c.execute("DROP TABLE pairs")  # an archive from before cold-start pairs
    assert Store(path, readonly=True).pairs() == []
    store = Store(path)
    store.put_pairs([{"id": "b", "origin": "o", "example": {"prompt": [], "completion": []}, "meta": {"x": 1}},
                     {"id": "a", "origin": "o", "example": {"prompt": [1], "completion": []}}])
    store.put_pairs([{"id": "b", "origin": "o2", "example": {"prompt": [2], "completion": []}}])
    got = store.pairs()
    assert [p["id"] for p in got] == ["b", "a"]
    assert got[0]["origin"] == "o2" and got[0]["example"]["prompt"] == [2] and got[1]["meta"] is None


# -- the cold_start node in a run ---------------------------------------------------------------------------------

def fake_adapter(out_dir):
    out_dir.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "deltanas_adapter.json"):
        (out_dir / name).write_text("{}")


def make_deps(tmp_path, learner, **over):
    return loop_deps(tmp_path, learner, **over)


def test_cold_start_trains_first_is_loaded_and_later_updates_keep_its_pairs(tmp_path):
    lemur_db(tmp_path / "lemur" / "db" / "ab.nn.db")
    calls = []

    def learner(examples, out_dir, stop, start_from=None):
        calls.append((out_dir.name, examples, len(deps.llm.inner.calls)))
        fake_adapter(out_dir)
        return {"loss": 0.7, "steps": 2, "seconds": 0.1}

    deps = make_deps(tmp_path, learner, **{"learn.cold_start_from": [str(tmp_path / "lemur"),
                                                                      str(tmp_path / "typo")]})
    out = run_graph(deps, InMemorySaver())
    assert out.status == "finished", out.error
    pairs = deps.store.pairs()
    assert [p["meta"]["variant"] for p in pairs] == ["LeNet-wide", "LeNet-bn"]
    cold, first = deps.store.adapters()
    assert cold["cycle"] == -1 and cold["status"] == "trained" and cold["path"] == "adapters/cold-start"
    assert cold["examples"] == 2 and cold["example_ids"] == [p["id"] for p in pairs]
    assert "typo: cannot read" in cold["note"] and "2 pairs from 5 networks" in cold["note"]
    # trained before the model proposed anything, and the model generated with it
    assert calls[0][0] == "cold-start" and calls[0][2] == 0
    assert calls[0][1] == [p["example"] for p in pairs]
    assert deps.llm.inner.adapters[0] == str(deps.run_dir / "adapters" / "cold-start")
    # the examples are the run's own prompt: the system turn the run sent its candidates
    traj = deps.store.get_trajectory(deps.store.candidates(cycle=0)[0].id)
    assert pairs[0]["example"]["prompt"][0] == traj[0]
    # the update after cycle 0 trains on the pairs too
    assert first["cycle"] == 0 and calls[1][0] == "cycle-0"
    assert first["example_ids"][:2] == cold["example_ids"] and len(first["example_ids"]) == 2 + 2
    assert calls[1][1][:2] == calls[0][1]
    sources = deps.store.get_meta("cold_start:sources")
    assert [s["pairs"] for s in sources] == [2, 0] and sources[1]["error"].startswith("cannot read")
    metrics = run_metrics(deps.store)
    assert metrics["cold_start"]["status"] == "trained" and metrics["cold_start"]["examples"] == 2
    assert "Cold-start LoRA update (before cycle 0): 2 ex, loss 0.700" in markdown(metrics, deps.run_dir)

    # a resume that extends the run finds the record: no second cold start, and the newest adapter stays
    deps.store.close()
    deps2 = make_deps(tmp_path, learner, **{"search.cycles": 2,
                                            "learn.cold_start_from": [str(tmp_path / "lemur")]})
    assert restore_adapter(deps2) == str(deps.run_dir / "adapters" / "cycle-0")
    assert run_graph(deps2, InMemorySaver()).status == "finished"
    assert [c[0] for c in calls] == ["cold-start", "cycle-0", "cycle-1"]
    assert not any(a.endswith("cold-start") for a in deps2.llm.inner.adapters)
    assert [a["cycle"] for a in deps2.store.adapters()] == [-1, 0, 1]


def test_cold_start_stopped_midway_resumes_without_reading_the_sources_again(tmp_path, monkeypatch):
    db = lemur_db(tmp_path / "ab.nn.db")
    reads, trained, leftover = [], [], []
    real_gather = cold_start_pairs.gather
    monkeypatch.setattr(cold_start_pairs, "gather", lambda *a, **k: reads.append(1) or real_gather(*a, **k))

    def learner(examples, out_dir, stop, start_from=None):
        partial = out_dir.parent / f".{out_dir.name}.partial-x"
        leftover.append(partial.exists())
        if not trained:
            partial.mkdir(parents=True)  # what a killed trainer leaves
            trained.append("stopped")
            raise RunStopped("stopped during the cold-start update")
        fake_adapter(out_dir)
        trained.append(out_dir.name)
        return {"loss": 1.0, "steps": 1, "seconds": 0.1}

    deps = make_deps(tmp_path, learner, **{"learn.cold_start_from": [str(db)]})
    saver = InMemorySaver()
    assert run_graph(deps, saver).status == "stopped"
    assert deps.store.adapters() == [] and len(deps.store.pairs()) == 2
    assert not deps.llm.inner.calls  # nothing proposed before the cold start is done
    assert run_graph(deps, saver).status == "finished"
    assert reads == [1] and trained == ["stopped", "cold-start", "cycle-0"]
    assert leftover == [False, False, False]  # the node cleared the stopped update's partial folder
    assert [a["status"] for a in deps.store.adapters()] == ["trained", "trained"]
    assert not list((deps.run_dir / "adapters").glob(".*"))  # the stopped update's leftovers cleared


def test_cold_start_outcomes_are_recorded_and_the_run_goes_on(tmp_path):
    # no learner: skipped, saying why, with what the sources gave
    db = lemur_db(tmp_path / "ab.nn.db")
    deps = make_deps(tmp_path / "a", None, **{"learn.cold_start_from": [str(db)]})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    cold = deps.store.adapters()[0]
    assert (cold["cycle"], cold["status"], cold["examples"]) == (-1, "skipped", 2)
    assert cold["note"].startswith("no learner in this test") and "2 pairs" in cold["note"]

    # every source unreadable: skipped, and the run goes on
    calls = []

    def learner(examples, out_dir, stop, start_from=None):
        calls.append(out_dir.name)
        fake_adapter(out_dir)
        return {"loss": 1.0, "steps": 1, "seconds": 0.1}

    deps = make_deps(tmp_path / "b", learner, **{"learn.cold_start_from": [str(tmp_path)]})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    cold = deps.store.adapters()[0]
    assert cold["status"] == "skipped" and "0 cold-start pairs, fewer than learn.min_examples = 1" in cold["note"]
    assert "a folder, but no archive.sqlite" in cold["note"] and calls == ["cycle-0"]

    # a failing trainer: failed, recorded, and cycle 0 still runs
    def broken(examples, out_dir, stop, start_from=None):
        raise RuntimeError("CUDA out of memory")

    deps = make_deps(tmp_path / "c", broken, **{"learn.cold_start_from": [str(db)]})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    cold = deps.store.adapters()[0]
    assert cold["status"] == "failed" and "out of memory" in cold["note"]
    assert len(deps.store.candidates(cycle=0)) == 2 and not deps.llm.inner.adapters

    # learning off: the sources are not even read
    deps = make_deps(tmp_path / "d", broken, **{"learn.cold_start_from": [str(db)], "learn.enabled": False})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    assert deps.store.get_meta("cold_start:sources") is None and deps.store.adapters() == []


def test_an_archive_source_feeds_a_new_run(tmp_path):
    """A finished run's improvements teach the next run's cold start."""
    first = make_deps(tmp_path / "first", None, **{"search.candidates": 3})
    assert run_graph(first, InMemorySaver()).status == "finished"
    better = [r for r in first.store.candidates(cycle=0)
              if r.status == "ok" and r.accuracy > first.store.get(r.parent_id).accuracy]
    first.store.close()
    seen = []

    def learner(examples, out_dir, stop, start_from=None):
        seen.append(examples)
        fake_adapter(out_dir)
        return {"loss": 1.0, "steps": 1, "seconds": 0.1}

    deps = make_deps(tmp_path / "second", learner, **{"learn.cold_start_from": [str(first.run_dir)],
                                                      "learn.cold_start_max_diff_lines": 200})
    assert run_graph(deps, InMemorySaver()).status == "finished"
    pairs = deps.store.pairs()
    assert sorted(p["meta"]["variant"] for p in pairs) == sorted(r.id for r in better) and pairs
    assert all(p["id"].startswith("run:") for p in pairs) and seen[0] == [p["example"] for p in pairs]


# -- with the real learner ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cold_start_pairs_train_a_real_adapter(tmp_path):
    """SmolLM2 with tiny LoRA settings: the cold-start adapter is a real peft adapter, loaded before cycle 0."""
    from deltanas.agent.learning.lora import LoraSettings, adapter_complete, train_adapter

    db = lemur_db(tmp_path / "ab.nn.db")
    tiny = LoraSettings(r=4, alpha=8, epochs=1, grad_accum=1, max_length=256, lr=1e-4)

    def learner(examples, out_dir, stop, start_from=None):
        return train_adapter("smollm2", examples, out_dir, tiny, device="cpu", stop=stop)

    deps = make_deps(tmp_path, learner, **{"learn.cold_start_from": [str(db)], "search.max_repairs": 0})
    deps.llm = CoalescingBackend(ScriptedBackend(lambda p: "no idea"), window_s=0.01)  # cycle 0 teaches nothing new
    started = time.perf_counter()
    assert run_graph(deps, InMemorySaver()).status == "finished"
    print(f"cold start with SmolLM2: {time.perf_counter() - started:.1f} s")
    cold, after = deps.store.adapters()
    assert cold["status"] == "trained" and cold["examples"] == 2, cold
    assert cold["steps"] >= 1 and math.isfinite(cold["loss"])
    assert adapter_complete(deps.run_dir / "adapters" / "cold-start")
    meta = json.loads((deps.run_dir / "adapters" / "cold-start" / "deltanas_adapter.json").read_text())
    assert meta["examples"] == 2 and meta["base_model"] == "smollm2"
    assert deps.llm.inner.adapters == [str(deps.run_dir / "adapters" / "cold-start")]  # reuse keeps it loaded
    # cycle 0 had no success: its update has the same examples and reuses the cold-start adapter
    assert (after["status"], after["path"], after["example_ids"]) == ("reused", cold["path"], cold["example_ids"])
