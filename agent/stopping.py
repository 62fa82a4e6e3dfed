"""How a run stops. The first Ctrl-C sets `Deps.stop`, checked before any new work starts, so
the work in flight finishes (a drain); the second calls `Deps.kill`, which cancels generation
and kills the sandboxes, so the work in flight ends too."""
from __future__ import annotations


class RunStopped(Exception):
    """Raised where new work would start after a stop was requested, and by work that a kill cut short."""
