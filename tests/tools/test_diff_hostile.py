"""Adversarial inputs to diff extraction and application. Each case asserts
the exact error code, and that a failed diff yields no source at all, or that a
successful one changed exactly the intended lines and nothing else."""
from __future__ import annotations

import time

import pytest

from deltanas.tools.diff_apply import ApplyResult, apply_diff, apply_model_output
from deltanas.tools.diff_errors import DiffCode

from support import LEARN, TRAIN_SETUP, changed_lines

BASE = '''\
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum", "dropout"}


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.stem = nn.Conv2d(in_shape[1], 32, 3, padding=1)
        self.block1 = Block(32)
        self.block2 = Block(32)
        self.dropout = nn.Dropout(prm["dropout"])
        self.fc = nn.Linear(32, out_shape[0])

''' + TRAIN_SETUP + "\n" + LEARN + '''
    def forward(self, x):
        x = self.stem(x)
        x = self.block1(x)
        x = self.block1(x)
        x = x.mean((2, 3))
        x = self.dropout(x)
        return self.fc(x)
'''

HUNK = """\
@@ -23,3 +23,4 @@
         self.block1 = Block(32)
+        self.block3 = Block(32)
         self.block2 = Block(32)
"""


def headers(old: str, new: str | None = None) -> str:
    return f"--- {old}\n+++ {old if new is None else new}\n"


def failed(r: ApplyResult, code: DiffCode) -> None:
    assert r.error is not None and r.error.code == code, r.error
    assert not r.ok and r.source is None
    assert r.error.message and r.error.hint
    assert r.to_json()["code"] == code.value


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/model.py",
        "a/../model.py",
        "../../model.py",
        "b/sub/../../../model.py",
        "a/..\\..\\model.py",
        "C:\\model.py",
        "c:/model.py",
        "\\\\server\\share\\model.py",
        "~/model.py",
        "model.py\x00.txt",
        "mo\x1bdel.py",
        "\u202eyp.ledom",
        "a/mod\u200bel.py",
        '"a/mod\\tel.py"',
        "a/model\u2028.py",
    ],
    ids=["etc", "root", "dotdot", "dotdot2", "deep-dotdot", "backslash-dotdot", "drive", "drive-slash",
         "unc", "home", "nul", "escape", "rtl-override", "zero-width", "quoted-escape", "line-separator"],
)
@pytest.mark.parametrize("where", ["old", "new", "both", "git"])
def test_unsafe_paths(path, where):
    if where == "git":
        diff = f"diff --git a/model.py {path}\n" + headers("a/model.py", "b/model.py") + HUNK
    else:
        old = path if where in ("old", "both") else "a/model.py"
        new = path if where in ("new", "both") else "b/model.py"
        diff = headers(old, new) + HUNK
    failed(apply_diff(BASE, diff), DiffCode.UNSAFE_PATH)
    failed(apply_model_output(BASE, f"```diff\n{diff}```"), DiffCode.UNSAFE_PATH)


def test_carriage_return_inside_a_path_is_unsafe_even_with_crlf_lines():
    diff = ("--- a/mo\rdel.py\n+++ b/model.py\n" + HUNK).replace("\n", "\r\n")
    failed(apply_model_output(BASE, diff), DiffCode.UNSAFE_PATH)
    # A plain CRLF diff is fine: the '\r' of the line end never reaches the path.
    ok = apply_model_output(BASE, (headers("a/model.py", "b/model.py") + HUNK).replace("\n", "\r\n"))
    assert ok.ok and changed_lines(BASE, ok.source) == ["+        self.block3 = Block(32)"]


@pytest.mark.parametrize(
    "diff",
    [
        headers("a/model.py", "b/model.py") + HUNK + headers("a/utils.py", "b/utils.py") + "@@ -1 +1 @@\n-x = 1\n+x = 2\n",
        headers("a/utils.py", "b/utils.py") + "@@ -1 +1 @@\n-x = 1\n+x = 2\n" + headers("a/model.py", "b/model.py") + HUNK,
        headers("a/train.py", "b/train.py") + HUNK + headers("a/model.py", "b/model.py") + HUNK,
    ],
    ids=["second-file-foreign", "first-file-foreign", "two-files"],
)
def test_foreign_paths(diff):
    failed(apply_diff(BASE, diff), DiffCode.FOREIGN_PATH)


