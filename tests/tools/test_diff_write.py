"""The diff writer: its headers, its context, and the bare `@@` it writes where a hunk's anchor is unique."""
from __future__ import annotations

from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.diff_write import make_diff


def test_make_diff_format():
    old = "a\nb\nc\nd\ne\nf\ng\nh\n"
    new = old.replace("d\n", "D\n")
    diff = make_diff(old, new, path="pkg/model.py")
    assert diff.splitlines() == ["--- a/pkg/model.py", "+++ b/pkg/model.py", "@@", " c", "-d", "+D", " e"]
    numbered = make_diff(old, new, path="pkg/model.py", numbered=True)
    assert numbered.splitlines()[2:] == ["@@ -3,3 +3,3 @@", " c", "-d", "+D", " e"]
    wide = make_diff(old, new, context=3, numbered=True)
    assert wide.splitlines()[2] == "@@ -1,7 +1,7 @@" and wide.count("\n ") == 6  # three context lines either side
    assert make_diff(old, old) == ""
    no_eol = make_diff("x = 1\ny = 2", "x = 1\ny = 3")
    assert no_eol.endswith("+y = 3\n\\ No newline at end of file\n")


def test_make_diff_numbers_only_the_hunks_whose_anchor_repeats():
    # A hunk's anchor is its context line and the line after it, as the answer grammar writes it:
    # "x\ny" occurs once, so its hunk goes bare; "p\nq" occurs twice (the file repeats that block),
    # so that hunk keeps its first old line's number, which tells the places apart
    old = "x\ny\nx\n1\n2\n3\n4\np\nq\np\n5\n6\n7\np\nq\np\n"
    new = old.replace("y\n", "Y\n").replace("5\n6\n7\np\nq\n", "5\n6\n7\np\nQ\n")
    diff = make_diff(old, new)
    assert [l for l in diff.splitlines() if l.startswith("@@")] == ["@@", "@@ -14 @@"]
    assert apply_model_output(old, f"```diff\n{diff}```\n").source == new
    bare = "\n".join("@@" if l.startswith("@@") else l for l in diff.splitlines()) + "\n"
    assert apply_model_output(old, f"```diff\n{bare}```\n").error.code == "ambiguous_match"  # why it keeps them
