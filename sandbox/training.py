"""The training loop, from the dataset on the device to the test set's predicted labels.

On a GPU the dataset sits on the device as uint8 and every batch is made there (no DataLoader):
a chunk of batches at a time is gathered in a seeded shuffle, flipped where the dataset allows it,
and normalised. A network trains with its own `train_setup`/`learn` (a LEMUR module) or with
`DefaultLoop`'s SGD, under the speed `speed.choose_speed` picks, its steps replayed as a CUDA graph
where they can be (sandbox/graphs.py). Only the epochs are timed, between two device syncs: the
device is readied before (sandbox/device_setup.py) and prediction comes after.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from deltanas.sandbox.outcome import Outcome, log
from deltanas.sandbox.speed import Speed, choose_speed, mixed_precision

_clock = time.perf_counter  # captured before candidate code can rebind it

# Float bytes of one prepared slice of the epoch: batches are gathered, flipped and normalised
# this many at a time, so the per-batch kernel launches of that work are paid once per chunk.
CHUNK_BYTES = 64 << 20


@dataclass
class Settings:
    """The job's settings, as the host writes them in job.json (its Job's fields without `source`)."""

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
    """A prepared handle onto `device`: train_x.npy (uint8 N,C,H,W), train_y.npy, test_x.npy and
    meta.json (its `hflip` allows random horizontal flips); the test labels are not there."""
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


def normalise(x_u8, mean, std):
    return (x_u8.float() / 255.0 - mean) / std


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


def train(model, prm: dict, data: Data, s: Settings, fields: dict) -> Speed:
    """The job's epochs of `model` on `data`, timed alone: `fields` gets train_seconds and
    final_loss. Returns the speed it trained at, which prediction keeps."""
    import torch

    device = data.device
    lemur = uses_learn(model)
    speed = choose_speed(model, normalise(data.x_train[:2], data.mean, data.std), s.batch_size, device)
    batches = TrainBatches(data.x_train, data.y_train, data.mean, data.std, s.batch_size, s.seed, flip=data.flip,
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
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise Outcome("diverged", f"train: parameter {name} is NaN or infinite")
    return speed


def predict(model, x_u8, mean, std, batch_size: int, num_classes: int, channels_last: bool = False):
    """The predicted class of each image (int16); logits of the wrong shape are `invalid`, NaN or
    infinite ones `diverged`. The caller holds the autocast context."""
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