@pytest.mark.parametrize(
    "old, new",
    [("a/train.py", "b/train.py"), ("a/src/model.py", "b/src/model.py"), ("a/model.py", "b/other.py"),
     ("a/modèl.py", "b/modèl.py"), ("a/mоdel.py", "b/mоdel.py"), ("baseline.py", "improved.py")],
    ids=["other", "subdir", "renamed-new", "accent", "homoglyph", "paper"],
)
def test_a_diff_of_one_file_is_a_diff_of_the_target_whatever_its_name(old, new):
    # The applier edits the target's text and nothing else, so the name a one-file diff gives it
    # changes nothing; the paper's prompt asks for `--- baseline.py` / `+++ improved.py`.
    r = apply_diff(BASE, headers(old, new) + HUNK)
    assert r.ok and changed_lines(BASE, r.source) == ["+        self.block3 = Block(32)"]


def test_the_papers_answer_applies_as_its_prompt_asks_for_it():
    text = f"Here is the improved network.\n<delta>\n{headers('baseline.py', 'improved.py')}{HUNK}</delta>\nDone."
    r = apply_model_output(BASE, text)
    assert r.ok and changed_lines(BASE, r.source) == ["+        self.block3 = Block(32)"]


@pytest.mark.parametrize("path", ["model.py", "a/model.py", "./model.py", "b/./model.py", "a/model.py\t2024-05-01 10:00:00"])
def test_accepted_spellings_of_the_target(path):
    r = apply_diff(BASE, headers(path) + HUNK)
    assert r.ok and changed_lines(BASE, r.source) == ["+        self.block3 = Block(32)"]


def test_nested_target_path_is_accepted_when_it_is_the_target():
    r = apply_diff(BASE, headers("a/nets/model.py", "b/nets/model.py") + HUNK, target="nets/model.py")
    assert r.ok
    two = headers("a/other/model.py", "b/other/model.py") + HUNK + headers("a/nets/model.py", "b/nets/model.py") + HUNK
    failed(apply_diff(BASE, two, target="nets/model.py"), DiffCode.FOREIGN_PATH)


# ---------------------------------------------------------------- file operations


@pytest.mark.parametrize(
    ("diff", "code"),
    [
        ("diff --git a/model.py b/model.py\nBinary files a/model.py and b/model.py differ\n", DiffCode.BINARY),
        ("diff --git a/model.py b/model.py\nindex 1a2b3c4..5d6e7f8 100644\nGIT binary patch\nliteral 12\nTcmZ?l\n", DiffCode.BINARY),
        ("diff --git a/model.py b/model.py\nnew file mode 120000\n--- /dev/null\n+++ b/model.py\n@@ -0,0 +1 @@\n+/etc/passwd\n", DiffCode.SYMLINK),
        ("diff --git a/model.py b/model.py\nold mode 100644\nnew mode 120000\n", DiffCode.SYMLINK),
        ("diff --git a/x.py b/model.py\nsimilarity index 100%\nrename from x.py\nrename to model.py\n", DiffCode.RENAME),
        ("diff --git a/model.py b/model.py\nsimilarity index 90%\ncopy from model.py\ncopy to model.py\n", DiffCode.RENAME),
        ("diff --git a/model.py b/model.py\ndeleted file mode 100644\n--- a/model.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-import torch\n", DiffCode.RENAME),
        ("--- /dev/null\n+++ b/model.py\n@@ -0,0 +1 @@\n+import torch\n", DiffCode.RENAME),
        ("diff --git a/model.py b/model.py\nnew file mode 100644\n" + headers("a/model.py", "b/model.py") + HUNK, DiffCode.RENAME),
        ("diff --git a/model.py b/model.py\nold mode 100644\nnew mode 100755\n", DiffCode.RENAME),
    ],
    ids=["binary", "git-binary", "symlink-new", "symlink-mode", "rename", "copy", "delete", "dev-null", "new-file", "mode"],
)
def test_file_operations_are_refused(diff, code):
    failed(apply_diff(BASE, diff), code)
    failed(apply_model_output(BASE, f"Here:\n```diff\n{diff}```"), code)


