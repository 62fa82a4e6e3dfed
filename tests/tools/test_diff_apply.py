"""Content-based diff application: correct applications of the diffs models
really send, the result's JSON, full-generation mode, and a property test."""
from __future__ import annotations

import ast
import difflib
import random
import re
import time

import pytest
import unidiff

from deltanas.tools.diff_apply import ApplyResult, apply_diff, apply_model_output
from deltanas.tools.diff_errors import DiffCode
from deltanas.tools.full_extract import apply_full_output

from support import TRAIN_SETUP, changed_lines

# Hunk line numbers below count TRAIN_SETUP's four lines.
BASE = '''\
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum", "dropout"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        channels = in_shape[1]
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(prm["dropout"])
        self.fc = nn.Linear(64 * (in_shape[2] // 4) * (in_shape[3] // 4), out_shape[0])

''' + TRAIN_SETUP + '''
    def learn(self, train_data):
        self.train()
        for inputs, labels in train_data:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            loss = self.criteria[0](self(inputs), labels)
            loss.backward()
            nn.utils.clip_grad_norm_(self.parameters(), 3)
            self.optimizer.step()

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)
'''

# The change most tests make: a BatchNorm after conv1, used in forward.
WITH_BN1 = BASE.replace("        self.relu = nn.ReLU()\n", "        self.bn1 = nn.BatchNorm2d(32)\n        self.relu = nn.ReLU()\n")
WANT = WITH_BN1.replace("self.relu(self.conv1(x))", "self.relu(self.bn1(self.conv1(x)))")

GOOD = """\
--- a/model.py
+++ b/model.py
@@ -14,3 +14,4 @@
         self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
+        self.bn1 = nn.BatchNorm2d(32)
         self.relu = nn.ReLU()
         self.pool = nn.MaxPool2d(2)
@@ -36,3 +37,3 @@
     def forward(self, x):
-        x = self.pool(self.relu(self.conv1(x)))
+        x = self.pool(self.relu(self.bn1(self.conv1(x))))
         x = self.pool(self.relu(self.conv2(x)))
"""


def assert_applied(r: ApplyResult, want: str = WANT) -> None:
    assert r.error is None, r.error
    assert r.ok and r.source == want


# ---------------------------------------------------------------- correct applications


def test_well_formed_diff():
    r = apply_diff(BASE, GOOD)
    assert_applied(r)
    assert (r.added, r.removed, r.hunks) == (2, 1, 2)


@pytest.mark.parametrize(
    "wrap",
    [
        "```diff\n{d}```\n",
        "```\n{d}```\n",
        "```patch\n{d}```",
        "~~~diff\n{d}~~~\n",
        "<delta>\n{d}</delta>",
        "<DELTA>{d}</DELTA>",
        "Here is a small change that adds BatchNorm.\n\n```diff\n{d}```\n\nThis should help convergence.",
        "I'll add batch norm:\n\n{d}\nThat is all.\n",
        "<delta>\n```diff\n{d}```\n</delta>\nDone.",
    ],
    ids=["diff-fence", "bare-fence", "patch-fence", "tilde-fence", "delta", "delta-upper", "prose-fenced", "prose-unfenced", "delta-fence"],
)
def test_wrapped_model_output(wrap):
    assert_applied(apply_model_output(BASE, wrap.format(d=GOOD)))


def test_wrong_counts_and_line_numbers():
    bad = re.sub(r"@@ .* @@", "@@ -200,1 +7,99 @@", GOOD)
    r = apply_model_output(BASE, f"```diff\n{bad}```")
    assert_applied(r)


def test_missing_file_headers():
    hunks_only = GOOD.split("\n", 2)[2]
    assert hunks_only.startswith("@@")
    assert_applied(apply_model_output(BASE, f"```diff\n{hunks_only}```"))


def test_missing_hunk_headers_after_file_header():
    d = """--- a/model.py
+++ b/model.py
         self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
+        self.bn1 = nn.BatchNorm2d(32)
         self.relu = nn.ReLU()
"""
    r = apply_diff(BASE, d)
    assert r.ok
    assert r.source == WITH_BN1


