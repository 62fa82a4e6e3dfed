"""Per-parent answer grammars: decoding under one can only write a diff that applies.

`delta_grammar(parent)` compiles the parent's lines into a Lark grammar (llguidance's dialect,
which vLLM's structured outputs take too) that admits exactly the diffs `tools/diff_apply.py`
accepts, shaped like an edit rather than a rewrite:

    answer   := prefix hunk(1) ... "```"         (prefix: "```diff\\n--- a/model.py\\n+++ b/model.py\\n")
    hunk     := header " " L(i-1) "\\n" group(i) (ctx group)* ctx        (hunks in file order)
    group(i) := "-" L(i) .. "-" L(i+k-1)  then 0..A "+" lines  (k in 1..R)
              | 1..A "+" lines                                    (an insertion before line i)
    ctx      := one or two unchanged lines between groups, one after the last

- Every context and removed line is a line of the parent, contiguous and in file order, so a
  hunk cannot miss; hunks never overlap (they may share one context line, as the applier allows).
- The header is a bare `@@` where the hunk's shortest old side (its context line and the line
  after it) occurs once in the parent; elsewhere it is `@@ -N @@`, N the hunk's first old line,
  which the applier uses to tell the places apart. So no answer is ambiguous.
- At most `max_hunks` hunks, `max_removed` removed and `max_added` added lines per group.
- A `+` line is one line with balanced brackets: no fence, no comment, no diff marker first, no
  block opened; inside an `nn.Sequential` one constructor call. It is indented like the lines
  around it (the nearest non-blank line above or below, one block deeper after a `:`; inside
  brackets up to two units deeper), so a small model cannot break Python's indentation. Under
  `sites`, a group cannot add back a line it removed (a no-op).
- With `allow_train_changes` off, no group starts or removes a line inside a protected function
  (`supported_hyperparameters`, `Net.train_setup`, `Net.learn`); their lines serve as context only.
- `sites` narrows where a group may start (gap i: before line i): the search can place each
  candidate's edit, which small models do poorly and which spreads a cycle's edits over the file.
- `anchors` (the product's default, `pick_sites`) go further: hunk h edits anchor h (the line
  itself, or layers just before or after it), every anchor in file order, and the answer may close
  only after the last. One-line edits are near-copies under the paper's novelty rule; edits at
  several places are not.
- `typed`: a `+` line inside a one-element-per-line `nn.Sequential` is a layer from the menu of
  `tools/layer_types.py`, which keeps the tensor shape there (its channel count read from the
  parent), and a removed run there is whole layers that keep it too. Any answer at typed anchors
  builds a network whose shapes fit. `DiffShape.repeats` says whether a group may add a kind of
  layer more than once: `apart`, never twice in a row (not `GELU` twice); `no`, once at most
  (not `GELU`, `BatchNorm2d`, `GELU`). A repeated line repeats its shingles, and the novelty
  rule counts the child a near-copy.

Full mode's grammar is one ```python fence that holds a `class Net` line.
"""
from __future__ import annotations

import ast
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from deltanas.tools.diff_extract import normalise_newlines
from deltanas.tools.protected import protected_functions

TARGET = "model.py"
DIFF_PREFIX = f"```diff\n--- a/{TARGET}\n+++ b/{TARGET}\n"
FULL_PREFIX = "```python\n"
CLOSE = "```"
MAX_PARENT_LINES = 5000
REPEATS = ("yes", "apart", "no")
MAX_KIND_STATES = 1000  # rules a group's "each kind once" may take (tools/layer_types.py draws 6 kinds: 63)
# A hunk may open at each site, and a parser holds one item per site at the answer's first byte:
# llguidance's (and vLLM's) default is at most 2,000 items in one row.
MAX_SITES = 800