# ---------------------------------------------------------------- sizes and empties


def test_huge_input_is_refused_before_any_work():
    huge = "```diff\n" + HUNK + "+# " + "x" * 250_000 + "\n```"
    start = time.perf_counter()
    failed(apply_model_output(BASE, huge), DiffCode.TOO_LARGE)
    failed(apply_diff(BASE, huge), DiffCode.TOO_LARGE)
    assert time.perf_counter() - start < 0.25  # refused on its length alone: no parsing


def test_result_over_the_limit_is_refused():
    diff = HUNK.replace("+        self.block3 = Block(32)\n", "+        self.block3 = Block(32)\n" + "+        # padding padding\n" * 40)
    limit = len(BASE) + 200
    assert len(diff) < limit
    failed(apply_diff(BASE, diff, max_bytes=limit), DiffCode.TOO_LARGE)
    assert apply_diff(BASE, diff).ok


@pytest.mark.parametrize("text", ["", " ", "\n\n\n", "\r\n", "```diff\n```", "<delta></delta>", "```\n\n```"])
def test_empty_input(text):
    failed(apply_model_output(BASE, text), DiffCode.NO_DIFF)


@pytest.mark.parametrize(
    "text",
    [
        "I think adding a third residual block would help.",
        "Plan:\n- add a block\n- widen the stem\n+ keep dropout\n\nThat's it.",
        "```python\nself.block3 = Block(32)\n```",
        "@ -1 +1 @\nnot a hunk",
    ],
)
def test_prose_only(text):
    failed(apply_model_output(BASE, text), DiffCode.NO_DIFF)


def test_pathological_text_is_handled_in_linear_time():
    for junk in ("<" * 190_000, "@@ -" * 45_000, "```\n" * 45_000, "+" * 190_000, "<delta>" * 25_000, "\n \n-\n+" * 45_000):
        start = time.perf_counter()
        r = apply_model_output(BASE, junk)
        assert not r.ok and r.source is None
        assert time.perf_counter() - start < 2.0, junk[:10]


# ---------------------------------------------------------------- matching


def test_ambiguous_context():
    # block1 appears twice in forward; without a usable line hint this is ambiguous.
    diff = "@@ -1000,2 +1000,3 @@\n         x = self.block1(x)\n+        x = self.block2(x)\n"
    failed(apply_diff(BASE, diff), DiffCode.AMBIGUOUS_MATCH)
    r = apply_diff(BASE, "@@\n         x = self.block1(x)\n+        x = self.block2(x)\n")
    failed(r, DiffCode.AMBIGUOUS_MATCH)
    assert "44" in r.error.hint and "45" in r.error.hint
    far = "@@ -200,1 +200,2 @@\n         x = self.block1(x)\n+        x = self.block2(x)\n"
    failed(apply_diff(BASE, far), DiffCode.AMBIGUOUS_MATCH)


def test_ambiguity_resolved_by_a_plausible_hint_only():
    diff = "@@ -45,1 +45,2 @@\n         x = self.block1(x)\n+        x = self.block2(x)\n"
    r = apply_diff(BASE, diff)
    assert r.ok
    assert "        x = self.block1(x)\n        x = self.block1(x)\n        x = self.block2(x)\n" in r.source
    assert changed_lines(BASE, r.source) == ["+        x = self.block2(x)"]