def test_bare_at_at_headers():
    d = GOOD.replace("@@ -14,3 +14,4 @@", "@@ ... @@").replace("@@ -36,3 +37,3 @@", "@@")
    assert_applied(apply_diff(BASE, d))


def test_blank_context_lines_without_leading_space():
    d = """@@ -19,4 +19,4 @@
         self.fc = nn.Linear(64 * (in_shape[2] // 4) * (in_shape[3] // 4), out_shape[0])

     def train_setup(self, prm):
@@ -34,5 +34,5 @@
             self.optimizer.step()

     def forward(self, x):
-        x = self.pool(self.relu(self.conv1(x)))
+        x = self.pool(self.relu(self.conv1(x))) * 2
"""
    r = apply_diff(BASE, d)
    assert r.ok, r.error
    assert r.source == BASE.replace("self.relu(self.conv1(x)))\n", "self.relu(self.conv1(x))) * 2\n")


def test_trailing_whitespace_tolerant_match():
    d = GOOD.replace("padding=1)\n+", "padding=1)   \n+").replace(" def forward(self, x):", " def forward(self, x):\t")
    assert_applied(apply_diff(BASE, d))


def test_indentation_tolerant_match_keeps_source_indentation():
    # The model dedented its hunk by eight spaces; the added line follows the source.
    d = """@@ -14,2 +14,3 @@
 self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
+self.bn1 = nn.BatchNorm2d(32)
 self.relu = nn.ReLU()
"""
    r = apply_diff(BASE, d)
    assert r.ok, r.error
    assert "\n        self.bn1 = nn.BatchNorm2d(32)\n        self.relu = nn.ReLU()\n" in r.source


def test_indentation_tolerant_nested_block_is_reindented():
    d = """@@
 def forward(self, x):
-    x = torch.flatten(x, 1)
+    if x.dim() > 2:
+        x = torch.flatten(x, 1)
"""
    base = BASE.replace(
        "    def forward(self, x):\n        x = self.pool(self.relu(self.conv1(x)))\n        x = self.pool(self.relu(self.conv2(x)))\n",
        "    def forward(self, x):\n",
    )
    r = apply_diff(base, d)
    assert r.ok, r.error
    assert "    def forward(self, x):\n        if x.dim() > 2:\n            x = torch.flatten(x, 1)\n        x = self.dropout(x)\n" in r.source


def test_context_lines_that_lost_their_diff_prefix():
    # Each context line lost one space (the prefix); the '+' line is right.
    d = """```diff
@@
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
+        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
```"""
    r = apply_model_output(BASE, d)
    assert r.ok, r.error
    assert "\n        self.bn1 = nn.BatchNorm2d(32)\n        self.relu = nn.ReLU()\n" in r.source


def test_unprefixed_column_zero_context_line():
    d = "```diff\n@@\nclass Net(nn.Module):\n+    \"\"\"A small CNN.\"\"\"\n    def __init__(self, in_shape, out_shape, prm, device):\n```"
    r = apply_model_output(BASE, d)
    assert r.ok, r.error
    assert r.source == BASE.replace("class Net(nn.Module):\n", 'class Net(nn.Module):\n    """A small CNN."""\n')


def test_hunks_sharing_context_lines():
    d = """@@ -14,2 +14,3 @@
         self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
+        self.bn1 = nn.BatchNorm2d(32)
         self.relu = nn.ReLU()
@@ -15,2 +16,3 @@
         self.relu = nn.ReLU()
+        self.bn2 = nn.BatchNorm2d(64)
         self.pool = nn.MaxPool2d(2)
"""
    r = apply_diff(BASE, d)
    assert r.ok, r.error
    assert "padding=1)\n        self.bn1 = nn.BatchNorm2d(32)\n        self.relu = nn.ReLU()\n        self.bn2 = nn.BatchNorm2d(64)\n        self.pool" in r.source


def test_hunks_out_of_order_still_apply():
    first, second = GOOD.split("@@ -36")
    d = "@@ -36" + second + first.split("\n", 2)[2]
    assert_applied(apply_diff(BASE, d))


