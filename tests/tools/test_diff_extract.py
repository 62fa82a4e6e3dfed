"""Finding the diff in raw model text: fences, tags, prose, CRLF, headers,
placeholder echoes and replies with no diff at all."""
from __future__ import annotations

import pytest

from deltanas.tools.diff_errors import DiffCode, DiffError
from deltanas.tools.diff_extract import extract_diff, fenced_blocks, find_placeholder

HUNK = """\
@@ -14,2 +14,3 @@
         self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
+        self.bn1 = nn.BatchNorm2d(32)
         self.relu = nn.ReLU()
"""
DIFF = "--- a/model.py\n+++ b/model.py\n" + HUNK


def ok(text: str) -> str:
    out = extract_diff(text)
    assert not isinstance(out, DiffError), out
    return out


def err(text: str) -> DiffError:
    out = extract_diff(text)
    assert isinstance(out, DiffError), out
    return out


@pytest.mark.parametrize(
    "text",
    [
        DIFF,
        f"```diff\n{DIFF}```",
        f"```\n{DIFF}```",
        f"```python\n{DIFF}```",
        f"~~~udiff\n{DIFF}~~~",
        f"<delta>{DIFF}</delta>",
        f"<delta>\n```diff\n{DIFF}```\n</delta>",
        f"<delta>\n{DIFF}",  # the model stopped before closing the tag
        f"Here is my proposal.\n\n```diff\n{DIFF}```\n\nIt adds BatchNorm after conv1.\n",
        f"Here is my proposal:\n{DIFF}\nIt adds BatchNorm after conv1.\n",
        f"````markdown\nThe diff:\n```diff\n{DIFF}```\n````",
        f"```diff\n{DIFF}",  # unclosed fence: ran out of tokens
    ],
    ids=["plain", "diff", "untagged", "python-tag", "tilde", "delta", "delta-fence", "delta-unclosed",
         "prose-fenced", "prose-unfenced", "nested-fence", "unclosed-fence"],
)
def test_extracts_the_same_clean_diff(text):
    assert ok(text) == DIFF


def test_crlf_is_normalised():
    assert ok(f"```diff\r\n{DIFF}```\r\n".replace("\n", "\r\n").replace("\r\r", "\r")) == DIFF


def test_hunks_only_and_no_hunk_header():
    assert ok(f"```diff\n{HUNK}```") == HUNK
    body = HUNK.split("\n", 1)[1]
    # Body lines alone in a diff fence become one hunk with no line hint.
    assert ok(f"```diff\n{body}```") == "@@\n" + body


def test_blank_context_line_gets_its_space_back():
    text = "```diff\n@@ -1,3 +1,4 @@\n import torch\n\n+import math\n import torch.nn as nn\n```"
    assert ok(text) == "@@ -1,3 +1,4 @@\n import torch\n \n+import math\n import torch.nn as nn\n"


def test_unprefixed_context_line_inside_a_fence_is_kept():
    # "    def" reads as a context line indented by three; content matching copes.
    text = "```diff\n@@\nclass Net(nn.Module):\n+    '''A CNN.'''\n    def __init__(self, in_shape, out_shape, prm, device):\n```"
    assert ok(text) == "@@\n class Net(nn.Module):\n+    '''A CNN.'''\n    def __init__(self, in_shape, out_shape, prm, device):\n"


def test_trailing_blank_lines_and_markdown_rule_end_the_hunk():
    assert ok(f"{DIFF}\n\n---\nHope this helps!\n- more ideas later") == DIFF


def test_two_fenced_blocks_are_joined_and_repeats_dropped():
    second = "@@ -36,2 +37,2 @@\n     def forward(self, x):\n-        x = 1\n+        x = 2\n"
    text = f"First:\n```diff\n{DIFF}```\nThen:\n```diff\n{second}```\nAgain:\n```diff\n{DIFF}```"
    assert ok(text) == DIFF + second


