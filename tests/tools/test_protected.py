"""check_source: no-op, syntax errors with a located hint, and the protected
training contract (supported_hyperparameters, Net.train_setup, Net.learn)."""
from __future__ import annotations

import ast

import pytest

from deltanas.tools.diff_errors import DiffCode
from deltanas.tools.diff_grammar import protected_lines
from deltanas.tools.protected import (PROTECTED_KEYS, PROTECTED_NAMES, check_source, protected_definitions,
                                      protected_functions)

from support import LEARN, TRAIN_SETUP

BASE = '''\
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.conv = nn.Conv2d(in_shape[1], 16, 3, padding=1)
        self.fc = nn.Linear(16 * in_shape[2] * in_shape[3], out_shape[0])

''' + TRAIN_SETUP + "\n" + LEARN + '''
    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))
'''

ARCH_CHANGE = BASE.replace("16, 3, padding=1)", "32, 3, padding=1)").replace("Linear(16 *", "Linear(32 *")


def test_protected_names():
    assert PROTECTED_NAMES == ("supported_hyperparameters", "train_setup", "learn")


def test_one_walk_names_what_the_check_and_the_grammar_protect():
    source = ("def supported_hyperparameters():\n    return {'lr'}\n\n"
              "class Net:\n    def learn(self, data):\n        pass\n\n    def forward(self, x):\n        return x\n\n"
              "Net.train_setup = None\n")
    tree = ast.parse(source)
    found = protected_definitions(tree)
    assert tuple(found) == PROTECTED_KEYS and all(found.values())
    assert [f.name for f in protected_functions(tree)] == ["supported_hyperparameters", "learn"]
    assert protected_lines(source) == ({0, 1, 4, 5}, {1, 5})


def test_architecture_change_is_fine():
    assert check_source(BASE, ARCH_CHANGE) is None


def test_no_op_ignores_trailing_whitespace():
    same = "\n".join(line + "  " for line in BASE.split("\n")) + "\n\n"
    for new in (BASE, same):
        e = check_source(BASE, new)
        assert e is not None and e.code == DiffCode.NO_OP and e.hint


@pytest.mark.parametrize(
    "new",
    [
        BASE.replace("        return self.fc", "          return self.fc"),
        BASE.replace("        self.device = device\n", "        self.device = device  # where to train\n"),
        BASE.replace('{"lr", "momentum"}', "{'lr', 'momentum'}"),
    ],
    ids=["reindent", "comment", "quotes"],
)
def test_comment_or_layout_only_change_is_a_no_op(new):
    e = check_source(BASE, new)
    assert e is not None and e.code == DiffCode.NO_OP and "comments or layout" in e.message


def test_indentation_that_breaks_the_code_is_a_syntax_error():
    e = check_source(BASE, BASE.replace("        self.device = device", "          self.device = device"))
    assert e is not None and e.code == DiffCode.SYNTAX_ERROR


def test_syntax_error_hint_shows_line_and_caret():
    broken = ARCH_CHANGE.replace("self.fc = nn.Linear(", "self.fc = nn.Linear((")
    e = check_source(BASE, broken)
    assert e.code == DiffCode.SYNTAX_ERROR
    lineno = broken.split("\n").index(next(x for x in broken.split("\n") if "Linear((" in x)) + 1
    assert f"line {lineno}" in e.message or f"line {lineno + 1}" in e.message
    assert "Linear((" in e.hint and "^" in e.hint and "|" in e.hint


def test_indentation_error_is_a_syntax_error():
    broken = ARCH_CHANGE.replace("        self.device = device\n", "        self.device = device\n            self.x = 1\n")
    e = check_source(BASE, broken)
    assert e.code == DiffCode.SYNTAX_ERROR and "IndentationError" in e.message


def test_nul_byte_and_lone_surrogate_are_syntax_errors():
    assert check_source(BASE, ARCH_CHANGE + "x = 1\0\n").code == DiffCode.SYNTAX_ERROR
    assert check_source(BASE, ARCH_CHANGE + 'x = "\ud800"\n').code == DiffCode.SYNTAX_ERROR


@pytest.mark.parametrize(
    ("new", "name", "verb"),
    [
        (BASE.replace("self.train()", "self.train(True)"), "Net.learn", "changes"),
        (BASE.replace("            self.optimizer.step()\n", ""), "Net.learn", "changes"),
        (BASE.replace("momentum=prm[\"momentum\"]", "momentum=0.99"), "Net.train_setup", "changes"),
        (BASE.replace('{"lr", "momentum"}', '{"lr"}'), "supported_hyperparameters", "changes"),
        (BASE.replace("    def learn(self, train_data):", "    def learn_old(self, train_data):"), "Net.learn", "removes"),
        (BASE[: BASE.index("    def train_setup")] + BASE[BASE.index("    def learn"):], "Net.train_setup", "removes"),
        (BASE + "\n\nNet.learn = lambda self, data: None\n", "Net.learn", "changes"),
        (BASE + "\n\nsupported_hyperparameters = lambda: set()\n", "supported_hyperparameters", "changes"),
        (BASE.replace("    def forward(self, x):", "    def learn(self, train_data):\n        pass\n\n    def forward(self, x):"), "Net.learn", "changes"),
    ],
    ids=["learn-body", "learn-line-removed", "train-setup", "hyperparameters", "learn-renamed",
         "train-setup-deleted", "monkeypatch", "rebind-hyperparameters", "learn-redefined"],
)
def test_protected_region(new, name, verb):
    e = check_source(BASE, new)
    assert e is not None and e.code == DiffCode.PROTECTED_REGION
    assert name in e.message and verb in e.message
    assert name in e.hint and "architecture" in e.hint
    assert check_source(BASE, new, allow_train_changes=True) is None


def test_comments_and_layout_inside_learn_may_change():
    new = ARCH_CHANGE.replace("        self.train()\n", "        # put layers in training mode\n        self.train( )\n")
    assert new != ARCH_CHANGE
    assert check_source(BASE, new) is None


def test_adding_a_protected_function_the_base_lacks_is_a_change():
    base = BASE[: BASE.index("    def train_setup")] + BASE[BASE.index("    def forward"):]
    assert "learn" not in base and check_source(base, base.replace("16, 3", "8, 3")) is None
    e = check_source(base, BASE)
    assert e.code == DiffCode.PROTECTED_REGION and "adds" in e.message
    assert check_source(base, BASE, allow_train_changes=True) is None


def test_syntax_is_checked_even_when_train_changes_are_allowed():
    e = check_source(BASE, BASE.replace("self.train()", "self.train("), allow_train_changes=True)
    assert e.code == DiffCode.SYNTAX_ERROR
