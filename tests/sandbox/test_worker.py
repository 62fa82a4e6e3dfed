"""The in-sandbox worker: its batches, its training loop, its speed choice, and a real run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltanas.sandbox import device_setup, training
from deltanas.sandbox.speed import HEAVY_STEP_FLOPS, Speed, choose_speed, mixed_precision, try_channels_last

from support import Arrays, write_handle

LEMUR_NET = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])

    def forward(self, x):
        return self.fc(x.flatten(1))

    def train_setup(self, prm):
        self.criteria = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"])

    def learn(self, train_data):
        total = 0.0
        for x, y in train_data:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            self.optimizer.zero_grad()
            loss = self.criteria(self(x), y)
            loss.backward()
            self.optimizer.step()
            total = float(loss)
        return total
'''


def test_train_batches_reshuffle_per_pass_and_are_seeded():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    data = training.TrainBatches(x, y, mean, std, batch_size=3, seed=7)
    first = [yb.tolist() for _, yb in data]
    second = [yb.tolist() for _, yb in data]
    assert len(data) == 3 == len(first)  # 3+3+3, the lone 10th sample is dropped (BatchNorm needs 2)
    assert first != second
    again = [yb.tolist() for _, yb in training.TrainBatches(x, y, mean, std, batch_size=3, seed=7)]
    assert again == first
    xb, yb = next(iter(data))
    assert xb.dtype == torch.float32
    assert torch.allclose(xb.flatten(), yb.float() / 255.0)


def _handle(root: Path) -> Path:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (200, 1, 8, 8)).astype(np.uint8)
    y_train = rng.integers(0, 3, 200).astype(np.int64)
    x_test = rng.integers(0, 256, (50, 1, 8, 8)).astype(np.uint8)
    y_test = rng.integers(0, 3, 50).astype(np.int64)
    return write_handle(Arrays("t", x_train, y_train, x_test, y_test, 3, [0.5], [0.3]), root)


def _run_worker(workdir: Path, handle: Path, source: str) -> dict:
    workdir.mkdir()
    (workdir / "model.py").write_text(source)
    (workdir / "job.json").write_text(json.dumps({
        "candidate_id": "w", "dataset_dir": str(handle), "hyperparameters": {"lr": 0.05}, "epochs": 2,
        "seed": 3, "batch_size": 32, "device": "cpu", "limits": {"cpu_threads": 1}}))
    proc = subprocess.run([sys.executable, "-m", "deltanas.sandbox.worker", str(workdir), str(handle)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train_setup/learn" in proc.stdout
    return json.loads((workdir / "out" / "result.json").read_text())


@pytest.mark.slow
def test_worker_runs_a_lemur_module_deterministically(tmp_path):
    handle = _handle(tmp_path / "ds")
    a = _run_worker(tmp_path / "a", handle, LEMUR_NET)
    b = _run_worker(tmp_path / "b", handle, LEMUR_NET)
    assert a["status"] == "ok" and a["error"] == ""
    assert a["param_count"] == 64 * 3 + 3
    assert isinstance(a["final_loss"], float) and a["final_loss"] == b["final_loss"]
    assert a["train_seconds"] > 0
    pa = np.load(tmp_path / "a" / "out" / "predictions.npy", allow_pickle=False)
    pb = np.load(tmp_path / "b" / "out" / "predictions.npy", allow_pickle=False)
    assert pa.shape == (50,) and pa.dtype == np.int16 and set(pa.tolist()) <= {0, 1, 2}
    assert pa.tolist() == pb.tolist()


def test_worker_usage_error_exits_2():
    proc = subprocess.run([sys.executable, "-m", "deltanas.sandbox.worker", "only-one"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


# --- the fast proxy epoch: GPU-resident batches, flips, bf16 and channels_last ---------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ZERO_LINEAR = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


def _asymmetric_images(n: int) -> torch.Tensor:
    """uint8 images that differ from their mirror: a ramp along the width plus the index."""
    ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8) * 10
    return (ramp + torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)).expand(n, 3, 4, 8).contiguous()


def test_without_flips_each_pass_is_the_seeds_permutation():
    """The order a seed gives on the CPU is exactly torch.randperm's: the fast path changed no draw."""
    n, bs, seed = 40, 8, 11
    x, y = _asymmetric_images(n), torch.arange(n)
    data = training.TrainBatches(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), bs, seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        expected = torch.randperm(n, generator=gen).tolist()
        got = [i for _, yb in data for i in yb.tolist()]
        assert got == expected
    xb, yb = next(iter(training.TrainBatches(x, y, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), bs, seed)))
    assert torch.equal(xb, x[yb].float() / 255.0)  # never mirrored


