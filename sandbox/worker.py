"""The in-sandbox worker: trains one candidate and writes its test predictions.

    python -m deltanas.sandbox.worker WORKDIR DATASET_DIR

WORKDIR holds `job.json` (the Job's fields without `source`) and `model.py`.
DATASET_DIR is a prepared handle: train_x.npy (uint8 N,C,H,W), train_y.npy,
test_x.npy and meta.json (its `hflip` allows random horizontal flips); the test
labels are not there. The worker writes WORKDIR/out/predictions.npy (int16 class
per test image) and, last, WORKDIR/out/result.json (status, error, param_count,
train_seconds, final_loss).

On a GPU the dataset sits on the device as uint8 and every batch is made there
(no DataLoader); a network with enough work per batch trains under bf16 autocast
in channels_last (`choose_speed`). On the CPU it trains in float32, as before.

The candidate runs in this process and may patch json, numpy or torch, so the
result files are written with os-level functions captured before it is
imported, by a serializer that lives here. The host trusts none of it except the
predictions array, which it validates and scores against labels it alone holds.
Nothing here knows which backend started it: a process group or a container
both just give it the two directories.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

SANDBOX_INIT_ENV = "DELTANAS_SANDBOX_INIT"  # "1": our parent is pid 1 of the job's own pid namespace

_STARTED = time.monotonic()

# Captured before candidate code can rebind them.
_open, _write, _close, _exit, _replace = os.open, os.write, os.close, os._exit, os.replace
_clock = time.perf_counter
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


class Outcome(Exception):
    """Ends the job early with a typed status."""

    def __init__(self, status: str, error: str):
        super().__init__(error)
        self.status = status
        self.error = error


def _json_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_value(v: object) -> str:
    if v is None or v is True or v is False:
        return {None: "null", True: "true", False: "false"}[v]
    if type(v) is int:
        return int.__repr__(v)
    if type(v) is float:
        return float.__repr__(v) if math.isfinite(v) else "null"
    return _json_str(str.__str__(v) if type(v) is str else repr(v))


def _write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".part"
    fd = _open(tmp, _O_NEW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[_write(fd, view):]
    finally:
        _close(fd)
    _replace(tmp, path)


def write_result(out_dir: str, fields: dict) -> None:
    body = ", ".join(_json_str(k) + ": " + _json_value(v) for k, v in fields.items())
    _write_bytes(out_dir + "/result.json", ("{" + body + "}\n").encode("utf-8"))


def write_predictions(out_dir: str, labels) -> None:
    """An .npy (format 1.0) of int16, built here rather than with np.save."""
    raw = labels.astype("<i2").tobytes()
    header = "{'descr': '<i2', 'fortran_order': False, 'shape': (%d,), }" % (len(raw) // 2)
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    prefix = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    _write_bytes(out_dir + "/predictions.npy", prefix + raw)


def log(msg: str) -> None:
    print(f"[worker +{time.monotonic() - _STARTED:.2f}s] {msg}", flush=True)


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text[:500]


def classify(exc: BaseException, phase: str) -> Outcome:
    """Maps an exception from candidate code to a status."""
    import errno

    if isinstance(exc, Outcome):
        return exc
    if isinstance(exc, SyntaxError):
        return Outcome("invalid", f"{phase}: SyntaxError: {exc.msg} (line {exc.lineno})")
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return Outcome("output_limit", f"{phase}: output file size limit reached")
    text = _describe(exc)
    oom_type = type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError)
    oom_text = isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
    if oom_type or oom_text:
        return Outcome("oom", f"{phase}: {text}")
    return Outcome("crashed", f"{phase}: {text}")


@dataclass
class Settings:
    epochs: int
    seed: int
    batch_size: int
    device: str
    cpu_threads: int
    hyperparameters: dict
    gpu_memory_mb: int | None = None
    cuda_graphs: bool = True

    @classmethod
    def from_job(cls, job: dict) -> "Settings":
        limits = job.get("limits") or {}
        return cls(epochs=int(job.get("epochs", 1)), seed=int(job.get("seed", 0)),
                   batch_size=int(job.get("batch_size", 128)), device=str(job.get("device", "cpu")),
                   cpu_threads=int(limits.get("cpu_threads", 2)),
                   hyperparameters=dict(job.get("hyperparameters") or {}),
                   gpu_memory_mb=int(limits["gpu_memory_mb"]) if limits.get("gpu_memory_mb") else None,
                   cuda_graphs=job.get("cuda_graphs", True) is not False)


# Float bytes of one prepared slice of the epoch: batches are gathered, flipped and normalised
# this many at a time, so the per-batch kernel launches of that work are paid once per chunk.
CHUNK_BYTES = 64 << 20
# Forward FLOPs per training step from which bf16 and channels_last pay on a GPU. Below it a step
# is bound by kernel launches, and autocast's casts only add to them (bench/proxy_epoch.py).
HEAVY_STEP_FLOPS = 10e9


class TrainBatches:
    """Re-iterable (x, y) batches; each pass is a fresh shuffle drawn from the seed.

    Images stay uint8 on the device. Each pass gathers them in the shuffled order, flips
    them (where the dataset allows it) and normalises them there, a chunk of batches at a
    time: a whole dataset sits on a GPU without a float copy, and no DataLoader worker or
    host copy is involved. Batches are float32 views of the chunk; autocast, not the
    data, decides the compute precision, so a LEMUR `learn` gets what it expects.
    """

    def __init__(self, x_u8, y, mean, std, batch_size: int, seed: int, *, flip: bool = False,
                 channels_last: bool = False):
        import torch

        self.x, self.y, self.mean, self.std = x_u8, y, mean, std
        self.batch_size = batch_size
        self.flip = flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        per_image = 4 * max(1, x_u8[:1].numel())
        self.chunk = batch_size * max(1, CHUNK_BYTES // (per_image * batch_size))

    def __len__(self) -> int:
        n, b = len(self.y), self.batch_size
        return n // b + (1 if n % b > 1 else 0)

    def __iter__(self):
        import torch

        n, b = len(self.y), self.batch_size
        # Drawn on the CPU from one generator, so a seed gives the same epoch on every device.
        order = torch.randperm(n, generator=self.gen)
        flips = (torch.rand(n, generator=self.gen) < 0.5).to(self.x.device) if self.flip else None
        order = order.to(self.x.device)
        used = 0 if b < 2 else n - 1 if n % b == 1 else n  # a batch of one breaks BatchNorm in training mode
        for c0 in range(0, used, self.chunk):
            idx = order[c0:min(c0 + self.chunk, used)]
            xc = self.x[idx]
            if flips is not None:
                xc = torch.where(flips[c0:c0 + len(idx)].view(-1, 1, 1, 1), xc.flip(3), xc)
            xc = normalise(xc.contiguous(memory_format=self.memory_format), self.mean, self.std)
            yc = self.y[idx]
            for i in range(0, len(idx), b):
                yield xc[i:i + b], yc[i:i + b]


def normalise(x_u8, mean, std):
    return (x_u8.float() / 255.0 - mean) / std


@dataclass
class Speed:
    """How the worker trains a model on its device: bf16 autocast and channels_last, or not."""

    bf16: bool = False
    channels_last: bool = False
    step_flops: float | None = None  # forward FLOPs of one training batch, where counted

    def describe(self) -> str:
        flops = f", {self.step_flops / 1e9:.3g} GFLOP forward per batch" if self.step_flops is not None else ""
        return ("bf16 autocast" if self.bf16 else "float32") + (", channels_last" if self.channels_last else "") + flops


def mixed_precision(device, enabled: bool = True):
    """bf16 autocast on a GPU that has bf16 (no loss scaling needed, so a LEMUR `learn` runs
    unchanged); float32 elsewhere or when not `enabled`."""
    import contextlib

    import torch

    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        # One context spans many optimizer steps; autocast's cast cache would keep serving the
        # bf16 copy of a weight from before the step, so it stays off.
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def forward_flops(model, sample) -> float | None:
    """Forward FLOPs per sample, counted on one no-grad eval forward; None if it fails."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(sample)
        return counter.get_total_flops() / len(sample)
    except Exception:  # noqa: BLE001 - the training step will report the candidate's own error
        return None
    finally:
        model.train(was_training)