def test_context_that_matches_nothing_quotes_the_nearest_lines():
    diff = (
        "@@ -50,3 +50,3 @@\n"
        "     def forward(self, x):\n"
        "-        x = self.stem_conv(x)\n"
        "+        x = torch.relu(self.stem_conv(x))\n"
        "         x = self.block1(x)\n"
    )
    r = apply_diff(BASE, diff)
    failed(r, DiffCode.CONTEXT_MISMATCH)
    assert "x = self.stem(x)" in r.error.hint  # what the source has
    assert "x = self.stem_conv(x)" in r.error.hint  # what the model expected
    assert "lines 42-44" in r.error.hint  # where to look


def test_elided_context_gets_a_specific_hint():
    diff = "@@\n     def forward(self, x):\n     ...\n-        return self.fc(x)\n+        return self.fc(x) * 2\n"
    r = apply_diff(BASE, diff)
    failed(r, DiffCode.CONTEXT_MISMATCH)
    assert "'...'" in r.error.hint


def test_a_hunk_overlapping_a_previous_one():
    diff = (
        "@@ -22,2 +22,2 @@\n"
        "         self.stem = nn.Conv2d(in_shape[1], 32, 3, padding=1)\n"
        "-        self.block1 = Block(32)\n"
        "+        self.block1 = Block(32) if True else None\n"
        "@@ -23,2 +23,2 @@\n"
        "         self.block1 = Block(32)\n"
        "-        self.block2 = Block(32)\n"
        "+        self.block2 = nn.Identity()\n"
    )
    r = apply_diff(BASE, diff)
    failed(r, DiffCode.CONTEXT_MISMATCH)
    assert "overlaps" in r.error.message and "hunk 2" in r.error.message


def test_the_same_hunk_twice_is_an_overlap_not_a_double_apply():
    failed(apply_diff(BASE, HUNK + HUNK), DiffCode.CONTEXT_MISMATCH)


def test_pure_insertion_without_context_is_malformed():
    failed(apply_diff(BASE, "@@ -23,0 +24,1 @@\n+        self.block3 = Block(32)\n"), DiffCode.MALFORMED_HUNK)


def test_headers_without_hunks_are_malformed():
    failed(apply_diff(BASE, headers("a/model.py", "b/model.py")), DiffCode.MALFORMED_HUNK)


# ---------------------------------------------------------------- checks after applying


@pytest.mark.parametrize(
    "hunk",
    [
        "@@\n         x = self.dropout(x)\n-        return self.fc(x)\n+        return self.fc(x\n",
        "@@\n         x = self.dropout(x)\n+      x = x * 2\n         return self.fc(x)\n",
        "@@\n     def forward(self, x):\n-        x = self.stem(x)\n+        x = self.stem(x) +* 2\n",
        "@@\n         x = self.dropout(x)\n+        x = " + "(" * 500 + "x" + ")" * 500 + "\n",
    ],
    ids=["unclosed-paren", "bad-indent", "bad-operator", "deep-nesting"],
)
def test_diffs_that_break_syntax(hunk):
    r = apply_diff(BASE, hunk)
    failed(r, DiffCode.SYNTAX_ERROR)
    assert "line" in r.error.hint


@pytest.mark.parametrize("allow", [False, True])
def test_hunk_that_removes_a_protected_function(allow):
    start = BASE.index("    def learn(")
    end = BASE.index("    def forward(", start)
    removed = BASE[start:end].split("\n")[:-1]
    diff = "@@\n         self.optimizer = torch.optim.SGD(self.parameters(), lr=prm[\"lr\"], momentum=prm[\"momentum\"])\n \n" + "".join(
        f"-{line}\n" for line in removed
    ) + "     def forward(self, x):\n"
    r = apply_diff(BASE, diff, allow_train_changes=allow)
    if allow:
        assert r.ok and r.source == BASE[:start] + BASE[end:]
    else:
        failed(r, DiffCode.PROTECTED_REGION)
        assert "removes Net.learn" in r.error.message


