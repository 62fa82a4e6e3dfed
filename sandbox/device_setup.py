"""The job's device, readied before the clock starts: made current, held to its share of GPU
memory, and warmed up, so that `train_seconds` measures the candidate's training alone.
"""
from __future__ import annotations

from deltanas.sandbox.outcome import log
from deltanas.sandbox.speed import mixed_precision


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