class GrammarError(ValueError):
    """A parent the grammar cannot serve; `code` is stable, the message says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DiffShape:
    """How big one answer may be: an edit, not a rewrite."""

    max_hunks: int = 4
    max_removed: int = 6  # per change group
    max_added: int = 8  # per change group
    min_added: int = 1  # per group that only adds
    repeats: str = "yes"  # under typed layers, a kind again in a group: yes, apart (not in a row), no

    def __post_init__(self) -> None:
        for name in ("max_hunks", "max_removed", "max_added", "min_added"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_added > self.max_added:
            raise ValueError(f"min_added ({self.min_added}) is above max_added ({self.max_added})")
        if self.repeats not in REPEATS:
            raise ValueError(f"repeats must be one of {REPEATS}, got {self.repeats!r}")


@dataclass(frozen=True)
class Grammar:
    lark: str  # the grammar of the answer after `prefix`
    prefix: str  # what every answer starts with: the backends pre-fill it, and `prefix` mode only it
    kind: str  # "delta" or "full"
    rules: int
    build_seconds: float
    sites: tuple[int, ...] = ()  # gaps where a change group may start (delta)
    windows: tuple[tuple[int, ...], ...] = ()  # under anchors: the gaps of each required hunk, in order


def anchor_counts(lines: list[str]) -> Counter:
    """How often each hunk anchor occurs: a hunk's shortest old side is its context line and the
    line after it (the first line alone for a hunk at the top of the file). Where that anchor
    occurs once, every longer old side starting there does too."""
    counts = Counter(zip(lines, lines[1:]))
    if lines:
        counts[(lines[0],)] += 1
    return counts


def hunk_header(counts: Counter, lines: list[str], i: int) -> str:
    """The `@@` line of a hunk whose first change is at line i (0-based) with one context line
    above it (none when i is 0): bare where its anchor is unique, else `@@ -N @@`, N its first old
    line (1-based), which the applier uses to pick among the places."""
    anchor = tuple(lines[i - 1:i + 1]) if i >= 1 else tuple(lines[:1])
    return "@@" if counts[anchor] == 1 else f"@@ -{max(i, 1)} @@"


def bracket_depths(lines: list[str]) -> list[int]:
    """The open-bracket depth before each line, and after the last one (n + 1 values), read with
    Python's tokenizer so that brackets inside strings and comments do not count."""
    import io
    import tokenize

    delta = [0] * len(lines)
    try:
        for t in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if t.type == tokenize.OP and t.string in "([{" and t.string:
                delta[t.start[0] - 1] += 1
            elif t.type == tokenize.OP and t.string in ")]}" and t.string:
                delta[t.start[0] - 1] -= 1
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # the parent was parsed before this; a tokenizer quirk leaves the depths it has read
    out = [0]
    for d in delta:
        out.append(max(0, out[-1] + d))
    return out


def _lark_regex(text: str) -> str:
    """`text` matched literally inside a Lark `/.../` regex, whose delimiter must be escaped too."""
    return re.escape(text).replace("/", "\\/")


def _q(text: str) -> str:
    """A Lark string literal (JSON's escapes, which llguidance reads)."""
    return json.dumps(text, ensure_ascii=False)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def parent_lines(source: str) -> list[str]:
    """The parent's lines as the applier sees them (CRLF normalised, no final empty line)."""
    text = normalise_newlines(source)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def protected_lines(source: str) -> tuple[set[int], set[int]]:
    """(every line of a protected function, decorators included; the lines after each def line),
    0-based, for the parent as written."""
    whole, body = set(), set()
    for f in protected_functions(ast.parse(source)):
        first = min([f.lineno] + [d.lineno for d in f.decorator_list]) - 1
        whole.update(range(first, f.end_lineno))
        body.update(range(f.lineno, f.end_lineno))  # 0-based: the lines after the def line
    return whole, body


def edit_sites(source: str, *, allow_train_changes: bool = False) -> tuple[list[int], set[int]]:
    """(gaps where a change group may start, lines that may be removed). Gap i lies before line i;
    a group starting there removes line i or inserts before it."""
    lines = parent_lines(source)
    if allow_train_changes:
        whole, body = set(), set()
    else:
        whole, body = protected_lines(source)
    removable = {i for i in range(len(lines)) if i not in whole}
    insertable = {i for i in range(len(lines)) if i not in body and (i == 0 or i - 1 not in whole)}
    return sorted(removable | insertable), removable


