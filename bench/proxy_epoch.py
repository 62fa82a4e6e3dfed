"""One proxy epoch: the sandbox worker's GPU-resident path against a conventional DataLoader loop.

    python bench/proxy_epoch.py                        # GPU: 50k CIFAR-shaped images
    python bench/proxy_epoch.py --variants             # also: what bf16 and channels_last each buy
    python bench/proxy_epoch.py --sandbox 5 --concurrent 4,8   # also: whole jobs in a warm sandbox
    python bench/proxy_epoch.py --references           # also: DataLoader loops at their own batch sizes
    python bench/proxy_epoch.py --n 2048 --device cpu  # CPU size (bench/summary.py runs a smaller one)
    python bench/proxy_epoch.py --json                 # the figures as JSON on stdout, the prose on stderr

Both sides train the same network on the same synthetic uint8 images (3x32x32, 10
classes), with SGD (lr 0.01, momentum 0.9) and random horizontal flips:

- ours: the worker's own pieces (`deltanas.sandbox.worker`): the dataset moved to the
  device once as uint8, batches gathered, flipped and normalised there, bf16 autocast
  and channels_last where the worker chooses them, no DataLoader;
- baseline: what a user writes with torchvision: a Dataset handing out PIL images,
  RandomHorizontalFlip / ToTensor / Normalize, a DataLoader with worker processes and
  pinned memory, float32.

The main network is torchvision's ResNet-18 adapted to 32x32 (3x3 stem, no max-pool).
Each side runs `--epochs` epochs of a fresh model; the first is what a proxy-trained
candidate pays (one epoch in a fresh model), the later ones are steady state. Then the
zoo's small CNNs (through their own train_setup/learn) give the per-candidate time
and an estimate of candidates per device-hour, beside the same estimate for a
conventional loop in a cold process per candidate. With --sandbox N, the same networks
also run as N whole jobs each through a warm process sandbox (a fresh forked child per
job, which moves the dataset to the GPU, trains one epoch and predicts the test images):
that is what a candidate costs in the search loop. Timings synchronise the device and
read a wall clock, with torch's and cuDNN's start-up paid before the first one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch
import torch.nn as nn

from deltanas.sandbox import device_setup, training, worker
from deltanas.sandbox.speed import Speed, choose_speed, mixed_precision, try_channels_last
from deltanas.tools.zoo import DEFAULT_PRM, get_baseline

# Per-candidate cost outside the training epoch, from bench/RESULTS.md (bench/sandbox_overhead.py):
# a warm worker's child (readied ahead on a GPU: CUDA context, warm-up; then model build, prediction
# of 1,000 images, read-back) against a cold worker process per candidate; on an H200 (2026-11-29),
# and on the 2-core CPU machine (2026-11-28).
OVERHEAD_S = {"cuda": (0.253, 9.389), "cpu": (0.069, 1.995)}

RESNET18_SOURCE = '''
import torch.nn as nn
from torchvision.models import resnet18


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.net = resnet18(num_classes=out_shape[0])
        self.net.conv1 = nn.Conv2d(in_shape[1], 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x):
        return self.net(x)
'''


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the usual 32x32 stem: a 3x3 stride-1 convolution, no max-pool."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def zoo_net(name: str, device: torch.device) -> nn.Module:
    """A zoo baseline loaded as the worker loads a candidate: from a file, so that its `learn`'s
    source can be read and its steps captured as a CUDA graph."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="deltanas-zoo-"), f"{name}.py")
    with open(path, "w") as f:
        f.write(get_baseline(name).source)
    return worker.load_candidate(path).Net((1, 3, 32, 32), (10,), dict(DEFAULT_PRM), device)


