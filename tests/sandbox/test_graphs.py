"""The CUDA-graph replay of training steps (sandbox/graphs.py).

On a GPU: a graphed epoch moves the weights as the eager epoch does, batch for batch; a loop
that a graph cannot hold (a host sync, a step counter, host randomness, a non-capturable
optimizer) falls back to eager steps and still gives every batch exactly one step. On the
CPU: the host-state summary that decides it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from deltanas.sandbox import graphs, training, worker

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Syncing(Small):
    """Reads a value back to the host in every forward: a capture cannot hold it."""

    def forward(self, x):
        if float(x.abs().max()) < 0:  # never true; only the sync matters
            x = -x
        return super().forward(x)


class Counting(Small):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class HostRandom(Small):
    def forward(self, x):
        return super().forward(x) * (1.0 if random.random() < 2 else 0.0)


class WithAdam(Small):
    """A LEMUR-style module whose optimizer is Adam (not capturable by default)."""

    def train_setup(self, prm):
        self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        self.criteria = (torch.nn.CrossEntropyLoss(),)

    def learn(self, train_data):
        self.train()
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            loss = self.criteria[0](self(inputs), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters(), 3)
            self.optimizer.step()


def _data(device, n: int, batch: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    mean, std = torch.full((1, 1, 1, 1), 0.5, device=device), torch.full((1, 1, 1, 1), 0.25, device=device)
    return training.TrainBatches(x, y, mean, std, batch, seed=5)


def _train(cls, device, graphed: bool, n: int = 10 * 32, batch: int = 32, lines: list | None = None):
    torch.manual_seed(0)
    net = cls().to(device)
    learn = training.make_learn(net, {"lr": 0.05, "momentum": 0.9}, training.uses_learn(net))
    batches = _data(device, n, batch)
    log = (lines.append if lines is not None else lambda _m: None)
    if graphed:
        ret = graphs.run_epoch(learn, batches, net, log)
    else:
        ret = learn(batches)
    torch.cuda.synchronize()
    return net, ret


def _assert_same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=1e-5), name


@pytest.fixture()
def deterministic():
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


@cuda
def test_a_graphed_epoch_moves_the_weights_as_the_eager_epoch(deterministic):
    dev = torch.device("cuda")
    lines = []
    eager, eager_loss = _train(Small, dev, graphed=False)
    fast, fast_loss = _train(Small, dev, graphed=True, lines=lines)
    _assert_same_weights(eager, fast)
    assert fast.bn.num_batches_tracked.item() == 10  # every batch got one step
    assert abs(float(eager_loss) - float(fast_loss)) < 1e-4
    assert lines == ["training steps: CUDA graph, 7 steps replayed and 3 eager"]


@cuda
def test_a_last_smaller_batch_runs_eagerly_after_the_replays(deterministic):
    dev = torch.device("cuda")
    lines = []
    eager, _ = _train(Small, dev, graphed=False, n=10 * 32 + 7)
    fast, _ = _train(Small, dev, graphed=True, n=10 * 32 + 7, lines=lines)
    _assert_same_weights(eager, fast)
    assert fast.bn.num_batches_tracked.item() == 11
    assert lines == ["training steps: CUDA graph, 7 steps replayed and 4 eager"]


@cuda
@pytest.mark.parametrize("cls, why", [
    (Syncing, "capture failed"),
    (Counting, "changes host state"),
    (HostRandom, "changes host state"),
    (WithAdam, "capture failed"),
])
def test_a_loop_a_graph_cannot_hold_runs_eagerly_with_one_step_per_batch(cls, why, deterministic):
    dev = torch.device("cuda")
    lines = []
    random.seed(1)
    eager, _ = _train(cls, dev, graphed=False)
    random.seed(1)
    fast, _ = _train(cls, dev, graphed=True, lines=lines)
    _assert_same_weights(eager, fast)
    assert fast.bn.num_batches_tracked.item() == 10
    assert len(lines) == 1 and "eager, 10 steps" in lines[0] and why in lines[0], lines
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    # The device is usable afterwards: the worker goes on to predict.
    with torch.no_grad():
        assert fast.eval()(torch.zeros(4, 1, 8, 8, device=dev)).shape == (4, 10)


def _stopping_after(n: int):
    class Stops(Small):
        """A LEMUR-style loop that stops after n batches."""

        def train_setup(self, prm):
            self.optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def learn(self, train_data):
            self.train()
            for i, (inputs, labels) in enumerate(train_data):
                if i == n:
                    break
                self.optimizer.zero_grad()
                torch.nn.functional.cross_entropy(self(inputs), labels).backward()
                self.optimizer.step()

    return Stops


@cuda
@pytest.mark.parametrize("n", [2, graphs.WARMUP_STEPS + 1, graphs.WARMUP_STEPS + 3])
def test_a_loop_that_stops_early_gets_exactly_its_steps(n, deterministic):
    """Stopping in the warm-up, right after the captured batch, or among the replays."""
    dev = torch.device("cuda")
    eager, _ = _train(_stopping_after(n), dev, graphed=False)
    fast, _ = _train(_stopping_after(n), dev, graphed=True)
    _assert_same_weights(eager, fast)
    assert fast.bn.num_batches_tracked.item() == n
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@cuda
def test_a_genuine_error_in_the_loop_propagates_and_leaves_no_capture_open():
    dev = torch.device("cuda")

    class Broken(Small):
        def forward(self, x):
            return super().forward(x)[:, :3].reshape(-1, 7)  # fails on the first step

    with pytest.raises(RuntimeError):
        _train(Broken, dev, graphed=True)
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@cuda
def test_the_zoo_learn_is_replayed_and_trains(tmp_path):
    from deltanas.tools.zoo import DEFAULT_PRM, get_baseline

    module = _load(get_baseline("lenet").source, tmp_path)  # from a file, as the worker loads it
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = module.Net((64, 1, 28, 28), (10,), dict(DEFAULT_PRM), dev).to(dev)
    g = torch.Generator().manual_seed(0)
    # A learnable task: the label is which quarter of the image is bright.
    y = torch.randint(0, 4, (2048,), generator=g)
    x = torch.zeros(2048, 1, 28, 28, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * 14:(r + 1) * 14, q * 14:(q + 1) * 14] = 255
    mean, std = torch.full((1, 1, 1, 1), 0.25, device=dev), torch.full((1, 1, 1, 1), 0.4, device=dev)
    batches = training.TrainBatches(x.to(dev), y.to(dev), mean, std, 64, seed=0)
    lines = []
    learn = training.make_learn(net, dict(DEFAULT_PRM), True)
    for _ in range(3):
        graphs.run_epoch(learn, batches, net, lines.append)
    assert all(line.startswith("training steps: CUDA graph, 29 steps replayed") for line in lines), lines
    labels = training.predict(net, x[:512].to(dev), mean, std, 128, 10)
    assert (labels == y[:512].numpy()).mean() > 0.9


def _load(source: str, tmp_path):
    path = tmp_path / "model.py"
    path.write_text(source)
    return worker.load_candidate(str(path))


LOOP_HEAD = """
import torch


