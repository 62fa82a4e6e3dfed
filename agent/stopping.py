"""How a run is told to stop: one event, checked before any new work starts."""
from __future__ import annotations


class RunStopped(Exception):
    """Raised where new work would start after a stop was requested."""