def test_crlf_model_output_and_base():
    r = apply_model_output(BASE.replace("\n", "\r\n"), ("```diff\n" + GOOD + "```\n").replace("\n", "\r\n"))
    assert_applied(r)
    assert "\r" not in r.source and "\r" not in r.diff


def test_base_without_final_newline_keeps_it_missing():
    base = BASE.rstrip("\n")
    r = apply_diff(base, GOOD)
    assert r.ok and r.source == WANT.rstrip("\n")


def test_no_newline_marker_on_changed_last_line():
    base = BASE.rstrip("\n")
    d = """--- a/model.py
+++ b/model.py
@@ -40,2 +40,2 @@
         x = self.dropout(x)
-        return self.fc(x)
\\ No newline at end of file
+        return self.fc(x).float()
"""
    r = apply_diff(base, d)
    assert r.ok, r.error
    assert r.source == BASE.replace("return self.fc(x)\n", "return self.fc(x).float()\n")

    d_keep = d + "\\ No newline at end of file\n"
    r = apply_diff(base, d_keep)
    assert r.ok and r.source == base.replace("return self.fc(x)", "return self.fc(x).float()")


def test_wrong_hint_is_ignored_for_unique_match_and_used_for_duplicates():
    base = BASE.replace("        x = self.dropout(x)\n", "        x = self.dropout(x)\n        x = self.dropout(x)\n")
    d = "@@ -{n},1 +{n},2 @@\n         x = self.dropout(x)\n+        x = x * 0.5\n"
    r = apply_diff(base, d.format(n=41))  # the second copy is line 41
    assert r.ok, r.error
    assert r.source == base.replace(
        "        x = self.dropout(x)\n        x = self.dropout(x)\n",
        "        x = self.dropout(x)\n        x = self.dropout(x)\n        x = x * 0.5\n",
    )
    r = apply_diff(base, d.format(n=40))
    assert r.ok and r.source.count("x = self.dropout(x)\n        x = x * 0.5\n        x = self.dropout(x)") == 1


def test_empty_base_accepts_pure_insertion():
    code = "import torch\n\n\nclass Net(torch.nn.Module):\n    pass\n"
    d = "@@ -0,0 +1,5 @@\n" + "".join("+" + line + "\n" for line in code.split("\n")[:-1])
    r = apply_diff("", d)
    assert r.ok and r.source == code


def test_result_json_is_stable():
    ok = apply_diff(BASE, GOOD).to_json()
    assert set(ok) == {"ok", "code", "message", "hint", "added", "removed", "hunks", "diff_lines", "fuzzy"}
    assert ok["ok"] is True and ok["code"] is None and ok["hint"] == "" and ok["fuzzy"] == 0
    assert (ok["added"], ok["removed"], ok["hunks"], ok["diff_lines"]) == (2, 1, 2, 12)
    bad = apply_diff(BASE, GOOD.replace("-        x = self.pool(self.relu(self.conv1(x)))",
                                        "-        x = self.pool(self.act(self.conv1(x)))")).to_json()
    assert bad["ok"] is False and bad["code"] == "context_mismatch" and bad["hint"] and bad["fuzzy"] == 0
    assert set(bad) == set(ok)
    fuzzy = apply_diff(BASE, GOOD.replace("self.relu = nn.ReLU()", "self.act = nn.GELU()")).to_json()
    assert fuzzy["ok"] is True and fuzzy["fuzzy"] == 1 and set(fuzzy) - set(ok) == {"corrected"}


# ---------------------------------------------------------------- the fuzzy tier: wrong context lines


def test_a_wrong_context_line_in_the_middle_is_tolerated_and_the_applied_diff_is_kept():
    r = apply_diff(BASE, GOOD.replace("self.relu = nn.ReLU()", "self.act = nn.GELU()"))
    assert_applied(r)
    assert r.fuzzy == 1 and "self.act" not in r.corrected and "         self.relu = nn.ReLU()" in r.corrected
    again = apply_diff(BASE, r.corrected)  # the applied diff places exactly, with no fuzz
    assert again.ok and again.fuzzy == 0 and again.source == WANT