def choose_speed(model, sample, batch_size: int, device) -> Speed:
    """bf16 and channels_last where they pay: on a GPU with bf16, for a model whose training
    batch does at least HEAVY_STEP_FLOPS of forward work. Puts the model in channels_last
    when that is chosen."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return Speed()
    per_sample = forward_flops(model, sample)
    if per_sample is None:
        return Speed()
    step = per_sample * batch_size
    if step < HEAVY_STEP_FLOPS:
        return Speed(step_flops=step)
    return Speed(True, try_channels_last(model, sample, device), step)


def try_channels_last(model, sample, device) -> bool:
    """Puts a convolutional network in channels_last on a GPU (cuDNN's NHWC kernels use the
    tensor cores without a layout change) when its forward accepts that layout; True if so.

    The probe is one no-grad forward in eval mode, so it moves no BatchNorm statistics:
    code such as `x.view(len(x), -1)` on a channels_last activation raises, and such a
    network keeps the default layout rather than failing because of it.
    """
    import torch

    if device.type != "cuda" or not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    was_training = model.training
    try:
        model.to(memory_format=torch.channels_last)
        model.eval()
        with torch.no_grad(), mixed_precision(device):
            model(sample.contiguous(memory_format=torch.channels_last))
        return True
    except Exception:  # noqa: BLE001 - any failure here just means: keep the default layout
        model.to(memory_format=torch.contiguous_format)
        return False
    finally:
        model.train(was_training)


def after_fork() -> None:
    """In a freshly forked child, before any other thread of it starts: torch's CPU thread pool,
    rebuilt once on this thread. After fork() torch rebuilds it on first use, and two threads that
    get there together race: on a machine with two GPUs, backward's two device threads did, and
    one aborted the child ("Invalid thread pool!", SIGABRT) in a spare's warm-up (2 H200s,
    torch 2.11, 2026-11-29)."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


