"""Find the unified diff inside raw model text.

Models wrap their diffs in fences, `<delta>` tags and prose, and they get the
format subtly wrong: counts that do not add up, missing file headers, blank
context lines without their leading space. This module tokenises the text line
by line with those mistakes in mind and returns a clean diff (every body line
carries its prefix). Matching against the source happens in `diff_apply`.

Strict parsers are no help here: `unidiff` 1.0.1 silently truncates a hunk
whose `@@` counts are too small, which would drop a line without a word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from deltanas.tools.diff_errors import DiffCode, DiffError

EXAMPLE_DIFF = """\
```diff
--- a/model.py
+++ b/model.py
@@ -14,3 +14,4 @@
         self.conv1 = nn.Conv2d(in_shape[1], 32, kernel_size=3, padding=1)
+        self.bn1 = nn.BatchNorm2d(32)
         self.pool = nn.MaxPool2d(2)
```"""

FORMAT_RULES = (
    "Lines starting with a space are unchanged context copied exactly from the source, "
    "'-' lines are removed, '+' lines are added. Include one unchanged context line above and below each change."
)

DIFF_FENCE_TAGS = frozenset({"diff", "patch", "udiff", "git"})


class Kind(str, Enum):
    GIT = "git"  # diff --git a/x b/y
    OLD_PATH = "old_path"  # --- a/x
    NEW_PATH = "new_path"  # +++ b/x
    META = "meta"  # index, mode, rename, copy, similarity, binary
    HUNK = "hunk"  # @@ -a,b +c,d @@
    CONTEXT = "context"
    REMOVE = "remove"
    ADD = "add"
    NO_EOL = "no_eol"  # \ No newline at end of file


BODY_KINDS = frozenset({Kind.CONTEXT, Kind.REMOVE, Kind.ADD})


@dataclass(frozen=True)
class DiffLine:
    kind: Kind
    text: str  # body: the line without its prefix; headers: the whole line
    lineno: int  # 1-based line in the text it came from

    @property
    def clean(self) -> str:
        """The line as it appears in a well-formed diff."""
        prefix = {Kind.CONTEXT: " ", Kind.REMOVE: "-", Kind.ADD: "+"}.get(self.kind)
        return self.text if prefix is None else prefix + self.text


@dataclass(frozen=True)
class FencedBlock:
    tag: str  # the info string's first word, lower-cased ("" when untagged)
    body: str
    closed: bool
    start: int  # 0-based line of the opening fence
    end: int  # 0-based line of the closing fence (the line count when unclosed)


_HUNK_RE = re.compile(r"^@@(?!@)")
_META_RE = re.compile(
    r"^(index [0-9a-fA-F]+\.\.[0-9a-fA-F]+"
    r"|(old|new|deleted file|new file) mode \d+"
    r"|(rename|copy) (from|to) "
    r"|(dis)?similarity index \d+%"
    r"|Binary files .* differ\s*$"
    r"|GIT binary patch\s*$)"
)
_FENCE_RE = re.compile(r"^(`{3,}|~{3,})\s*([^\s`]*)")
# A tag counts only at the start of a line: '<delta>' inside a code line is code.
_DELTA_RE = re.compile(r"^[ \t]*<delta>(.*?)(?:</delta>|\Z)", re.IGNORECASE | re.DOTALL | re.MULTILINE)

# A whole line that is an angle-bracketed description ("<added line>") is a
# template placeholder, never code. Single words such as "<div>" are not flagged
# unless they are words templates use.
_PLACEHOLDER_RE = re.compile(r"^\s*<\s*([A-Za-z][A-Za-z0-9 _\-/.,'()]*?)\s*>\s*$")
_PLACEHOLDER_WORDS = re.compile(
    r"\b(line|lines|code|context|added|removed|baseline|here|change|changes|file|path|"
    r"snippet|unchanged|new|old|original|modified|your)\b",
    re.IGNORECASE,
)
_ELISION_RE = re.compile(
    r"^\s*#.*\b(rest of (the )?(code|file|class|model|method|function)|existing code|"
    r"remains? (the same|unchanged)|unchanged code|same as (before|above|the baseline)|"
    r"code omitted|omitted for brevity)\b",
    re.IGNORECASE,
)
_ELLIPSES = frozenset({"...", "…", "# ...", "# …"})


def normalise_newlines(text: str) -> str:
    # Only CRLF pairs are line ends; a lone '\r' is left in place so that one
    # inside a path is still seen (and refused) rather than turned into a break.
    return text.replace("\r\n", "\n")


def fenced_blocks(text: str) -> list[FencedBlock]:
    """Top-level fenced blocks (``` or ~~~ at column 0). A closing fence uses the
    same character and is at least as long as the opening one, so a four-backtick
    fence can hold a three-backtick one. An unclosed block runs to the end (the
    model ran out of tokens)."""
    blocks: list[FencedBlock] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, tag = m.group(1), m.group(2).lower()
        body: list[str] = []
        j = i + 1
        closed = False
        while j < len(lines):
            close = re.match(r"^(`{3,}|~{3,})\s*$", lines[j])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                closed = True
                break
            body.append(lines[j])
            j += 1
        blocks.append(FencedBlock(tag=tag, body="\n".join(body), closed=closed, start=i, end=j))
        i = j + 1
    return blocks


