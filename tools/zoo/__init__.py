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
from pathlib import Path
from functools import lru_cache
from importlib import resources

from deltanas.sandbox.base import DEFAULT_HYPERPARAMETERS

# The hyperparameters a baseline is measured with when none are given: the jobs' own defaults.
DEFAULT_PRM: dict[str, float] = DEFAULT_HYPERPARAMETERS

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


def is_path(name: str) -> bool:
    """A baseline given as a file of the user's own (the LEMUR `Net` interface), not a zoo name."""
    return name.endswith(".py") or "/" in name or "\\" in name


def get_baseline(name: str) -> Baseline:
    """A zoo network by name, or the user's own file by its path (named after the file)."""
    if is_path(name):
        path = Path(name).expanduser()
        return Baseline(name=path.stem, family="user", description=str(path), source=path.read_text())
    for baseline in _load_all():
        if baseline.name == name:
            return baseline
    raise KeyError(f"no baseline named {name!r}; available: {', '.join(sorted(_FAMILIES))}")


def check_user_baseline(name: str) -> str | None:
    """Why the user's baseline file cannot start a search, or None: it must exist, parse and
    define `Net`, and the answer grammar must find a layer line in it to edit."""
    import ast

    from deltanas.tools.diff_grammar import GrammarError, layer_lines, parent_lines

    path = Path(name).expanduser()
    if not path.is_file():
        return f"baseline file {path} does not exist"
    try:
        source = path.read_text()
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError) as e:
        return f"baseline file {path} cannot be read: {e}"
    except SyntaxError as e:
        return f"baseline file {path} does not parse: {e.msg} (line {e.lineno})"
    if not any(isinstance(n, ast.ClassDef) and n.name == "Net" for n in tree.body):
        return f"baseline file {path} defines no class Net (the LEMUR interface: Net(in_shape, out_shape, prm, device))"
    if any("\r" in x or "\0" in x for x in parent_lines(source)):
        return f"baseline file {path}: a line holds a carriage return or a NUL, which a diff line cannot carry"
    try:
        if not layer_lines(source):
            return (f"baseline file {path}: the answer grammar finds no line to edit in it (no statement in a "
                    "function outside supported_hyperparameters, train_setup and learn)")
    except (SyntaxError, GrammarError) as e:
        return f"baseline file {path}: {e}"
    return None


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
