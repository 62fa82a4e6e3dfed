"""Which sandbox a run's candidates get: Docker where a daemon answers and its image exists (or
where it is demanded), else the process sandbox. Plain values in, a `Sandbox` out; the agent
builds one per run, and each Ray actor one for itself."""
from __future__ import annotations

from pathlib import Path

from deltanas.sandbox.base import Sandbox


def sandbox_for(kind: str, work_root: Path, *, image: str, warm: bool, max_idle: int) -> Sandbox:
    """The sandbox `kind` ("auto", "docker" or "process") gives on this machine. Raises
    `DockerUnavailable` where Docker is demanded and cannot run."""
    from deltanas.sandbox.image import select_backend

    chosen, _why = select_backend(kind, image)
    if chosen == "docker":
        from deltanas.sandbox.docker import DockerSandbox

        return DockerSandbox(work_root, image=image, warm=warm, max_idle=max_idle)
    from deltanas.sandbox.process import ProcessSandbox

    return ProcessSandbox(work_root, warm=warm, max_idle=max_idle)
