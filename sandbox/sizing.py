"""How big each candidate's share of the machine is: the device it trains on, checked, and its
part of a GPU's memory. Plain values in and out; the run's config is read on the agent side
(agent/run/build.py). Imports nothing of the package, so that the in-sandbox warm worker can read
`SPARES` from here too."""
from __future__ import annotations

SPARES = 3  # children a warm worker readies ahead of their jobs on a GPU (sandbox/warm.py)
CUDA_CONTEXT_MB = 768  # a job child's own CUDA context and cuDNN/cuBLAS workspaces, outside its share


class SandboxUnfit(ValueError):
    """Settings this machine cannot run; the message is meant for the user as is."""


def check_device(device: str, *, here: bool = True) -> None:
    """`here`: the device must exist on this machine (false under Ray, whose actors may train on
    other nodes: the executor checks the cluster's GPUs instead)."""
    if device == "cpu" or device == "auto":
        return
    head, _, index = device.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise SandboxUnfit(f"device {device!r}: use cpu, cuda or cuda:N")
    if not here:
        return
    import torch

    if not torch.cuda.is_available():
        raise SandboxUnfit(f"device {device!r} asked for, but CUDA is not available on this machine")
    if int(index or 0) >= torch.cuda.device_count():
        raise SandboxUnfit(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")


def gpu_share_mb(device: str, *, workers: int, warm: bool, asked_mb: int | None,
                 total_mb: int | None = None) -> int | None:
    """Each candidate's GPU memory share when `workers` train on `device` at once: `asked_mb`, or
    with several workers an equal part of what their CUDA contexts leave. None: no cap (a CPU, or
    one worker that asked for none). A share that cannot fit is refused. `total_mb`: the card's
    memory, read from it when not given."""
    if not device.startswith("cuda") or (asked_mb is None and workers == 1):
        return asked_mb
    if total_mb is None:
        import torch

        total_mb = torch.cuda.get_device_properties(torch.device(device)).total_memory // 2**20
    # A warm worker on a GPU holds 1 + SPARES CUDA contexts: its running job's, and those of the
    # spare children that ready the next jobs (sandbox/warm.py).
    contexts = workers * (1 + SPARES if warm else 1)
    free = total_mb - contexts * CUDA_CONTEXT_MB
    share = asked_mb if asked_mb is not None else free // workers
    if share <= 0 or share * workers > free:
        raise SandboxUnfit(f"sandbox.workers = {workers} candidates of {share} MB each do not fit on {device} "
                           f"({total_mb} MB, {CUDA_CONTEXT_MB} MB for each of {contexts} CUDA contexts): lower "
                           "sandbox.workers or sandbox.gpu_memory_mb")
    return share
