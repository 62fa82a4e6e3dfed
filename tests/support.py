"""Test data that several test files share: the protected training methods of a
LEMUR-style network, and the small datasets the sandbox tests hand to a sandbox.

A plain module rather than fixtures because the sources are used at import time,
to build module constants and parametrize lists. tests/conftest.py puts tests/
on sys.path so test files can `import support`.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltanas.tools.proxy import EvalOutcome

REPO_ROOT = Path(__file__).resolve().parents[1]

# Each test file writes its own architecture around these, so the diff, protected
# and mutator tests all guard the same training contract. Hunk line numbers in
# those files count these lines: TRAIN_SETUP is 4 lines, LEARN 8.
TRAIN_SETUP = '''\
    def train_setup(self, prm):
        self.to(self.device)
        self.criteria = (nn.CrossEntropyLoss().to(self.device),)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])
'''

LEARN = '''\
    def learn(self, train_data):
        self.train()
        for inputs, labels in train_data:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            loss = self.criteria[0](self(inputs), labels)
            loss.backward()
            self.optimizer.step()
'''

# The single-quoted spelling of LEMUR's own model files, which the mutator and the
# mutate backend are tested on.
TRAIN_SETUP_SINGLE_QUOTED = TRAIN_SETUP.replace('"', "'")

# learn as compact LEMUR files write it: no train(), tensors moved where they are used.
LEARN_COMPACT = '''\
    def learn(self, train_data):
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            loss = self.criteria[0](self(inputs.to(self.device)), labels.to(self.device))
            loss.backward()
            self.optimizer.step()
'''


@dataclass
class Arrays:
    """Stands in for deltanas.tools.datasets.DatasetArrays, so the sandbox tests
    build their data by hand and do not depend on the dataset code."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: list[float]
    std: list[float]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# The smallest network that meets the Net contract: one linear layer, for tests of the sandboxes.
LINEAR_NET = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], out_shape[0])

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


def write_handle(ds: Arrays, root: Path) -> Path:
    """Write the sandbox's view of ``ds`` to ``root``: the train arrays, the test
    images and meta.json; test labels stay with the host."""
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "train_x.npy", ds.x_train)
    np.save(root / "train_y.npy", ds.y_train)
    np.save(root / "test_x.npy", ds.x_test)
    meta = {"name": ds.name, "num_classes": ds.num_classes, "shape": list(ds.in_shape), "mean": ds.mean,
            "std": ds.std, "n_train": len(ds.y_train), "n_test": len(ds.y_test)}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def noise(n_train: int = 256, n_test: int = 128, seed: int = 1) -> Arrays:
    """Random 1×28×28 images and labels: nothing to learn, which suits tests of the sandbox."""
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, 1, 28, 28)).astype(np.uint8)
    y_train = rng.integers(0, 10, n_train).astype(np.int64)
    x_test = rng.integers(0, 256, (n_test, 1, 28, 28)).astype(np.uint8)
    y_test = rng.integers(0, 10, n_test).astype(np.int64)
    return Arrays("noise", x_train, y_train, x_test, y_test, 10, [0.5], [0.25])


def threads_inside(path_end: str) -> dict[str, str]:
    """The threads now running code of the file whose path ends with `path_end`, each with the
    function at the top of its stack: `wait` for one asleep on a lock or condition, the looping
    function itself for one that polls."""
    names = {t.ident: t.name for t in threading.enumerate()}
    found = {}
    for ident, frame in sys._current_frames().items():
        f = frame
        while f is not None and not f.f_code.co_filename.endswith(path_end):
            f = f.f_back
        if f is not None:
            found[names.get(ident, str(ident))] = frame.f_code.co_name
    return found


class InstantExecutor:
    """Scores by source length; stands in for the sandbox in routing tests only."""

    def __init__(self, on_eval=None):
        self.calls: list[str] = []
        self.on_eval = on_eval
        self.lock = threading.Lock()

    def evaluate(self, source, candidate_id, out_dir, dataset=None):
        with self.lock:
            self.calls.append(candidate_id)
        if self.on_eval:
            self.on_eval(candidate_id)
        return EvalOutcome(status="ok", accuracy=0.5 + (len(source) % 97) / 1000, param_count=100,
                           train_seconds=0.01, total_seconds=0.02, error="", log_tail="")

    def close(self):
        pass


LAYERS = ["nn.Conv2d(in_shape[1], {a}, kernel_size={k}, padding={p})", "nn.BatchNorm2d({a})", "nn.GELU()",
          "nn.SiLU()", "nn.LeakyReLU(negative_slope=0.{b})", "nn.Dropout(p=0.{b})", "nn.MaxPool2d({k2})",
          "nn.AvgPool2d(kernel_size={k2}, stride=1)", "nn.Conv2d({a}, {c}, kernel_size=1, bias=False)",
          "nn.Identity()", "nn.Hardswish()", "nn.InstanceNorm2d({a}, affine=True)", "nn.Flatten(start_dim=1)",
          "nn.Linear({c}, {a})", "nn.LayerNorm({c})", "nn.Tanh()"]


