"""Apply a unified diff to a candidate source by content.

`@@` line numbers and counts are hints only; models get them wrong. Each hunk's
old side (its context and '-' lines) is looked up in the original source:
exactly first, then ignoring trailing whitespace, then ignoring indentation.
Where none of those finds it, a last, fuzzy tier tolerates wrong *context*
lines, never wrong '-' lines (a small model often invents a context line):
- up to `_FUZZ_TRIM` context lines may be dropped from either end of the hunk,
  as GNU patch's fuzz factor does;
- else the hunk fits a window of the source where every '-' line is there,
  at least half of the context lines are there, and each other context line
  resembles the source line it stands for (`_FUZZ_RATIO`).
A fuzzy placement must be the only one (or the one the @@ line picks); the
result counts its fuzzy hunks, and carries the diff as applied (`corrected`,
context from the source), which is what the model should learn from.
A hunk that matches nowhere, or in several places that the line hint cannot
tell apart, is an error with a hint for the model, never a silent skip.
Hunks are placed in the original source and may not overlap, except that two
hunks may share unchanged context lines.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from math import gcd

from deltanas.tools.diff_errors import DiffCode, DiffError
from deltanas.tools.diff_extract import (
    BODY_KINDS,
    FORMAT_RULES,
    DiffLine,
    Kind,
    extract_diff,
    no_diff_error,
    normalise_newlines,
    placeholder_error,
    tokenize_diff,
)
from deltanas.tools.diff_write import make_diff
from deltanas.tools.protected import check_source

_TIERS = ("exact", "rstrip", "indent")
_FUZZ_TRIM = 2  # context lines the fuzzy tier may drop from each end of a hunk
# Ends to trim, fewest lines first: (leading, trailing) context lines dropped.
_TRIMS = sorted(((a, b) for a in range(_FUZZ_TRIM + 1) for b in range(_FUZZ_TRIM + 1) if a or b),
                key=lambda ab: (ab[0] + ab[1], ab[1]))
_FUZZ_RATIO = 0.5  # a differing context line must resemble its source line this much (difflib ratio)
_ELISIONS = ("...", "…")
_HINT_SLACK = 15  # farthest a plausible @@ line hint may be from the match it picks
_QUOTE_LINES = 12
MAX_HUNKS = 200  # far above any real proposal; bounds the pairwise overlap checks


@dataclass(frozen=True)
class ApplyResult:
    ok: bool
    source: str | None  # patched source when ok
    error: DiffError | None
    diff: str  # the extracted diff text ("" if none)
    added: int  # '+' lines in the diff
    removed: int  # '-' lines
    hunks: int
    fuzzy: int = 0  # hunks placed by the fuzzy tier (wrong context lines tolerated)
    corrected: str = ""  # when fuzzy: the diff as applied, its context from the source

    def to_json(self) -> dict:
        extra = {"corrected": self.corrected} if self.fuzzy else {}
        return {
            "ok": self.ok,
            "code": None if self.error is None else self.error.code.value,
            "message": self.message,
            "hint": "" if self.error is None else self.error.hint,
            "added": self.added,
            "removed": self.removed,
            "hunks": self.hunks,
            "diff_lines": len(self.diff.splitlines()),
            "fuzzy": self.fuzzy,
            **extra,
        }

    @property
    def message(self) -> str:
        if self.error is not None:
            return self.error.message
        return f"applied {self.hunks} hunk(s): +{self.added} -{self.removed}"


@dataclass
class _Hunk:
    header: str
    lineno: int  # of the header in the diff text
    hint_start: int | None  # 1-based old start from the @@ header
    lines: list[DiffLine] = field(default_factory=list)
    old_no_eol: bool = False
    new_no_eol: bool = False

    @property
    def old(self) -> list[str]:
        return [t.text for t in self.lines if t.kind != Kind.ADD]


@dataclass
class _Section:
    paths: list[tuple[str, int]] = field(default_factory=list)  # (raw path, diff line)
    meta: list[str] = field(default_factory=list)
    hunks: list[_Hunk] = field(default_factory=list)


@dataclass(frozen=True)
class _Placement:
    start: int  # source span [start, end) of the hunk's old side
    end: int
    removed: frozenset[int]
    inserts: dict[int, list[str]]  # source index -> lines inserted before it
    fuzzy: bool = False  # placed by the fuzzy tier


# ---------------------------------------------------------------- parsing


def _starts_section(t: DiffLine, cur: _Section | None) -> bool:
    if cur is None or t.kind == Kind.GIT:
        return True
    if cur.hunks:
        return t.kind in (Kind.OLD_PATH, Kind.NEW_PATH)
    has_old = any(raw.startswith("--- ") for raw, _ in cur.paths)
    has_new = any(raw.startswith("+++ ") for raw, _ in cur.paths)
    return (t.kind == Kind.OLD_PATH and has_old) or (t.kind == Kind.NEW_PATH and has_new)


def _sections(tokens: list[DiffLine]) -> list[_Section]:
    sections: list[_Section] = []
    cur: _Section | None = None
    hunk: _Hunk | None = None
    for t in tokens:
        if t.kind in (Kind.GIT, Kind.OLD_PATH, Kind.NEW_PATH, Kind.META, Kind.HUNK) and (
            cur is None or (t.kind in (Kind.GIT, Kind.OLD_PATH, Kind.NEW_PATH) and _starts_section(t, cur))
        ):
            cur = _Section()
            sections.append(cur)
            hunk = None
        if cur is None:
            continue  # body lines always follow an @@ token, so this is unreachable in practice
        if t.kind in (Kind.GIT, Kind.OLD_PATH, Kind.NEW_PATH):
            cur.paths.append((t.text, t.lineno))
        elif t.kind == Kind.META:
            cur.meta.append(t.text)
        elif t.kind == Kind.HUNK:
            m = re.match(r"^@@ -(\d+)", t.text)
            hunk = _Hunk(t.text, t.lineno, int(m.group(1)) if m else None)
            cur.hunks.append(hunk)
        elif t.kind in BODY_KINDS and hunk is not None:
            hunk.lines.append(t)
        elif t.kind == Kind.NO_EOL and hunk is not None and hunk.lines:
            last = hunk.lines[-1].kind
            hunk.old_no_eol |= last != Kind.ADD
            hunk.new_no_eol |= last != Kind.REMOVE
    return sections


def _header_paths(text: str) -> list[str]:
    if text.startswith("diff --git "):
        rest = text[len("diff --git ") :]
        m = re.match(r'^("[^"]*"|\S+) ("[^"]*"|\S+)\s*$', rest)
        return [m.group(1), m.group(2)] if m else [rest]
    path = text[4:]
    # "--- a/model.py\t2024-01-01 00:00:00" carries a timestamp after a tab.
    return [path.split("\t", 1)[0].rstrip(" ")]


def _unsafe(path: str) -> str | None:
    for ch in path:
        if ch in "\r\n\0" or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            return f"the path contains the control character {ch!r}"
    if path.startswith('"'):
        if "\\" in path:
            return "the quoted path contains escape sequences"
        path = path.strip('"')
    if not path.strip():
        return "the path is empty"
    if path == "/dev/null":
        return None
    if path.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", path):
        return "the path is absolute"
    if ".." in re.split(r"[/\\]", path):
        return "the path climbs out of the directory with '..'"
    return None


def _relative(path: str) -> str:
    path = path.strip('"').strip()
    if path.startswith(("a/", "b/")):
        path = path[2:]
    while path.startswith("./"):
        path = path[2:]
    return path


def _unsafe_error(path: str, why: str, target: str) -> DiffError:
    return DiffError(
        DiffCode.UNSAFE_PATH,
        f"unsafe path {path!r}: {why}",
        hint=(
            f"The diff names the file {path!r}, which is not allowed ({why}). Edit only {target}: "
            f"use the headers '--- a/{target}' and '+++ b/{target}'."
        ),
    )


def _file_error(sections: list[_Section], target: str) -> DiffError | None:
    """Path, binary, symlink, rename and foreign-file checks, most dangerous first."""
    paths = [(p, n) for s in sections for raw, n in s.paths for p in _header_paths(raw)]
    for path, _ in paths:
        why = _unsafe(path)
        if why:
            return _unsafe_error(path, why, target)
    meta = [m for s in sections for m in s.meta]
    if any(m.startswith(("Binary files", "GIT binary patch")) for m in meta):
        return DiffError(
            DiffCode.BINARY,
            "the diff is a binary patch",
            hint=f"Send a text unified diff of {target}, not a binary patch. {FORMAT_RULES}",
        )
    if any(re.search(r"\b120000\b", m) for m in meta):
        return DiffError(
            DiffCode.SYMLINK,
            "the diff creates or changes a symbolic link",
            hint=f"Symbolic links are not allowed. Send a text unified diff that edits {target} in place.",
        )
    file_ops = ("rename", "copy", "deleted file", "new file", "old mode", "new mode")
    operation = next((m for m in meta if m.startswith(file_ops)), None)
    if operation is None and any(p == "/dev/null" for p, _ in paths):
        operation = "a /dev/null header (creating or deleting a file)"
    if operation is not None:
        return DiffError(
            DiffCode.RENAME,
            f"the diff renames, copies, creates or deletes a file: {operation}",
            hint=(
                f"Do not create, delete, rename or copy files or change their modes. Edit {target} in "
                f"place with '--- a/{target}' and '+++ b/{target}' headers."
            ),
        )
    # A diff of one file is a diff of the target, whatever it calls it: the paper's prompt has the
    # model write `--- baseline.py` / `+++ improved.py`. Only a diff that names several files may
    # mean another one.
    named = [s for s in sections if s.paths]
    if len(named) <= 1:
        return None
    allowed = {target, os.path.basename(target)}
    for path, _ in paths:
        if _relative(path) not in allowed:
            return DiffError(
                DiffCode.FOREIGN_PATH,
                f"the diff edits {path!r}, not {target}",
                hint=(
                    f"Your diff edits {path!r}, but only {target} may change. Send one diff for "
                    f"{target} alone, with the headers '--- a/{target}' and '+++ b/{target}'."
                ),
            )
    return None


# ---------------------------------------------------------------- matching


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _cols(ws: str) -> int:
    return len(ws.expandtabs(4))


class _Source:
    """The base lines with the normalised views each matching tier compares."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.views = {
            "exact": lines,
            "rstrip": [x.rstrip() for x in lines],
            "indent": [x.strip() for x in lines],
        }
        self.positions: dict[str, list[int]] = {}
        for i, x in enumerate(self.views["indent"]):
            self.positions.setdefault(x, []).append(i)
        widths = [_cols(_indent(x)) for x in lines if x.strip() and not x.startswith("\t")]
        self.unit = 0
        for w in widths:
            self.unit = gcd(self.unit, w)
        self.tabs = sum(x.startswith("\t") for x in lines) > sum(x.startswith(" ") for x in lines)

    def find(self, old: list[str], tier: str) -> list[int]:
        norm = {"exact": lambda s: s, "rstrip": str.rstrip, "indent": str.strip}[tier]
        want = [norm(x) for x in old]
        view = self.views[tier]
        m = len(want)
        return [p for p in range(len(view) - m + 1) if view[p] == want[0] and view[p : p + m] == want]


