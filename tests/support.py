"""Test data that several test files share: the protected training methods of a
LEMUR-style network, and the small datasets the sandbox tests hand to a sandbox.

A plain module rather than fixtures because the sources are used at import time,
to build module constants and parametrize lists. tests/conftest.py puts tests/
on sys.path so test files can `import support`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
