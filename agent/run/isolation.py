"""Whether candidates run in a filesystem view of their own, and the rule built on it: no
model-written code runs without one unless the user opts in.

A candidate outside such a view can do whatever the user can: read the dataset cache with
the test labels (and score 100%), read keys under $HOME, write anywhere. Docker, bubblewrap
and Landlock each close that; rlimits, a network namespace or a dropped uid alone do not.
The mutate backend's candidates are derived from the baselines by trusted code, so they may
run without it.

Plain values in and out, and no heavy imports: `deltanas status` and `deltanas report` read
the archive's record through this module.
"""
from __future__ import annotations

import time
from typing import Any

from deltanas.agent.config import ConfigError
from deltanas.agent.llm.factory import LLMSpec

ISOLATION_META = "sandbox:isolation"
"""Archive meta key: a list with one record per session of the run (see `record`), oldest first."""
FS_LAYERS = ("bubblewrap", "landlock")  # the process sandbox's layers that give a filesystem view
OPT_IN_FLAG = "--unsafe-no-isolation"
OPT_IN_KEY = "unsafe_no_isolation = true under [sandbox]"


def fs_isolation(sandbox) -> str | None:
    """None when `sandbox` runs each job in a filesystem view of its own (Docker, bubblewrap or
    Landlock in force), else why it does not, in a phrase."""
    if getattr(sandbox, "name", None) == "docker":
        return None
    layers = getattr(sandbox, "layers", None)
    if layers is not None:
        fs = [layer for layer in layers() if layer["name"] in FS_LAYERS]
        if any(layer["in_force"] for layer in fs):
            return None
        return "; ".join(f"{layer['name']}: {layer['why']}" for layer in fs) or "no filesystem layer in this sandbox"
    if getattr(sandbox, "fs_isolated", False):  # a sandbox that does not say is not isolated
        return None
    return "bubblewrap (bwrap) is missing or cannot start the worker's view here"


def runs_model_code(backend: LLMSpec) -> bool:
    """False for `mutate`, whose candidates (its cold-start cycles' too) the rule-based mutator
    makes from the baselines the user chose."""
    return backend.type != "mutate"


def refusal(missing: str, *, config_key: bool) -> str:
    """The paragraph a refused run or eval prints."""
    opt_in = f"pass {OPT_IN_FLAG}" + (f" or set {OPT_IN_KEY} in the config file" if config_key else "")
    mutate = " (`--llm mutate`, which runs no model-written code, needs neither)" if config_key else ""
    return (f"no filesystem isolation for candidates here ({missing}), so model-written code would run with "
            "your own access: it could read the test labels (and score 100%), your keys and files, and write "
            "anywhere you can. Install bubblewrap (e.g. `sudo apt install bubblewrap`; `bash scripts/install.sh` "
            "does it when run as root) or a Docker engine (then `deltanas sandbox build`); `deltanas sandbox "
            f"check` says what is in force. To run anyway, at your own risk, {opt_in}{mutate}.")


def require(missing: str | None, *, model_code: bool, opted_in: bool, config_key: bool = True) -> None:
    """Raises ConfigError (the `refusal` text) when model-written code would run without a
    filesystem view of its own and the user has not opted in."""
    if missing is not None and model_code and not opted_in:
        raise ConfigError(refusal(missing, config_key=config_key))


def record(sandbox_name: str, description: str, missing: str | None, *, model_code: bool,
           opted_in: bool) -> dict[str, Any]:
    """One session's entry under ISOLATION_META. `unsafe`: model-written code ran without a
    filesystem view of its own (`opted_in` says whether the user asked for that)."""
    return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sandbox": sandbox_name,
            "isolated": missing is None, "missing": missing, "model_code": model_code, "opted_in": opted_in,
            "unsafe": missing is not None and model_code, "description": description}


def describe(records: list[dict[str, Any]] | None) -> str:
    """One line for `deltanas status` and `deltanas report`: the latest session's isolation, and
    whether an earlier one ran model-written code without any."""
    if not records:
        return "isolation: not recorded (the run predates the record)"
    last = records[-1]
    if last["isolated"]:
        line = f"isolation: {last['sandbox']} sandbox, a filesystem view of its own per candidate"
    elif not last["unsafe"]:
        line = (f"isolation: NONE, for the mutate backend's candidates only (made from the baselines by "
                f"trusted code): {last['missing']}")
    elif last["opted_in"]:
        line = (f"isolation: NONE (opted in with {OPT_IN_FLAG} or [sandbox] unsafe_no_isolation): model-written "
                f"code ran with the user's own file access, test labels included: {last['missing']}")
    else:
        line = f"isolation: NONE, and no opt-in recorded: model-written code ran unconfined: {last['missing']}"
    earlier = sum(r["unsafe"] for r in records[:-1])
    if earlier:
        line += f" (and {earlier} earlier session(s) of this run ran model-written code without isolation)"
    return line


def unsafe(records: list[dict[str, Any]] | None) -> bool:
    """Whether any session of the run ran model-written code without isolation."""
    return any(r["unsafe"] for r in records or [])