def test_diff_that_only_touches_learn():
    diff = "@@\n             loss.backward()\n+            nn.utils.clip_grad_norm_(self.parameters(), 1.0)\n             self.optimizer.step()\n"
    r = apply_diff(BASE, diff)
    failed(r, DiffCode.PROTECTED_REGION)
    assert "Net.learn" in r.error.hint
    ok = apply_diff(BASE, diff, allow_train_changes=True)
    assert ok.ok and changed_lines(BASE, ok.source) == ["+            nn.utils.clip_grad_norm_(self.parameters(), 1.0)"]


def test_hyperparameter_set_change_is_protected():
    diff = '@@\n def supported_hyperparameters():\n-    return {"lr", "momentum", "dropout"}\n+    return {"lr", "momentum", "dropout", "width"}\n'
    failed(apply_diff(BASE, diff), DiffCode.PROTECTED_REGION)


@pytest.mark.parametrize(
    "diff",
    [
        "@@\n         self.block1 = Block(32)\n-        self.block2 = Block(32)\n+        self.block2 = Block(32)\n",
        "@@\n         self.block1 = Block(32)\n         self.block2 = Block(32)\n",
        "@@\n         self.block1 = Block(32)\n-        self.block2 = Block(32)\n+        self.block2 = Block(32)   \n",
        "@@\n         self.block1 = Block(32)\n+        # a third block could go here\n         self.block2 = Block(32)\n",
    ],
    ids=["remove-readd", "context-only", "trailing-space", "comment-only"],
)
def test_no_op_diff(diff):
    failed(apply_diff(BASE, diff), DiffCode.NO_OP)


# ---------------------------------------------------------------- nesting, unicode, tabs


def test_nested_fences():
    text = f"````markdown\nMy answer:\n\n```diff\n{HUNK}```\n\nBye.\n````\n"
    r = apply_model_output(BASE, text)
    assert r.ok and changed_lines(BASE, r.source) == ["+        self.block3 = Block(32)"]


def test_a_diff_inside_a_diff():
    # The new code holds a diff in a string: its header lines are '+' lines of
    # the outer diff, and must neither start a new file nor be dropped.
    inner = ["EXAMPLE = '''", "--- a/etc/passwd", "+++ b/etc/passwd", "@@ -1 +1 @@", "-root", "+evil", "'''"]
    diff = headers("a/model.py", "b/model.py") + "@@ -1,2 +1,9 @@\n import torch\n" + "".join(
        f"+{line}\n" for line in inner
    ) + " import torch.nn as nn\n"
    for text in (diff, f"```diff\n{diff}```"):
        r = apply_model_output(BASE, text)
        assert r.ok, r.error
        assert changed_lines(BASE, r.source) == [f"+{line}" for line in inner]
        assert r.added == len(inner)


def test_diff_lines_that_look_like_file_headers_inside_a_counted_hunk():
    base = BASE.replace("        return torch.relu", '        """\n-- old\n        """\n        return torch.relu')
    diff = (
        headers("a/model.py", "b/model.py")
        + '@@ -14,4 +14,4 @@\n     def forward(self, x):\n         """\n--- old\n+++ new\n         """\n'
    )
    r = apply_diff(base, diff)
    assert r.ok, r.error
    assert changed_lines(base, r.source) == ["--- old", "+++ new"]


def test_unicode_content():
    diff = (
        "@@\n"
        "         self.fc = nn.Linear(32, out_shape[0])\n"
        "+        self.größe = 32  # Kanäle ✓ — αβγ 日本語\n"
        "+        self.名前 = \"🚀\"\n"
        " \n"
        "     def train_setup(self, prm):\n"
    )
    r = apply_model_output(BASE, f"Voilà ✨\n```diff\n{diff}```\nFertig.")
    assert r.ok, r.error
    assert changed_lines(BASE, r.source) == [
        "+        self.größe = 32  # Kanäle ✓ — αβγ 日本語",
        "+        self.名前 = \"🚀\"",
    ]


def test_lone_surrogate_in_a_line_is_a_syntax_error_not_a_crash():
    failed(apply_diff(BASE, '@@\n         x = self.dropout(x)\n+        s = "\ud800"\n'), DiffCode.SYNTAX_ERROR)


