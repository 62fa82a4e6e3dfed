"""Turns an LLM spec string (`hf:smollm2`, `openai:MODEL@URL`, `mutate`, ...) into a backend.

No spec names the tests' scripted backend: they build `agent/llm/scripted.py`'s ScriptedBackend
directly."""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Literal

from deltanas.agent.llm.base import LLMBackend

BackendType = Literal["hf", "openai", "vllm", "mutate"]

ACCEPTED_FORMS = (
    "hf:smollm2 | hf:tinycoder | hf:/path/to/model.gguf | hf:/path/to/hf-model-dir | hf:ORG/NAME (a local folder) | "
    "openai:MODEL@http://HOST:PORT/v1 | vllm:MODEL | mutate"
)


@dataclass(frozen=True)
class LLMSpec:
    type: BackendType
    model: str = ""
    url: str = ""


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"invalid LLM spec {spec!r}: {why}. Accepted forms: {ACCEPTED_FORMS}")


@functools.lru_cache(maxsize=64)
def parse_llm_spec(spec: str) -> LLMSpec:
    """The one parse of a spec string (cached: `LLMConfig.backend` reads it here)."""
    s = spec.strip() if isinstance(spec, str) else ""
    if not s:
        raise _bad(str(spec), "empty")
    if s == "mutate":
        return LLMSpec(type="mutate")
    kind, sep, rest = s.partition(":")
    if not sep or kind not in ("hf", "openai", "vllm"):
        raise _bad(s, f"unknown backend {kind!r}")
    rest = rest.strip()
    if not rest:
        raise _bad(s, f"`{kind}:` needs a model")
    if kind == "openai":
        model, at, url = rest.rpartition("@")
        if not at or not model:
            raise _bad(s, "write the server as openai:MODEL@http://HOST:PORT/v1")
        if not re.match(r"^https?://[^/\s]+", url):
            raise _bad(s, f"server URL {url!r} must start with http:// or https://")
        return LLMSpec(type="openai", model=model, url=url.rstrip("/"))
    if kind == "hf" and re.match(r"^https?://", rest):
        raise _bad(s, "hf: loads local models only (this tool works offline); use openai:MODEL@URL for a server")
    return LLMSpec(type=kind, model=rest)


def make_backend(spec: LLMSpec | str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8, seed: int = 0,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 600.0, max_lora_rank: int = 32,
                 gpu_memory: float = 0.5, seed_requests: bool = False) -> LLMBackend:
    """Build the backend a spec names. Heavy libraries are imported only for the backend in use."""
    if isinstance(spec, str):
        spec = parse_llm_spec(spec)
    if spec.type == "mutate":
        from deltanas.agent.llm.mutate import MutateBackend

        return MutateBackend(seed=seed)
    if spec.type == "hf":
        from deltanas.agent.llm.hf import HFBackend

        return HFBackend(spec.model, device=device, dtype=dtype, batch_size=batch_size, seed=seed)
    if spec.type == "openai":
        from deltanas.agent.llm.openai_compat import OpenAIBackend

        return OpenAIBackend(spec.model, spec.url, api_key=os.environ.get(api_key_env),
                             concurrency=batch_size, timeout_s=timeout_s, seed_requests=seed_requests)
    if spec.type == "vllm":
        from deltanas.agent.llm.vllm_local import VLLMBackend

        return VLLMBackend(spec.model, device=device, batch_size=batch_size, seed=seed, max_lora_rank=max_lora_rank,
                           gpu_memory_utilization=gpu_memory)
    raise ValueError(f"unknown backend type {spec.type!r}")
