"""How the worker trains a model on its device: bf16 autocast and channels_last where they pay.

A network with enough work per batch trains under bf16 autocast in channels_last on a GPU that
has bf16 (`choose_speed`); a small one stays in float32, where autocast's casts would only add
kernel launches. On the CPU everything trains in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

# Forward FLOPs per training step from which bf16 and channels_last pay on a GPU. Below it a step
# is bound by kernel launches, and autocast's casts only add to them (bench/proxy_epoch.py).
HEAVY_STEP_FLOPS = 10e9


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
