"""The rule-based mutator on realistic LEMUR-style networks: every result compiles, differs,
keeps the protected functions, still runs forward, and round-trips through its diff."""
from __future__ import annotations

import ast
import random
import re
from collections import Counter

import pytest
import torch

from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.diff_write import make_diff
from deltanas.tools.mutator import MUTATIONS, NoMutation, mutate_source

from support import LEARN_COMPACT, TRAIN_SETUP_SINGLE_QUOTED

PRM = {"lr": 0.01, "momentum": 0.9, "dropout": 0.5}

ALEXNET = '''import torch
import torch.nn as nn


def supported_hyperparameters():
    return {'lr', 'momentum', 'dropout'}


class Net(nn.Module):
''' + TRAIN_SETUP_SINGLE_QUOTED + '''
    def learn(self, train_data):
        for inputs, labels in train_data:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            outputs = self(inputs)
            loss = self.criteria[0](outputs, labels)
            loss.backward()
            nn.utils.clip_grad_norm_(self.parameters(), 3)
            self.optimizer.step()

    def __init__(self, in_shape: tuple, out_shape: tuple, prm: dict, device: torch.device) -> None:
        super().__init__()
        self.device = device
        dropout: float = prm['dropout']
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[1], 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 96, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(64 * 6 * 6, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, out_shape[0]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x
'''

LENET = '''import torch
import torch.nn as nn
import torch.nn.functional as F


def supported_hyperparameters():
    return {'lr', 'momentum'}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.conv1 = nn.Conv2d(in_shape[1], 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, out_shape[0])

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

''' + TRAIN_SETUP_SINGLE_QUOTED + '''
    def learn(self, train_data):
        for inputs, labels in train_data:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            loss = self.criteria[0](self(inputs), labels)
            loss.backward()
            self.optimizer.step()
'''

RESNETISH = '''import torch
from torch import nn


def supported_hyperparameters():
    return {'lr', 'momentum'}


def conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        width = 16
        self.stem = conv_bn(in_shape[1], width)
        self.layer1 = BasicBlock(width)
        self.down = conv_bn(width, width * 2, stride=2)
        self.layer2 = BasicBlock(width * 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 2, out_shape[0])

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))

''' + TRAIN_SETUP_SINGLE_QUOTED + "\n" + LEARN_COMPACT

# Non-ASCII before a layer on the same line: AST columns are UTF-8 bytes, edits are characters.
# The last Sequential element has no trailing comma, and the file has no final newline.
VGGISH = '''import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.größe = 8; self.stem = nn.Conv2d(in_shape[1], 8, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.SiLU()
        )
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, out_shape[0]))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))'''

SOURCES = {
    "alexnet": (ALEXNET, (2, 3, 64, 64)),
    "lenet": (LENET, (2, 1, 28, 28)),
    "resnetish": (RESNETISH, (2, 3, 16, 16)),
    "vggish": (VGGISH, (2, 3, 16, 16)),
}
PROTECTED = ("supported_hyperparameters", "train_setup", "learn")


def protected_functions(source: str) -> dict[str, str]:
    return {n.name: ast.dump(n) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef) and n.name in PROTECTED}


def patch(old: str, diff: str) -> str:
    """A strict inverse of make_diff: hunks applied at their stated line numbers, every
    context and removed line checked."""
    lines = old.splitlines(keepends=True)
    out: list[str] = []
    pos = 0
    body = diff.splitlines(keepends=True)
    assert body[0] == "--- a/model.py\n" and body[1] == "+++ b/model.py\n"
    i = 2
    while i < len(body):
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", body[i])
        assert m, body[i]
        start = int(m.group(1)) - (0 if m.group(2) == "0" else 1)
        out.extend(lines[pos:start])
        pos = start
        i += 1
        while i < len(body) and not body[i].startswith("@@"):
            tag, text = body[i][0], body[i][1:]
            if i + 1 < len(body) and body[i + 1].startswith("\\"):
                text = text.rstrip("\n")
            if tag in " -":
                assert lines[pos] == text, (lines[pos], text)
                pos += 1
            if tag in " +":
                out.append(text)
            i += 1 + (i + 1 < len(body) and body[i + 1].startswith("\\"))
    out.extend(lines[pos:])
    return "".join(out)