def test_tabs_in_the_source_spaces_in_the_diff():
    base = BASE.replace("    ", "\t")
    diff = (
        "@@\n"
        "     def forward(self, x):\n"
        "         x = self.stem(x)\n"
        "+        if x.shape[1] > 1:\n"
        "+            x = torch.relu(x)\n"
        "         x = self.block1(x)\n"
    )
    r = apply_diff(base, diff)
    assert r.ok, r.error
    assert changed_lines(base, r.source) == ["+\t\tif x.shape[1] > 1:", "+\t\t\tx = torch.relu(x)"]


def test_tabs_in_the_diff_spaces_in_the_source():
    diff = "@@\n \tdef forward(self, x):\n \t\tx = self.stem(x)\n+\t\tx = torch.relu(x)\n \t\tx = self.block1(x)\n"
    r = apply_diff(BASE, diff)
    assert r.ok, r.error
    assert changed_lines(BASE, r.source) == ["+        x = torch.relu(x)"]


def test_failed_application_leaves_no_partial_result():
    # Hunk 1 is fine, hunk 2 does not match: nothing is applied.
    diff = HUNK + "@@\n     def forward(self, x):\n-        x = self.nothing(x)\n+        x = self.stem(x)\n"
    r = apply_diff(BASE, diff)
    failed(r, DiffCode.CONTEXT_MISMATCH)
    assert r.hunks == 2 and r.added == 2 and r.removed == 1


def test_tags_without_a_diff_do_not_hide_one_outside():
    text = f"<delta>\n(your diff goes here)\n</delta>\n```diff\n{HUNK}```"
    r = apply_model_output(BASE, text)
    assert r.ok and changed_lines(BASE, r.source) == ["+        self.block3 = Block(32)"]


@pytest.mark.parametrize("seed", range(8))
def test_random_damage_never_crashes_and_never_passes_bad_code(seed):
    import random

    rng = random.Random(seed)
    good = "```diff\n" + headers("a/model.py", "b/model.py") + HUNK + "@@\n     def forward(self, x):\n-        x = self.stem(x)\n+        x = torch.relu(self.stem(x))\n```"
    alphabet = ["", " ", "+", "-", "@@", "\t", "\r", "\\", "```", "<delta>", "---", "+++ ", "\n", "é", "\x00"]
    for _ in range(60):
        lines = good.split("\n")
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            op = rng.randrange(4)
            if op == 0:
                del lines[i]
            elif op == 1:
                lines.insert(i, rng.choice(lines))
            elif op == 2:
                j = rng.randrange(len(lines[i]) + 1)
                lines[i] = lines[i][:j] + rng.choice(alphabet) + lines[i][j:]
            else:
                lines[i] = lines[i][1:]
        r = apply_model_output(BASE, "\n".join(lines))
        assert isinstance(r, ApplyResult) and r.ok == (r.error is None)
        if r.ok:
            compile(r.source, "model.py", "exec")
            assert r.source != BASE
        else:
            assert r.source is None and r.error.hint


def test_many_hunks_are_refused_quickly():
    many = "".join("@@\n         self.block1 = Block(32)\n" for i in range(3000))
    start = time.perf_counter()
    r = apply_diff(BASE, many)
    failed(r, DiffCode.TOO_LARGE)
    assert "hunks" in r.error.message and time.perf_counter() - start < 1.0


def test_mismatch_hint_stays_cheap_on_a_large_source():
    big = BASE + "".join(f"\n\ndef helper_{i}(x):\n    return x * {i}\n" for i in range(3000))
    diff = "@@\n" + "".join(f" def helper_{i}(y):\n     return y * {i}\n" for i in range(100, 160)) + "+x = 1\n"
    start = time.perf_counter()
    r = apply_diff(big, diff)
    failed(r, DiffCode.CONTEXT_MISMATCH)
    assert "helper_100" in r.error.hint and time.perf_counter() - start < 1.0
