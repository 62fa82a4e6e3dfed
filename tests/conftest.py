"""Shared fixtures. Tests use the real parts where they run here: SQLite, real
subprocess sandboxes, the real MNIST, the real SmolLM2 / tiny GGUF."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# With --import-mode=importlib test modules cannot import each other, and tests/
# is not on sys.path; shared sources and helpers live in tests/support.py.
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Datasets are cached per test session, never in the user's home."""
    cache = tmp_path_factory.getbasetemp() / "deltanas-cache"
    monkeypatch.setenv("DELTANAS_CACHE", str(cache))