class _Typing(NamedTuple):
    """What typed layers read from the parent (tools/layer_types.py)."""

    flows: dict  # gap -> Flow
    removable: set[int]  # one-line elements whose removal keeps the flow
    nn: str  # how the parent names torch.nn
    families: tuple[str, ...] | None  # the kinds of layer a `+` line may be
    keepers: set[int]  # last lines of elements whose backward reads their output


class _Builder:
    def __init__(self, lines: list[str], shape: DiffShape, sites: list[int], removable: set[int],
                 narrow: bool = False, windows: list[list[int]] | None = None, typed: _Typing | None = None):
        self.lines, self.shape = lines, shape
        self.narrow = narrow  # sites were given: a small grammar can afford per-group terminals
        self.windows = windows  # hunk h edits windows[h - 1], every window in order (None: any sites)
        self.typed = typed  # layers from a menu in a Sequential
        self.n = len(lines)
        self.sites = sites
        self.site_set = set(sites)
        self.removable = removable
        self.rules: dict[str, str] = {}
        self._todo: list = []
        self._queued: set[str] = set()
        self.unit = "\t" if sum(x.startswith("\t") for x in lines) > sum(x.startswith(" ") for x in lines) else "    "
        self._next = {}
        nxt = None
        for m in range(self.n, -1, -1):
            if m in self.site_set:
                nxt = m
            self._next[m] = nxt
        self._plus: dict[tuple, str] = {}  # (indentation alternatives, context, exclusions, flow) -> rule name
        self._menus: dict[object, str] = {}  # flow -> the terminal of the layers that keep it
        self._parts: dict[object, list[str]] = {}  # flow -> a terminal per kind of layer that keeps it
        self.counts = anchor_counts(lines)
        self.depth = bracket_depths(lines)

    def ctx(self, i: int) -> str:
        name = f"l{i}"
        if name not in self.rules:
            self.rules[name] = _q(" " + self.lines[i] + "\n")
        return name

    def rem(self, i: int) -> str:
        name = f"r{i}"
        if name not in self.rules:
            self.rules[name] = _q("-" + self.lines[i] + "\n")
        return name

    def header(self, i: int) -> str:
        return _q(hunk_header(self.counts, self.lines, i) + "\n")

    def indents(self, j: int) -> tuple[str, ...]:
        """Indentations a '+' line at gap j may start with (before any deeper units)."""
        out = []
        above = next((self.lines[k] for k in range(j - 1, -1, -1) if self.lines[k].strip()), None)
        below = next((self.lines[k] for k in range(j, self.n) if self.lines[k].strip()), None)
        if above is not None:
            out.append(_indent(above) + (self.unit if above.rstrip().endswith(":") else ""))
        if below is not None and not below.lstrip().startswith((")", "]", "}")):
            out.append(_indent(below))
        return tuple(sorted(set(out))) or ("",)

    def context(self, j: int) -> str:
        """What a line added at gap j is: a STATEMENT, a MODULE of an `nn.Sequential` or
        `nn.ModuleList`, or another bracket's ELEMENT (a call's argument, a list's item)."""
        depth = self.depth[j] if j < len(self.depth) else 0
        if depth == 0:
            return "STATEMENT"
        opener = next((self.lines[k] for k in range(j - 1, -1, -1) if self.depth[k] < depth), "")
        return "MODULE" if re.search(r"\b(Sequential|ModuleList)\(\[?\s*$", opener) else "ELEMENT"

    def menu(self, j: int) -> str:
        """The terminal of the layers an `nn.Sequential` may take at gap j (tools/layer_types.py)."""
        from deltanas.tools.layer_types import menu

        flow = self.typed.flows.get(j)
        name = self._menus.get(flow)
        if name is None:
            name = self._menus[flow] = f"LAYER{len(self._menus)}"
            self.rules[name] = menu(flow, self.typed.nn, self.typed.families)
        return name

    def parts(self, j: int) -> list[str]:
        """The terminals of the layers an `nn.Sequential` may take at gap j, one per kind."""
        from deltanas.tools.layer_types import menu_parts

        flow = self.typed.flows.get(j)
        names = self._parts.get(flow)
        if names is None:
            names = self._parts[flow] = []
            for part in menu_parts(flow, self.typed.nn, self.typed.families).values():
                names.append(f"KIND{len(self._parts) - 1}_{len(names)}")
                self.rules[names[-1]] = part
        return names

    def plus(self, j: int, at_least: int, removed: tuple[int, ...] = ()) -> str:
        """The rule for `at_least` to max_added lines added at gap j. Under narrowed sites, a line
        that repeats one the group removed is not admitted: the pair would change nothing."""
        ind, kind = self.indents(j), self.context(j)
        exclude = tuple(sorted({self.lines[k].strip() for k in removed})) if self.narrow else ()
        if self.typed and kind == "MODULE" and self.shape.repeats != "yes":
            parts = self.parts(j)  # where too few kinds fit for the count asked, they may repeat
            if len(parts) >= max(2, at_least if self.shape.repeats == "no" else 0):
                return self.kinds(ind, parts, exclude, at_least)
        terminal = self.menu(j) if self.typed and kind == "MODULE" else kind
        key = ("|".join(ind), terminal, exclude)
        name = self._plus.get(key)
        if name is None:
            name = f"plus{len(self._plus)}"
            upper = name.upper()
            self._plus[key] = name
            body = terminal
            if exclude:
                body = f"{upper}_BODY"
                same = "|".join(_lark_regex(x) for x in exclude)
                self.rules[body] = f"{terminal} & ~/(?:{same})" + r"[ \t]*/"
            alt = "|".join(re.escape(x).replace("\\ ", " ") for x in ind)
            # A layer from the menu sits exactly as deep as its neighbours (free elements may go deeper).
            deeper = f"(?:{re.escape(self.unit).replace(chr(92) + ' ', ' ')}){{0,2}}" \
                if kind != "STATEMENT" and terminal == kind else ""
            self.rules[upper] = f'"+" /(?:{alt}){deeper}/ {body} "\\n"'
        rule = f"{name}_{at_least}"
        if rule not in self.rules:
            self.rules[rule] = f"{name.upper()}{{{at_least},{self.shape.max_added}}}"
        return rule

    def kinds(self, ind: tuple[str, ...], kinds: list[str], exclude: tuple[str, ...], at_least: int) -> str:
        """`plus` where a group may not repeat a kind of layer (`DiffShape.repeats`): `at_least` to
        max_added layers from the kinds' terminals, none of the kind just added (`apart`) or of any
        kind already added (`no`). A rule per state: the kinds that may not come next, and the count."""
        key = ("|".join(ind), tuple(kinds), exclude)
        name = self._plus.get(key)
        if name is None:
            name = self._plus[key] = f"plus{len(self._plus)}"
            alt = "|".join(re.escape(x).replace("\\ ", " ") for x in ind)
            same = "|".join(_lark_regex(x) for x in exclude)
            for n, k in enumerate(kinds):
                body = k
                if exclude:
                    body = f"{name.upper()}_{n}_BODY"
                    self.rules[body] = f"{k} & ~/(?:{same})" + r"[ \t]*/"
                self.rules[f"{name.upper()}_{n}"] = f'"+" /(?:{alt})/ {body} "\\n"'
        # Once at most needs a rule per set of kinds used: with many kinds (no draw narrowed them)
        # and long groups, that is thousands; never twice in a row then holds instead.
        apart = self.shape.repeats == "apart" or sum(
            math.comb(len(kinds), k) for k in range(self.shape.max_added)) > MAX_KIND_STATES

        def run(barred: int, done: int) -> str:  # barred: a bit per kind that may not come next
            rule = f"{name}_{at_least}_{barred}_{done}"
            if rule not in self.rules:
                self.rules[rule] = ""  # claimed before the rules it refers to are made
                more = []
                for n in range(len(kinds)):
                    if barred >> n & 1:
                        continue
                    after = (1 << n) if apart else barred | (1 << n)
                    last = done + 1 >= self.shape.max_added or after == (1 << len(kinds)) - 1
                    more.append(f"{name.upper()}_{n}" + ("" if last else f" {run(after, done + 1)}"))
                body = " | ".join(more)
                self.rules[rule] = f"({body})?" if done >= at_least else body
            return rule

        return run(0, 0)

    def body_terminals(self) -> dict[str, str]:
        """One added line's text, by where it lands. Everywhere: brackets balanced (three levels
        deep), no comment, no fence, nothing a diff reads as a marker. A layer of an
        `nn.Sequential` is one constructor call and its comma; another bracket's element has no
        `=` or `:` outside its own brackets and ends in a comma. A statement opens no block: no
        `:` outside brackets."""
        a = r"[^()\[\]{}\n\r`]"

        def balanced(top: str, levels: int = 3) -> str:
            level = f"{a}*"
            for _ in range(levels):
                group = rf"\({level}\)|\[{level}\]|\{{{level}\}}"
                level = f"(?:{a}|{group})*"
            return f"(?:{top}|{group})*"

        # Bounded counts and negations inside these intersections multiply the lexer's states: an
        # answer that wrote `def` once exhausted llguidance's lexer budget. So no length bound (the
        # token budget and the closing rule bound a line) and no keyword list: a compound statement
        # needs a `:` outside brackets, which a statement may not have.
        common = r"/[^\s`+@#-][^\n\r`]*/"
        element = balanced(r"[^()\[\]{}\n\r`=:]|==|[<>!]=")
        statement = balanced(r"[^()\[\]{}\n\r`:]")
        call = r"[A-Za-z_][A-Za-z0-9_.]{0,63}\(" + balanced(a, 2) + r"\),[ \t]*"  # a bounded name
        return {
            "MODULE": f"/{call}/ & {common}",
            "ELEMENT": f"/{element}/ & {common} & " + r"/.*,[ \t]*/",
            "STATEMENT": f"/{statement}/ & {common}",
        }

    # Rules are written as they are referenced, from `start` on, so a grammar narrowed to a few
    # sites holds only the rules those sites can reach.
    def want(self, name: str, make) -> str:
        if name not in self.rules and name not in self._queued:
            self._queued.add(name)
            self._todo.append((name, make))
        return name

    def s(self, h: int, m: int) -> str | None:
        """'Hunk h starts at gap m or later' (in window h, under windows), or None when no hunk may
        start there."""
        if h > self.shape.max_hunks or m > self.n:
            return None
        if self.windows is not None:
            g = next((x for x in self.windows[h - 1] if x >= m), None) if h <= len(self.windows) else None
        else:
            g = self._next.get(m)
        return None if g is None else self.want(f"s{h}_{g}", lambda: self.make_s(h, g))

    def last_hunk(self, h: int) -> bool:
        """May the answer close after hunk h? Under windows, only once every window is edited."""
        return self.windows is None or h == len(self.windows)

    def group_sites(self, h: int) -> set[int]:
        return self.site_set if self.windows is None else set(self.windows[h - 1])

    def limit(self, h: int) -> int:
        """The last line a group of hunk h may end on with its context line: under windows, the
        line before the next window, so the next hunk can still open there."""
        if self.windows is None or h >= len(self.windows):
            return self.n
        return self.windows[h][0] - 1

    def g(self, h: int, i: int) -> str:
        return self.want(f"g{h}_{i}", lambda: " | ".join(self.group_alts(h, i)))

    def e(self, h: int, k: int) -> str:
        return self.want(f"e{h}_{k}", lambda: self.make_e(h, k))

    def make_s(self, h: int, i: int) -> str:
        above = f" {self.ctx(i - 1)}" if i >= 1 else ""
        alts = [f"{self.header(i)}{above} {self.g(h, i)}"]
        later = self.s(h, i + 1)
        if later:
            alts.append(later)
        return " | ".join(alts)

    def make_e(self, h: int, k: int) -> str:
        """After a group and one context line, at line k: close, start the next hunk, or go on
        with another group after zero or one more context line."""
        alts = [_q(CLOSE)] if self.last_hunk(h) else []
        nxt = self.s(h + 1, k)
        if nxt:
            alts.append(nxt)
        here = self.group_sites(h)
        if k < self.n and k in here:
            alts.append(self.g(h, k))
        if k + 1 < self.n and k + 1 in here:
            alts.append(f"{self.ctx(k)} {self.g(h, k + 1)}")
        if not alts:
            raise AssertionError(f"no way on after hunk {h} at line {k}")
        return " | ".join(alts)

    def build(self) -> str:
        first = self.s(1, 0)
        if first is None:
            raise GrammarError("no_edit_site", "no line of the parent may change at the sites asked for "
                                               "(they are all in protected functions)")
        while self._todo:
            name, make = self._todo.pop()
            self.rules[name] = make()
        self.rules.update(self.body_terminals())
        head = f"start: {first}"
        return "\n".join([head] + [f"{k}: {v}" for k, v in self.rules.items()]) + "\n"

    def after(self, h: int, j: int) -> str | None:
        """What follows a change group of hunk h that ends before line j: the context line below,
        or the end of the answer at the end of the file (None: the group may not end there)."""
        if j > self.limit(h):
            return None
        if j < self.n:
            return f"{self.ctx(j)} {self.e(h, j + 1)}"
        return _q(CLOSE) if self.last_hunk(h) else None

    def group_alts(self, h: int, i: int) -> list[str]:
        """A group at gap i: lines i..j-1 removed, then additions; or additions alone before line i.
        A removed run keeps the brackets balanced and stays within its block (no line less indented
        than its first), and a run that empties a block must be replaced by at least one line."""
        alts = []
        removed = []
        first = len(_indent(self.lines[i])) if i < self.n else 0
        layers = self.typed is not None and self.context(i) == "MODULE"  # whole layers that keep the flow
        for k in range(1, self.shape.max_removed + 1):
            j = i + k - 1
            if j >= self.n or j not in self.removable or (layers and j not in self.typed.removable):
                break
            if self.lines[j].strip() and len(_indent(self.lines[j])) < first:
                break
            if self.depth[j + 1] < self.depth[i]:
                break  # the run would close a bracket it did not open
            removed.append(self.rem(j))
            if self.depth[j + 1] != self.depth[i]:
                continue
            then = self.after(h, j + 1)
            if then is None:
                break
            adds = self.plus(j + 1, 1 if self.empties(i, j + 1) or self.exposes(i, j + 1) else 0, tuple(range(i, j + 1)))
            alts.append(f"{' '.join(removed)} {adds} {then}")
        then = self.after(h, i) if i < self.n else None
        if then is not None:
            alts.append(f"{self.plus(i, self.shape.min_added)} {then}")
        if not alts:
            raise AssertionError(f"no change group at line {i}")
        return alts

    def exposes(self, i: int, j: int) -> bool:
        """Would removing layers i..j-1 put a layer in place (`ReLU(inplace=True)`) right after one
        whose backward reads its output (a `ReLU`)? The first's output would be overwritten, and
        training fails; a layer added between them keeps it."""
        if self.typed is None:
            return False
        flow = self.typed.flows.get(j)
        return i - 1 in self.typed.keepers and flow is not None and flow.before_inplace

    def empties(self, i: int, j: int) -> bool:
        """Would removing lines i..j-1 leave the block they are in without a statement?"""
        above = next((self.lines[k] for k in range(i - 1, -1, -1) if self.lines[k].strip()), None)
        below = next((self.lines[k] for k in range(j, self.n) if self.lines[k].strip()), None)
        opens = above is not None and above.rstrip().endswith(":") and self.depth[i] == 0
        return opens and (below is None or len(_indent(below)) < len(_indent(self.lines[i])))