def use_device(device) -> None:
    """Makes `device` this process's current CUDA device. Graph captures, side streams and the
    libraries' handles go to the current device, not to the tensors' one: on cuda:1 with cuda:0
    current, a job's graph capture failed ("operation not permitted when stream is capturing")
    and its steps ran eagerly (2 H200s, 2026-11-29)."""
    import torch

    if device.type == "cuda" and device.index is not None:  # plain "cuda" is the current one already
        torch.cuda.set_device(device)


def cap_gpu_memory(device, mb: int) -> None:
    """Hold this job to `mb` of its GPU, so candidates sharing the card are accounted for: past
    its share, torch's allocator raises OutOfMemoryError here (an `oom` result for this candidate
    alone) instead of taking memory its neighbours were promised. The CUDA context is outside it."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, mb * 2**20 / total), device)
    log(f"GPU memory capped at {mb} MB of {total / 2**20:.0f} MB")


def warm_up(device) -> None:
    """Pays torch's lazy start-up (the optimizer's first use imports torch._dynamo: ~0.9 s
    here; on a GPU the context, cuDNN, cuBLAS and the kernels a small CNN's step loads on first
    use, in float32 and in bf16 channels_last, and a CUDA graph capture) before the clock starts,
    so train_seconds measures the candidate's training alone. A spare warm child, readied before
    its job arrives (sandbox/warm.py), also runs `warm_up_wide`."""
    import torch

    conv = torch.nn.Conv2d(1, 2, 3).to(device)
    opt = torch.optim.SGD(conv.parameters(), lr=0.0, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(conv(torch.zeros(2, 1, 4, 4, device=device)).flatten(1),
                                             torch.zeros(2, dtype=torch.int64, device=device))
    loss.backward()
    opt.step()
    if device.type != "cuda":
        return
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, 10)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    x = torch.zeros(8, 3, 16, 16, device=device)
    y = torch.zeros(8, dtype=torch.int64, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        nn.utils.clip_grad_norm_(net.parameters(), 3)
        opt.step()

    step()
    with mixed_precision(device):
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        step()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
            graph.capture_begin()
            step()
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
    with torch.no_grad():
        net.eval()(x)
    torch.cuda.synchronize(device)


# The wide warm-up's batch when the job's is not known yet, the largest it warms, and the free GPU
# memory below which it warms only WIDE_WARM_SMALL_BATCH, so that spares readied beside running
# candidates on a shared GPU take little of it (its peak at batch 512 is 0.83 GB).
WIDE_WARM_BATCH, WIDE_WARM_MAX_BATCH, WIDE_WARM_SMALL_BATCH, WIDE_WARM_MIN_FREE = 512, 1024, 64, 16 << 30


def warm_up_wide(device, batch: int | None, n_train: int, n_test: int) -> str:
    """bf16 channels_last steps of a ResNet-like stack with the widths (64 to 512) and strides of a
    ResNet-18 on 32x32 images, at the shapes a job will meet: a training step at `batch` and at
    the epoch's last, smaller batch (n_train % batch), inference at `batch` and at the test set's
    last batch; its memory is given back after. cuDNN picks kernels by shape, and a candidate's
    first epoch of a heavy network otherwise loads them itself: on an H200 ResNet-18's first epoch
    took 1.11-1.17 s after `warm_up` alone, 0.97-0.98 s after this at batch 512 only, and 0.91-0.97 s
    with the last batch's shape too (bench/RESULTS.md). Returns what it warmed. Best effort:
    running out of memory skips the rest."""
    import torch

    if device.type != "cuda":
        return "not on a GPU"
    if not torch.cuda.is_bf16_supported():
        return "no bf16 on this GPU"
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                      nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    batch = min(batch or WIDE_WARM_BATCH, WIDE_WARM_MAX_BATCH)
    if torch.cuda.mem_get_info(device)[0] < WIDE_WARM_MIN_FREE:
        batch = min(batch, WIDE_WARM_SMALL_BATCH)
    train = [b for b in dict.fromkeys([batch, n_train % batch]) if b > 1]
    infer = [b for b in dict.fromkeys([batch, n_test % batch]) if b > 0]
    done = []
    net = opt = None
    try:
        net = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                            Residual(64, 64, 1), Residual(64, 128, 2), Residual(128, 256, 2), Residual(256, 512, 2),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
        net = net.to(device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
        with mixed_precision(device):
            for b in train:
                x = torch.zeros(b, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(x), torch.zeros(b, dtype=torch.int64, device=device)).backward()
                opt.step()
                done.append(f"step {b}")
            net.eval()
            with torch.no_grad():
                for b in infer:
                    net(torch.zeros(b, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last))
                    done.append(f"inference {b}")
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        done.append("out of GPU memory")
    finally:
        net = opt = x = None
        torch.cuda.empty_cache()
    return ", ".join(done)


def load_candidate(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("candidate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["candidate"] = module
    spec.loader.exec_module(module)
    return module


class DefaultLoop:
    """The loop for a network without train_setup/learn: SGD (lr, momentum from the job's
    hyperparameters; its momentum kept across epochs) on cross-entropy, one step per batch."""

    def __init__(self, model, prm: dict):
        import torch

        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=float(prm.get("lr", 0.01)),
                                   momentum=float(prm.get("momentum", 0.9)))
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def learn(self, data):
        self.model.train()
        last = None
        for x, y in data:
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.opt.step()
            last = loss.detach()
        return last


def make_learn(model, prm: dict, lemur: bool):
    """The epoch function: a LEMUR module's own learn (after its train_setup), else DefaultLoop's.
    Call it inside the autocast context, as train_setup may build what the steps use."""
    if lemur:
        model.train_setup(prm)
        return model.learn
    return DefaultLoop(model, prm).learn


def uses_learn(model) -> bool:
    """A LEMUR module trains itself through train_setup/learn."""
    return callable(getattr(model, "train_setup", None)) and callable(getattr(model, "learn", None))


def loss_value(ret) -> float | None:
    """The loss a training loop returned (a number or a one-element tensor), else None."""
    import torch

    if isinstance(ret, torch.Tensor) and ret.numel() == 1:
        return float(ret)
    if isinstance(ret, (int, float)) and not isinstance(ret, bool):
        return float(ret)
    return None


def train_epoch(learn, model, data: TrainBatches, cuda_graphs: bool) -> float | None:
    """One epoch of `learn` (the module's own, after its train_setup, or DefaultLoop's), its steps
    replayed as a CUDA graph when `cuda_graphs` (sandbox/graphs.py). The caller holds the autocast
    context."""
    model.train()
    if cuda_graphs:
        from deltanas.sandbox import graphs

        ret = graphs.run_epoch(learn, data, model, log)
    else:
        ret = learn(data)
    value = loss_value(ret)
    if value is not None and not math.isfinite(value):
        raise Outcome("diverged", f"train: loss became {value}")
    return value


def predict(model, x_u8, mean, std, batch_size: int, num_classes: int, channels_last: bool = False):
    import numpy as np
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(x_u8), batch_size):
            xb = normalise(x_u8[start:start + batch_size].contiguous(memory_format=fmt), mean, std)
            logits = model(xb)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(xb), num_classes):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise Outcome("invalid", f"predict: logits must have shape {(len(xb), num_classes)}, got {shape}")
            if not bool(torch.isfinite(logits).all()):
                raise Outcome("diverged", "predict: logits are NaN or infinite")
            chunks.append(logits.argmax(dim=1).to("cpu").numpy().astype(np.int16))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


@dataclass
class Data:
    """The dataset as a worker holds it: uint8 images and int64 labels as tensors on `device`.
    `flip`: the handle allows random horizontal flips (natural images, not digits)."""

    x_train: object
    y_train: object
    x_test: object
    mean: object
    std: object
    num_classes: int
    shape: tuple
    device: object
    flip: bool = False

    def to(self, device) -> "Data":
        move = lambda t: t.to(device)  # noqa: E731
        return Data(move(self.x_train), move(self.y_train), move(self.x_test), move(self.mean), move(self.std),
                    self.num_classes, self.shape, device, self.flip)


def load_data(dataset_dir: str, device) -> Data:
    import json

    import numpy as np
    import torch

    with open(os.path.join(dataset_dir, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    load = lambda name: np.load(os.path.join(dataset_dir, name), allow_pickle=False)  # noqa: E731
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    data = Data(x_train=as_tensor(load("train_x.npy")), y_train=as_tensor(load("train_y.npy").astype(np.int64)),
                x_test=as_tensor(load("test_x.npy")),
                mean=torch.tensor(meta["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1),
                std=torch.tensor(meta["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1),
                num_classes=int(meta["num_classes"]), shape=tuple(int(v) for v in meta["shape"]), device=device,
                flip=meta.get("hflip") is True)
    log(f"dataset loaded: {len(data.y_train)} train, {len(data.x_test)} test images on {device}"
        f"{', random horizontal flips' if data.flip else ''}")
    return data


def run(workdir: str, dataset_dir: str, fields: dict, data: Data | None = None) -> None:
    """Trains and predicts the candidate in WORKDIR. Fills `fields` as it goes, so a failure
    still reports what was learnt. `data`: the dataset already loaded (a warm worker's copy);
    loaded from `dataset_dir` when None, or moved when it sits on another device."""
    import json
    import random

    import numpy as np
    import torch

    log(f"torch {torch.__version__} imported")

    with open(os.path.join(workdir, "job.json"), encoding="utf-8") as f:
        s = Settings.from_job(json.load(f))
    torch.set_num_threads(max(1, s.cpu_threads))
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise Outcome("crashed", f"setup: cuda requested but not available (device {s.device!r})")
    device = torch.device(s.device)
    use_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        log(f"on {device}: {props.name}, GPU-{props.uuid}")
    if device.type == "cuda" and s.gpu_memory_mb:
        cap_gpu_memory(device, s.gpu_memory_mb)
    if data is None or data.device != device:
        data = load_data(dataset_dir, device) if data is None else data.to(device)
        warm_up(device)
        log("warmed up")
    # Seeded after the warm-up, which draws from the generators (its layers' initialisation): a
    # job then starts from the same random state in a cold worker as in a warm one's child.
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    c, h, w = data.shape
    num_classes, mean, std = data.num_classes, data.mean, data.std

    phase = "import"
    try:
        module = load_candidate(os.path.join(workdir, "model.py"))
        net_cls = getattr(module, "Net", None)
        if not isinstance(net_cls, type):
            raise Outcome("invalid", "import: the module defines no class `Net`")
        prm = dict(s.hyperparameters)
        phase = "build"
        model = net_cls((s.batch_size, c, h, w), (num_classes,), prm, device)
        if not isinstance(model, torch.nn.Module):
            raise Outcome("invalid", "build: Net is not a torch.nn.Module")
        model = model.to(device)
        fields["param_count"] = int(sum(p.numel() for p in model.parameters()))
        if fields["param_count"] <= 0:
            raise Outcome("invalid", "build: Net has no parameters")
        log(f"built Net with {fields['param_count']} parameters on {device}")

        phase = "train"
        lemur = uses_learn(model)
        speed = choose_speed(model, normalise(data.x_train[:2], mean, std), s.batch_size, device)
        batches = TrainBatches(data.x_train, data.y_train, mean, std, s.batch_size, s.seed, flip=data.flip,
                               channels_last=speed.channels_last)
        log(("training with the module's train_setup/learn" if lemur else "training with the default SGD loop")
            + f" ({speed.describe()})")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = _clock()
        graphed = device.type == "cuda" and s.cuda_graphs
        with mixed_precision(device, speed.bf16):
            learn = make_learn(model, prm, lemur)
            for _ in range(s.epochs):
                fields["final_loss"] = train_epoch(learn, model, batches, graphed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fields["train_seconds"] = _clock() - t0
        log(f"trained {s.epochs} epoch(s) in {fields['train_seconds']:.3f}s")
        if fields.get("final_loss") is not None and not math.isfinite(fields["final_loss"]):
            raise Outcome("diverged", f"train: loss became {fields['final_loss']}")
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise Outcome("diverged", f"train: parameter {name} is NaN or infinite")

        phase = "predict"
        with mixed_precision(device, speed.bf16):
            labels = predict(model, data.x_test, mean, std, s.batch_size, num_classes, speed.channels_last)
        log(f"predicted {len(labels)} test images")
    except BaseException as exc:  # noqa: BLE001 - candidate code may raise anything, SystemExit included
        raise classify(exc, phase) from None
    write_predictions(os.path.join(workdir, "out"), labels)


def serve(workdir: str, dataset_dir: str, data: Data | None = None) -> None:
    """Runs one job to its result file, then ends the process without running the candidate's
    atexit hooks or waiting for threads it left behind."""
    import signal

    # Python ignores SIGXFSZ; restored, a write past RLIMIT_FSIZE kills the process
    # with a signal the host reads as output_limit, whatever the candidate catches.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    out_dir = os.path.join(workdir, "out")
    os.makedirs(out_dir, exist_ok=True)
    fields: dict = {"status": "ok", "error": "", "param_count": None, "train_seconds": None, "final_loss": None}
    try:
        run(workdir, dataset_dir, fields, data)
    except Outcome as o:
        fields["status"], fields["error"] = o.status, o.error
    except BaseException as exc:  # noqa: BLE001 - the worker's own setup failed
        o = classify(exc, "setup")
        fields["status"], fields["error"] = o.status, o.error
    if fields["status"] != "ok":
        log(f"{fields['status']}: {fields['error']}")
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - a broken stdout must not lose the result
        pass
    write_result(out_dir, fields)
    _exit(0)


def die_with_driver() -> None:
    """Ask the kernel to kill this worker when the driver that started it dies
    (a `kill -9` of `deltanas run` must not leave workers training on)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    # Set here rather than before exec: entering the user namespace changes credentials,
    # which clears the setting. If the driver died before this point, stop now. Under
    # bubblewrap, pid 1 is the sandbox's own init (it dies with the driver), not a reaper.
    if os.getppid() == 1 and os.environ.get(SANDBOX_INIT_ENV) != "1":
        os._exit(3)


def main(argv: list[str]) -> None:
    die_with_driver()
    workdir, dataset_dir = argv
    serve(workdir, dataset_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.stderr.write("usage: python -m deltanas.sandbox.worker WORKDIR DATASET_DIR\n")
        sys.exit(2)
    main(sys.argv[1:])
