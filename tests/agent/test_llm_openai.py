"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that speaks
/chat/completions and vLLM's /load_lora_adapter, and plays a server that honours vLLM's
structured outputs, one that ignores them, and one that refuses them."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support import RELU_TO_GELU

from deltanas.agent.llm import openai_compat
from deltanas.agent.llm.base import Prompt, Sampling
from deltanas.agent.llm.openai_compat import OpenAIBackend
from deltanas.agent.stopping import RunStopped
from deltanas.tools.zoo import get_baseline


class FakeServer:
    def __init__(self, delay_s: float = 0.0, fail_first: int = 0, fail_status: int = 503):
        self.delay_s = delay_s
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.answer: str | None = None  # the content of every chat answer; None echoes the last message
        self.finish_reason = "stop"
        self.refuse_structured = False  # answer HTTP 400 to a request that carries `structured_outputs`
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
                if server.refuse_structured and "structured_outputs" in payload:
                    return self._send(400, {"object": "error", "message": "1 validation error: structured_outputs: "
                                                                         "Extra inputs are not permitted"})
                last = payload["messages"][-1]["content"]
                text = f"[{model}] echo: {last}" if server.answer is None else server.answer
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                              "finish_reason": server.finish_reason}],
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


def test_a_cancel_cuts_the_requests_in_flight_at_once(server):
    server.delay_s = 5.0  # a long generation on the server
    b = OpenAIBackend("base-model", server.url, concurrency=4, timeout_s=60)
    got = {}

    def ask():
        try:
            got["answer"] = b.generate([user(f"prompt {i}") for i in range(3)], Sampling())
        except RunStopped as e:
            got["stopped"] = e

    t = threading.Thread(target=ask)
    t.start()
    while server.in_flight < 3 and t.is_alive():
        time.sleep(0.01)
    cancelled = time.monotonic()
    b.cancel()
    t.join(5)
    assert "stopped" in got and time.monotonic() - cancelled < 1, got
    with pytest.raises(RunStopped):  # and nothing new is sent
        b.generate([user("after")], Sampling())
    assert len(server.requests) == 3
    b.close()


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


# --- prefix and grammar ------------------------------------------------------------------------

UNCONSTRAINED = "Sure! Here is a diff that swaps the activation:\n@@\n-nn.ReLU()\n+nn.GELU()\n```"


@pytest.fixture(scope="module")
def lenet_grammar():
    pytest.importorskip("llguidance")
    from deltanas.tools.diff_grammar import accepts, delta_grammar

    g = delta_grammar(get_baseline("lenet").source)
    assert accepts(g.lark, RELU_TO_GELU) and not accepts(g.lark, UNCONSTRAINED)
    return g


def diff_prompt(g, text: str = "edit the net") -> Prompt:
    return Prompt(messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": text}],
                  prefix=g.prefix, grammar=g.lark)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == openai_compat.log.name]


def test_grammar_and_prefix_go_to_vllm_and_the_text_starts_with_the_prefix(server, lenet_grammar, caplog):
    g = lenet_grammar
    server.answer = RELU_TO_GELU
    b = OpenAIBackend("base-model", server.url, concurrency=2)
    assert b.supports_grammar and b.supports_prefix
    out = b.generate([diff_prompt(g, "a"), diff_prompt(g, "b")], Sampling())
    assert [c.text for c in out] == [g.prefix + RELU_TO_GELU] * 2
    assert all(c.meta["constrained"] is True and "grammar_ignored" not in c.meta for c in out)
    assert not b.grammar_ignored and not warnings_of(caplog)
    for req, user_text in zip(sorted(server.requests, key=lambda r: r["messages"][1]["content"]), "ab"):
        assert req["structured_outputs"] == {"grammar": g.lark}
        assert "guided_grammar" not in req  # vLLM >= 0.12 ignores it: sending it would hide nothing
        # the prefix is the final assistant message, which the model continues (no new turn opened)
        assert req["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": user_text},
                                   {"role": "assistant", "content": g.prefix}]
        assert req["continue_final_message"] is True and req["add_generation_prompt"] is False


def test_a_prompt_without_prefix_or_grammar_sends_neither(server):
    out = OpenAIBackend("base-model", server.url, concurrency=1).generate([user("hi")], Sampling())
    req = server.requests[0]
    assert out[0].text == "[base-model] echo: hi" and out[0].meta["constrained"] is False
    assert req["messages"][-1] == {"role": "user", "content": "hi"}
    assert not {"structured_outputs", "continue_final_message", "add_generation_prompt"} & set(req)


