"""The run directory: creation, refusal to reuse, resume checks, the frozen config."""
from __future__ import annotations

from pathlib import Path

from deltanas.agent.config import Config, ConfigError, dump_toml, load_config

CONFIG_FILE = "config.toml"
ARCHIVE_FILE = "archive.sqlite"
CHECKPOINT_FILE = "checkpoints.sqlite"
REVIEW_ANSWERS_FILE = "review-answers.json"  # answers typed under search.review, not yet handed to the graph


def create_run_dir(path: Path, cfg: Config, *, dry_run: bool = False) -> Path:
    """A new run directory with the frozen config; refuses one that was used before.
    With `dry_run`, only the refusal checks run."""
    if path.exists() and any(path.iterdir()):
        if (path / CONFIG_FILE).exists() or (path / ARCHIVE_FILE).exists():
            raise ConfigError(f"{path} already holds a run; continue it with `deltanas run --resume {path}` "
                              "or choose another --run-dir")
        raise ConfigError(f"{path} is not empty; choose an empty or new --run-dir")
    if dry_run:
        return path
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("candidates", "adapters", "report"):
        (path / sub).mkdir(exist_ok=True)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(dump_toml(cfg))
    tmp.replace(path / CONFIG_FILE)
    return path


def open_run_dir(path: Path, overrides: dict | None = None) -> Config:
    """The frozen config of an existing run, with the overrides a resume may change."""
    if not path.is_dir():
        raise ConfigError(f"cannot resume {path}: no such run directory")
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"cannot resume {path}: no {CONFIG_FILE} there, so it is not a deltanas run directory")
    return load_config(path / CONFIG_FILE, overrides)


def default_run_dir(cfg: Config, root: Path = Path("runs")) -> Path:
    base = root / cfg.name
    if not base.exists():
        return base
    i = 2
    while (root / f"{cfg.name}-{i}").exists():
        i += 1
    return root / f"{cfg.name}-{i}"