def test_headerless_blocks_are_kept_apart():
    a = " a = 1\n+b = 2\n"
    b = " c = 3\n-d = 4\n"
    assert ok(f"```diff\n{a}```\n```diff\n{b}```") == "@@\n" + a + "@@\n" + b


def test_extraction_is_idempotent():
    once = ok(f"Sure!\n```diff\n{DIFF}```")
    assert ok(once) == once


def test_git_headers_pass_through():
    text = "diff --git a/model.py b/model.py\nindex 83db48f..bf269f4 100644\n" + DIFF
    assert ok(text) == text


def test_binary_and_rename_markers_are_diffs_not_prose():
    assert ok("Binary files a/model.py and b/model.py differ") == "Binary files a/model.py and b/model.py differ\n"
    assert "rename from" in ok("diff --git a/x.py b/model.py\nrename from x.py\nrename to model.py\n")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t\n",
        "I would add a BatchNorm layer after the first convolution and raise dropout.",
        "Ideas:\n- add BatchNorm\n- raise dropout to 0.3\n+ maybe a residual\n",
        "```python\nclass Net(nn.Module):\n    def forward(self, x):\n        return x\n```",
    ],
    ids=["empty", "blank", "prose", "bullets", "python-only"],
)
def test_no_diff(text):
    e = err(text)
    assert e.code == DiffCode.NO_DIFF
    # The hint shows a concrete example, not placeholders.
    assert "```diff" in e.hint and "+        self.bn1 = nn.BatchNorm2d(32)" in e.hint
    assert "<" not in e.hint


@pytest.mark.parametrize(
    "text",
    [
        "```diff\n@@ -1,3 +1,4 @@\n <context line from baseline>\n+<added line>\n <context line from baseline>\n```",
        "```diff\n@@ -1,3 +1,3 @@\n <context line from baseline>\n-<removed line>\n+        self.bn = nn.BatchNorm2d(32)\n```",
        "```diff\n--- a/<path>\n+++ b/<path>\n@@ -1 +1 @@\n-x = 1\n+x = 2\n```",
        "```diff\n@@ -1,3 +1,3 @@\n ...\n-...\n+...\n```",
        "```diff\n@@ -1,3 +1,3 @@\n     def forward(self, x):\n+        x = self.bn(x)\n         # ... existing code ...\n```",
        "<delta>\n@@ -L,N +L,N @@\n < unchanged line >\n+<your code here>\n</delta>",
    ],
    ids=["context+added", "removed", "path", "ellipsis-hunk", "elision", "spaced"],
)
def test_placeholder_echo(text):
    e = err(text)
    assert e.code == DiffCode.PLACEHOLDER_ECHO
    assert "placeholder" in e.hint.lower() and "```diff" in e.hint


def test_real_code_that_looks_like_markup_is_not_a_placeholder():
    assert find_placeholder(["        html = '<div>'", "<div>", "        return x  # <- logits", "    ..."]) is None
    assert find_placeholder(["<added line>"]) == "<added line>"


def test_fenced_blocks_follow_the_closing_rule():
    blocks = fenced_blocks("````\n```diff\n+x\n```\n````\n```py\ncode\n```\n~~~\nopen")
    assert [(b.tag, b.body, b.closed) for b in blocks] == [
        ("", "```diff\n+x\n```", True),
        ("py", "code", True),
        ("", "open", False),
    ]


def test_a_hunk_left_outside_the_fence_is_not_dropped():
    second = "@@ -36,2 +37,2 @@\n     def forward(self, x):\n-        x = 1\n+        x = 2\n"
    text = f"```diff\n{DIFF}```\nAnd in forward:\n{second}\nDone."
    assert ok(text) == DIFF + second


def test_delta_inside_a_code_line_is_not_a_tag():
    diff = DIFF.replace("+        self.bn1 = nn.BatchNorm2d(32)", "+        self.tag = '<delta>'")
    assert ok(diff) == diff