class Net(torch.nn.Module):
    def learn(self, train_data):
        self.train()
"""


@pytest.mark.parametrize("body, why", [
    ("        for x, y in train_data:\n            self.step(x, y)\n", ""),
    ("        for i, (x, y) in enumerate(train_data):\n            self.step(x, y)\n        return 1\n", ""),
    ("        for i, (x, y) in enumerate(train_data):\n            if i == 50:\n                break\n"
     "            self.step(x, y)\n", "stop or skip early"),
    ("        for x, y in train_data:\n            if x is None:\n                continue\n            self.step(x, y)\n",
     "stop or skip early"),
    ("        for i, (x, y) in enumerate(train_data):\n            self.step(x, y, warm=i < 10)\n", "batch index"),
    ("        for (x, y), _ in zip(train_data, range(5)):\n            self.step(x, y)\n", "one plain for-loop"),
    ("        it = iter(train_data)\n        for _ in range(5):\n            self.step(*next(it))\n",
     "one plain for-loop"),
    ("        for x, y in train_data:\n            for p in self.parameters():\n                p.grad = None\n",
     "one plain for-loop"),
    ("        for x, y in train_data:\n            self.step(x, y)\n        self.seen = len(train_data)\n",
     "outside its for-loop"),
    ("        n = 0\n        for x, y in train_data:\n            self.step(x, y)\n            n += 1\n", "carries"),
    ("        total = 0\n        for x, y in train_data:\n            total = total + self.step(x, y)\n", "carries"),
    ("        seen = []\n        for x, y in train_data:\n            seen.append(self.step(x, y))\n", "carries"),
    ("        last = None\n        for x, y in train_data:\n            last = self.step(x, y)\n        return last\n", ""),
])
def test_only_one_plain_loop_over_the_batches_is_captured(body, why, tmp_path):
    """Replayed batches never reach the loop: a loop that would stop, skip or count does not get a graph."""
    net = _load(LOOP_HEAD + body, tmp_path).Net()
    got = graphs.loop_shape(net.learn)
    assert (why in got and got) if why else got == "", got
    assert graphs.loop_shape(training.DefaultLoop(Small(), {}).learn) == ""


def test_a_loop_without_readable_source_runs_eagerly():
    namespace: dict = {}
    exec("def learn(train_data):\n    for b in train_data:\n        pass\n", namespace)
    assert graphs.loop_shape(namespace["learn"]) == "its source cannot be read"


def test_host_state_sees_counters_randomness_and_schedules_but_not_weights():
    net = Small()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.optimizer = opt
    net.scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    base = graphs.host_state(net)
    with torch.no_grad():
        net.fc.weight.add_(1.0)  # device work a graph replays: not host state
    net.bn.running_mean.add_(1.0)
    assert graphs.host_state(net) == base
    for change in (lambda: setattr(net, "calls", 1), lambda: random.random(), lambda: np.random.rand(),
                   lambda: torch.rand(1), lambda: net.scheduler.step(), lambda: setattr(net.fc, "cache", torch.ones(1)),
                   lambda: net.__dict__.setdefault("history", []).append(1)):
        before = graphs.host_state(net)
        change()
        assert graphs.host_state(net) != before


def test_host_state_of_an_unchanged_model_is_stable_with_nan_attributes():
    net = Small()
    net.threshold = float("nan")
    assert graphs.host_state(net) == graphs.host_state(net)


def test_the_switch_travels_from_the_config_to_the_worker(tmp_path):
    from deltanas.agent.config import load_config
    from deltanas.agent.run.build import job_spec
    from deltanas.tools.proxy import make_job

    assert load_config(None, {}).sandbox.cuda_graphs is True
    cfg = load_config(None, {"sandbox.cuda_graphs": False})
    assert cfg.sandbox.cuda_graphs is False
    job = make_job(job_spec(cfg, tmp_path), "x = 1\n", "c")
    assert training.Settings.from_job(job.to_json()).cuda_graphs is False
    job = make_job(job_spec(load_config(None, {}), tmp_path), "x = 1\n", "c")
    assert training.Settings.from_job(job.to_json()).cuda_graphs