def delta_grammar(parent_source: str, *, shape: DiffShape | None = None, allow_train_changes: bool = False,
                  sites: list[int] | None = None, anchors: list[int] | None = None,
                  typed: bool = False, families: tuple[str, ...] | None = None) -> Grammar:
    """The grammar of the diffs against `parent_source` that apply (see the module docstring).
    `sites`: gaps where change groups may start (default: everywhere allowed). `anchors`: lines
    that must each be edited, one hunk apiece in file order (changed, or layers added just before
    or after). `typed`: a line added inside an `nn.Sequential` is a layer that keeps the shapes
    there (tools/layer_types.py), of the kinds in `families` (default: all). Raises GrammarError
    for a parent it cannot serve."""
    started = time.perf_counter()
    shape = shape or DiffShape()
    if not isinstance(parent_source, str) or not parent_source.strip():
        raise GrammarError("empty_parent", "the parent source is empty")
    lines = parent_lines(parent_source)
    if len(lines) > MAX_PARENT_LINES:
        raise GrammarError("parent_too_large", f"the parent has {len(lines)} lines; the grammar serves at most "
                                               f"{MAX_PARENT_LINES}")
    bad = next((i for i, x in enumerate(lines) if "\r" in x or "\0" in x), None)
    if bad is not None:
        raise GrammarError("unsupported_line", f"line {bad + 1} of the parent holds a carriage return or a NUL, "
                                               "which a diff line cannot carry")
    try:
        allowed, removable = edit_sites(parent_source, allow_train_changes=allow_train_changes)
    except SyntaxError as e:
        raise GrammarError("parent_syntax", f"the parent does not parse: {e.msg} (line {e.lineno})") from None
    windows = None
    if anchors is not None:
        ok = set(allowed)
        windows = []
        for a in sorted(set(anchors)):  # a window too close to the one before it joins nothing: dropped
            w = [g for g in site_window(a) if g in ok and g < len(lines)]
            if w and (not windows or w[0] > windows[-1][-1]):
                windows.append(w)
        if not windows:
            raise GrammarError("no_edit_site", "no line of the parent may change at the anchors asked for "
                                               "(they are in protected functions)")
        if len(windows) > shape.max_hunks:
            raise GrammarError("too_many_anchors", f"{len(windows)} anchors need as many hunks; "
                                                   f"max_hunks is {shape.max_hunks}")
        sites = [g for w in windows for g in w]
    if sites is not None:
        allowed = sorted(set(allowed) & set(sites))
    elif len(allowed) > MAX_SITES:
        raise GrammarError("too_many_sites", f"the parent has {len(allowed)} places a diff may start; a grammar "
                                             f"over all of them passes {MAX_SITES}, past what grammar engines "
                                             "parse by default. Narrow them with sites (llm.sites = \"sampled\")")
    typing = None
    if typed:
        from deltanas.tools.layer_types import flows, nn_prefix, output_keepers, removable_lines

        typing = _Typing(flows(parent_source), removable_lines(parent_source), nn_prefix(parent_source), families,
                         output_keepers(parent_source))
    builder = _Builder(lines, shape, allowed, removable, narrow=sites is not None, windows=windows, typed=typing)
    lark = builder.build()
    return Grammar(lark=lark, prefix=DIFF_PREFIX, kind="delta", rules=len(builder.rules) + 1,
                   build_seconds=time.perf_counter() - started, sites=tuple(allowed),
                   windows=tuple(tuple(w) for w in windows or ()))