def test_an_invented_context_line_at_an_end_is_dropped_as_patch_fuzz_does():
    diff = ("@@\n"
            "         self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)\n"
            "+        self.bn1 = nn.BatchNorm2d(32)\n"
            "         self.norm = nn.LayerNorm(32)\n")  # no such line: the next one is self.relu
    r = apply_diff(BASE, diff)
    assert r.ok and r.fuzzy == 1, r.error
    assert changed_lines(BASE, r.source) == ["+        self.bn1 = nn.BatchNorm2d(32)"]
    lines = r.source.splitlines()
    assert lines[lines.index("        self.bn1 = nn.BatchNorm2d(32)") - 1].strip().startswith("self.conv1 =")
    lead = ("@@\n         self.conv0 = nn.Conv2d(3, 3, 1)\n"
            "+        self.bn1 = nn.BatchNorm2d(32)\n         self.relu = nn.ReLU()\n")
    r = apply_diff(BASE, lead)
    assert r.ok and r.fuzzy == 1 and changed_lines(BASE, r.source) == ["+        self.bn1 = nn.BatchNorm2d(32)"]


def test_the_fuzzy_tier_never_removes_a_line_the_diff_did_not_quote():
    # the '-' line is not in the source (self.act), its context is right: no placement at all
    diff = ("@@\n         self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)\n"
            "-        self.act = nn.ReLU()\n+        self.act = nn.GELU()\n         self.pool = nn.MaxPool2d(2)\n")
    r = apply_diff(BASE, diff)
    assert not r.ok and r.error.code == DiffCode.CONTEXT_MISMATCH and r.fuzzy == 0 and r.corrected == ""


def test_the_fuzzy_tier_refuses_what_it_cannot_place_in_one_spot():
    # after dropping the invented first line, the anchor `x = self.pool(...)` could be either of two lines
    twice = BASE.replace("        x = self.pool(self.relu(self.conv2(x)))\n",
                         "        x = self.pool(self.relu(self.conv2(x)))\n        x = self.dropout(x)\n")
    diff = "@@\n         y = invented(x)\n+        x = x * 2\n         x = self.dropout(x)\n"
    assert twice.count("        x = self.dropout(x)\n") == 2
    r = apply_diff(twice, diff)
    assert not r.ok and r.error.code == DiffCode.CONTEXT_MISMATCH, r.source
    # a hunk whose context lines all differ (none copied exactly) is not placed either
    wrong = ("@@\n         self.conv_one = nn.Conv2d(channels, 32, kernel_size=3)\n"
             "+        self.bn1 = nn.BatchNorm2d(32)\n         self.relu_one = nn.ReLU()\n")
    assert apply_diff(BASE, wrong).error.code == DiffCode.CONTEXT_MISMATCH


def test_extracted_diff_is_clean_and_reapplies():
    raw = "Sure:\n```diff\n" + GOOD.replace("\n\n", "\n") + "```\nThanks"
    r = apply_model_output(BASE, raw)
    assert r.ok
    assert r.diff == GOOD
    assert apply_diff(BASE, r.diff).source == r.source


def test_applying_is_fast_on_a_200_line_file():
    extra = "".join(f"        self.extra{i} = nn.Identity()\n" for i in range(160))
    anchor = "        self.dropout = nn.Dropout(prm[\"dropout\"])\n"
    base = BASE.replace(anchor, anchor + extra)
    assert len(base.split("\n")) > 200
    want = WANT.replace(anchor, anchor + extra)
    text = "```diff\n" + GOOD + "```"
    assert apply_model_output(base, text).source == want
    runs = 50
    start = time.perf_counter()
    for _ in range(runs):
        apply_model_output(base, text)
    per_call = (time.perf_counter() - start) / runs
    # A guard against a blow-up (a quadratic search), not a speed target: about 5 ms on a 2-core
    # machine, 11 ms on a loaded one; a blow-up costs seconds.
    assert per_call < 0.050, f"{per_call * 1000:.2f} ms per apply"


# ---------------------------------------------------------------- property test