def _reindent(hunk: _Hunk, start: int, src: _Source) -> dict[int, str]:
    """Re-indent the hunk's added lines to match the source block they land in.

    Used only when the hunk matched ignoring indentation. An added line takes the
    source indentation of the context lines that share its indentation in the
    hunk; a deeper one keeps its extra depth on top of the nearest such line.
    Returns hunk-line index -> re-indented text, only for lines that change.
    """
    mapping: dict[str, str] = {}
    k = start
    for t in hunk.lines:
        if t.kind != Kind.ADD:
            if t.text.strip():
                mapping.setdefault(_indent(t.text), _indent(src.lines[k]))
            k += 1
    if all(h == s for h, s in mapping.items()):
        return {}
    # A shift off the source's indentation grid (one space) comes from context
    # lines that lost their diff prefix, not from a re-indented hunk: '+' lines
    # already on the grid are then right as written.
    off_grid = src.unit >= 2 and any((_cols(s) - _cols(h)) % src.unit for h, s in mapping.items())
    out: dict[int, str] = {}
    for i, t in enumerate(hunk.lines):
        if t.kind != Kind.ADD or not t.text.strip():
            continue
        ws, body = _indent(t.text), t.text.lstrip()
        if off_grid and _cols(ws) % src.unit == 0:
            continue
        if ws in mapping:
            out[i] = mapping[ws] + body
            continue
        deeper = [h for h in mapping if ws.startswith(h)]
        base = max(deeper, key=len) if deeper else min(mapping, key=_cols)
        width = max(0, _cols(ws) - _cols(base) + _cols(mapping[base]))
        out[i] = _make_indent(width, src) + body
    return out