def full_grammar(*, max_line_chars: int = 240) -> Grammar:
    """One ```python fence holding the whole file, with a `class Net` line in it."""
    started = time.perf_counter()
    line = rf"/[^\n`]{{0,{max_line_chars}}}\n/"
    lark = "\n".join([
        f"start: line* net line* {_q(CLOSE)}",
        f"line: {line}",
        rf"net: /class Net[(:][^\n`]{{0,{max_line_chars}}}\n/",
    ]) + "\n"
    return Grammar(lark=lark, prefix=FULL_PREFIX, kind="full", rules=3, build_seconds=time.perf_counter() - started)


def layer_lines(source: str, *, allow_train_changes: bool = False) -> list[int]:
    """Lines worth an edit (0-based): the statements and the elements of multi-line calls in the
    bodies of the functions and methods a diff may change (Net's `__init__` and `forward`, helper
    blocks), without docstrings, `super().__init__()`, blank, comment or closing-bracket lines."""
    tree = ast.parse(source)
    lines = parent_lines(source)
    whole, _ = (set(), set()) if allow_train_changes else protected_lines(source)
    out: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        if not body:
            continue
        for i in range(body[0].lineno - 1, node.end_lineno):
            text = lines[i].strip() if i < len(lines) else ""
            if (i in whole or not text or text.startswith(("#", ")", "]", "}", "def ", "class ", "@"))
                    or text.startswith("super(")):
                continue
            out.add(i)
    return sorted(out)