def _is_body(line: str) -> bool:
    return line[:1] in (" ", "+", "-") or line == ""


def _is_file_pair(lines: list[str], i: int) -> bool:
    return (
        lines[i].startswith("--- ")
        and i + 1 < len(lines)
        and lines[i + 1].startswith("+++ ")
    )


def _declared_counts(header: str) -> tuple[int, int] | None:
    m = re.match(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", header)
    if not m:
        return None
    return int(m.group(1) or 1), int(m.group(2) or 1)


def tokenize_diff(text: str, *, bare_ok: bool) -> list[DiffLine]:
    """Classify the diff lines of `text`; prose lines are left out.

    `bare_ok` accepts body lines before any header (a fenced ```diff block, or
    text a caller says is a diff). Without it, '-' bullets in prose never turn
    into a hunk.
    """
    lines = text.split("\n")
    out: list[DiffLine] = []
    in_hunk = False
    after_file_header = False
    remaining: tuple[int, int] | None = None  # old/new lines still due per @@ counts
    pending_blank: list[DiffLine] = []  # blank lines that are context only if the hunk goes on

    def flush_hunk() -> None:
        nonlocal in_hunk, remaining
        pending_blank.clear()  # trailing blank context says nothing about placement
        in_hunk = False
        remaining = None

    def emit(kind: Kind, content: str, i: int) -> None:
        nonlocal remaining
        if kind in BODY_KINDS:
            out.extend(pending_blank)
            pending_blank.clear()
        out.append(DiffLine(kind, content, i + 1))
        if remaining is not None and kind in BODY_KINDS:
            old, new = remaining
            remaining = (old - (kind != Kind.ADD), new - (kind != Kind.REMOVE))

    def counts_open() -> bool:
        return remaining is not None and remaining[0] > 0 and remaining[1] > 0

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            flush_hunk()
            out.append(DiffLine(Kind.GIT, line, i + 1))
            after_file_header = True
        elif _is_file_pair(lines, i) and (
            not counts_open() or (i + 2 < len(lines) and _HUNK_RE.match(lines[i + 2]))
        ):
            # A '---'/'+++' pair inside a hunk whose counts still expect lines is
            # a removed '-- x' and an added '++ y', unless an @@ follows it: counts
            # are often wrong, and a file header is then the likelier reading.
            flush_hunk()
            out.append(DiffLine(Kind.OLD_PATH, line, i + 1))
            out.append(DiffLine(Kind.NEW_PATH, lines[i + 1], i + 2))
            after_file_header = True
            i += 1
        elif line.startswith("+++ ") and not in_hunk:
            out.append(DiffLine(Kind.NEW_PATH, line, i + 1))
            after_file_header = True
        elif _HUNK_RE.match(line):
            flush_hunk()
            out.append(DiffLine(Kind.HUNK, line, i + 1))
            in_hunk = True
            remaining = _declared_counts(line)
        elif not in_hunk and _META_RE.match(line):
            out.append(DiffLine(Kind.META, line, i + 1))
        elif line.startswith("\\") and in_hunk:
            out.append(DiffLine(Kind.NO_EOL, line, i + 1))
        elif in_hunk and line.strip() in ("---", "***", "___") and not counts_open():
            flush_hunk()  # a Markdown rule after the diff, not a removed "--"
            after_file_header = False
        elif in_hunk or ((after_file_header or bare_ok) and _is_body(line) and line != ""):
            if not in_hunk:
                # Body lines with no @@ before them: one hunk with no line hint.
                out.append(DiffLine(Kind.HUNK, "@@", i + 1))
                in_hunk = True
            if line == "":
                pending_blank.append(DiffLine(Kind.CONTEXT, "", i + 1))
            elif line[0] == " ":
                emit(Kind.CONTEXT, line[1:], i)
            elif line[0] == "-":
                emit(Kind.REMOVE, line[1:], i)
            elif line[0] == "+":
                emit(Kind.ADD, line[1:], i)
            elif bare_ok or (i + 1 < len(lines) and _is_body(lines[i + 1]) and lines[i + 1] != ""):
                # An unprefixed line inside a fenced diff, or with the hunk going
                # on after it, is a context line that lost its leading space. If
                # it was prose after all, content matching reports it.
                emit(Kind.CONTEXT, line, i)
            else:
                flush_hunk()
                after_file_header = False
        i += 1
    return out


def _has_diff(tokens: list[DiffLine]) -> bool:
    return any(t.kind in BODY_KINDS or t.kind in (Kind.HUNK, Kind.META) for t in tokens)


def find_placeholder(lines: list[str]) -> str | None:
    """The first line that is a template placeholder or an elision comment."""
    for line in lines:
        m = _PLACEHOLDER_RE.match(line)
        if m and (" " in m.group(1) or _PLACEHOLDER_WORDS.search(m.group(1))):
            return line.strip()
        if _ELISION_RE.match(line):
            return line.strip()
    return None


def _hunk_bodies(tokens: list[DiffLine]) -> list[list[DiffLine]]:
    hunks: list[list[DiffLine]] = []
    current: list[DiffLine] | None = None
    for t in tokens:
        if t.kind == Kind.HUNK:
            current = []
            hunks.append(current)
        elif t.kind in BODY_KINDS:
            if current is None:
                current = []
                hunks.append(current)
            current.append(t)
        elif t.kind in (Kind.GIT, Kind.OLD_PATH, Kind.NEW_PATH):
            current = None
    return hunks


def placeholder_error(tokens: list[DiffLine]) -> DiffError | None:
    for t in tokens:
        if t.kind in (Kind.OLD_PATH, Kind.NEW_PATH) and re.search(r"<[^<>]+>", t.text):
            return _placeholder(t.text)
    bodies = [t.text for t in tokens if t.kind in BODY_KINDS]
    found = find_placeholder(bodies)
    if found:
        return _placeholder(found)
    for hunk in _hunk_bodies(tokens):
        texts = [t.text.strip() for t in hunk if t.text.strip()]
        if texts and all(x in _ELLIPSES for x in texts):
            return _placeholder("...")
    return None


def _placeholder(line: str) -> DiffError:
    return DiffError(
        DiffCode.PLACEHOLDER_ECHO,
        f"the diff contains a template placeholder: {line!r}",
        hint=(
            f"Your diff contains the placeholder {line!r}. Placeholders and elisions are not code: "
            "copy the real lines from the baseline source as context, write real Python on the "
            "'+' lines, and never abbreviate with '...'. "
            f"{FORMAT_RULES} For example:\n{EXAMPLE_DIFF}"
        ),
    )


def no_diff_error(what: str = "no unified diff found in the reply") -> DiffError:
    return DiffError(
        DiffCode.NO_DIFF,
        what,
        hint=(
            "I could not find a unified diff in your reply. Reply with one unified diff against "
            f"model.py inside a ```diff fence, like this:\n{EXAMPLE_DIFF}\n{FORMAT_RULES}"
        ),
    )


def _candidate_texts(text: str, depth: int = 0) -> list[tuple[str, bool]]:
    """(text, bare_ok) pieces that hold diff lines, in the order of the reply.

    Fenced blocks are read whole; the prose between them is read too, so that a
    hunk the model left outside a fence is never dropped.
    """
    if depth == 0:
        tagged = [m.group(1) for m in _DELTA_RE.finditer(text)]
        pieces = [p for inner in tagged for p in _candidate_texts(inner, 1)]
        if pieces:
            return pieces
        text = _DELTA_RE.sub("", text) if tagged else text
    lines = text.split("\n")
    found: list[tuple[str, bool]] = []
    pos = 0
    for block in fenced_blocks(text):
        found.extend(_prose_piece("\n".join(lines[pos : block.start])))
        pos = block.end + 1
        if depth < 3 and fenced_blocks(block.body):
            found.extend(_candidate_texts(block.body, depth + 1))
        elif block.tag in DIFF_FENCE_TAGS or _has_diff(tokenize_diff(block.body, bare_ok=False)):
            # A fence holds what the model meant as one piece: once it is a diff
            # (by its tag, or by headers and hunks inside), all of it is read as one.
            if _has_diff(tokenize_diff(block.body, bare_ok=True)):
                found.append((block.body, True))
    found.extend(_prose_piece("\n".join(lines[pos:])))
    return found


def _prose_piece(text: str) -> list[tuple[str, bool]]:
    return [(text, False)] if _has_diff(tokenize_diff(text, bare_ok=False)) else []


def _tokens_of(pieces: list[tuple[str, bool]]) -> list[DiffLine]:
    tokens: list[DiffLine] = []
    seen: set[str] = set()
    for piece, bare_ok in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.extend(tokenize_diff(piece, bare_ok=bare_ok))
    return tokens


def extract_diff(text: str) -> str | DiffError:
    """Raw model text -> the clean unified diff text, or NO_DIFF / PLACEHOLDER_ECHO.

    Several fenced diff blocks are joined in order (models often split one change
    over two blocks); an exact repeat of a block is kept once.
    """
    if not isinstance(text, str) or not text.strip():
        return no_diff_error("the reply is empty")
    text = normalise_newlines(text)
    tokens = _tokens_of(_candidate_texts(text))
    if not _has_diff(tokens):
        return no_diff_error()
    err = placeholder_error(tokens)
    if err is not None:
        return err
    return "\n".join(t.clean for t in tokens) + "\n"