def _make_indent(width: int, src: _Source) -> str:
    if src.tabs:
        return "\t" * (width // 4) + " " * (width % 4)
    return " " * width


def _place(hunk: _Hunk, start: int, tier: str, src: _Source) -> _Placement:
    texts = _reindent(hunk, start, src) if tier == "indent" else {}
    removed: set[int] = set()
    inserts: dict[int, list[str]] = {}
    k = start
    for i, t in enumerate(hunk.lines):
        if t.kind == Kind.ADD:
            inserts.setdefault(k, []).append(texts.get(i, t.text))
        else:
            if t.kind == Kind.REMOVE:
                removed.add(k)
            k += 1
    return _Placement(start, k, frozenset(removed), inserts)


def _conflicts(a: _Placement, b: _Placement) -> bool:
    """Does either hunk change a line or a gap that the other needs unchanged?"""
    for x, y in ((a, b), (b, a)):
        if any(y.start <= r < y.end for r in x.removed):
            return True
        if any(y.start < p < y.end for p in x.inserts):
            return True
    return False


def _quote(lines: list[str], first: int | None = None) -> str:
    shown = lines[:_QUOTE_LINES]
    if first is None:
        body = "\n".join(f"    {x}" for x in shown)
    else:
        body = "\n".join(f"  {first + i:4d}| {x}" for i, x in enumerate(shown))
    if len(lines) > _QUOTE_LINES:
        body += f"\n    ... ({len(lines) - _QUOTE_LINES} more lines)"
    return body


def _nearby_windows(old: list[str], src: _Source, keep: int = 8) -> list[int]:
    """Window starts worth a difflib comparison: each hunk line found in the
    source votes for the window that would align it. Keeps a failed match cheap
    on a large source."""
    n, m = len(src.lines), len(old)
    if not n:
        return []
    last = max(0, n - m)
    votes: Counter[int] = Counter()
    for i, line in enumerate(old):
        if line.strip():
            for q in src.positions.get(line.strip(), ()):
                votes[min(last, max(0, q - i))] += 1
    if votes:
        return [p for p, _ in votes.most_common(keep)]
    return list(range(0, last + 1, max(1, (last + 1) // keep)))[:keep]


def _mismatch(hunk: _Hunk, number: int, total: int, src: _Source, target: str) -> DiffError:
    old = hunk.old
    m = len(old)
    n = len(src.lines)
    stripped = [x.strip() for x in old]
    # Characters tell near-identical lines apart; on a long hunk that is too slow,
    # and whole lines do.
    by_char = sum(map(len, stripped)) < 800
    want = "\n".join(stripped) if by_char else stripped
    best_ratio, best = -1.0, 0
    for p in _nearby_windows(old, src):
        window = src.views["indent"][p : p + m]
        sm = difflib.SequenceMatcher(None, want, "\n".join(window) if by_char else window, autojunk=False)
        if sm.ratio() > best_ratio:
            best_ratio, best = sm.ratio(), p
    lines = [
        f"Hunk {number} of {total} ({hunk.header}) does not match {target}: its context (' ') and "
        "removed ('-') lines must be copied exactly from the source, in order."
    ]
    lines.append(f"Your hunk expects:\n{_quote(old)}")
    if n:
        near = src.lines[best : best + m]
        lines.append(
            f"The closest lines in {target} are lines {best + 1}-{best + len(near)}:\n{_quote(near, best + 1)}"
        )
        for i, (exp, got) in enumerate(zip(old, near)):
            if exp.strip() != got.strip():
                lines.append(
                    f"First difference: your line {exp.strip()!r}, but line {best + i + 1} "
                    f"of the source is {got.strip()!r}."
                )
                break
        else:
            if m > len(near):
                lines.append(f"Your hunk has {m} old lines but the file ends after line {n}.")
    else:
        lines.append(f"{target} is empty.")
    if any(x.strip() in ("...", "…") for x in old):
        lines.append("Do not abbreviate the source with '...': copy every context line.")
    lines.append("Resend the whole diff with this hunk's context copied from those source lines.")
    return DiffError(
        DiffCode.CONTEXT_MISMATCH, f"hunk {number} of {total} does not match the source", hint="\n".join(lines)
    )


def _choose(hunk: _Hunk, spots: list[int]) -> int | None:
    """The spot the @@ hint picks out clearly, or None."""
    if hunk.hint_start is None:
        return None
    ranked = sorted(spots, key=lambda p: abs(p + 1 - hunk.hint_start))
    d0, d1 = abs(ranked[0] + 1 - hunk.hint_start), abs(ranked[1] + 1 - hunk.hint_start)
    return ranked[0] if d0 <= _HINT_SLACK and 2 * d0 < d1 else None


def _locate(
    hunk: _Hunk, number: int, total: int, src: _Source, placed: list[_Placement], target: str, fuzz: bool = True
) -> _Placement | DiffError:
    old = hunk.old
    if not hunk.lines:
        return _malformed(f"hunk {number} ({hunk.header}) has no lines", target)
    if not old:
        if src.lines:
            return _malformed(
                f"hunk {number} ({hunk.header}) only adds lines and has no context to place them by",
                target,
            )
        return _place(hunk, 0, "exact", src)
    for tier in _TIERS:
        spots = src.find(old, tier)
        if not spots:
            continue
        options = [(p, _place(hunk, p, tier, src)) for p in spots]
        free = [(p, pl) for p, pl in options if not any(_conflicts(pl, q) for q in placed)]
        if not free:
            return DiffError(
                DiffCode.CONTEXT_MISMATCH,
                f"hunk {number} of {total} overlaps an earlier hunk",
                hint=(
                    f"Hunk {number} of {total} ({hunk.header}) matches lines {spots[0] + 1}-{spots[0] + len(old)} "
                    "of the source, but an earlier hunk already changes those lines. Every hunk's "
                    "context and '-' lines refer to the original source. Merge overlapping changes "
                    "into one hunk and resend the whole diff."
                ),
            )
        if len(free) == 1:
            return free[0][1]
        pick = _choose(hunk, [p for p, _ in free])
        if pick is not None:
            return dict(free)[pick]
        where = ", ".join(str(p + 1) for p, _ in free[:6])
        return DiffError(
            DiffCode.AMBIGUOUS_MATCH,
            f"hunk {number} of {total} matches {len(free)} places in the source",
            hint=(
                f"Hunk {number} of {total} ({hunk.header}) matches the source at lines {where}, so I "
                f"cannot tell where it goes. Its old lines are:\n{_quote(old)}\nAdd more unchanged "
                "context lines above or below the change (lines that occur only once in the file, "
                "such as a def line or a distinctive layer) and give the right @@ line numbers."
            ),
        )
    fuzzy = _fuzzy(hunk, src, placed) if fuzz else None
    return fuzzy if fuzzy is not None else _mismatch(hunk, number, total, src, target)


def _trimmed(hunk: _Hunk, lead: int, trail: int) -> _Hunk | None:
    """The hunk without `lead` leading and `trail` trailing context lines, or None where its ends
    have fewer context lines than that."""
    lines = hunk.lines
    if lead + trail >= len(lines):
        return None
    if any(t.kind != Kind.CONTEXT for t in lines[:lead]) or any(t.kind != Kind.CONTEXT for t in lines[len(lines) - trail:]):
        return None
    hint = None if hunk.hint_start is None else hunk.hint_start + lead
    return _Hunk(hunk.header, hunk.lineno, hint, lines[lead:len(lines) - trail], hunk.old_no_eol and not trail,
                 hunk.new_no_eol and not trail)


def _one(hunk: _Hunk, options: list[_Placement], placed: list[_Placement]) -> _Placement | None:
    """The only placement that leaves the earlier hunks alone, or the one the @@ hint picks."""
    free = [pl for pl in options if not any(_conflicts(pl, q) for q in placed)]
    if len(free) == 1:
        return free[0]
    pick = _choose(hunk, [pl.start for pl in free]) if free else None
    return next((pl for pl in free if pl.start == pick), None)


def _fuzzy(hunk: _Hunk, src: _Source, placed: list[_Placement]) -> _Placement | None:
    """The fuzzy tier (see the module's text): a unique placement that tolerates wrong context lines."""
    old = hunk.old
    if any(x.strip() in _ELISIONS for x in old):
        return None  # an abbreviated source is asked for again, with its own hint
    for lead, trail in _TRIMS:
        part = _trimmed(hunk, lead, trail)
        if part is None or not any(x.strip() for x in part.old):
            continue
        for tier in _TIERS:
            spots = src.find(part.old, tier)
            if spots:
                pl = _one(part, [_place(part, p, tier, src) for p in spots], placed)
                if pl is not None:
                    return dataclasses.replace(pl, fuzzy=True)
                break  # found, but not in one place: another trim may tell
    kinds = [t.kind for t in hunk.lines if t.kind != Kind.ADD]
    context = sum(k == Kind.CONTEXT for k in kinds)
    spots = []
    for p in _nearby_windows(old, src):
        window = src.views["indent"][p : p + len(old)]
        if len(window) < len(old):
            continue
        exact, fits = 0, True
        for kind, line, got in zip(kinds, old, window):
            want = line.strip()
            if want == got:
                exact += kind == Kind.CONTEXT and bool(want)
            elif kind == Kind.REMOVE or difflib.SequenceMatcher(None, want, got, autojunk=False).ratio() < _FUZZ_RATIO:
                fits = False
                break
        if fits and exact and 2 * exact >= context:
            spots.append(p)
    if not spots:
        return None
    pl = _one(hunk, [_place(hunk, p, "indent", src) for p in sorted(set(spots))], placed)
    return None if pl is None else dataclasses.replace(pl, fuzzy=True)


def _malformed(what: str, target: str) -> DiffError:
    return DiffError(
        DiffCode.MALFORMED_HUNK,
        what,
        hint=(
            f"Your diff is malformed: {what}. Every hunk starts with an @@ line and contains "
            f"an unchanged context line from {target} above and below the '+'/'-' lines. {FORMAT_RULES}"
        ),
    )


# ---------------------------------------------------------------- entry points


def _too_large(what: str, size: int, max_bytes: int) -> DiffError:
    return DiffError(
        DiffCode.TOO_LARGE,
        f"{what} is {size} bytes, over the {max_bytes}-byte limit",
        hint=(
            f"Your {what} is too large ({size} bytes, the limit is {max_bytes}). Send a small diff "
            "that changes only the lines that need changing, with one context line above and below each change."
        ),
    )


def _result(
    error: DiffError | None, diff: str, tokens: list[DiffLine], hunks: int, source: str | None = None,
    fuzzy: int = 0, corrected: str = ""
) -> ApplyResult:
    return ApplyResult(
        ok=error is None,
        source=source if error is None else None,
        error=error,
        diff=diff,
        added=sum(t.kind == Kind.ADD for t in tokens),
        removed=sum(t.kind == Kind.REMOVE for t in tokens),
        hunks=hunks,
        fuzzy=fuzzy if error is None else 0,
        corrected=corrected if error is None else "",
    )


def _base_lines(base_source: str) -> tuple[list[str], bool]:
    if base_source == "":
        return [], True
    lines = base_source.split("\n")
    if lines[-1] == "":
        return lines[:-1], True
    return lines, False


def apply_diff(
    base_source: str,
    diff_text: str,
    *,
    target: str = "model.py",
    allow_train_changes: bool = False,
    max_bytes: int = 200_000,
    fuzz: bool = True,
) -> ApplyResult:
    """Apply a unified diff to `base_source` by content, then check the result. `fuzz=False` leaves
    out the fuzzy tier (bench/fuzzy_context.py measures what it recovers)."""
    size = len(diff_text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return _result(_too_large("diff", size, max_bytes), "", [], 0)
    tokens = tokenize_diff(normalise_newlines(diff_text), bare_ok=True)
    diff = "\n".join(t.clean for t in tokens) + "\n" if tokens else ""
    sections = _sections(tokens)
    hunks = [h for s in sections for h in s.hunks]
    if not tokens:
        return _result(no_diff_error(), diff, tokens, 0)
    err = _file_error(sections, target) or placeholder_error(tokens)
    if err is None and not hunks:
        err = _malformed("the diff has file headers but no @@ hunks", target)
    if err is None and len(hunks) > MAX_HUNKS:
        err = DiffError(
            DiffCode.TOO_LARGE,
            f"the diff has {len(hunks)} hunks, over the limit of {MAX_HUNKS}",
            hint=(
                f"Your diff has {len(hunks)} hunks. Send a small diff: a few hunks that change only "
                "what needs changing."
            ),
        )
    if err is not None:
        return _result(err, diff, tokens, len(hunks))

    base = normalise_newlines(base_source)
    lines, eol = _base_lines(base)
    src = _Source(lines)
    placed: list[_Placement] = []
    for number, hunk in enumerate(hunks, 1):
        spot = _locate(hunk, number, len(hunks), src, placed, target, fuzz)
        if isinstance(spot, DiffError):
            return _result(spot, diff, tokens, len(hunks))
        placed.append(spot)
        if spot.end == len(lines):
            if hunk.new_no_eol:
                eol = False
            elif hunk.old_no_eol:
                eol = True

    removed = frozenset().union(*(p.removed for p in placed))
    out: list[str] = []
    for i in range(len(lines) + 1):
        for p in placed:
            out.extend(p.inserts.get(i, ()))
        if i < len(lines) and i not in removed:
            out.append(lines[i])
    source = "\n".join(out) + ("\n" if eol and out else "")
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return _result(_too_large("patched file", size, max_bytes), diff, tokens, len(hunks))
    err = check_source(base, source, allow_train_changes=allow_train_changes)
    fuzzy = sum(p.fuzzy for p in placed)
    corrected = make_diff(base, source) if fuzzy and err is None else ""
    return _result(err, diff, tokens, len(hunks), source, fuzzy, corrected)


def apply_model_output(
    base_source: str,
    model_text: str,
    *,
    target: str = "model.py",
    allow_train_changes: bool = False,
    max_bytes: int = 200_000,
    fuzz: bool = True,
) -> ApplyResult:
    """Raw model text -> extracted diff -> patched, checked source."""
    size = len(model_text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return _result(_too_large("reply", size, max_bytes), "", [], 0)
    diff = extract_diff(model_text)
    if isinstance(diff, DiffError):
        return _result(diff, "", [], 0)
    return apply_diff(
        base_source, diff, target=target, allow_train_changes=allow_train_changes, max_bytes=max_bytes, fuzz=fuzz
    )