def block_diff(base: str, tag: str) -> str:
    """A real unified diff inserting a distinctive block after super().__init__().
    Each tag draws different layers, so siblings are structurally different."""
    rng = random.Random(tag)
    lines = base.splitlines(keepends=True)
    at = next(i for i, l in enumerate(lines) if "super().__init__()" in l) + 1
    indent = lines[at - 1][: len(lines[at - 1]) - len(lines[at - 1].lstrip())]
    vals = dict(a=rng.randint(4, 64), b=rng.randint(1, 9), c=rng.randint(4, 64), k=3, p=1, k2=rng.randint(2, 3))
    body = [f"{indent}    {layer.format(**vals)},\n" for layer in rng.sample(LAYERS, 9)]
    block = [f"{indent}self.aux_{tag} = nn.Sequential(\n", *body, f"{indent})\n"]
    new = "".join(lines[:at] + block + lines[at:])
    return "".join(difflib.unified_diff(base.splitlines(True), new.splitlines(True), "a/model.py", "b/model.py"))


def synthetic(n_train: int = 512, n_test: int = 128, seed: int = 0) -> "Arrays":
    """A bright block whose position is the class, over noise: learnable in one epoch."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            r, c = divmod(int(k), 4)
            x[i, 0, 2 + 8 * r:8 + 8 * r, 2 + 7 * c:7 + 7 * c] = 230
        return x, y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Arrays("synthetic", xtr, ytr, xte, yte, 10, [0.2], [0.3])


# An answer the zoo lenet's grammar admits (tools/diff_grammar.py), as the text after the prefix.
RELU_TO_GELU = """@@
             nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
-            nn.ReLU(inplace=True),
+            nn.GELU(),
             nn.MaxPool2d(2),
```"""


def loop_deps(tmp_path: Path, learner, answer=None, *, dataset=("mnist", (1, 28, 28), 10), **over):
    """Deps for a whole graph run: the scripted model (`answer(prompt)`, by default a fresh block
    diff each time), the instant executor, a real archive under tmp_path/run, and `over` config keys
    on top of one cycle of two candidates from lenet under the `valid` rule."""
    from deltanas.agent.archive import Store
    from deltanas.agent.config import load_config
    from deltanas.agent.llm.coalesce import CoalescingBackend
    from deltanas.agent.llm.scripted import ScriptedBackend
    from deltanas.agent.loop.deps import DatasetInfo, Deps
    from deltanas.tools.novelty import NoveltyIndex

    if answer is None:
        counter = iter(range(10_000))

        def answer(p):
            return f"```diff\n{block_diff(p.base_source, f'k{next(counter)}')}```"

    cfg = load_config(None, {"llm.spec": "mutate", "search.cycles": 1, "search.candidates": 2,
                             "baselines": ["lenet"], "learn.rule": "valid", "learn.after_last_cycle": True, **over})
    run_dir = tmp_path / "run"
    (run_dir / "candidates").mkdir(parents=True, exist_ok=True)
    return Deps(config=cfg, llm=CoalescingBackend(ScriptedBackend(answer), window_s=0.01), executor=InstantExecutor(),
                store=Store(run_dir / "archive.sqlite"), novelty=NoveltyIndex(), datasets={dataset[0]: DatasetInfo(*dataset)},
                run_dir=run_dir, learner=learner, learner_note="" if learner else "no learner in this test")


def require_tmux() -> None:
    """Skips the calling test module where tmux is missing, unless CI demands it."""
    import pytest

    if shutil.which("tmux") is None:
        if os.environ.get("DELTANAS_REQUIRE_TMUX") == "1":
            pytest.fail("DELTANAS_REQUIRE_TMUX=1 but tmux is not installed", pytrace=False)
        pytest.skip("tmux is not installed (apt-get install tmux)", allow_module_level=True)


class Pane:
    def __init__(self, command: str, env: dict[str, str]):
        self.name = f"dn-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-x", "200", "-y", "50", "-s", self.name,
                        f"cd {REPO_ROOT} && env {exports} {command}; echo EXITED=$?; sleep 600"], check=True)

    def text(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-S", "-2000", "-t", self.name],
                              capture_output=True, text=True).stdout

    def wait_for(self, needle: str, timeout: float = 240, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if text.count(needle) >= count:
                return text
            time.sleep(0.5)
        raise AssertionError(f"{needle!r} (x{count}) did not appear; the pane shows:\n{self.text()[-3000:]}")

    def type(self, *keys: str) -> None:
        for k in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", k], check=True)
            subprocess.run(["tmux", "send-keys", "-t", self.name, "Enter"], check=True)

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def changed_lines(before: str, after: str) -> list[str]:
    """The '+' and '-' lines between two sources, without context (what a diff changed)."""
    import difflib

    body = list(difflib.unified_diff(before.split("\n"), after.split("\n"), lineterm="", n=0))[2:]
    return [line for line in body if line[:1] in "+-"]


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """A script of bench/ as a module (`bench/<name>.py`), its folder first on sys.path as when it
    runs, and registered under its name (dataclasses look their module up while being made)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
