"""The per-parent diff grammar admits exactly the diffs the applier accepts, shaped like edits."""
from __future__ import annotations

import random
import time

import pytest
from support import RELU_TO_GELU

from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.diff_grammar import (
    DIFF_PREFIX,
    DiffShape,
    GrammarError,
    accepts,
    delta_grammar,
    full_grammar,
    layer_lines,
    site_window,
)
from deltanas.tools.diff_write import make_diff
from deltanas.tools.mutator import NoMutation, mutate_source
from deltanas.tools.zoo import get_baseline, list_baselines

pytest.importorskip("llguidance")


def answer(diff: str) -> str:
    """A make_diff diff as the model's answer after the pre-filled prefix."""
    assert diff.startswith("--- a/model.py\n+++ b/model.py\n")
    return diff[len("--- a/model.py\n+++ b/model.py\n"):] + "```"


def test_every_mutator_diff_of_every_zoo_network_is_admitted_and_applies():
    checked = 0
    for b in list_baselines():
        g = delta_grammar(b.source)
        rng = random.Random(b.name)
        for _ in range(12):
            try:
                _, new = mutate_source(b.source, rng)
            except NoMutation:
                continue
            text = answer(make_diff(b.source, new))
            assert accepts(g.lark, text), (b.name, text)
            res = apply_model_output(b.source, DIFF_PREFIX + text)
            assert res.ok and res.source == new, (b.name, res.error)
            checked += 1
    assert checked >= 8 * len(list_baselines())


LENET = get_baseline("lenet").source


def test_a_plain_edit_is_admitted():
    assert accepts(delta_grammar(LENET).lark, RELU_TO_GELU)


@pytest.mark.parametrize("why, text", [
    ("context not copied", RELU_TO_GELU.replace("padding=2),\n", "padding=3),\n", 1)),
    ("no change at all", "@@\n             nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),\n"
                         "             nn.ReLU(inplace=True),\n```"),
    ("hunks out of order", """@@
             nn.Linear(120, 84),
+            nn.Dropout(0.1),
             nn.ReLU(inplace=True),
@@
             nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
+            nn.BatchNorm2d(16),
             nn.ReLU(inplace=True),
```"""),
    ("hunks overlap", """@@
             nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
-            nn.ReLU(inplace=True),
+            nn.GELU(),
             nn.MaxPool2d(2),
@@
             nn.ReLU(inplace=True),
+            nn.Dropout(0.1),
             nn.MaxPool2d(2),
```"""),
    ("a protected function edited", """@@
     def train_setup(self, prm):
-        self.to(self.device)
+        self.to('cpu')
         self.criteria = (nn.CrossEntropyLoss().to(self.device),)
```"""),
    ("an unclosed answer", RELU_TO_GELU.removesuffix("```")),
    ("a fence inside an added line", RELU_TO_GELU.replace("nn.GELU(),", "nn.GELU(), ```", 1)),
    ("an added line that opens a block", RELU_TO_GELU.replace("+            nn.GELU(),\n", "+            if x:\n", 1)),
    ("unbalanced brackets", RELU_TO_GELU.replace("nn.GELU(),", "nn.GELU(,", 1)),
    ("an assignment among layers", RELU_TO_GELU.replace("nn.GELU(),", "x = nn.GELU(),", 1)),
    ("a number among layers", RELU_TO_GELU.replace("nn.GELU(),", "1,", 1)),
    ("a def among layers", RELU_TO_GELU.replace("nn.GELU(),", "def act(x): 2,", 1)),
    ("a layer without its comma", RELU_TO_GELU.replace("nn.GELU(),", "nn.GELU()", 1)),
    ("a bare @@ where the anchor repeats", """@@
             nn.ReLU(inplace=True),
+            nn.Dropout(0.1),
             nn.MaxPool2d(2),
```"""),
])
def test_diffs_the_applier_would_refuse_are_not_admitted(why, text):
    assert not accepts(delta_grammar(LENET).lark, text), why


def test_protected_lines_serve_as_context_but_open_when_train_changes_are_allowed():
    edit = """@@
     def train_setup(self, prm):
-        self.to(self.device)
+        self.to(self.device)
+        self.extra = 1
         self.criteria = (nn.CrossEntropyLoss().to(self.device),)
```"""
    assert not accepts(delta_grammar(LENET).lark, edit)
    assert accepts(delta_grammar(LENET, allow_train_changes=True).lark, edit)


def test_repeated_lines_get_numbered_headers_that_the_applier_places():
    src = LENET
    lines = src.splitlines()
    pools = [i for i, x in enumerate(lines) if x == "            nn.MaxPool2d(2),"]
    at = pools[1]  # (ReLU, MaxPool2d) occurs twice: insert between the second pair
    g = delta_grammar(src)
    assert not accepts(g.lark, f"@@\n {lines[at - 1]}\n+            nn.Dropout(0.1),\n {lines[at]}\n```")
    text = (f"@@ -{at} @@\n {lines[at - 1]}\n+            nn.Dropout(0.1),\n {lines[at]}\n```")
    assert accepts(g.lark, text)
    res = apply_model_output(src, DIFF_PREFIX + text)
    assert res.ok, res.error
    assert res.source.splitlines()[at] == "            nn.Dropout(0.1),"


def test_shape_caps_bound_the_answer():
    g = delta_grammar(LENET, shape=DiffShape(max_hunks=1, max_added=2))
    three = RELU_TO_GELU.replace("+            nn.GELU(),\n", "+            nn.GELU(),\n" * 3, 1)
    assert accepts(g.lark, RELU_TO_GELU.replace("+            nn.GELU(),\n", "+            nn.GELU(),\n" * 2, 1))
    assert not accepts(g.lark, three)
    two_hunks = RELU_TO_GELU.removesuffix("```") + """@@
             nn.Linear(120, 84),
+            nn.Dropout(0.1),
             nn.ReLU(inplace=True),
```"""
    assert not accepts(g.lark, two_hunks)
    assert accepts(delta_grammar(LENET).lark, two_hunks)