def build(source: str):
    ns: dict = {}
    exec(compile(source, "model.py", "exec"), ns)
    return ns["Net"]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_mutations_compile_change_and_keep_protected_code(name):
    source, shape = SOURCES[name]
    protected = protected_functions(source)
    seen = Counter()
    for seed in range(25):
        mutation, new = mutate_source(source, random.Random(seed))
        seen[mutation] += 1
        assert mutation in MUTATIONS
        assert new != source
        compile(new, "model.py", "exec")
        assert protected_functions(new) == protected
        diff = make_diff(source, new)
        assert apply_model_output(source, f"```diff\n{diff}```\n").source == new  # as the sandbox applies it
        assert patch(source, make_diff(source, new, numbered=True)) == new
        changed = [l for l in diff.splitlines()[2:] if l[:1] in "+-"]
        assert 0 < len(changed) <= 12, diff  # small, local edits
    assert len(seen) >= 3, seen  # several mutation kinds apply to every network


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_mutated_networks_still_run_forward(name):
    source, shape = SOURCES[name]
    torch.manual_seed(0)
    broken = []
    for seed in range(12):
        mutation, new = mutate_source(source, random.Random(seed))
        net = build(new)(shape, (10,), PRM, torch.device("cpu"))
        try:
            out = net(torch.randn(*shape))
        except RuntimeError as e:
            broken.append((mutation, str(e)[:80]))
            continue
        assert out.shape == (shape[0], 10)
    assert not broken, broken


def test_every_mutation_is_reachable_on_the_test_networks():
    seen = set()
    for source, _ in SOURCES.values():
        for seed in range(40):
            seen.add(mutate_source(source, random.Random(seed))[0])
    assert seen == set(MUTATIONS)


def test_same_seed_same_mutation_and_different_seeds_explore():
    a = mutate_source(ALEXNET, random.Random(7))
    assert mutate_source(ALEXNET, random.Random(7)) == a
    results = {mutate_source(ALEXNET, random.Random(s))[1] for s in range(20)}
    assert len(results) >= 10


def test_width_change_follows_the_consumer():
    # LeNet's conv2 (16 channels) feeds fc1 through `16 * 4 * 4`: both must change together
    for seed in range(200):
        mutation, new = mutate_source(LENET, random.Random(seed))
        out = re.search(r"self\.conv2 = nn\.Conv2d\(\d+, (\d+), ", new).group(1)
        if mutation in ("widen", "narrow") and out != "16":
            assert f"nn.Linear({out} * 4 * 4, 120)" in new
            net = build(new)((2, 1, 28, 28), (10,), PRM, "cpu")
            assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
            return
    pytest.fail("no width change of conv2 in 200 seeds")


def test_kernel_change_keeps_output_size_through_padding():
    for seed in range(200):
        mutation, new = mutate_source(ALEXNET, random.Random(seed))
        if mutation == "kernel_size" and "kernel_size=5, padding=2" not in new:
            k, p = map(int, re.search(r"nn\.Conv2d\(64, 96, kernel_size=(\d+), padding=(\d+)\)", new).groups())
            assert 2 * p - k == 2 * 2 - 5
            return
    pytest.fail("no kernel change of the 5x5 conv in 200 seeds")


def test_nothing_to_mutate_is_a_clear_error():
    with pytest.raises(NoMutation, match="no structural mutation"):
        mutate_source("def supported_hyperparameters():\n    return {'lr'}\n", random.Random(0))
    with pytest.raises(NoMutation, match="does not parse"):
        mutate_source("def f(:\n", random.Random(0))


def test_protected_functions_are_never_mutated_even_when_they_hold_layers():
    source = LENET.replace("        self.to(self.device)\n",
                           "        self.to(self.device)\n        self.extra = nn.Conv2d(3, 8, 3)\n")
    protected = protected_functions(source)
    for seed in range(40):
        _, new = mutate_source(source, random.Random(seed))
        assert protected_functions(new) == protected