def test_an_answer_cut_at_the_token_limit_is_judged_by_what_it_wrote(server, lenet_grammar, caplog):
    g = lenet_grammar
    server.answer, server.finish_reason = RELU_TO_GELU[:70], "length"
    b = OpenAIBackend("base-model", server.url, concurrency=1)
    out = b.generate([diff_prompt(g)], Sampling(max_new_tokens=20))
    assert out[0].text == g.prefix + RELU_TO_GELU[:70] and out[0].meta["constrained"] is True
    assert not b.grammar_ignored and not warnings_of(caplog)
    server.answer = UNCONSTRAINED[:40]  # cut too, but it broke the grammar before the cut
    out = b.generate([diff_prompt(g)], Sampling(max_new_tokens=20))
    assert out[0].meta["constrained"] is False and out[0].meta["grammar_ignored"] is True


def test_a_server_that_ignores_the_grammar_is_caught_once_and_then_sent_prefixes_only(server, lenet_grammar,
                                                                                      caplog):
    g = lenet_grammar
    server.answer = UNCONSTRAINED  # HTTP 200 and free text: what vLLM >= 0.12 does with `guided_grammar`
    b = OpenAIBackend("base-model", server.url, concurrency=1)
    first, second = b.generate([diff_prompt(g, "a"), diff_prompt(g, "b")], Sampling())
    third = b.generate([diff_prompt(g, "c")], Sampling())[0]
    assert b.grammar_ignored
    assert first.meta["grammar_ignored"] is True and first.meta["constrained"] is False
    assert all(c.meta["constrained"] is False and "grammar_ignored" not in c.meta for c in (second, third))
    assert all(c.text == g.prefix + UNCONSTRAINED for c in (first, second, third))
    assert "structured_outputs" in server.requests[0]
    for req in server.requests[1:]:  # no grammar any more, but still the prefix to continue
        assert "structured_outputs" not in req
        assert req["messages"][-1] == {"role": "assistant", "content": g.prefix}
        assert req["continue_final_message"] is True
    warned = warnings_of(caplog)
    assert len(warned) == 1
    assert "ignored the structured-output grammar" in warned[0] and "structured_outputs" in warned[0]
    assert "an older vLLM or another server may not support" in warned[0]


def test_concurrent_answers_that_break_the_grammar_warn_once(server, lenet_grammar, caplog):
    server.answer, server.delay_s = UNCONSTRAINED, 0.2
    b = OpenAIBackend("base-model", server.url, concurrency=4)
    out = b.generate([diff_prompt(lenet_grammar, str(i)) for i in range(4)], Sampling())
    assert server.max_in_flight >= 3  # they were all in flight with the grammar when the first came back
    assert b.grammar_ignored and len(warnings_of(caplog)) == 1
    assert sum(bool(c.meta.get("grammar_ignored")) for c in out) == 1
    assert all(c.meta["constrained"] is False for c in out)


def test_a_server_that_refuses_structured_outputs_is_asked_again_without_them(server, lenet_grammar, caplog):
    g = lenet_grammar
    server.answer, server.refuse_structured = UNCONSTRAINED, True
    b = OpenAIBackend("base-model", server.url, concurrency=1)
    first = b.generate([diff_prompt(g, "a")], Sampling())[0]
    second = b.generate([diff_prompt(g, "b")], Sampling())[0]
    assert [("structured_outputs" in r, r["messages"][1]["content"]) for r in server.requests] == [
        (True, "a"), (False, "a"), (False, "b")]
    assert all(r["messages"][-1] == {"role": "assistant", "content": g.prefix} for r in server.requests)
    assert first.text == second.text == g.prefix + UNCONSTRAINED
    assert first.meta["grammar_ignored"] is True and first.meta["constrained"] is False
    assert second.meta["constrained"] is False and "grammar_ignored" not in second.meta
    assert b.grammar_ignored
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "refused the structured-output grammar (HTTP 400" in warned[0]
    assert "Extra inputs are not permitted" in warned[0]


def test_a_400_that_is_not_about_the_grammar_is_an_error_and_keeps_the_grammar(server, lenet_grammar, caplog):
    server.fail_first, server.fail_status = 2, 400  # refused with and without the grammar alike
    b = OpenAIBackend("base-model", server.url, concurrency=1)
    with pytest.raises(RuntimeError, match="answered HTTP 400"):
        b.generate([diff_prompt(lenet_grammar)], Sampling())
    assert len(server.requests) == 2 and not b.grammar_ignored and not warnings_of(caplog)
    server.answer = RELU_TO_GELU
    assert b.generate([diff_prompt(lenet_grammar)], Sampling())[0].meta["constrained"] is True
    assert "structured_outputs" in server.requests[-1]