def test_flips_mirror_about_half_the_images_and_follow_the_seed():
    n = 200
    x, y = _asymmetric_images(n), torch.arange(n)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    data = training.TrainBatches(x, y, mean, std, 32, seed=5, flip=True)
    mirrored = 0
    for xb, yb in data:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 4, 8)
        plain, mirror = x[yb].float() / 255.0, x[yb].flip(3).float() / 255.0
        is_plain = (xb == plain).flatten(1).all(1)
        is_mirror = (xb == mirror).flatten(1).all(1)
        assert bool((is_plain ^ is_mirror).all())  # each image whole, either way round
        mirrored += int(is_mirror.sum())
    assert 60 < mirrored < 140
    first = [xb for xb, _ in training.TrainBatches(x, y, mean, std, 32, seed=5, flip=True)]
    again = [xb for xb, _ in training.TrainBatches(x, y, mean, std, 32, seed=5, flip=True)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_handle_hflip_reaches_the_worker(tmp_path):
    handle = _handle(tmp_path / "ds")
    assert training.load_data(str(handle), torch.device("cpu")).flip is False
    meta = json.loads((handle / "meta.json").read_text())
    (handle / "meta.json").write_text(json.dumps({**meta, "hflip": True}))
    data = training.load_data(str(handle), torch.device("cpu"))
    assert data.flip is True and data.to(torch.device("cpu")).flip is True


def test_cpu_keeps_float32_nchw_and_no_autocast():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    sample = torch.zeros(2, 3, 8, 8)
    speed = choose_speed(net, sample, 4096, torch.device("cpu"))
    assert speed == Speed() and speed.describe() == "float32"
    assert try_channels_last(net, sample, torch.device("cpu")) is False
    with mixed_precision(torch.device("cpu"), speed.bf16):
        assert not torch.is_autocast_enabled("cpu")
        assert net(sample).dtype == torch.float32
    assert net[0].weight.is_contiguous()


@pytest.mark.parametrize("n", [10, 64, 97, 100])
def test_chunked_preparation_yields_the_same_batches(monkeypatch, n):
    """Preparing a chunk of batches at once changes no batch: same order, flips, values and sizes."""
    x, y = _asymmetric_images(n), torch.arange(n)
    mean, std = torch.full((1, 3, 1, 1), 0.4), torch.full((1, 3, 1, 1), 0.2)

    def passes(chunk_bytes):
        monkeypatch.setattr(training, "CHUNK_BYTES", chunk_bytes)
        data = training.TrainBatches(x, y, mean, std, 8, seed=2, flip=True)
        return [[(xb.clone(), yb.clone()) for xb, yb in data] for _ in range(2)]

    one_at_a_time, chunked = passes(1), passes(1 << 30)
    sizes = [len(yb) for _, yb in chunked[0]]
    assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 > 1 else [])
    for a, b in zip(one_at_a_time, chunked):
        assert len(a) == len(b)
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.slow
def test_cpu_run_matches_a_plain_float32_loop(tmp_path):
    """The worker's CPU result is what a plain loop gives: the seed's order, normalised float32
    batches, SGD (one optimizer for the run, so momentum carries across epochs), no flips, no autocast."""
    handle = _handle(tmp_path / "ds")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "model.py").write_text(ZERO_LINEAR)
    (workdir / "job.json").write_text(json.dumps({
        "candidate_id": "w", "dataset_dir": str(handle), "hyperparameters": {"lr": 0.05, "momentum": 0.5},
        "epochs": 2, "seed": 3, "batch_size": 32, "device": "cpu", "limits": {"cpu_threads": 1}}))
    proc = subprocess.run([sys.executable, "-m", "deltanas.sandbox.worker", str(workdir), str(handle)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "default SGD loop" in proc.stdout and "autocast" not in proc.stdout
    got = json.loads((workdir / "out" / "result.json").read_text())
    assert got["status"] == "ok", got

    x = torch.from_numpy(np.load(handle / "train_x.npy")).float()
    y = torch.from_numpy(np.load(handle / "train_y.npy"))
    x_test = torch.from_numpy(np.load(handle / "test_x.npy")).float()
    norm = lambda t: (t / 255.0 - 0.5) / 0.3  # noqa: E731
    fc = torch.nn.Linear(64, 3)
    torch.nn.init.zeros_(fc.weight)
    torch.nn.init.zeros_(fc.bias)
    gen = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.SGD(fc.parameters(), lr=0.05, momentum=0.5)
        for _ in range(2):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), 32):
                idx = order[start:start + 32]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(fc(norm(x[idx]).flatten(1)), y[idx])
                loss.backward()
                opt.step()
        with torch.no_grad():
            expected = fc(norm(x_test).flatten(1)).argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)
    assert got["final_loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert np.load(workdir / "out" / "predictions.npy").tolist() == expected.tolist()


def _zoo_lenet():
    from deltanas.tools.zoo import DEFAULT_PRM, get_baseline

    module = type(sys)("zoo_lenet")
    exec(compile(get_baseline("lenet").source, "<lenet>", "exec"), module.__dict__)
    return module.Net, dict(DEFAULT_PRM)


def test_zoo_learn_gets_the_batches_and_trains_as_on_a_plain_list():
    """A LEMUR network's own learn(train_data) runs unchanged on the worker's batches: the
    result equals learn() over the same batches handed over as a plain list."""
    net_cls, prm = _zoo_lenet()
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.integers(0, 256, (96, 1, 28, 28)).astype(np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, 96).astype(np.int64))
    mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    cpu = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        net = net_cls((32, 1, 28, 28), (10,), prm, cpu)
        net.train_setup(prm)
        return net

    via_worker, via_list = fresh(), fresh()
    start = [p.detach().clone() for p in via_worker.parameters()]
    batches = training.TrainBatches(x, y, mean, std, 32, seed=4)
    plain = list(training.TrainBatches(x, y, mean, std, 32, seed=4))
    assert len(plain) == 3 and all(xb.dtype == torch.float32 and xb.shape == (32, 1, 28, 28) for xb, _ in plain)
    assert training.uses_learn(via_worker)
    torch.manual_seed(1)  # dropout draws
    with mixed_precision(cpu):
        assert training.train_epoch(via_worker.learn, via_worker, batches, cuda_graphs=False) is None  # the zoo's learn returns nothing
    torch.manual_seed(1)
    via_list.train()
    via_list.learn(plain)
    for a, b, s in zip(via_worker.parameters(), via_list.parameters(), start):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, s) for a, s in zip(via_worker.parameters(), start))


