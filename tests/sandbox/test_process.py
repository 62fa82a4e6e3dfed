"""The process sandbox and the proxy client on well-behaved candidates (real worker subprocesses)."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deltanas.sandbox.base import Job, JobSpec, Limits, Sandbox
from deltanas.sandbox.process import ProcessSandbox, bwrap_view, one_gpu, python_roots
from deltanas.tools.proxy import declared_hyperparameters, evaluate_source, select_hyperparameters

from support import Arrays, synthetic, write_handle

SMALL_CNN = '''
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 4, 4, stride=4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 7 * 7, out_shape[0])

    def forward(self, x):
        return self.head(self.features(x))
'''

LEMUR_CNN = SMALL_CNN + '''
    def train_setup(self, prm):
        print("LEMUR-MARK train_setup", sorted(prm))
        self.criteria = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, train_data):
        n = 0
        for x, y in train_data:
            self.optimizer.zero_grad()
            self.criteria(self(x), y).backward()
            self.optimizer.step()
            n += 1
        print("LEMUR-MARK learn batches", n)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Arrays, Path]:
    ds = synthetic()
    return ds, write_handle(ds, tmp_path_factory.mktemp("handle"))


@pytest.fixture
def sandbox(tmp_path):
    sb = ProcessSandbox(tmp_path / "work")
    yield sb
    sb.close()


LIMITS = Limits(timeout_s=60, memory_mb=4096, cpu_threads=1)


def evaluate(source, sandbox, data, out_dir=None, **settings):
    ds, handle = data
    spec = JobSpec(str(handle), **{"limits": LIMITS, "batch_size": 32, **settings})
    return evaluate_source(source, sandbox=sandbox, dataset=ds, spec=spec, candidate_id="c-1", out_dir=out_dir)


def test_process_sandbox_satisfies_the_protocol(sandbox):
    assert isinstance(sandbox, Sandbox)
    assert sandbox.name == "process"
    sentence = sandbox.isolation()
    assert "network" in sentence and "filesystem" in sentence
    sandbox.close()
    sandbox.close()  # twice is safe


@pytest.mark.slow
def test_default_loop_trains_and_host_scores(sandbox, data, tmp_path):
    out = tmp_path / "cand"
    outcome = evaluate(SMALL_CNN, sandbox, data, out_dir=out)
    assert outcome.status == "ok", outcome.error + outcome.log_tail
    assert outcome.accuracy is not None and outcome.accuracy > 0.3
    assert outcome.param_count == 4 * 16 + 4 + 196 * 10 + 10
    assert outcome.train_seconds is not None and 0 < outcome.train_seconds < outcome.total_seconds
    assert "default SGD loop" in outcome.log_tail
    # The score is the host's own: recompute it from the saved predictions.
    preds = np.load(out / "predictions.npy", allow_pickle=False)
    assert float(np.mean(preds == data[0].y_test)) == pytest.approx(outcome.accuracy)
    assert (out / "model.py").read_text() == SMALL_CNN
    assert json.loads((out / "result.json").read_text())["accuracy"] == outcome.accuracy
    assert "default SGD loop" in (out / "log.txt").read_text()
    # Work dirs and the sandbox's copy of the predictions are gone; after close, the warm worker too.
    assert [p for p in (tmp_path / "work").rglob("*") if p.is_file() and "warm" not in p.parts] == []
    sandbox.close()
    assert [p for p in (tmp_path / "work").rglob("*") if p.is_file()] == []


@pytest.mark.slow
def test_lemur_train_setup_and_learn_are_used(sandbox, data):
    outcome = evaluate(LEMUR_CNN, sandbox, data, hyperparameters={"lr": 0.02, "dropout": 0.5})
    assert outcome.status == "ok", outcome.error + outcome.log_tail
    assert outcome.accuracy > 0.3
    # dropout is not declared by the module, so it was not passed; momentum came from the defaults.
    assert "LEMUR-MARK train_setup ['lr', 'momentum']" in outcome.log_tail
    assert "LEMUR-MARK learn batches 16" in outcome.log_tail  # 512 / 32
    assert "train_setup/learn" in outcome.log_tail


@pytest.mark.slow
def test_a_seed_trains_the_same_network_in_a_warm_child_and_in_a_cold_worker(data, tmp_path):
    """A cold worker warms up (drawing from the generators) before its job: the job is seeded
    after that, so a candidate and a seed give the same weights, loss and predictions whichever
    way it runs; another seed gives others."""
    _, handle = data
    runs = {}
    for warm in (True, False):
        sb = ProcessSandbox(tmp_path / f"work-{warm}", warm=warm)
        try:
            for seed in (0, 1):
                r = sb.run(Job(candidate_id=f"c-{seed}", source=SMALL_CNN, dataset_dir=str(handle), seed=seed,
                               batch_size=32, limits=LIMITS))
                assert r.status == "ok", r.error + r.log_tail
                runs[warm, seed] = (r.final_loss, np.load(r.predictions_path, allow_pickle=False))
        finally:
            sb.close()
    for seed in (0, 1):
        assert runs[True, seed][0] == runs[False, seed][0]
        assert np.array_equal(runs[True, seed][1], runs[False, seed][1])
    assert runs[True, 0][0] != runs[True, 1][0]


@pytest.mark.slow
def test_keep_leaves_the_work_dir_and_concurrent_runs_work(data, tmp_path):
    ds, handle = data
    sb = ProcessSandbox(tmp_path / "work", keep=True)
    jobs = [Job(candidate_id=f"k{i}", source=SMALL_CNN, dataset_dir=str(handle), batch_size=64, limits=LIMITS)
            for i in range(2)]
    results = [None, None]

    def go(i):
        results[i] = sb.run(jobs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(Path(r.predictions_path).is_file() for r in results)
    kept = sorted(p.name for p in (tmp_path / "work").iterdir() if p.name not in ("predictions", "warm"))
    assert len(kept) == 2 and all(k.startswith(("k0-", "k1-")) for k in kept)
    assert all((tmp_path / "work" / k / "log.txt").is_file() for k in kept)


@pytest.mark.slow
def test_close_from_another_thread_kills_a_running_job(sandbox, data):
    _, handle = data
    job = Job(candidate_id="hang", source="while True:\n    pass\n", dataset_dir=str(handle),
              limits=Limits(timeout_s=60, memory_mb=4096, cpu_threads=1))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", sandbox.run(job)))
    t0 = time.monotonic()
    t.start()
    time.sleep(3)
    sandbox.close()
    t.join(timeout=20)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 20
    assert box["r"].status == "crashed" and "closed" in box["r"].error
    assert sandbox._running == {}


def test_declared_hyperparameters_reads_literals_only():
    assert declared_hyperparameters(SMALL_CNN) == {"lr", "momentum"}
    assert declared_hyperparameters("def supported_hyperparameters():\n    return ['lr']\n") == {"lr"}
    assert declared_hyperparameters("def supported_hyperparameters():\n    return set(X)\n") is None
    assert declared_hyperparameters("x = 1\n") is None
    assert declared_hyperparameters("def (:\n") is None


def test_select_hyperparameters_defaults_and_filtering():
    assert select_hyperparameters("x = 1\n", None) == {"lr": 0.01, "momentum": 0.9, "dropout": 0.2}
    assert select_hyperparameters(SMALL_CNN, {"lr": 0.5, "dropout": 0.1}) == {"lr": 0.5, "momentum": 0.9}


@pytest.mark.slow
def test_a_warm_worker_outlives_the_thread_whose_job_started_it(data, tmp_path):
    """Workers die with the thread that spawned them (PR_SET_PDEATHSIG, bwrap --die-with-parent),
    so they are spawned from the pool's own thread, not from a job's short-lived one."""
    _, handle = data
    sb = ProcessSandbox(tmp_path / "work", warm=True)
    try:
        def one() -> str:
            box = {}
            t = threading.Thread(target=lambda: box.setdefault("r", sb.run(
                Job(candidate_id="t", source=SMALL_CNN, dataset_dir=str(handle), batch_size=64, limits=LIMITS))))
            t.start()
            t.join()
            return box["r"].status

        assert one() == "ok"
        time.sleep(0.5)  # the first job's thread is gone
        assert one() == "ok"
        assert sb._pool.started == 1
    finally:
        sb.close()


def test_prewarm_starts_the_worker_the_first_job_then_takes(data, tmp_path):
    _, handle = data
    sb = ProcessSandbox(tmp_path / "work", warm=True)
    try:
        job = Job(candidate_id="first", source=SMALL_CNN, dataset_dir=str(handle), batch_size=64, limits=LIMITS)
        sb.prewarm(job)
        sb.prewarm(job)  # one waits already: no second start
        assert sb._pool.started == 1 and len(sb._pool._idle) == 1
        assert sb.run(job).status == "ok"
        assert sb._pool.started == 1
        # Other limits are another worker's key.
        sb.prewarm(Job(candidate_id="x", source="", dataset_dir=str(handle), limits=Limits(timeout_s=60)))
        assert sb._pool.started == 2
    finally:
        sb.close()


def test_prewarm_raises_when_the_worker_cannot_start(tmp_path):
    from deltanas.sandbox.pool import WorkerLost

    (tmp_path / "not-a-handle").mkdir()
    sb = ProcessSandbox(tmp_path / "work", warm=True)
    try:
        with pytest.raises(WorkerLost, match="failed to start"):
            sb.prewarm(Job(candidate_id="x", source="", dataset_dir=str(tmp_path / "not-a-handle"), limits=LIMITS))
        assert sb._pool._idle == []
    finally:
        sb.close()
    cold = ProcessSandbox(tmp_path / "cold", warm=False)
    try:  # without warm workers there is nothing to start
        cold.prewarm(Job(candidate_id="x", source="", dataset_dir=str(tmp_path / "not-a-handle"), limits=LIMITS))
        assert cold._pool.started == 0
    finally:
        cold.close()


def test_a_spare_reads_the_batch_size_from_the_hosts_job_file_and_nothing_else(tmp_path):
    from deltanas.sandbox.warm import _batch_size

    cases = {"ok": ({"batch_size": 256}, 256), "bool": ({"batch_size": True}, None),
             "zero": ({"batch_size": 0}, None), "text": ({"batch_size": "512"}, None),
             "list": ([1, 2], None), "none": ({}, None)}
    for name, (content, want) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.json").write_text(json.dumps(content))
        assert _batch_size(str(tmp_path / name)) == want, name
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "job.json").write_text("{not json")
    assert _batch_size(str(tmp_path / "garbage")) is None
    assert _batch_size(str(tmp_path / "missing")) is None


def test_a_gpu_job_sees_its_gpu_alone_as_cuda_0(tmp_path, monkeypatch):
    # cuda:N counts among the driver's visible GPUs, as torch counts it there.
    assert one_gpu("cuda:1", None) == ("1", "cuda:0")
    assert one_gpu("cuda", None) == ("0", "cuda:0")
    assert one_gpu("cuda:1", "4,6") == ("6", "cuda:0")
    assert one_gpu("cuda:0", "GPU-a1b2, GPU-c3d4") == ("GPU-a1b2", "cuda:0")
    # Beyond the list, or no GPU visible: unchanged, and the worker reports the missing device.
    assert one_gpu("cuda:2", "4,6") == ("4,6", "cuda:2")
    assert one_gpu("cuda:0", "") == ("", "cuda:0")
    assert one_gpu("cpu", "4,6") == ("4,6", "cpu")
    assert one_gpu("cpu", None) == (None, "cpu")
    sandbox = ProcessSandbox(tmp_path / "work", warm=False)
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
        assert sandbox._base_env(tmp_path, 1, 0, device="cuda:1")["CUDA_VISIBLE_DEVICES"] == "6"
        assert sandbox._base_env(tmp_path, 1, 0, device="cpu")["CUDA_VISIBLE_DEVICES"] == "4,6"
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        assert sandbox._base_env(tmp_path, 1, 0, device="cuda:1")["CUDA_VISIBLE_DEVICES"] == "1"
        assert "CUDA_VISIBLE_DEVICES" not in sandbox._base_env(tmp_path, 1, 0, device="cpu")
    finally:
        sandbox.close()


def test_the_wide_warm_up_is_for_gpus_only():
    from deltanas.sandbox import device_setup

    assert device_setup.warm_up_wide(torch.device("cpu"), 512, 50_000, 10_000) == "not on a GPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_spares_warm_the_shapes_of_the_last_jobs_batch(data, tmp_path):
    """Spares readied before any job warm the default batch; those forked after a job warm that
    job's batch and the last, smaller batches of its epoch and of its predictions. A spare whose
    job is already waiting skips the wide warm-up."""
    _, handle = data  # 512 train and 128 test images
    sb = ProcessSandbox(tmp_path / "work", warm=True)
    logs = []
    try:
        for i in range(3):
            time.sleep(4 if i else 0)  # later spares are ready before their jobs come
            r = sb.run(Job(candidate_id=f"s{i}", source=SMALL_CNN, dataset_dir=str(handle), batch_size=48,
                           device="cuda:0", limits=LIMITS))
            assert r.status == "ok", (r.error, r.log_tail)
            logs.append(r.log_tail)
    finally:
        sb.close()
    # The first two spares start with the worker, at the first job: the first has it waiting.
    assert "no wide warm-up (its job was waiting)" in logs[0], logs[0]
    assert "wide (step 512, inference 512, inference 128)" in logs[1], logs[1]
    assert "wide (step 48, step 32, inference 48, inference 32)" in logs[2], logs[2]


def test_a_bubblewrap_view_covers_hidden_folders_inside_what_it_shows(tmp_path):
    inside = python_roots(sys.executable)[-1] / "lib"
    args = bwrap_view(sys.executable, [], [], [inside, tmp_path])
    at = args.index(str(inside))
    assert args[at - 1] == "--tmpfs" and args[at + 1: at + 3] == ["--remount-ro", str(inside)]
    assert str(tmp_path) not in args  # outside the view: nothing to cover
