"""The backends without a model: spec parsing and the factory, the scripted replay backend,
and the rule-based `mutate` backend whose diffs must apply like a model's."""
from __future__ import annotations

import ast
import re

import pytest

from deltanas.agent.llm.base import LLMBackend, Prompt, Sampling
from deltanas.agent.llm.factory import LLMSpec, make_backend, parse_llm_spec
from deltanas.agent.llm.mutate import MutateBackend
from deltanas.agent.llm.scripted import ScriptedBackend, ScriptExhausted
from deltanas.tools import prompting

from support import LEARN_COMPACT, TRAIN_SETUP_SINGLE_QUOTED

SOURCE = '''import torch
import torch.nn as nn


def supported_hyperparameters():
    return {'lr', 'momentum'}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[1], 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, out_shape[0])

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))

''' + TRAIN_SETUP_SINGLE_QUOTED + "\n" + LEARN_COMPACT


def prompt(mode: str = "delta", source: str = SOURCE) -> Prompt:
    msgs = prompting.propose_messages(parent_source=source, dataset="mnist", in_shape=(1, 1, 28, 28),
                                      num_classes=10, parent_accuracy=0.9, mode=mode)
    return Prompt(messages=msgs, base_source=source, mode=mode)


# --- spec parsing and the factory ---------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("hf:smollm2", LLMSpec("hf", "smollm2")),
    ("hf:tinycoder", LLMSpec("hf", "tinycoder")),
    ("hf:/models/tiny.gguf", LLMSpec("hf", "/models/tiny.gguf")),
    ("hf:/models/qwen-0.5b", LLMSpec("hf", "/models/qwen-0.5b")),
    ("hf:Qwen/Qwen2.5-Coder-0.5B-Instruct", LLMSpec("hf", "Qwen/Qwen2.5-Coder-0.5B-Instruct")),
    ("openai:deepseek-coder@http://127.0.0.1:8000/v1", LLMSpec("openai", "deepseek-coder", "http://127.0.0.1:8000/v1")),
    ("openai:org/model@https://llm.example:443/v1/", LLMSpec("openai", "org/model", "https://llm.example:443/v1")),
    ("vllm:Qwen/Qwen2.5-Coder-7B-Instruct", LLMSpec("vllm", "Qwen/Qwen2.5-Coder-7B-Instruct")),
    ("mutate", LLMSpec("mutate")),
    ("  mutate ", LLMSpec("mutate")),
])
def test_parse_accepted_forms(spec, expected):
    assert parse_llm_spec(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "   ", "gpt4", "hf:", "hf:  ", "openai:model", "openai:@http://x/v1", "openai:m@localhost:8000",
    "ollama:llama3", "vllm:", "hf:https://huggingface.co/x/y", "scripted", "mutate:x",
])
def test_parse_rejects_with_the_accepted_forms(spec):
    with pytest.raises(ValueError) as e:
        parse_llm_spec(spec)
    msg = str(e.value)
    assert "Accepted forms" in msg and "openai:MODEL@http://HOST:PORT/v1" in msg and "hf:smollm2" in msg


def test_factory_builds_the_light_backends_and_explains_the_missing_ones():
    b = make_backend("mutate", seed=3)
    assert isinstance(b, MutateBackend) and b.seed == 3 and isinstance(b, LLMBackend)
    o = make_backend("openai:m@http://127.0.0.1:9/v1", batch_size=2, timeout_s=5)
    assert o.name == "openai" and o.base_url == "http://127.0.0.1:9/v1" and o.timeout_s == 5
    o.close()
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=re.escape("pip install 'deltanas[vllm]'")):
            make_backend("vllm:some/model")
    with pytest.raises(ValueError, match="unknown backend type 'scripted'"):  # built directly, never from a spec
        make_backend(LLMSpec("scripted"))
    with pytest.raises(FileNotFoundError, match="not an alias"):
        make_backend("hf:/no/such/model-dir")