@cuda
def test_gpu_bf16_weights_follow_the_optimizer_inside_one_autocast_context():
    """One autocast context spans the epoch: each forward must see the weights of the last step."""
    dev = torch.device("cuda")
    lin = torch.nn.Linear(4, 1).to(dev)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    x = torch.ones(2, 4, device=dev)
    outs = []
    with mixed_precision(dev):
        for _ in range(3):
            out = lin(x)
            assert out.dtype == torch.bfloat16
            outs.append(float(out[0].detach()))
            out.sum().backward()
            opt.step()
            opt.zero_grad()
    assert outs[0] != outs[1] != outs[2]


@cuda
def test_gpu_speed_is_chosen_by_the_work_per_batch():
    from torchvision.models import resnet18

    net_cls, prm = _zoo_lenet()
    dev = torch.device("cuda")
    sample = torch.zeros(2, 3, 32, 32, device=dev)
    light = choose_speed(net_cls((128, 3, 32, 32), (10,), prm, dev).to(dev), sample, 128, dev)
    assert light.bf16 is False and light.channels_last is False and 0 < light.step_flops < HEAVY_STEP_FLOPS
    big = resnet18(num_classes=10).to(dev)
    big.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False).to(dev)
    heavy = choose_speed(big, sample, 512, dev)
    assert heavy.bf16 is True and heavy.channels_last is True and heavy.step_flops > HEAVY_STEP_FLOPS
    assert big.conv1.weight.is_contiguous(memory_format=torch.channels_last) and big.training


