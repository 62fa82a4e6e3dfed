"""Prompt rendering: every placeholder resolved, the parent's facts present, and the worked
example in the delta prompt is a real diff that applies to its real example network."""
from __future__ import annotations

import re

import jinja2
import pytest

from deltanas.tools import prompting
from deltanas.tools.diff_write import make_diff

PARENT = '''import torch.nn as nn


def supported_hyperparameters():
    return {'lr', 'momentum'}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_shape[1], 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(out_shape[0]))

    def forward(self, x):
        return self.body(x)
'''

LEFTOVERS = re.compile(r"\{\{|\}\}|\{%|%\}|<context|<added|<removed|\bNone\b|Undefined")


def render(**over):
    kw = dict(parent_source=PARENT, dataset="mnist", in_shape=(1, 1, 28, 28), num_classes=10,
              parent_accuracy=0.9695, goal="improve first-epoch test accuracy")
    kw.update(over)
    return prompting.propose_messages(**kw)


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_propose_carries_the_parent_and_its_facts():
    system, user = render()
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert fenced(text, "python") == [PARENT]
    for fact in ("mnist", "(1, 1, 28, 28)", "10 classes", "96.95%", "improve first-epoch test accuracy",
                 "```diff", "Net.__init__(self, in_shape, out_shape, prm, device)", "train_setup"):
        assert fact in text, fact
    assert "Change only the architecture" in text
    for msg in (system, user):
        assert not LEFTOVERS.search(msg["content"]), LEFTOVERS.search(msg["content"])


def test_unmeasured_parent_and_train_changes_allowed():
    _, user = render(parent_accuracy=None, allow_train_changes=True)
    assert "not measured yet" in user["content"]
    assert "Change only the architecture" not in user["content"]
    assert "training code" in user["content"]


def test_parent_without_final_newline_still_closes_its_fence():
    _, user = render(parent_source=PARENT.rstrip("\n"))
    assert fenced(user["content"], "python") == [PARENT]


def test_delta_system_prompt_shows_a_real_worked_example_not_placeholders():
    system = prompting.system_message("delta")["content"]
    (example_src,) = fenced(system, "python")
    (example_diff,) = fenced(system, "diff")
    assert example_src == prompting.EXAMPLE_SOURCE
    assert example_diff == make_diff(prompting.EXAMPLE_SOURCE, prompting.EXAMPLE_IMPROVED)
    assert "-            nn.ReLU(),\n+            nn.BatchNorm2d(16),\n+            nn.GELU(),\n" in example_diff
    assert re.search(r"^@@$", example_diff, flags=re.M)  # its old lines occur once: a bare @@ places it
    assert "where its first two lines also occur elsewhere" in system  # and when they are needed
    apply_mod = pytest.importorskip("deltanas.tools.diff_apply")
    result = apply_mod.apply_model_output(prompting.EXAMPLE_SOURCE, "```diff\n" + example_diff + "```\n")
    assert result.ok, result.error
    assert result.source == prompting.EXAMPLE_IMPROVED


def test_full_mode_asks_for_the_whole_file():
    system, user = render(mode="full")
    assert "```python fence" in system["content"] and "```diff" not in system["content"]
    assert "whole new model.py" in user["content"] and "```diff" not in user["content"]
    assert fenced(user["content"], "python") == [PARENT]


def test_repair_feeds_the_error_back():
    msg = prompting.repair_message(code="context_mismatch", message="hunk 1 does not match model.py",
                                   hint="Nearest lines in model.py:\n   12 |         nn.ReLU(),",
                                   attempt=1, max_attempts=2)
    assert msg["role"] == "user"
    text = msg["content"]
    for fact in ("context_mismatch", "hunk 1 does not match model.py", "   12 |         nn.ReLU(),",
                 "Attempt 1 of 2", "```diff"):
        assert fact in text, fact
    assert not LEFTOVERS.search(text)
    full = prompting.repair_message(code="syntax_error", message="line 3: invalid syntax", hint="",
                                    attempt=2, max_attempts=2, mode="full")["content"]
    assert "```python" in full and "```diff" not in full and "\n\n\n" not in full


def test_strict_templates_and_modes():
    with pytest.raises(jinja2.UndefinedError):
        prompting.render("propose.j2", dataset="mnist")
    with pytest.raises(ValueError, match="mode"):
        prompting.system_message("patch")
    with pytest.raises(ValueError, match="mode"):
        render(mode="diff")


def test_prompt_without_the_parent_is_compact():
    # SmolLM2-135M has an 8k context; the real token count is checked in the slow SmolLM2 test.
    system, user = render(parent_source="")
    chars = len(system["content"]) + len(user["content"])
    assert chars < 2400, chars  # about 4 characters per token for this kind of text
