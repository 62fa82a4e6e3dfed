"""The sandbox image: `deltanas sandbox build`.

Two ways to an image:

- online (an image registry answers): sandbox/Dockerfile, a PyTorch base image
  with this project pip-installed; Python comes from the image;
- offline: a minimal Debian rootfs made by debootstrap from the host's own apt
  mirror and release, imported as an image labelled `deltanas.python=host`.
  The docker backend then mounts the host's Python, virtualenv and the
  deltanas.sandbox folder read-only into it (the same release as the host, so
  the host's interpreter finds the C libraries it was built against).

Which sandbox a run gets, and `deltanas sandbox check`, are sandbox/choose.py's.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from deltanas.sandbox.docker import DEFAULT_IMAGE, PYTHON_LABEL, _client, _one_line, image_available

DEBOOTSTRAP_TIMEOUT_S = 900


class ImageBuildError(RuntimeError):
    """The sandbox image could not be built; the message says what to do."""


# -- offline -------------------------------------------------------------------------------------------------------

def host_release() -> str:
    """The host's Debian/Ubuntu codename, e.g. "bookworm"."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError as e:
        raise ImageBuildError("cannot read /etc/os-release to pick the rootfs release") from e
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    if not m:
        raise ImageBuildError("/etc/os-release names no VERSION_CODENAME; the offline image needs a Debian "
                              "or Ubuntu host")
    return m.group(1)


def apt_mirror() -> str:
    """The first main archive URI in the host's apt sources (one-line or deb822 format)."""
    found: list[str] = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            found += [u for line in re.findall(r"^URIs:\s*(.+)$", text, re.M) for u in line.split()]
        else:
            found += re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)
    main = [u for u in found if "security" not in u]
    if not main:
        raise ImageBuildError("no apt mirror found in /etc/apt/sources.list{,.d}; the offline image is built "
                              "with debootstrap from the host's mirror")
    return main[0]


def build_offline_image(tag: str = DEFAULT_IMAGE, client=None, force: bool = False) -> str:
    """Builds `tag` from a debootstrap minbase rootfs of the host's release. Does nothing when
    `tag` exists (unless `force`). Needs root and debootstrap. Returns the tag."""
    c = _client(client)
    if not force and image_available(tag, c):
        return tag
    if os.geteuid() != 0:
        raise ImageBuildError("building the offline image needs root (debootstrap); run "
                              "`sudo deltanas sandbox build`")
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed: apt-get install -y debootstrap")
    release, mirror = host_release(), apt_mirror()
    with tempfile.TemporaryDirectory(prefix="deltanas-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", release, str(rootfs), mirror]
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=DEBOOTSTRAP_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise ImageBuildError(f"debootstrap took over {DEBOOTSTRAP_TIMEOUT_S} s") from e
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            raise ImageBuildError(f"{' '.join(cmd)} failed: {' | '.join(tail)}")
        # The host's Python is mounted under /root/.pyenv and the like: the job's
        # non-root user must be able to walk through /root to reach it.
        (rootfs / "root").chmod(0o755)
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(rootfs, arcname=".")
        try:
            c.api.import_image_from_file(str(archive), repository=tag.split(":")[0],
                                         tag=tag.split(":")[1] if ":" in tag else "latest",
                                         changes=[f"LABEL {PYTHON_LABEL}=host", "CMD [\"/bin/sh\"]"])
        except Exception as e:  # noqa: BLE001
            raise ImageBuildError(f"docker import of the rootfs failed: {_one_line(e)}") from None
    if not image_available(tag, c):
        raise ImageBuildError(f"docker import finished but {tag!r} is not listed")
    return tag


# -- online --------------------------------------------------------------------------------------------------------

def project_root() -> Path:
    """The source checkout holding pyproject.toml and sandbox/Dockerfile."""
    here = Path(__file__).resolve().parent
    root = here.parent
    if not (root / "pyproject.toml").is_file() or not (here / "Dockerfile").is_file():
        raise ImageBuildError(f"no source checkout around {here}: the online image builds from the project's "
                              f"Dockerfile; use the offline build instead")
    return root


def build_online_image(tag: str = DEFAULT_IMAGE, client=None) -> str:
    """Builds `tag` from sandbox/Dockerfile (pulls the PyTorch base image). Returns the tag."""
    c = _client(client)
    try:
        c.images.build(path=str(project_root()), dockerfile="sandbox/Dockerfile", tag=tag, rm=True,
                       forcerm=True, pull=False)
    except ImageBuildError:
        raise
    except Exception as e:  # noqa: BLE001 - BuildError, APIError (no registry), ...
        raise ImageBuildError(f"building {tag!r} from sandbox/Dockerfile failed: {_one_line(e)}") from None
    return tag


def build_image(tag: str = DEFAULT_IMAGE, mode: str = "auto", client=None) -> tuple[str, str]:
    """mode "online" | "offline" | "auto" (online, then offline when no registry answers).
    Returns (tag, what was done)."""
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"mode {mode!r}: use auto, online or offline")
    c = _client(client)
    if mode in ("auto", "online"):
        try:
            return build_online_image(tag, c), "built online from sandbox/Dockerfile"
        except ImageBuildError as e:
            if mode == "online":
                raise
            why = str(e)
    else:
        why = "offline build asked for"
    existed = image_available(tag, c)
    build_offline_image(tag, c)
    done = "already present" if existed else "built offline from a debootstrap rootfs"
    return tag, f"{done} ({why})" if mode == "auto" else done