def site_window(anchor: int) -> list[int]:
    """The gaps of an edit placed at `anchor`: change it (or the lines from it on), or insert
    before or after it."""
    return [anchor, anchor + 1]


@lru_cache(maxsize=1)
def _byte_tokenizer():
    """An llguidance tokenizer whose tokens are the 256 bytes (and an end token), to check a
    text against a grammar exactly, with no model's tokenizer at hand."""
    import llguidance
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):  # GPT-2's byte-to-character map, which the ByteLevel decoder reverses
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)} | {"<eos>": 256}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return llguidance.LLTokenizer(tok.to_str(), eos_token=256)


def accepts(lark: str, text: str, *, partial: bool = False) -> bool:
    """Does the grammar admit exactly `text` (an answer without its prefix)? With `partial`, is
    `text` a start the grammar can still complete (an answer cut at its token limit)? Raises
    GrammarError when the grammar does not compile."""
    import llguidance

    m = llguidance.LLMatcher(_byte_tokenizer(), lark, log_level=0)
    if m.is_error():
        raise GrammarError("grammar_invalid", f"the grammar does not compile: {m.get_error()[:300]}")
    return m.consume_tokens(list(text.encode("utf-8"))) and (partial or m.is_accepting())


CONSTRAIN_MODES = ("grammar", "prefix", "none")


