"""Which sandbox a run's candidates get: Docker where a daemon answers and its image exists (or
where it is demanded), else the process sandbox. Plain values in, a `Sandbox` out; the agent
builds one per run, and each Ray actor one for itself. `select_backend` is the one place that
turns `sandbox = "auto" | "docker" | "process"` into a backend and a reason; `check` reports it
for `deltanas sandbox check`."""
from __future__ import annotations

import tempfile
from pathlib import Path

from deltanas.sandbox.base import Sandbox
from deltanas.sandbox.docker import DEFAULT_IMAGE, DockerUnavailable, docker_available, image_available


def sandbox_for(kind: str, work_root: Path, *, image: str, warm: bool, max_idle: int) -> Sandbox:
    """The sandbox `kind` ("auto", "docker" or "process") gives on this machine. Raises
    `DockerUnavailable` where Docker is demanded and cannot run."""
    chosen, _why = select_backend(kind, image)
    if chosen == "docker":
        from deltanas.sandbox.docker import DockerSandbox

        return DockerSandbox(work_root, image=image, warm=warm, max_idle=max_idle)
    from deltanas.sandbox.process import ProcessSandbox

    return ProcessSandbox(work_root, warm=warm, max_idle=max_idle)


def select_backend(requested: str = "auto", image: str = DEFAULT_IMAGE) -> tuple[str, str]:
    """("docker" | "process", why). Raises DockerUnavailable when "docker" is demanded
    and cannot be had."""
    if requested not in ("auto", "docker", "process"):
        raise ValueError(f"sandbox {requested!r}: use auto, docker or process")
    if requested == "process":
        return "process", "the process sandbox was asked for"
    ok, detail = docker_available()
    if ok and image_available(image):
        return "docker", f"{detail}; image {image} is present"
    why = detail if not ok else f"image {image} is missing (build it with `deltanas sandbox build`)"
    if requested == "docker":
        raise DockerUnavailable(f"sandbox 'docker' was asked for, but {why}")
    return "process", f"falling back to the process sandbox: {why}"


def check(requested: str = "auto", image: str = DEFAULT_IMAGE) -> dict:
    """What `deltanas sandbox check` prints: the sandbox in force, its isolation, and why."""
    ok, detail = docker_available()
    present = ok and image_available(image)
    out: dict = {"requested": requested, "docker": {"available": ok, "detail": detail},
                 "image": {"tag": image, "present": present, "python": None}}
    try:
        kind, reason = select_backend(requested, image)
    except DockerUnavailable as e:
        out.update(sandbox=None, reason=str(e), isolation="none: the run would refuse to start")
        return out
    with tempfile.TemporaryDirectory(prefix="deltanas-check-") as tmp:
        if kind == "docker":
            from deltanas.sandbox.docker import DockerSandbox

            sb = DockerSandbox(Path(tmp), image=image)
            out["image"]["python"] = sb.python_from
        else:
            from deltanas.sandbox.process import ProcessSandbox

            sb = ProcessSandbox(Path(tmp))
        try:
            out.update(sandbox=kind, reason=reason, isolation=sb.isolation(),
                       layers=sb.layers() if hasattr(sb, "layers") else None)
        finally:
            sb.close()
    return out
