"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that speaks
/chat/completions and vLLM's /load_lora_adapter."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deltanas.agent.llm import openai_compat
from deltanas.agent.llm.base import Prompt, Sampling
from deltanas.agent.llm.openai_compat import OpenAIBackend


class FakeServer:
    def __init__(self, delay_s: float = 0.0, fail_first: int = 0, fail_status: int = 503):
        self.delay_s = delay_s
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.requests: list[dict] = []
        self.adapters: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | str):
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            **payload})
                    failing = server.fail_first > 0
                    server.fail_first -= 1
                if failing:
                    return self._send(server.fail_status, {"error": "overloaded"})
                if self.path == "/v1/chat/completions":
                    return self._chat(payload)
                if self.path == "/v1/load_lora_adapter":
                    return self._lora(payload)
                return self._send(404, {"error": "no route"})

            def _chat(self, payload):
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay_s)
                with server.lock:
                    server.in_flight -= 1
                model = payload["model"]
                if model != "base-model" and model not in server.adapters:
                    return self._send(404, {"error": f"model {model} does not exist"})
                last = payload["messages"][-1]["content"]
                text = f"[{model}] echo: {last}"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": len(last.split()) + 7,
                                           "completion_tokens": len(text.split())}})

            def _lora(self, payload):
                name = payload["lora_name"]
                if name in server.adapters and not payload.get("load_inplace"):
                    return self._send(400, {"message": f"The lora adapter '{name}' has already been loaded."})
                server.adapters[name] = payload["lora_path"]
                self._send(200, f"Success: LoRA adapter '{name}' added successfully.")

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def user(text: str) -> Prompt:
    return Prompt(messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": text}])


def test_batch_runs_concurrently_in_order_with_usage(server):
    server.delay_s = 0.3
    b = OpenAIBackend("base-model", server.url, api_key="k-123", concurrency=4, seed_requests=True)
    started = time.perf_counter()
    out = b.generate([user(f"prompt number {i}") for i in range(4)],
                     Sampling(temperature=0.35, top_k=50, top_p=0.9, max_new_tokens=64, seed=11))
    elapsed = time.perf_counter() - started
    b.close()
    assert [c.text for c in out] == [f"[base-model] echo: prompt number {i}" for i in range(4)]
    assert server.max_in_flight >= 3  # the requests overlapped
    assert elapsed < 4 * 0.3
    assert all(c.prompt_tokens == 10 and c.completion_tokens == 5 for c in out)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k-123"
    assert (req["temperature"], req["top_k"], req["top_p"], req["max_tokens"], req["seed"]) == (0.35, 50, 0.9, 64, 11)
    assert req["messages"][-1]["role"] == "user"


def test_top_k_zero_and_the_seed_are_left_out_by_default(server):
    b = OpenAIBackend("base-model", server.url, concurrency=1)
    b.generate([user("x")], Sampling(top_k=0, seed=7))
    assert "top_k" not in server.requests[0] and "seed" not in server.requests[0]
    assert server.requests[0]["auth"] is None


def test_retries_a_503_then_succeeds(server, monkeypatch):
    monkeypatch.setattr(openai_compat, "_BACKOFF_S", 0.01)
    server.fail_first = 2
    out = OpenAIBackend("base-model", server.url, concurrency=1).generate([user("hi")], Sampling())
    assert out[0].text == "[base-model] echo: hi"
    assert len(server.requests) == 3


def test_gives_up_after_bounded_retries_naming_the_url(server, monkeypatch):
    monkeypatch.setattr(openai_compat, "_BACKOFF_S", 0.01)
    server.fail_first = 10
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:\d+/v1/chat/completions failed after 3 tries.*503"):
        OpenAIBackend("base-model", server.url, concurrency=1).generate([user("hi")], Sampling())
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(server):
    b = OpenAIBackend("no-such-model", server.url, concurrency=1)
    with pytest.raises(RuntimeError, match="HTTP 404.*no-such-model does not exist"):
        b.generate([user("hi")], Sampling())
    assert len(server.requests) == 1


def test_server_down_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(openai_compat, "_BACKOFF_S", 0.01)
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAIBackend("m", f"http://127.0.0.1:{port}/v1", concurrency=1, timeout_s=2)
    with pytest.raises(RuntimeError, match=rf"LLM server at http://127\.0\.0\.1:{port}/v1/chat/completions "
                                           r"failed after 3 tries: .*(refused|Connection)"):
        b.generate([user("hi")], Sampling())


def test_load_adapter_posts_to_vllm_and_switches_the_model(server, tmp_path):
    adapter = tmp_path / "cycle-1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    b = OpenAIBackend("base-model", server.url, concurrency=2)
    b.load_adapter(str(adapter))
    lora = server.requests[-1]
    assert lora["path"] == "/v1/load_lora_adapter"
    assert lora["lora_name"] == "cycle-1" and lora["lora_path"] == str(adapter.resolve())
    assert b.generate([user("hi")], Sampling())[0].text == "[cycle-1] echo: hi"
    # the same name again (a second run against the same server) is replaced in place
    b2 = OpenAIBackend("base-model", server.url, concurrency=1)
    b2.load_adapter(str(adapter))
    assert server.requests[-1].get("load_inplace") is True and b2.model == "cycle-1"


def test_load_adapter_errors(server, tmp_path):
    b = OpenAIBackend("base-model", server.url, concurrency=1)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        b.load_adapter(str(tmp_path / "missing"))
    server.fail_first, server.fail_status = 1, 400
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="refused LoRA adapter.*VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        b.load_adapter(str(tmp_path))
    assert b.model == "base-model"
