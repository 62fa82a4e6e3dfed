"""Writes the unified diffs this project trains on and shows: the inverse of tools/diff_apply.py.

Hunk headers follow the answer grammar's rule (tools/diff_grammar.py `hunk_header`), so that a
written diff and a constrained answer look alike.
"""
from __future__ import annotations

import difflib
import re

from deltanas.tools.diff_grammar import anchor_counts, hunk_header

# Context lines per hunk side in the diffs this project writes (the system prompt's example, the
# mutator's answers, cold-start and training targets). Hunks are placed by content with the @@ line
# as a hint (tools/diff_apply.py), so one line is enough to place them, and every context line is
# one more line a model must copy exactly. On the zoo it brings a delta answer from about 39% of
# the whole file's tokens to about 28%, and bare @@ lines (make_diff) to about 25% (bench/tokens.py).
DIFF_CONTEXT = 1


def make_diff(old: str, new: str, path: str = "model.py", context: int = DIFF_CONTEXT,
              numbered: bool = False) -> str:
    """A unified diff from `old` to `new` with a/ b/ headers and `context` lines of context.

    Hunk headers are written as the answer grammar writes them (tools/diff_grammar.py), so that
    training targets and constrained answers look alike: a bare `@@` where the hunk's anchor (its
    context line and the next line) occurs once in `old`, else `@@ -N @@` with N the hunk's first
    old line, which tells the places apart. A tokenizer that splits digits spends about 14 tokens
    on `@@ -16,7 +16,7 @@`. `numbered=True` writes full headers on every hunk, for tools that need
    them (`patch`, `git apply`)."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    raw = list(difflib.unified_diff(a, b, fromfile=f"a/{path}", tofile=f"b/{path}", n=context))
    bare = [x.rstrip("\n") for x in a]
    counts = anchor_counts(bare)
    lines = []
    for i, line in enumerate(raw):
        if line.startswith("@@") and not numbered:
            start = int(re.match(r"^@@ -(\d+)", line).group(1))  # 1-based first old line
            starts_with_context = raw[i + 1].startswith(" ") if i + 1 < len(raw) else False
            line = hunk_header(counts, bare, start if starts_with_context else start - 1) + "\n"
        if not line.endswith("\n"):  # the file's last line had no newline
            line += "\n\\ No newline at end of file\n"
        lines.append(line)
    return "".join(lines)