def test_a_site_window_admits_edits_only_there():
    lines = LENET.splitlines()
    relu = lines.index("            nn.ReLU(inplace=True),")
    assert relu in layer_lines(LENET)
    g = delta_grammar(LENET, sites=site_window(relu))
    assert accepts(g.lark, RELU_TO_GELU)
    elsewhere = """@@
             nn.Linear(120, 84),
+            nn.Dropout(0.1),
             nn.ReLU(inplace=True),
```"""
    assert accepts(delta_grammar(LENET).lark, elsewhere)
    assert not accepts(g.lark, elsewhere)


def test_a_narrowed_grammar_does_not_let_a_group_put_back_what_it_removed():
    lines = LENET.splitlines()
    relu = lines.index("            nn.ReLU(inplace=True),")
    g = delta_grammar(LENET, sites=site_window(relu))
    same = RELU_TO_GELU.replace("+            nn.GELU(),", "+            nn.ReLU(inplace=True),", 1)
    assert accepts(g.lark, RELU_TO_GELU) and not accepts(g.lark, same)
    both = RELU_TO_GELU.replace("+            nn.GELU(),", "+            nn.GELU(),\n+            nn.ReLU(inplace=True),", 1)
    assert not accepts(g.lark, both)


@pytest.mark.parametrize("name", [b.name for b in list_baselines()])
def test_every_layer_line_of_every_zoo_network_gets_a_grammar_that_compiles(name):
    # convmixer's `padding=kernel_size // 2` once broke the narrowed grammar's regex delimiter
    src = get_baseline(name).source
    for line in layer_lines(src):
        g = delta_grammar(src, sites=site_window(line))
        assert not accepts(g.lark, "```")  # compiles (a grammar error raises), and admits no empty answer


def test_layer_lines_are_inside_the_networks_code_only():
    lines = LENET.splitlines()
    picked = [lines[i].strip() for i in layer_lines(LENET)]
    assert "nn.MaxPool2d(2)," in picked and "return self.classifier(self.features(x))" in picked
    assert not any(p.startswith(("def ", "class ", "import", "super(", ")")) for p in picked)
    assert "self.optimizer.step()" not in picked  # learn is protected
    assert "self.optimizer.step()" in [lines[i].strip() for i in layer_lines(LENET, allow_train_changes=True)]


@pytest.mark.parametrize("source, code", [
    ("", "empty_parent"),
    ("def broken(:\n    pass\n", "parent_syntax"),
    ("x = 1\r\ny = 2\rz = 3\n", "unsupported_line"),
])
def test_parents_the_grammar_cannot_serve_are_typed_errors(source, code):
    with pytest.raises(GrammarError) as e:
        delta_grammar(source)
    assert e.value.code == code


def test_a_site_list_with_no_editable_gap_is_a_typed_error():
    protected_body = [x.strip() for x in LENET.splitlines()].index("self.optimizer.zero_grad()")
    with pytest.raises(GrammarError) as e:
        delta_grammar(LENET, sites=[protected_body])
    assert e.value.code == "no_edit_site"


def test_odd_characters_in_the_parent_survive_the_grammar():
    src = (
           '"""Ünïcödé docstring with "quotes", \\\\ backslashes and a ``` fence."""\n'
           "import torch.nn as nn\n\n\nclass Net(nn.Module):\n"
           "    def __init__(self, in_shape, out_shape, prm, device):\n        super().__init__()\n"
           "        self.tag = 'tab\\there \\\\ \"q\" ✓ {}'\n"
           "        self.body = nn.Linear(4, 4)\n\n    def forward(self, x):\n        return self.body(x)\n")
    g = delta_grammar(src)
    text = ("@@\n         self.tag = 'tab\\there \\\\ \"q\" ✓ {}'\n"
            "+        self.extra = nn.Identity()\n         self.body = nn.Linear(4, 4)\n```")
    assert accepts(g.lark, text)
    res = apply_model_output(src, DIFF_PREFIX + text)
    assert res.ok, res.error


def test_a_two_thousand_line_parent_is_served_at_sampled_sites_and_refused_whole():
    block = "".join(f"        self.l{k} = nn.Linear(8, 8)\n" for k in range(1990))
    src = ("import torch.nn as nn\n\n\nclass Net(nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
           "        super().__init__()\n" + block + "\n    def forward(self, x):\n        return self.l0(x)\n")
    started = time.perf_counter()
    with pytest.raises(GrammarError) as e:
        delta_grammar(src)
    assert e.value.code == "too_many_sites"
    at = src.splitlines().index("        self.l1500 = nn.Linear(8, 8)")
    g = delta_grammar(src, sites=site_window(at))
    text = ("@@\n         self.l1499 = nn.Linear(8, 8)\n-        self.l1500 = nn.Linear(8, 8)\n"
            "+        self.l1500 = nn.Linear(8, 16)\n         self.l1501 = nn.Linear(8, 8)\n```")
    assert accepts(g.lark, text)
    assert g.rules < 100  # only what the site reaches
    assert time.perf_counter() - started < 60  # a guard against a hang, not a benchmark


def test_full_mode_grammar_wants_one_fence_with_a_net_class():
    g = full_grammar()
    assert accepts(g.lark, "import torch\nclass Net(nn.Module):\n    pass\n```")
    assert not accepts(g.lark, "import torch\nclass Other(nn.Module):\n    pass\n```")
    assert not accepts(g.lark, "class Net(nn.Module):\n    pass\n")
