"""The baseline zoo: compact networks that the search starts from.

Each baseline is one file in this folder, in the LEMUR ``nn-dataset`` interface
(``supported_hyperparameters``, ``Net`` with ``train_setup``/``learn``/
``forward``). The files are read as text, because the source is what a language
model edits with diffs, and each is also a valid standalone module that needs
only torch. All of them take 1 or 3 channels at 28 px or more, and they end in
adaptive pooling, so one file serves MNIST, CIFAR and the 64 px sets alike.

The first line of a file's docstring is its description; its family is listed
below, so that ``list_baselines`` can show one network per design idea.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

# The hyperparameters a baseline is measured with when none are given.
DEFAULT_PRM: dict[str, float] = {"lr": 0.01, "momentum": 0.9, "dropout": 0.2}

# Baseline file name (without .py) -> the design family it represents.
_FAMILIES: dict[str, str] = {
    "alexnet": "alexnet",
    "convmixer": "convmixer",
    "densenet": "densenet",
    "lenet": "lenet",
    "mobilenet": "mobilenet",
    "resnet": "resnet",
    "senet": "squeeze-excitation",
    "vgg": "vgg",
}


@dataclass(frozen=True)
class Baseline:
    name: str
    family: str
    description: str
    source: str


def list_baselines() -> list[Baseline]:
    """Every baseline, sorted by name."""
    return list(_load_all())


def get_baseline(name: str) -> Baseline:
    for baseline in _load_all():
        if baseline.name == name:
            return baseline
    raise KeyError(f"no baseline named {name!r}; available: {', '.join(sorted(_FAMILIES))}")


def count_parameters(
    source: str,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
) -> int:
    """Build the source's ``Net`` on the CPU and count its parameters.

    This executes the source in this process, so it is for trusted code only
    (the zoo); candidates are measured inside the sandbox.
    """
    import torch

    module = types.ModuleType("deltanas_zoo_candidate")
    exec(compile(source, "<baseline>", "exec"), module.__dict__)
    prm = dict(DEFAULT_PRM)
    net = module.Net((1, *in_shape), (num_classes,), prm, torch.device("cpu"))
    return int(sum(p.numel() for p in net.parameters()))


@lru_cache(maxsize=1)
def _load_all() -> tuple[Baseline, ...]:
    folder = resources.files(__name__)
    baselines = []
    for name in sorted(_FAMILIES):
        source = folder.joinpath(f"{name}.py").read_text(encoding="utf-8")
        baselines.append(Baseline(name, _FAMILIES[name], _first_docstring_line(source), source))
    return tuple(baselines)


def _first_docstring_line(source: str) -> str:
    import ast

    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