def _mutate(source: str, rng: random.Random) -> str:
    """A random, syntax-preserving edit of a few lines."""
    lines = source.split("\n")
    statements = [
        i for i, line in enumerate(lines)
        if line.startswith("        ") and line.strip() and not line.rstrip().endswith(":")
    ]
    for _ in range(rng.randint(1, 4)):
        i = rng.choice(statements)
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        op = rng.choice(["number", "insert", "replace", "comment"])
        if op == "number" and re.search(r"\d+", lines[i]):
            lines[i] = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), lines[i], count=1)
        elif op == "insert":
            lines.insert(i + 1, f"{indent}_tmp{rng.randint(0, 999)} = {rng.randint(0, 99)}")
            statements = [j + (j > i) for j in statements]
        elif op == "replace":
            lines[i] = f"{indent}pass"
        else:
            lines[i] += f"  # note {rng.randint(0, 99)}"
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(60))
def test_property_random_edits_round_trip(seed):
    rng = random.Random(seed)
    mutated = _mutate(BASE, rng)
    if ast.dump(ast.parse(mutated)) == ast.dump(ast.parse(BASE)):  # comments only: a no-op
        mutated = mutated.replace("32, kernel_size", "48, kernel_size", 1)
    context = rng.choice([1, 2, 3])
    diff = "".join(difflib.unified_diff(
        BASE.splitlines(True), mutated.splitlines(True), "a/model.py", "b/model.py", n=context
    ))
    r = apply_diff(BASE, diff, allow_train_changes=True)
    assert r.error is None, (r.error, diff)
    assert r.source == mutated

    # unidiff agrees with our parse on well-formed input.
    patch = unidiff.PatchSet(diff)
    assert (r.added, r.removed, r.hunks) == (patch.added, patch.removed, len(patch[0]))

    # The same diff with lying @@ headers, inside prose and a fence.
    liar = re.sub(r"^@@ .* @@$", "@@ -1,1 +1,1 @@", diff, flags=re.M)
    r = apply_model_output(BASE, f"Change:\n```diff\n{liar}```\nDone.", allow_train_changes=True)
    assert r.error is None or r.error.code == DiffCode.AMBIGUOUS_MATCH, (r.error, liar)
    if r.error is None:
        assert r.source == mutated


# ---------------------------------------------------------------- full-generation mode


def test_full_output_takes_the_largest_python_block():
    text = f"Snippet:\n```python\nx = 1\n```\nFull file:\n```python\n{WANT}```\nDone."
    r = apply_full_output(BASE, text)
    assert r.ok and r.source == WANT
    assert (r.added, r.removed, r.hunks) == (2, 1, 2)
    assert r.diff.startswith("--- a/model.py\n+++ b/model.py\n@@")


def test_full_output_whole_text_when_it_is_python():
    r = apply_full_output(BASE, WANT)
    assert r.ok and r.source == WANT


def test_full_output_unclosed_fence_is_taken_to_the_end():
    r = apply_full_output(BASE, f"```python\n{WANT}")
    assert r.ok and r.source == WANT


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("I would add batch norm after the first convolution.", DiffCode.NO_DIFF),
        ("", DiffCode.NO_DIFF),
        (f"```python\n{BASE}```", DiffCode.NO_OP),
        ("```python\n" + WANT.replace("return self.fc(x)", "return self.fc(x") + "```", DiffCode.SYNTAX_ERROR),
        ("```python\n" + WANT.replace("self.train()", "self.train(True)") + "```", DiffCode.PROTECTED_REGION),
        ("```python\n" + WANT.replace("        x = torch.flatten(x, 1)\n", "        # ... rest of the code unchanged\n") + "```", DiffCode.PLACEHOLDER_ECHO),
        ("```python\n" + WANT.replace("        x = self.dropout(x)\n", "        <new layers here>\n") + "```", DiffCode.PLACEHOLDER_ECHO),
        ("x" * 300_001, DiffCode.TOO_LARGE),
    ],
    ids=["prose", "empty", "copy", "syntax", "protected", "elision", "placeholder", "too-large"],
)
def test_full_output_errors(text, code):
    r = apply_full_output(BASE, text)
    assert not r.ok and r.source is None and r.error.code == code
    assert r.error.hint


def test_full_output_allows_train_changes_when_asked():
    new = WANT.replace("self.train()", "self.train(True)")
    assert apply_full_output(BASE, f"```python\n{new}```", allow_train_changes=True).source == new