@cuda
def test_gpu_learn_gets_resident_float32_batches_in_bf16():
    net_cls, prm = _zoo_lenet()
    dev = torch.device("cuda")
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (512,), device=dev)
    mean, std = torch.full((1, 3, 1, 1), 0.5, device=dev), torch.full((1, 3, 1, 1), 0.25, device=dev)
    torch.manual_seed(0)
    net = net_cls((64, 3, 32, 32), (10,), prm, dev).to(dev)
    assert try_channels_last(net, training.normalise(x[:2], mean, std), dev) is True
    seen = []

    class Spy(training.TrainBatches):
        def __iter__(self):
            for xb, yb in super().__iter__():
                seen.append((xb.device.type, xb.dtype, xb.is_contiguous(memory_format=torch.channels_last)))
                yield xb, yb

    start = [p.detach().clone() for p in net.parameters()]
    batches = Spy(x, y, mean, std, 64, seed=0, flip=True, channels_last=True)
    with mixed_precision(dev):
        learn = training.make_learn(net, prm, lemur=True)
        training.train_epoch(learn, net, batches, cuda_graphs=False)
        with torch.no_grad():
            assert net(training.normalise(x[:4], mean, std)).dtype == torch.bfloat16
    assert seen == [("cuda", torch.float32, True)] * 8
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert any(not torch.equal(p, s) for p, s in zip(net.parameters(), start))


@cuda
def test_gpu_channels_last_is_refused_by_a_view_and_training_still_runs():
    dev = torch.device("cuda")

    class Viewer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.size(0), -1))

    net = Viewer().to(dev)
    sample = torch.zeros(2, 3, 8, 8, device=dev)
    assert try_channels_last(net, sample, dev) is False
    assert net.conv.weight.is_contiguous() and net.training
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
    batches = training.TrainBatches(x, y, torch.zeros(1, 3, 1, 1, device=dev), torch.ones(1, 3, 1, 1, device=dev),
                                    16, seed=0)
    with mixed_precision(dev):
        loss = training.train_epoch(training.make_learn(net, {"lr": 0.01}, lemur=False), net, batches, cuda_graphs=True)
    assert loss is not None and np.isfinite(loss)


@cuda
@pytest.mark.slow
@pytest.mark.parametrize("batch_size, how", [(128, "float32"), (1024, "bf16 autocast, channels_last")])
def test_gpu_worker_run_end_to_end(tmp_path, batch_size, how):
    from deltanas.tools.zoo import get_baseline

    rng = np.random.default_rng(0)
    arrays = Arrays("t", rng.integers(0, 256, (2048, 3, 32, 32)).astype(np.uint8),
                    rng.integers(0, 10, 2048).astype(np.int64), rng.integers(0, 256, (100, 3, 32, 32)).astype(np.uint8),
                    rng.integers(0, 10, 100).astype(np.int64), 10, [0.5] * 3, [0.3] * 3)
    handle = write_handle(arrays, tmp_path / "ds")
    meta = json.loads((handle / "meta.json").read_text())
    (handle / "meta.json").write_text(json.dumps({**meta, "hflip": True}))
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "model.py").write_text(get_baseline("resnet").source)
    (workdir / "job.json").write_text(json.dumps({
        "candidate_id": "g", "dataset_dir": str(handle), "hyperparameters": {"lr": 0.01, "momentum": 0.9,
                                                                           "dropout": 0.2},
        "epochs": 1, "seed": 0, "batch_size": batch_size, "device": "cuda:0", "limits": {"cpu_threads": 2}}))
    proc = subprocess.run([sys.executable, "-m", "deltanas.sandbox.worker", str(workdir), str(handle)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((workdir / "out" / "result.json").read_text())
    assert got["status"] == "ok", (got, proc.stdout)
    for text in ("random horizontal flips", "train_setup/learn", f"({how}, ", "GFLOP forward per batch"):
        assert text in proc.stdout, proc.stdout
    pred = np.load(workdir / "out" / "predictions.npy")
    assert pred.shape == (100,) and set(pred.tolist()) <= set(range(10))


@cuda
def test_gpu_wide_warm_up_warms_the_jobs_shapes_and_gives_its_memory_back():
    dev = torch.device("cuda")
    assert device_setup.warm_up_wide(dev, 128, 50_000, 10_000) == "step 128, step 80, inference 128, inference 16"
    # cuBLAS's workspaces stay, as after any first matmul; earlier tests in this process may hold
    # memory too, so what the call leaves is measured against what was there before it
    torch.cuda.empty_cache()
    kept, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    assert device_setup.warm_up_wide(dev, 128, 50_000, 10_000)
    assert torch.cuda.memory_allocated(dev) == kept  # nothing of the network, its gradients or optimizer
    assert torch.cuda.memory_reserved(dev) - reserved < 256 << 20  # its activations' memory went back
    # No batch known yet: the usual 512; a huge one is capped; an even split has no last batch.
    assert device_setup.warm_up_wide(dev, None, 1024, 512) == "step 512, inference 512"
    assert device_setup.warm_up_wide(dev, 100_000, 4096, 10) == "step 1024, inference 1024, inference 10"
