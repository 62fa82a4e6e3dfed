"""The baseline zoo: registry, LEMUR interface, shapes, and that each one learns."""

from __future__ import annotations

import ast
import runpy
import types
from importlib import resources

import numpy as np
import pytest
import torch

from deltanas.tools.datasets import load_dataset
from deltanas.tools.zoo import (
    DEFAULT_PRM,
    Baseline,
    count_parameters,
    get_baseline,
    list_baselines,
)

BASELINES = list_baselines()
IDS = [b.name for b in BASELINES]


def build(baseline: Baseline, in_shape: tuple[int, int, int], num_classes: int = 10):
    module = types.ModuleType(baseline.name)
    exec(compile(baseline.source, f"{baseline.name}.py", "exec"), module.__dict__)
    torch.manual_seed(0)
    return module, module.Net((1, *in_shape), (num_classes,), dict(DEFAULT_PRM), torch.device("cpu"))


def test_at_least_eight_baselines_of_distinct_families_sorted_by_name():
    assert len(BASELINES) >= 8
    assert IDS == sorted(IDS)
    families = [b.family for b in BASELINES]
    assert len(set(families)) == len(families)
    for needed in ("lenet", "alexnet", "vgg", "resnet", "mobilenet", "densenet"):
        assert needed in families
    assert {"squeeze-excitation", "attention"} & set(families)
    for b in BASELINES:
        assert b.description and "\n" not in b.description


def test_every_file_in_the_package_is_registered():
    files = {
        p.name[:-3]
        for p in resources.files("deltanas.tools.zoo").iterdir()
        if p.name.endswith(".py") and p.name != "__init__.py"
    }
    assert files == set(IDS)


def test_get_baseline_returns_the_file_and_unknown_names_list_the_choices():
    assert get_baseline("resnet").source == resources.files("deltanas.tools.zoo").joinpath(
        "resnet.py"
    ).read_text()
    with pytest.raises(KeyError) as err:
        get_baseline("no-such-net")
    for name in IDS:
        assert name in str(err.value)


@pytest.mark.parametrize("baseline", BASELINES, ids=IDS)
def test_source_is_self_contained_and_compact(baseline: Baseline):
    tree = ast.parse(baseline.source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] == "torch" for a in node.names), ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] == "torch", ast.dump(node)
    assert 35 <= len(baseline.source.splitlines()) <= 85


@pytest.mark.parametrize("baseline", BASELINES, ids=IDS)
def test_lemur_interface_is_present(baseline: Baseline):
    module, net = build(baseline, (1, 28, 28))
    assert {"lr", "momentum", "dropout"} <= set(module.supported_hyperparameters())
    for method in ("train_setup", "learn", "forward"):
        assert callable(getattr(net, method))
    net.train_setup(dict(DEFAULT_PRM))
    assert isinstance(net.optimizer, torch.optim.Optimizer)
    assert callable(net.criteria[0])


def _protected_text(source: str) -> dict[str, str]:
    tree = ast.parse(source)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "supported_hyperparameters":
            found[node.name] = ast.get_source_segment(source, node)
        if isinstance(node, ast.ClassDef) and node.name == "Net":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in ("train_setup", "learn"):
                    found[item.name] = ast.get_source_segment(source, item)
    return found


def test_protected_functions_are_identical_in_every_baseline():
    # Same text everywhere: a diff never has a reason to touch them.
    reference = _protected_text(BASELINES[0].source)
    assert set(reference) == {"supported_hyperparameters", "train_setup", "learn"}
    for b in BASELINES[1:]:
        assert _protected_text(b.source) == reference, b.name


@pytest.mark.parametrize("baseline", BASELINES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_forward_shape_for_one_and_three_channels(baseline: Baseline, shape):
    _, net = build(baseline, shape, num_classes=7)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("baseline", BASELINES, ids=IDS)
def test_file_runs_as_a_standalone_module(baseline: Baseline, tmp_path):
    path = tmp_path / f"{baseline.name}.py"
    path.write_text(baseline.source)
    namespace = runpy.run_path(str(path))
    assert "Net" in namespace and "supported_hyperparameters" in namespace


def test_count_parameters_matches_the_built_network():
    b = get_baseline("lenet")
    _, net = build(b, (1, 28, 28))
    expected = sum(p.numel() for p in net.parameters())
    assert count_parameters(b.source) == expected > 0
    # A first conv over 3 channels and a 100-way head hold more weights.
    assert count_parameters(b.source, (3, 32, 32), 100) > expected
    for other in BASELINES:
        assert 5_000 < count_parameters(other.source) < 2_000_000, other.name


def _normalised(x: np.ndarray, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (torch.from_numpy(x).float() / 255.0 - m) / s


@pytest.mark.slow
@pytest.mark.parametrize("baseline", BASELINES, ids=IDS)
def test_one_epoch_on_synthetic_beats_chance(baseline: Baseline):
    torch.set_num_threads(2)
    ds = load_dataset("synthetic", limit_train=2000, limit_test=500)
    x_train = _normalised(ds.x_train, ds.mean, ds.std)
    y_train = torch.from_numpy(ds.y_train)
    _, net = build(baseline, ds.in_shape, ds.num_classes)
    net.train_setup(dict(DEFAULT_PRM))
    net.learn([(x_train[i : i + 32], y_train[i : i + 32]) for i in range(0, len(y_train), 32)])
    net.eval()
    with torch.no_grad():
        predictions = net(_normalised(ds.x_test, ds.mean, ds.std)).argmax(1).numpy()
    accuracy = float((predictions == ds.y_test).mean())
    assert accuracy > 0.3, f"{baseline.name}: {accuracy:.3f} after one epoch (chance is 0.1)"


@pytest.mark.slow
def test_lenet_learns_real_mnist(tmp_path):
    torch.set_num_threads(2)
    ds = load_dataset("mnist", cache_dir=tmp_path, limit_train=10_000, limit_test=2_000)
    x_train = _normalised(ds.x_train, ds.mean, ds.std)
    y_train = torch.from_numpy(ds.y_train)
    _, net = build(get_baseline("lenet"), ds.in_shape)
    net.train_setup(dict(DEFAULT_PRM))
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))
    net.learn([(x_train[order[i : i + 64]], y_train[order[i : i + 64]]) for i in range(0, len(order), 64)])
    net.eval()
    with torch.no_grad():
        predictions = net(_normalised(ds.x_test, ds.mean, ds.std)).argmax(1).numpy()
    assert float((predictions == ds.y_test).mean()) > 0.9