def pick_sites(source: str, key: str, count: int = 1, *, allow_train_changes: bool = False,
               typed: bool = False) -> list[int]:
    """Layer lines (0-based, in file order, at least two apart) for one candidate's edits, drawn
    from `key` (seed, cycle and index), so a resume draws the same and a cycle's candidates spread
    over the network. With `typed`, only the layers of one-per-line `nn.Sequential`s are drawn
    while the parent has any (a line added there comes from a menu of layers that fit; a free
    statement is where small models break a network), so fewer than `count` may come back."""
    import random

    try:
        lines = layer_lines(source, allow_train_changes=allow_train_changes)
        if typed:
            from deltanas.tools.layer_types import flows

            known = flows(source)
    except SyntaxError:
        return []
    rng = random.Random(key)
    pool = [i for i in lines if typed and i in known and i + 1 in known] or lines
    rng.shuffle(pool)
    chosen: list[int] = []
    for i in pool:
        if len(chosen) == count:
            break
        if all(abs(i - c) >= 2 for c in chosen):
            chosen.append(i)
    return sorted(chosen)


@dataclass(frozen=True)
class AnswerFormat:
    """What a backend is given to hold one answer to the format: the pre-filled start of the
    answer and the grammar of the rest (None: unconstrained), and the mode they realise."""

    constrain: str
    prefix: str = ""
    grammar: str | None = None
    note: str = ""  # why a mode fell back to a weaker one
    hunks: int = 0  # hunks the grammar requires (one per edit window)


def answer_format(parent_source: str, *, mode: str, constrain: str, shape: DiffShape | None = None,
                  allow_train_changes: bool = False, sites: list[int] | None = None,
                  typed: bool = False, families: tuple[str, ...] | None = None) -> AnswerFormat:
    """The prefix and grammar of one answer. A parent the grammar cannot serve gets the prefix,
    and the reason in `note`."""
    if constrain not in CONSTRAIN_MODES:
        raise ValueError(f"constrain must be one of {CONSTRAIN_MODES}, got {constrain!r}")
    prefix = FULL_PREFIX if mode == "full" else DIFF_PREFIX
    if constrain == "none":
        return AnswerFormat("none")
    if constrain == "prefix":
        return AnswerFormat("prefix", prefix)
    if mode == "full":
        return AnswerFormat("grammar", prefix, full_grammar().lark)
    try:
        g = delta_grammar(parent_source, shape=shape, allow_train_changes=allow_train_changes,
                          anchors=sites or None, typed=typed, families=families)
    except GrammarError as e:
        return AnswerFormat("prefix", prefix, note=f"grammar unavailable ({e.code}): {e}")
    return AnswerFormat("grammar", prefix, g.lark, hunks=len(g.windows))