def synthetic(n: int, n_test: int, seed: int = 0):
    """Random CIFAR-shaped uint8 images and labels: speed does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n + n_test, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x[:n], y, x[n:]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    epochs: list[float]
    predict_s: float | None = None
    setup_s: float | None = None  # the dataset's move to the device
    note: str = ""

    @property
    def first(self) -> float:
        return self.epochs[0]

    @property
    def steady(self) -> float:
        return min(self.epochs[1:]) if len(self.epochs) > 1 else self.epochs[0]


def ours(make_net, arrays, device, batch: int, epochs: int, *, force: tuple[bool, bool] | None = None,
         cudnn_benchmark: bool = False, graphs: bool = True, seed: int = 0) -> Timing:
    """The worker's path: the steps of `worker.run` between the model's build and its predictions.
    `force`: (bf16, channels_last) instead of the worker's own choice; `graphs`: the worker's CUDA-graph
    replay of the steps (on a GPU), or every step launched from Python."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    x, y, x_test = arrays
    torch.manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    host = training.Data(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x_test),
                         torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.29), 10, (3, 32, 32),
                         torch.device("cpu"), flip=True)
    data = host.to(device)
    sync(device)
    setup_s = time.perf_counter() - t0
    model = make_net(device).to(device)
    prm = dict(DEFAULT_PRM)
    lemur = training.uses_learn(model)
    sample = training.normalise(data.x_train[:2], data.mean, data.std)
    if force is None:
        speed = choose_speed(model, sample, batch, device)
    else:
        speed = Speed(force[0] and device.type == "cuda", force[1] and try_channels_last(model, sample, device))
    batches = training.TrainBatches(data.x_train, data.y_train, data.mean, data.std, batch, seed, flip=data.flip,
                                    channels_last=speed.channels_last)
    times = []
    with mixed_precision(device, speed.bf16):
        sync(device)
        t0 = time.perf_counter()
        learn = training.make_learn(model, prm, lemur)
        logged: list[str] = []  # the worker's log lines, which say how it ran the steps
        with mock.patch.object(training, "log", logged.append):
            for _ in range(epochs):
                loss = training.train_epoch(learn, model, batches, graphs and device.type == "cuda")
                sync(device)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
        labels = training.predict(model, data.x_test, data.mean, data.std, batch, 10, speed.channels_last)
        sync(device)
        predict_s = time.perf_counter() - t0
    torch.backends.cudnn.benchmark = False
    assert len(labels) == len(x_test) and (loss is None or np.isfinite(loss))
    how = "worker's choice" if force is None else "forced"
    note = ", ".join([f"{speed.describe()} ({how})", "own learn()" if lemur else "default loop"]
                     + [m.removeprefix("training steps: ") for m in logged[-1:] if m.startswith("training steps:")]
                     + (["no CUDA graph"] if device.type == "cuda" and not graphs else [])
                     + (["cudnn.benchmark"] if cudnn_benchmark else []))
    return Timing(times, predict_s, setup_s, note)