# --- scripted -----------------------------------------------------------------------------

def test_scripted_replays_in_order_and_records_calls():
    b = ScriptedBackend(["one", "two", "three"])
    assert isinstance(b, LLMBackend)
    p1, p2, p3 = prompt(), prompt("full"), prompt()
    out = b.generate([p1, p2], Sampling())
    assert [c.text for c in out] == ["one", "two"]
    assert b.generate([p3], Sampling())[0].text == "three"
    assert b.calls == [[p1, p2], [p3]]
    assert b.remaining == 0


def test_scripted_exhaustion_is_an_error_not_a_cycle():
    b = ScriptedBackend(["only"])
    with pytest.raises(ScriptExhausted, match="1 completion\\(s\\) left but was asked for 2"):
        b.generate([prompt(), prompt()], Sampling())
    assert b.generate([prompt()], Sampling())[0].text == "only"  # a refused batch consumes nothing
    with pytest.raises(ScriptExhausted):
        b.generate([prompt()], Sampling())


def test_scripted_function_per_prompt():
    b = ScriptedBackend(lambda p: f"mode={p.mode} turns={len(p.messages)}")
    out = b.generate([prompt(), prompt("full")], Sampling())
    assert [c.text for c in out] == ["mode=delta turns=2", "mode=full turns=2"]
    assert out[0].completion_tokens == 2
    b.load_adapter("/tmp/adapter")
    assert b.adapters == ["/tmp/adapter"]


# --- mutate -------------------------------------------------------------------------------

def protected(source: str) -> list[str]:
    return [ast.dump(n) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef) and n.name in ("supported_hyperparameters", "train_setup", "learn")]


def test_mutate_answers_with_a_fenced_diff_that_applies():
    b = MutateBackend(seed=0)
    out = b.generate([prompt() for _ in range(12)], Sampling())
    assert len(out) == 12
    mutations = set()
    apply_mod = pytest.importorskip("deltanas.tools.diff_apply")
    for c in out:
        (diff,) = re.findall(r"```diff\n(.*?)```", c.text, flags=re.S)
        assert re.match(r"--- a/model.py\n\+\+\+ b/model.py\n@@(\n| -\d)", diff), diff
        mutations.add(c.meta["mutation"])
        res = apply_mod.apply_model_output(SOURCE, c.text)
        assert res.ok, (res.error, c.text)
        compile(res.source, "model.py", "exec")
        assert res.source != SOURCE and protected(res.source) == protected(SOURCE)
    assert len(mutations) >= 3


def test_mutate_full_mode_returns_the_whole_file():
    out = MutateBackend(seed=1).generate([prompt("full")], Sampling())[0]
    (code,) = re.findall(r"```python\n(.*?)```", out.text, flags=re.S)
    assert code != SOURCE and protected(code) == protected(SOURCE)
    compile(code, "model.py", "exec")
    full = pytest.importorskip("deltanas.tools.full_extract")
    res = full.apply_full_output(SOURCE, out.text)
    assert res.ok, res.error


def test_mutate_is_seeded():
    a = [c.text for c in MutateBackend(seed=5).generate([prompt()] * 4, Sampling())]
    b = [c.text for c in MutateBackend(seed=5).generate([prompt()] * 4, Sampling())]
    c = [c.text for c in MutateBackend(seed=6).generate([prompt()] * 4, Sampling())]
    assert a == b and a != c
    assert len(set(a)) > 1  # each answer draws its own mutation


def test_mutate_without_a_mutable_source_answers_without_a_diff():
    b = MutateBackend()
    out = b.generate([Prompt(messages=[], base_source=""),
                      Prompt(messages=[], base_source="x = 1\n")], Sampling())
    assert [c.meta["error"] for c in out] == ["no_source", "no_mutation"]
    assert all("```" not in c.text for c in out)
    b.load_adapter("/runs/a/adapters/cycle-1")
    assert b.adapters == ["/runs/a/adapters/cycle-1"]