class PILArrays(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image through the transforms."""

    def __init__(self, x_nchw: np.ndarray, y: np.ndarray, transform):
        self.x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))  # HWC, as CIFAR10 stores it
        self.y = y
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def dataloader(make_net, arrays, device, batch: int, epochs: int, workers: int, seed: int = 0,
               crop: bool = False) -> Timing:
    """The conventional loop: CPU transforms in DataLoader workers, pinned memory, float32.
    `crop`: also RandomCrop(32, padding=4) first, as the common CIFAR recipes do."""
    import torchvision.transforms as T

    x, y, _ = arrays
    torch.manual_seed(seed)
    transform = T.Compose([*([T.RandomCrop(32, padding=4)] if crop else []), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.29,) * 3)])
    loader = torch.utils.data.DataLoader(PILArrays(x, y, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    model = make_net(device).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(times, note=f"float32, {workers} workers, pin_memory={device.type == 'cuda'}"
                  + (", RandomCrop + flip" if crop else ""))


@dataclass(frozen=True)
class Reference:
    """A DataLoader loop with settings fixed from outside this project, run at its own batch size."""
    label: str
    batch: int
    workers: int
    crop: bool

    def describe(self) -> str:
        return f"batch {self.batch}, {self.workers} workers, {'crop + flip' if self.crop else 'flip'}, float32"


REFERENCE_LOOPS = (
    # DESIGN.md's "conventional torchvision DataLoader loop" (8.8 s for ResNet-18 in ENVIRONMENT.md).
    Reference("conventional loop", 64, 4, False),
    # The common CIFAR recipe's input pipeline: kuangliu/pytorch-cifar's train.py settings.
    Reference("CIFAR recipe", 128, 2, True),
)


def write_handle(arrays, root) -> str:
    """A dataset handle as tools.datasets.prepare_handle writes it, flips allowed (CIFAR-like)."""
    from pathlib import Path

    x, y, x_test = arrays
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train_x.npy", x), ("train_y.npy", y), ("test_x.npy", x_test)):
        np.save(root / name, arr)
    meta = {"name": "synthetic-cifar", "num_classes": 10, "shape": [3, 32, 32], "mean": [0.5] * 3,
            "std": [0.29] * 3, "n_train": len(y), "n_test": len(x_test), "hflip": True}
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root)


def sandbox_jobs(arrays, device, sources: dict[str, tuple[str, int]], jobs: int, threads: int,
                 concurrent: list[int]) -> None:
    """Runs each (source, batch size) `jobs` times as a whole job through one warm ProcessSandbox
    and prints the medians; then the first small CNN `jobs` times on each of K threads at once."""
    import statistics
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from deltanas.sandbox.base import Job, Limits
    from deltanas.sandbox.process import ProcessSandbox

    tmp = Path(tempfile.mkdtemp(prefix="deltanas-proxy-epoch-"))
    handle = write_handle(arrays, tmp / "handle")
    sandbox = ProcessSandbox(tmp / "work", warm=True, max_idle=max([1, *concurrent]))
    limits = Limits(timeout_s=600, memory_mb=8192, cpu_threads=threads)

    def run(name: str, source: str, batch: int):
        r = sandbox.run(Job(name, source, handle, dict(DEFAULT_PRM), batch_size=batch, device=str(device),
                            limits=limits))
        if r.status != "ok":
            raise SystemExit(f"sandbox job {name} ended {r.status}: {r.error}\n{r.log_tail}")
        return r

    print(f"  ({sandbox.isolation()[:100]}...)")
    try:
        # The worker's own start (torch import, dataset into host memory) is paid once, not per candidate.
        first = run("start", *next(iter(sources.values())))
        print(f"  worker start-up job: {first.total_seconds:.2f} s (left out below)")
        for name, (source, batch) in sources.items():
            t0 = time.perf_counter()
            results = [run(f"{name}-{i}", source, batch) for i in range(jobs)]
            seq = time.perf_counter() - t0
            walls = [r.total_seconds for r in results]
            trains = [r.train_seconds for r in results]
            med = statistics.median(walls)
            outside = statistics.median(w - t for w, t in zip(walls, trains))
            print(f"  job {name:<9} batch {batch:<4} train {statistics.median(trains):.3f} s (min {min(trains):.3f}), "
                  f"whole job {med:.3f} s (min {min(walls):.3f}, max {max(walls):.3f}), outside training "
                  f"{outside:.3f} s, median of {jobs}; {jobs} back to back in {seq:.2f} s -> "
                  f"{3600 * jobs / seq:,.0f} candidates per device-hour, one at a time")
            print("    its last job's log: " + "\n    ".join(ln for ln in results[-1].log_tail.splitlines()
                                                            if ln.startswith("[worker"))[-1400:])
        name = [n for n in sources if n != "resnet18"][:1]
        for k in concurrent if name else []:
            source, batch = sources[name[0]]
            with ThreadPoolExecutor(k) as pool:  # a first round starts the k warm workers
                list(pool.map(lambda i: run(f"c{k}-warm-{i}", source, batch), range(k)))
                t0 = time.perf_counter()
                done = list(pool.map(lambda i: run(f"c{k}-{i}", source, batch), range(k * jobs)))
                wall = time.perf_counter() - t0
            trains = [r.train_seconds for r in done]
            print(f"  {k} jobs at once, {name[0]}: {len(done)} jobs in {wall:.2f} s (train median "
                  f"{statistics.median(trains):.3f} s) -> {3600 * len(done) / wall:,.0f} candidates per device-hour")
    finally:
        sandbox.close()


def repeated(n: int, measure) -> Timing:
    """`measure()` n times; each epoch's median, and every run's first epoch in the note."""
    import statistics

    runs = [measure() for _ in range(n)]
    if n == 1:
        return runs[0]
    epochs = [statistics.median(r.epochs[i] for r in runs) for i in range(len(runs[0].epochs))]
    firsts = ", ".join(f"{r.first:.3f}" for r in runs)
    return Timing(epochs, runs[0].predict_s, runs[0].setup_s, f"{runs[0].note}; median of {n}, first epochs {firsts} s")


def row(label: str, t: Timing) -> str:
    extra = f"  predict {t.predict_s:.3f} s" if t.predict_s is not None else ""
    extra += f"  data to device {t.setup_s:.3f} s" if t.setup_s is not None else ""
    return f"  {label:<38} first {t.first:7.3f} s/epoch  steady {t.steady:7.3f} s/epoch{extra}   ({t.note})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="training images")
    ap.add_argument("--n-test", type=int, default=None, help="test images to predict (default n/5)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None,
                    help="batch sizes of the ResNet-18 comparison, each on both sides (default 512,128; CPU: 512)")
    ap.add_argument("--small-batch", type=int, default=128, help="batch size of the small CNNs (the Job default)")
    ap.add_argument("--workers", type=int, default=4, help="the DataLoader's num_workers")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per measurement; the first is reported apart (default 2; CPU: 1)")
    ap.add_argument("--small", default="lenet,resnet", help="zoo baselines for the per-candidate estimate")
    ap.add_argument("--overhead", type=float, default=None,
                    help="per-candidate cost outside training with a warm worker, s (default: RESULTS.md's figure)")
    ap.add_argument("--cold-overhead", type=float, default=None,
                    help="the same for a cold process per candidate, the baseline (default: RESULTS.md's)")
    ap.add_argument("--sandbox", type=int, default=0, metavar="JOBS",
                    help="also run ResNet-18 and the small CNNs as JOBS whole jobs each in a warm process sandbox")
    ap.add_argument("--references", "--recipe", dest="references", action="store_true",
                    help="also the reference loops at their own batch sizes, each against ours at each batch: "
                         + "; ".join(f"{r.label} ({r.describe()})" for r in REFERENCE_LOOPS))
    ap.add_argument("--repeat", type=int, default=1, help="run each ResNet-18 measurement (ours, the DataLoader "
                    "loops) this many times, each with a fresh model, and report each epoch's median")
    ap.add_argument("--variants", action="store_true", help="also time ours without channels_last, without bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--concurrent", default="", help="with --sandbox: also run the first small CNN as this many "
                    "jobs at once, sharing the GPU (comma-separated list)")
    ap.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout, the prose on stderr")
    args = ap.parse_args(argv)
    stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.batches = [int(b) for b in (args.batches or ("512,128" if on_gpu else "512")).split(",") if b]
    args.epochs = args.epochs or (2 if on_gpu else 1)

    if args.threads:
        torch.set_num_threads(args.threads)
    n_test = args.n_test if args.n_test is not None else max(2, args.n // 5)
    warm_default, cold_default = OVERHEAD_S["cuda" if device.type == "cuda" else "cpu"]
    overhead = args.overhead if args.overhead is not None else warm_default
    cold_overhead = args.cold_overhead if args.cold_overhead is not None else cold_default
    arrays = synthetic(args.n, n_test)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, GPU {gpu}; python {sys.version.split()[0]}, "
          f"torch {torch.__version__}")
    print(f"data: {args.n} train / {n_test} test synthetic uint8 images 3x32x32, 10 classes; device {device}")
    device_setup.warm_up(device)  # the worker pays this before its clock too (a spare child before its job)
    warmed = device_setup.warm_up_wide(device, args.batches[0], args.n, n_test)
    if device.type == "cuda":
        print(f"warmed up as a spare child is: {warmed}")
    res = {"device": str(device), "gpu": gpu, "n": args.n, "n_test": n_test, "epochs": args.epochs, "resnet18": [],
           "small": {}, "baseline_small": {}}

    resnet = lambda d: resnet18_cifar()  # noqa: E731
    mines = []
    for batch in args.batches:
        print(f"\nResNet-18 (torchvision, 32x32 stem), batch {batch} both sides, {args.epochs} epoch(s) each:")
        mine = repeated(args.repeat, lambda: ours(resnet, arrays, device, batch, args.epochs))
        print(row("ours: GPU-resident worker path" if device.type == "cuda" else "ours: worker path", mine))
        base = repeated(args.repeat, lambda: dataloader(resnet, arrays, device, batch, args.epochs, args.workers))
        print(row("baseline: torchvision DataLoader", base))
        print(f"  batch {batch}: ours {mine.first:.3f} s/epoch vs DataLoader {base.first:.3f} s/epoch: "
              f"{base.first / mine.first:.2f}x faster (first epoch); "
              f"steady {mine.steady:.3f} vs {base.steady:.3f} s/epoch: {base.steady / mine.steady:.2f}x")
        res["resnet18"].append({"batch": batch, "ours_first_s": mine.first, "ours_steady_s": mine.steady,
                                "ours_note": mine.note, "baseline_first_s": base.first,
                                "baseline_steady_s": base.steady, "speedup_first": base.first / mine.first})
        mines.append(mine)
    if args.references:
        res["references"] = {}
        for ref in REFERENCE_LOOPS:
            t = repeated(args.repeat, lambda: dataloader(resnet, arrays, device, ref.batch, args.epochs, ref.workers,
                                                         crop=ref.crop))
            print(row(f"reference: {ref.label}", t))
            for batch, mine in zip(args.batches, mines):
                print(f"  {ref.label} ({ref.describe()}) {t.first:.3f} s/epoch vs ours at batch {batch} "
                      f"{mine.first:.3f} s/epoch: {t.first / mine.first:.2f}x (first epoch); steady "
                      f"{t.steady:.3f} vs {mine.steady:.3f}: {t.steady / mine.steady:.2f}x")
            res["references"][ref.label] = {"batch": ref.batch, "workers": ref.workers, "crop": ref.crop,
                                            "first_s": t.first, "steady_s": t.steady}

    if args.variants:
        batch = args.batches[0]
        print(f"\nvariants of ours (ResNet-18, batch {batch}):")
        print(row("worker's choice, no CUDA graph", ours(resnet, arrays, device, batch, args.epochs, graphs=False)))
        for label, force in (("bf16, NCHW", (True, False)), ("float32, channels_last", (False, True)),
                             ("float32, NCHW", (False, False))):
            print(row(label, ours(resnet, arrays, device, batch, args.epochs, force=force)))
        print(row("worker's choice + cudnn.benchmark", ours(resnet, arrays, device, batch, args.epochs,
                                                            cudnn_benchmark=True)))

    print(f"\nsmall CNNs from the zoo, their own train_setup/learn, batch {args.small_batch}:")
    names = [s for s in args.small.split(",") if s]
    for name in names:
        t = ours(lambda d, name=name: zoo_net(name, d), arrays, device, args.small_batch, args.epochs)
        print(row(f"ours: zoo {name}", t))
        if args.variants:
            print(row(f"  {name}: no CUDA graph", ours(lambda d, name=name: zoo_net(name, d), arrays, device,
                                                        args.small_batch, args.epochs, graphs=False)))
            for label, force in (("bf16, channels_last", (True, True)), ("bf16, NCHW", (True, False))):
                print(row(f"  {name}: {label}", ours(lambda d, name=name: zoo_net(name, d), arrays, device,
                                                     args.small_batch, args.epochs, force=force)))
        per_candidate = t.first + t.predict_s + overhead
        print(f"  {name}: per candidate {t.first:.3f} s epoch + {t.predict_s:.3f} s predict + {overhead:.3f} s "
              f"warm-worker overhead = {per_candidate:.3f} s -> {3600 / per_candidate:,.0f} candidates per device-hour "
              f"(one at a time)")
        res["small"][name] = {"epoch_s": t.first, "predict_s": t.predict_s, "overhead_s": overhead,
                              "per_candidate_s": per_candidate, "per_hour": 3600 / per_candidate, "note": t.note}
    if names:
        name = names[0]
        b = dataloader(lambda d: zoo_net(name, d), arrays, device, args.small_batch, 1, args.workers)
        per_candidate = b.first + cold_overhead
        print(row(f"baseline: zoo {name}, DataLoader", b))
        print(f"  baseline {name}: {b.first:.3f} s epoch + {cold_overhead:.3f} s cold process = "
              f"{per_candidate:.3f} s -> {3600 / per_candidate:,.0f} candidates per device-hour")
        res["baseline_small"][name] = {"epoch_s": b.first, "overhead_s": cold_overhead,
                                       "per_candidate_s": per_candidate, "per_hour": 3600 / per_candidate}

    if args.sandbox:
        print(f"\nwhole jobs in a warm process sandbox ({args.n} train / {n_test} test images; "
              f"epoch, prediction, fork, CUDA context, model build, read-back):")
        sources = {"resnet18": (RESNET18_SOURCE, args.batches[0])}
        sources.update({n: (get_baseline(n).source, args.small_batch) for n in names})
        sandbox_jobs(arrays, device, sources, args.sandbox, args.threads or 2,
                     [int(k) for k in args.concurrent.split(",") if k])
    if args.json:
        print(json.dumps(res), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
