"""Which structured-decoding library serves the per-parent diff grammar best: compile and mask cost.

    python bench/grammar_libs.py [--tokenizer smollm2|tinycoder] [--repeats 5] [--baselines lenet,resnet]
                                 [--libs llguidance,xgrammar,xgrammar-dyn,outlines-core] [--json PATH] [--quick]

For every zoo baseline and a 200-line parent (the zoo's resnet with distinct helper blocks added
before `class Net`), two grammars from `tools/diff_grammar.py`:
- full: `delta_grammar(src)`, a change group may start at any allowed line;
- narrowed: `delta_grammar(src, sites=site_window(a))`, one drawn edit site, `a` a line of
  `layer_lines(src)` (the one the measured answer edits). The product's default since draws four
  sites, a hunk each, with typed layers (`anchors=`, `typed=True`); its compile time is what
  `bench/valid_rate.py` reports.
Each library compiles each grammar `--repeats` times (fresh, no cache; the median is shown) and
then walks one real admitted answer token by token, timing the next-token mask at every step
(the first mask apart, since a lazy library does work there that an eager one did at compile);
`answer ms` is the compile plus every mask of that answer, what constraining it cost in all.
The answer is a rule-based mutation of the parent (`tools/mutator.py`) written as the diff the
grammar admits, after the pre-filled prefix, so every library consumes the same token ids (a
parent no mutation fits at one site falls back to a greedy walk of llguidance's masks). Each
row also checks that the library refuses the same answer with a broken context line.

- llguidance: the grammar as the product sends it (`LLMatcher`; `compute_bitmask` per step).
- xgrammar: takes EBNF, not llguidance's Lark. The grammar is converted here (rules, JSON
  string literals, `{m,n}`, regex terminals as EBNF strings, classes and repeats). EBNF has no
  `&` (intersection) nor `~` (negation), which the ELEMENT/STATEMENT terminals use: those take
  their first operand alone (the bracket-balance regex; the length cap, the no-marker first
  character, the trailing comma and the no-keyword rule are dropped), a looser and easier
  grammar, so xgrammar's figures are a lower bound. `compile_grammar` and
  `fill_next_token_bitmask` are timed; the conversion is reported apart. `xgrammar-dyn` is the
  same with `enable_dynamic_compilation`, which builds token masks at first use instead.
- outlines-core: compiles regexes only (no CFG). The grammar is tried as one regex by inlining its
  rules (they are not recursive), with the same first-operand approximation; where the inlined
  regex would pass `--max-regex` characters (the full grammar: every hunk start inlines every
  later one) the row says so instead of a number. Its vocabulary is the tokenizer's token bytes.
A library that is not installed is a `skipped` row with the reason; a failure is an `error` row.
A grammar whose first compile takes over `--max-compile-s` is not compiled again, and a library
that has spent `--lib-budget-s` compiling skips its remaining rows (outlines-core takes minutes
per narrowed grammar), which is why the 200-line parent comes first.

`--quick`: lenet and the 200-line parent, the tinycoder tokenizer, one repeat (the CI run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from deltanas.tools.diff_grammar import (  # noqa: E402
    CLOSE,
    TARGET,
    GrammarError,
    accepts,
    delta_grammar,
    layer_lines,
    parent_lines,
    site_window,
)
from deltanas.tools.diff_write import make_diff  # noqa: E402
from deltanas.tools.mutator import NoMutation, mutate_source  # noqa: E402
from deltanas.tools.zoo import get_baseline, list_baselines  # noqa: E402

LIBS = ("llguidance", "xgrammar", "xgrammar-dyn", "outlines-core")
TARGET_COMPILE_MS = 50.0  # the issue's target for a 200-line parent
BIG_LINES = 200
MAX_ANSWER_SEEDS = 400
GREEDY_STEPS = 200
APPROX = "&/~ terminals cut to their first operand (looser grammar: a lower bound)"


# ---------------------------------------------------------------- parents


def helper_block(k: int) -> str:
    """A distinct, valid helper module: its own widths, kernel and scale."""
    c = 8 + 4 * k
    return (f"class Helper{k}(nn.Module):\n"
            f"    def __init__(self, channels={c}):\n"
            f"        super().__init__()\n"
            f"        self.conv{k} = nn.Conv2d(channels, channels, kernel_size={3 + 2 * (k % 2)}, "
            f"padding={1 + k % 2}, bias=False)\n"
            f"        self.norm{k} = nn.BatchNorm2d(channels)\n"
            f"        self.act{k} = nn.ReLU(inplace=True)\n"
            f"\n"
            f"    def forward(self, x):\n"
            f"        return self.act{k}(self.norm{k}(self.conv{k}(x))) * {k + 1} + x\n"
            f"\n\n")


def parent_of_lines(n: int = BIG_LINES) -> str:
    """The zoo's resnet plus helper blocks (and one-line constants to land exactly) before
    `class Net`, until the file has `n` lines. Valid Python, deterministic."""
    base = get_baseline("resnet").source
    head, sep, tail = base.partition("class Net(")
    assert sep, "the resnet baseline has no class Net"
    count = lambda text: len(parent_lines(text))  # noqa: E731
    extra, k = "", 0
    while count(head + extra + helper_block(k) + sep + tail) <= n:
        extra += helper_block(k)
        k += 1
    j = 0
    while count(head + extra + sep + tail) < n:
        extra = f"HELPER_SCALE_{j} = {j + 1}\n" + extra
        j += 1
    src = head + extra + sep + tail
    compile(src, "model.py", "exec")
    return src


def parents(names: list[str] | None) -> list[tuple[str, str]]:
    """The 200-line parent first (the issue's figure, measured before any budget runs out), then
    the zoo's baselines."""
    return [("resnet+helpers", parent_of_lines(BIG_LINES))] + [
        (b.name, b.source) for b in list_baselines() if names is None or b.name in names]


# ---------------------------------------------------------------- answers


@dataclass
class Answer:
    text: str  # what follows the pre-filled prefix, the closing fence included
    anchor: int | None  # the layer line of the narrowed grammar that admits it
    how: str


def diff_answer(base: str, new: str) -> str:
    diff = make_diff(base, new)
    head = f"--- a/{TARGET}\n+++ b/{TARGET}\n"
    assert diff.startswith(head), diff[:80]
    return diff[len(head):] + CLOSE


def find_answer(src: str) -> Answer | None:
    """A rule-based mutation that both the full grammar and one site window admit, so both modes
    walk the same tokens; the first seed that gives one (None: no seed does). Site windows whose
    grammar does not compile are passed over (`refused_windows` lists them)."""
    full = delta_grammar(src).lark
    anchors = [a for a in layer_lines(src) if a not in refused_windows(src)]
    for seed in range(MAX_ANSWER_SEEDS):
        try:
            name, new = mutate_source(src, random.Random(seed))
        except NoMutation:
            continue
        text = diff_answer(src, new)
        if not accepts(full, text):
            continue
        for a in anchors:
            if accepts(delta_grammar(src, sites=site_window(a)).lark, text):
                return Answer(text, a, f"mutation {name} (seed {seed})")
    return None


@lru_cache(maxsize=None)
def refused_windows(src: str) -> dict[int, str]:
    """The layer lines whose site-window grammar llguidance refuses, with its error: a builder
    bug to report, not a cost to measure."""
    out = {}
    for a in layer_lines(src):
        try:
            accepts(delta_grammar(src, sites=site_window(a)).lark, "")
        except GrammarError as e:
            out[a] = str(e)
    return out


def greedy_answer(lltok, lark: str) -> tuple[list[int], bool]:
    """Any answer the grammar admits: the first allowed token at every step, capped at
    GREEDY_STEPS; (tokens, whether the answer is complete)."""
    import llguidance
    import numpy as np

    m = llguidance.LLMatcher(lltok, lark, log_level=0)
    eos = set(lltok.eos_tokens)
    out: list[int] = []
    for _ in range(GREEDY_STEPS):
        if m.is_stopped():
            break
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = [t for t in np.flatnonzero(bits[: lltok.vocab_size]).tolist() if t not in eos]
        if not allowed:
            break
        out.append(allowed[0])
        m.consume_token(allowed[0])
    return out, m.is_accepting()


# ---------------------------------------------------------------- Lark (llguidance dialect) -> AST

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<re>/(?:[^/\\\n]|\\.)+/[imslux]*)
  | (?P<rep>\{(?P<lo>\d+)(?:,(?P<hi>\d*))?\})
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>[|&~()?*+])
""", re.X | re.S)


def lark_rules(lark: str) -> dict[str, tuple]:
    """The rules of a grammar as `tools/diff_grammar.py` writes them: `name: body` per line. Nodes:
    ("lit", text) ("re", pattern) ("ref", name) ("rep", node, lo, hi) ("seq", [..]) ("alt", [..])
    ("and", [..]) ("not", node)."""
    rules = {}
    for line in lark.splitlines():
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        name, sep, body = line.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            raise ValueError(f"not a rule line: {line[:80]!r}")
        rules[name.strip()] = _parse_body(body)
    return rules


def _parse_body(body: str) -> tuple:
    toks, pos = [], 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m:
            raise ValueError(f"cannot read the grammar at {body[pos:pos + 40]!r}")
        pos = m.end()
        if m.group("ws"):
            continue
        if m.group("str") is not None:
            toks.append(("lit", json.loads(m.group("str"))))
        elif m.group("re") is not None:
            pat = m.group("re")
            flags = pat[pat.rindex("/") + 1:]
            if flags:
                raise ValueError(f"regex flags {flags!r} are not converted")
            toks.append(("re", pat[1:pat.rindex("/")].replace("\\/", "/")))
        elif m.group("rep") is not None:
            hi = m.group("hi")
            toks.append(("rep", int(m.group("lo")), None if hi == "" else int(hi if hi is not None else m.group("lo"))))
        elif m.group("name") is not None:
            toks.append(("ref", m.group("name")))
        else:
            toks.append(("op", m.group("op")))
    node, i = _alt(toks, 0)
    if i != len(toks):
        raise ValueError(f"unexpected {toks[i]} in the grammar")
    return node


def _alt(toks, i):
    alts = []
    node, i = _and(toks, i)
    alts.append(node)
    while i < len(toks) and toks[i] == ("op", "|"):
        node, i = _and(toks, i + 1)
        alts.append(node)
    return (alts[0] if len(alts) == 1 else ("alt", alts)), i


def _and(toks, i):
    parts = []
    node, i = _seq(toks, i)
    parts.append(node)
    while i < len(toks) and toks[i] == ("op", "&"):
        node, i = _seq(toks, i + 1)
        parts.append(node)
    return (parts[0] if len(parts) == 1 else ("and", parts)), i


def _seq(toks, i):
    items = []
    while i < len(toks) and toks[i] not in (("op", "|"), ("op", "&"), ("op", ")")):
        node, i = _postfix(toks, i)
        items.append(node)
    if not items:
        return ("lit", ""), i
    return (items[0] if len(items) == 1 else ("seq", items)), i


def _postfix(toks, i):
    node, i = _atom(toks, i)
    while i < len(toks):
        t = toks[i]
        if t[0] == "rep":
            node = ("rep", node, t[1], t[2])
        elif t == ("op", "?"):
            node = ("rep", node, 0, 1)
        elif t == ("op", "*"):
            node = ("rep", node, 0, None)
        elif t == ("op", "+"):
            node = ("rep", node, 1, None)
        else:
            break
        i += 1
    return node, i


def _atom(toks, i):
    t = toks[i]
    if t == ("op", "~"):
        node, i = _atom(toks, i + 1)
        return ("not", node), i
    if t == ("op", "("):
        node, i = _alt(toks, i + 1)
        if i >= len(toks) or toks[i] != ("op", ")"):
            raise ValueError("unbalanced parenthesis in the grammar")
        return node, i + 1
    if t[0] in ("lit", "re", "ref"):
        return t, i + 1
    raise ValueError(f"unexpected {t} in the grammar")


def reachable(rules: dict[str, tuple], root: str = "start") -> dict[str, tuple]:
    """The rules `root` reaches, in their order."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        stack = [rules[name]]
        while stack:
            node = stack.pop()
            if node[0] == "ref":
                todo.append(node[1])
            elif node[0] in ("seq", "alt", "and"):
                stack.extend(node[1])
            elif node[0] in ("rep", "not"):
                stack.append(node[1])
    return {k: v for k, v in rules.items() if k in seen}


def approximate(node: tuple, cut: list) -> tuple:
    """The node without `&` and `~`: an intersection becomes its first operand (a superset)."""
    kind = node[0]
    if kind == "and":
        cut.append(node)
        first = node[1][0]
        if first[0] == "not":
            raise ValueError("an intersection led by a negation has no positive operand to keep")
        return approximate(first, cut)
    if kind == "not":
        raise ValueError("a negation outside an intersection cannot be approximated from above")
    if kind in ("seq", "alt"):
        return (kind, [approximate(x, cut) for x in node[1]])
    if kind == "rep":
        return ("rep", approximate(node[1], cut), node[2], node[3])
    return node


# ---------------------------------------------------------------- AST -> xgrammar EBNF

def _ebnf_str(text: str) -> str:
    out = []
    for ch in text:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or o == 0x7f:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@lru_cache(maxsize=None)
def _category_ranges(category: str) -> tuple[tuple[int, int], ...]:
    """Python's own meaning of \\s, \\d, \\w in a str pattern, as code point ranges."""
    test = {"space": str.isspace, "digit": lambda c: unicodedata.category(c) == "Nd",
            "word": lambda c: c.isalnum() or c == "_"}[category]
    out, lo = [], None
    for cp in range(0x110000):
        hit = test(chr(cp))
        if hit and lo is None:
            lo = cp
        elif not hit and lo is not None:
            out.append((lo, cp - 1))
            lo = None
    if lo is not None:
        out.append((lo, 0x10FFFF))
    return tuple(out)


def _class_char(cp: int) -> str:
    ch = chr(cp)
    if ch in "\\]-^[":
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02x}"
    if cp > 0xFFFF:
        return f"\\U{cp:08x}"
    if cp > 0x7E:
        return f"\\u{cp:04x}"
    return ch


def _char_class(ranges: list[tuple[int, int]], negate: bool) -> str:
    body = "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}" for a, b in ranges)
    return f"[{'^' if negate else ''}{body}]"


_CATEGORIES = {"CATEGORY_SPACE": ("space", False), "CATEGORY_NOT_SPACE": ("space", True),
               "CATEGORY_DIGIT": ("digit", False), "CATEGORY_NOT_DIGIT": ("digit", True),
               "CATEGORY_WORD": ("word", False), "CATEGORY_NOT_WORD": ("word", True)}


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, at = [], 0
    for a, b in sorted(ranges):
        if a > at:
            out.append((at, a - 1))
        at = max(at, b + 1)
    if at <= 0x10FFFF:
        out.append((at, 0x10FFFF))
    return out


def _atomic(expr: str) -> bool:
    """Is this EBNF one string, one class, one rule name or one parenthesized group?"""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", expr):
        return True
    if not expr or expr[0] not in '"[(':
        return False
    depth, i, n = 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and expr[i] != close:
                i += 2 if expr[i] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if depth == 0 and i < n - 1:
            return False  # something follows the first item
        i += 1
    return True


def regex_to_ebnf(pattern: str, shared: dict[str, str] | None = None, prefix: str = "xsub") -> str:
    """One EBNF expression for a Python-syntax regex (the subset the grammars use: literals,
    classes, \\s \\d \\w, `.`, groups, alternation, greedy or lazy repeats) in xgrammar's own
    operators: a string for a run of literals, a class as a class, `*` `+` `?` `{m,n}`. With
    `shared` (EBNF body -> rule name, filled in here), the body of every repeated group becomes
    one rule however often it occurs, as one would write the grammar by hand: the bracket-balance
    terminal nests each level three times, and inlined it compiles several times slower."""
    import re._constants as C
    import re._parser as P

    def seq(items) -> str:
        parts, lit = [], []
        for op, av in items:
            if op is C.LITERAL:
                lit.append(chr(av))
                continue
            if lit:
                parts.append(_ebnf_str("".join(lit)))
                lit = []
            parts.append(one(op, av))
        if lit:
            parts.append(_ebnf_str("".join(lit)))
        return " ".join(parts) if parts else '""'

    def one(op, av) -> str:
        if op is C.NOT_LITERAL:
            return _char_class([(av, av)], True)
        if op is C.ANY:
            return _char_class([(10, 10)], True)  # Python's `.`: anything but a newline
        if op is C.IN:
            negate, ranges = False, []
            for kind, arg in av:
                if kind is C.NEGATE:
                    negate = True
                elif kind is C.LITERAL:
                    ranges.append((arg, arg))
                elif kind is C.RANGE:
                    ranges.append(arg)
                elif kind is C.CATEGORY:
                    name, neg = _CATEGORIES[str(arg)]
                    cat = list(_category_ranges(name))
                    ranges += _complement(cat) if neg else cat
                else:
                    raise ValueError(f"regex class item {kind} is not converted")
            return _char_class(ranges, negate)
        if op is C.BRANCH:
            return "(" + " | ".join(seq(b) for b in av[1]) + ")"
        if op is C.SUBPATTERN:
            return f"({seq(av[-1])})"
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, body = av
            inner = seq(body)
            if shared is not None and not re.fullmatch(r'\[(?:[^\]\\]|\\.)*\]|"(?:[^"\\]|\\.)*"', inner):
                inner = shared.setdefault(inner, f"{prefix}{len(shared)}")
            elif not _atomic(inner):
                inner = f"({inner})"
            if hi is C.MAXREPEAT:
                return inner + ("*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}")
            return inner + ("?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}")
        raise ValueError(f"regex operator {op} is not converted")

    return seq(P.parse(pattern))


class EbnfWriter:
    """llguidance Lark, as `tools/diff_grammar.py` writes it, to xgrammar's EBNF."""

    def __init__(self, share: bool = True):
        self._regex: dict[str, tuple[str, str]] = {}  # pattern -> (rule name, its EBNF)
        self._shared: dict[str, str] | None = {} if share else None  # repeated groups' bodies -> rule

    def regex_rule(self, pattern: str) -> str:
        if pattern not in self._regex:
            self._regex[pattern] = (f"xre{len(self._regex)}", regex_to_ebnf(pattern, self._shared))
        return self._regex[pattern][0]

    def expr(self, node: tuple) -> str:
        kind = node[0]
        if kind == "lit":
            return _ebnf_str(node[1])
        if kind == "re":
            return self.regex_rule(node[1])
        if kind == "ref":
            return f"g_{node[1]}"
        if kind == "seq":
            return " ".join(self.expr(x) for x in node[1])
        if kind == "alt":
            return "(" + " | ".join(self.expr(x) for x in node[1]) + ")"
        if kind == "rep":
            lo, hi = node[2], node[3]
            return f"({self.expr(node[1])}){{{lo},{'' if hi is None else hi}}}"
        raise ValueError(f"no EBNF for {kind}")

    def convert(self, lark: str) -> tuple[str, list[str]]:
        """(EBNF with root `root`, names of the rules whose &/~ were cut)."""
        rules = reachable(lark_rules(lark))  # the builder also writes the terminals no rule uses
        lines, cut_rules = ["root ::= g_start"], []
        for name, node in rules.items():
            cut: list = []
            body = approximate(node, cut)
            if cut:
                cut_rules.append(name)
            lines.append(f"g_{name} ::= {self.expr(body)}")
        lines += [f"{name} ::= {text}" for name, text in self._regex.values()]
        lines += [f"{name} ::= {text}" for text, name in (self._shared or {}).items()]
        return "\n".join(lines) + "\n", cut_rules


# ---------------------------------------------------------------- AST -> one regex (outlines-core)

_RE_SPECIAL = set("\\.+*?()|[]{}^$")


def _re_lit(text: str) -> str:
    out = []
    for ch in text:
        if ch in _RE_SPECIAL:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


class RegexTooLarge(Exception):
    pass


def inline_regex(lark: str, limit: int) -> tuple[str, list[str]]:
    """The whole grammar as one regex, rules inlined (refused when recursive or past `limit`
    characters; the size is worked out before any string is built)."""
    rules = reachable(lark_rules(lark))
    cut_rules, approx = [], {}
    for name, node in rules.items():
        cut: list = []
        approx[name] = approximate(node, cut)
        if cut:
            cut_rules.append(name)

    sizes: dict[str, int] = {}
    visiting: set[str] = set()

    def size(node) -> int:
        kind = node[0]
        if kind == "lit":
            return len(_re_lit(node[1]))
        if kind == "re":
            return len(node[1]) + 4
        if kind == "ref":
            return rule_size(node[1])
        if kind == "seq":
            return sum(size(x) for x in node[1])
        if kind == "alt":
            return sum(size(x) for x in node[1]) + len(node[1]) + 3
        if kind == "rep":
            return size(node[1]) + 14
        raise ValueError(kind)

    def rule_size(name: str) -> int:
        if name in sizes:
            return sizes[name]
        if name in visiting:
            raise RegexTooLarge(f"no CFG support, and rule {name} is recursive: no single regex")
        visiting.add(name)
        s = size(approx[name]) + 4
        visiting.discard(name)
        sizes[name] = s
        return s

    total = rule_size("start")
    if total > limit:
        raise RegexTooLarge(f"no CFG support, and the grammar inlined into one regex would be {total:.1e} chars "
                            f"(tried up to {limit:.0e})")
    memo: dict[str, str] = {}

    def emit(node) -> str:
        kind = node[0]
        if kind == "lit":
            return _re_lit(node[1])
        if kind == "re":
            return f"(?:{node[1]})"
        if kind == "ref":
            if node[1] not in memo:
                memo[node[1]] = f"(?:{emit(approx[node[1]])})"
            return memo[node[1]]
        if kind == "seq":
            return "".join(emit(x) for x in node[1])
        if kind == "alt":
            return "(?:" + "|".join(emit(x) for x in node[1]) + ")"
        if kind == "rep":
            return f"(?:{emit(node[1])}){{{node[2]},{'' if node[3] is None else node[3]}}}"
        raise ValueError(kind)

    return emit(("ref", "start")), cut_rules


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    library: str
    parent: str
    lines: int
    mode: str
    status: str = "ok"  # ok | skipped | infeasible | error
    compile_ms: float | None = None
    compile_ms_all: list = field(default_factory=list)
    first_mask_us: float | None = None
    mask_us_median: float | None = None
    mask_us_mean: float | None = None
    mask_us_max: float | None = None
    answer_ms: float | None = None  # compile and every mask of the answer: what constraining it cost
    tokens: int = 0
    rules: int = 0
    grammar_chars: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 3)


def _us(seconds: float) -> float:
    return round(1e6 * seconds, 2)


def timed_compiles(row: Row, compile_once, repeats: int, max_compile_s: float):
    """Compile `repeats` times (fewer once one compile takes more than `max_compile_s`); the
    median goes in the row, the last result is returned."""
    times, out = [], None
    for _ in range(repeats):
        out = None  # let the previous result go before the next compile
        started = time.perf_counter()
        out = compile_once()
        times.append(time.perf_counter() - started)
        if times[-1] > max_compile_s:
            break
    row.compile_ms_all = [_ms(t) for t in times]
    row.compile_ms = _ms(statistics.median(times))
    if len(times) < repeats:
        row.extra["compiles"] = len(times)
    return out


def _fill_masks(row: Row, masks: list[float]) -> None:
    row.tokens = len(masks)
    row.answer_ms = round(row.compile_ms + 1e3 * sum(masks), 3)
    if masks:
        row.first_mask_us = _us(masks[0])
        row.mask_us_median = _us(statistics.median(masks))
        row.mask_us_mean = _us(statistics.fmean(masks))
        row.mask_us_max = _us(max(masks))


def _names(names: list[str], shown: int = 3) -> str:
    names = sorted(set(names))
    more = f" +{len(names) - shown} more" if len(names) > shown else ""
    return "/".join(names[:shown]) + more


class Backend:
    """One library: `compile(lark)` returns a compiled object (or raises Infeasible); `matcher(c)`
    a fresh walker over it with `mask()`, `advance(token) -> bool` and `done() -> bool`."""

    name = ""
    setup_s = 0.0
    version = "?"

    def prepare(self, row: Row, lark: str):
        """The library's input for this grammar (timed apart from the compile)."""
        return lark

    def compile(self, prepared):
        raise NotImplementedError

    def matcher(self, compiled):
        raise NotImplementedError

    def run(self, row: Row, lark: str, tokens: list[int], bad: list[int] | None, repeats: int,
            max_compile_s: float, complete: bool = True, over_budget: str | None = None) -> None:
        prepared = self.prepare(row, lark)  # may find the grammar infeasible, which costs nothing
        if over_budget:
            raise Skipped(over_budget)
        compiled = timed_compiles(row, lambda: self.compile(prepared), repeats, max_compile_s)
        m = self.matcher(compiled)
        masks = []
        for i, t in enumerate(tokens):
            started = time.perf_counter()
            m.mask()
            masks.append(time.perf_counter() - started)
            if not m.advance(t):
                raise RuntimeError(f"{self.name} rejected token {i} ({t}) of the answer")
        if complete and not m.done():
            raise RuntimeError(f"{self.name}: the answer ended before the grammar did")
        _fill_masks(row, masks)
        if bad is not None:  # the converted grammars must still tell a wrong diff: a context line the parent lacks
            m = self.matcher(compiled)
            row.extra["rejects_bad_answer"] = not (all(m.advance(t) for t in bad) and m.done())


class Infeasible(Exception):
    """The library cannot take this grammar at all (the row says why)."""


class Skipped(Exception):
    """Not measured this time (the row says why)."""


class Llguidance(Backend):
    name = "llguidance"

    def __init__(self, hf_tok):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        started = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf_tok)
        self.setup_s = time.perf_counter() - started
        self.version = _dist_version("llguidance")

    def compile(self, lark: str):
        m = self.ll.LLMatcher(self.tok, lark, log_level=0)
        if m.is_error():
            raise RuntimeError(f"llguidance refused the grammar: {m.get_error()[:300]}")
        return m

    def matcher(self, compiled):
        m = compiled.deep_copy()
        return SimpleNamespace(mask=m.compute_bitmask, advance=m.consume_token, done=m.is_accepting)


class Xgrammar(Backend):
    name = "xgrammar"

    def __init__(self, hf_tok, dynamic: bool = False):
        import xgrammar as xgr

        self.xgr = xgr
        self.dynamic = dynamic
        if dynamic:
            self.name = "xgrammar-dyn"
        started = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tok)
        # no cache: every compile below does the whole work, as a new parent's grammar would
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False, enable_dynamic_compilation=dynamic)
        self.setup_s = time.perf_counter() - started
        self.version = _dist_version("xgrammar")

    def prepare(self, row: Row, lark: str) -> str:
        started = time.perf_counter()
        ebnf, cut = EbnfWriter().convert(lark)
        row.extra["convert_ms"] = _ms(time.perf_counter() - started)
        row.extra["ebnf_chars"] = len(ebnf)
        row.note = f"EBNF conversion {row.extra['convert_ms']:.0f} ms (not in compile)"
        if self.dynamic:
            row.note = "enable_dynamic_compilation (masks built at first use); " + row.note
        if cut:
            row.note += f"; {_names(cut)}: {APPROX}"
        return ebnf

    def compile(self, ebnf: str):
        return self.compiler.compile_grammar(ebnf)

    def matcher(self, compiled):
        m = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)

        return SimpleNamespace(mask=lambda: m.fill_next_token_bitmask(bitmask), advance=m.accept_token,
                               done=m.is_completed)


class OutlinesCore(Backend):
    name = "outlines-core"

    def __init__(self, hf_tok, lltok, max_regex: int):
        import numpy as np
        import outlines_core

        self.oc, self.np, self.max_regex = outlines_core, np, max_regex
        started = time.perf_counter()
        eos = hf_tok.eos_token_id
        by_bytes: dict[bytes, list[int]] = {}
        for t in range(lltok.vocab_size):
            if t == eos or lltok.is_special_token(t):
                continue
            b = lltok.decode_bytes([t])
            if b:
                by_bytes.setdefault(b, []).append(t)
        self.vocab = outlines_core.Vocabulary(eos, by_bytes)
        self.n_vocab = lltok.vocab_size
        self.setup_s = time.perf_counter() - started
        self.version = _dist_version("outlines-core")

    def prepare(self, row: Row, lark: str) -> str:
        try:
            regex, cut = inline_regex(lark, self.max_regex)
        except RegexTooLarge as e:
            raise Infeasible(str(e)) from None
        row.extra["regex_chars"] = len(regex)
        row.note = f"one regex of {len(regex):,} chars"
        if cut:
            row.note += f"; {_names(cut)}: {APPROX}"
        return regex

    def compile(self, regex: str):
        return self.oc.Index(regex, self.vocab)

    def matcher(self, index):
        guide = self.oc.Guide(index)
        bitmask = self.np.zeros((self.n_vocab + 31) // 32, dtype=self.np.int32)

        def advance(t: int) -> bool:
            try:
                guide.advance(t, return_tokens=False)
            except Exception:  # noqa: BLE001 - the guide raises on a token it does not allow
                return False
            return True

        return SimpleNamespace(mask=lambda: guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4),
                               advance=advance, done=guide.is_finished)


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from deltanas.agent.llm.model_folder import resolve_model

    loc = resolve_model(name)
    kwargs = {"local_files_only": True}
    if loc.gguf_file:
        kwargs["gguf_file"] = loc.gguf_file
    return AutoTokenizer.from_pretrained(loc.path, **kwargs)


PIP_NAME = {"xgrammar-dyn": "xgrammar"}


def make_backends(hf_tok, llg: Llguidance, wanted: list[str], max_regex: int) -> dict:
    """name -> backend object, or the reason it is skipped."""
    out: dict[str, object] = {"llguidance": llg}
    for lib in wanted:
        if lib == "llguidance":
            continue
        pip = PIP_NAME.get(lib, lib)
        try:
            if lib == "xgrammar":
                out[lib] = Xgrammar(hf_tok)
            elif lib == "xgrammar-dyn":
                out[lib] = Xgrammar(hf_tok, dynamic=True)
            elif lib == "outlines-core":
                out[lib] = OutlinesCore(hf_tok, llg.tok, max_regex)
        except ImportError as e:
            out[lib] = f"{pip} is not installed ({e.__class__.__name__}: {e}); pip install {pip}"
        except Exception as e:  # noqa: BLE001 - one library's setup failing must not end the table
            out[lib] = f"{pip} did not load with this tokenizer: {e.__class__.__name__}: {str(e)[:200]}"
    return out


def bad_answer(text: str) -> str:
    """The answer with a backtick put into its first line after the `@@` one: no parent line holds
    it there, so every grammar must refuse it."""
    lines = text.split("\n")
    lines[1] = lines[1][:1] + "`" + lines[1][1:]
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict:
    started_all = time.perf_counter()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    hf_tok = load_tokenizer(args.tokenizer)
    tok_s = time.perf_counter() - t0
    llg = Llguidance(hf_tok)
    backends = make_backends(hf_tok, llg, args.libs, args.max_regex)
    rows: list[Row] = []
    answers = {}
    spent: dict[str, float] = {}  # compile seconds per library
    for pname, src in parents(args.baselines):
        n_lines = len(parent_lines(src))
        try:
            answer = find_answer(src)
            ok_anchors = [a for a in layer_lines(src) if a not in refused_windows(src)] or layer_lines(src)
            anchor = answer.anchor if answer else ok_anchors[len(ok_anchors) // 2]
            modes = [("full", delta_grammar(src)), ("narrowed", delta_grammar(src, sites=site_window(anchor)))]
        except GrammarError as e:  # the builder's grammar itself is broken: say so for every library
            answers[pname] = {"error": str(e)}
            for mode in ("full", "narrowed"):
                for lib in args.libs:
                    rows.append(Row(lib, pname, n_lines, mode, status="error",
                                    note=f"the grammar builder failed: {str(e)[:200]}"))
                    print(_line(rows[-1]), file=sys.stderr, flush=True)
            continue
        refused = refused_windows(src)
        answers[pname] = {"anchor": anchor, "how": answer.how if answer else None,
                          "text": answer.text if answer else None,
                          "refused_windows": {str(a): msg[:300] for a, msg in refused.items()}}
        if refused:
            print(f"WARNING {pname}: llguidance refuses the site-window grammar of {len(refused)} of "
                  f"{len(layer_lines(src))} layer lines {sorted(refused)}: "
                  f"{' '.join(next(iter(refused.values())).split())[:160]}", file=sys.stderr, flush=True)
        for mode, g in modes:
            if answer:
                tokens, how, complete = llg.tok.tokenize_str(answer.text), answer.how, True
                text = answer.text
            else:  # no mutation fits one site window: any answer the grammar admits
                tokens, complete = greedy_answer(llg.tok, g.lark)
                how = f"greedy first-allowed walk, {len(tokens)} tokens{'' if complete else ' (capped)'}"
                text = llg.tok.decode_str(tokens)
            bad = llg.tok.tokenize_str(bad_answer(text)) if complete and text.count("\n") >= 2 else None
            for lib in args.libs:
                row = Row(lib, pname, n_lines, mode, rules=g.rules, grammar_chars=len(g.lark))
                row.extra["answer"] = how
                backend = backends.get(lib)
                over = None
                if spent.get(lib, 0.0) > args.lib_budget_s:
                    over = (f"over its time budget: {spent[lib]:.0f} s of compiles so far "
                            f"(--lib-budget-s {args.lib_budget_s:.0f})")
                if isinstance(backend, str):
                    row.status, row.note = "skipped", backend
                else:
                    try:
                        backend.run(row, g.lark, tokens, bad, args.repeats, args.max_compile_s, complete, over)
                    except Infeasible as e:
                        row.status, row.note = "infeasible", str(e)
                    except Skipped as e:
                        row.status, row.note = "skipped", str(e)
                    except Exception as e:  # noqa: BLE001 - report it in the row and go on
                        row.status = "error"
                        row.note = f"{e.__class__.__name__}: {str(e)[:300]}"
                    spent[lib] = spent.get(lib, 0.0) + sum(row.compile_ms_all) / 1e3
                    if row.extra.get("compiles"):
                        row.note += f"; {row.extra['compiles']} compile(s): one took over {args.max_compile_s:g} s"
                    if row.extra.get("rejects_bad_answer") is False:
                        row.note += "; WARNING: admits a diff with a wrong context line"
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)
    info = {
        "tokenizer": args.tokenizer,
        "vocab": llg.tok.vocab_size,
        "tokenizer_load_s": round(tok_s, 2),
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        "versions": {k: (v.version if not isinstance(v, str) else None) for k, v in backends.items()},
        "setup_s": {k: (round(v.setup_s, 3) if not isinstance(v, str) else None) for k, v in backends.items()},
        "target_compile_ms": TARGET_COMPILE_MS,
        "seconds": round(time.perf_counter() - started_all, 1),
    }
    return {"info": info, "answers": answers, "rows": [r.__dict__ for r in rows]}


# ---------------------------------------------------------------- output

HEAD = (f"{'library':<13} {'parent':<14} {'lines':>5} {'mode':<8} {'compile ms':>10} {'1st mask µs':>11} "
        f"{'mask µs med':>11} {'mask µs mean':>12} {'tokens':>6} {'answer ms':>9}  note")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _line(r: Row | dict) -> str:
    d = r if isinstance(r, dict) else r.__dict__
    note = d["note"] if d["status"] == "ok" else f"[{d['status']}] {d['note']}"
    return (f"{d['library']:<13} {d['parent']:<14} {d['lines']:>5} {d['mode']:<8} {_num(d['compile_ms'], '.2f'):>10} "
            f"{_num(d['first_mask_us'], '.0f'):>11} {_num(d['mask_us_median'], '.1f'):>11} "
            f"{_num(d['mask_us_mean'], '.1f'):>12} {d['tokens'] or '-':>6} {_num(d['answer_ms'], '.1f'):>9}  {note}")


def summary_lines(res: dict) -> list[str]:
    """Per mode, each library's medians over the parents it served, and who is fastest."""
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    out = []
    for mode in ("full", "narrowed"):
        by_lib: dict[str, list] = {}
        for r in ok:
            if r["mode"] == mode:
                by_lib.setdefault(r["library"], []).append(r)
        if not by_lib:
            continue
        stats = {lib: {"compile_ms": statistics.median(r["compile_ms"] for r in rs),
                       "mask_us_median": statistics.median(r["mask_us_median"] for r in rs),
                       "mask_us_mean": statistics.median(r["mask_us_mean"] for r in rs),
                       "answer_ms": statistics.median(r["answer_ms"] for r in rs), "parents": len(rs)}
                 for lib, rs in by_lib.items()}
        out.append(f"{mode} grammar, medians over the parents each library served:")
        for lib, s in stats.items():
            out.append(f"  {lib:<13} compile {s['compile_ms']:9.2f} ms  mask {s['mask_us_median']:7.1f} µs median, "
                       f"{s['mask_us_mean']:8.1f} µs mean  compile+masks {s['answer_ms']:9.1f} ms  "
                       f"({s['parents']} parents)")
        best = {k: min(stats, key=lambda lib: stats[lib][k]) for k in ("compile_ms", "mask_us_median",
                                                                        "mask_us_mean", "answer_ms")}
        out.append(f"  fastest compile: {best['compile_ms']}; cheapest mask: {best['mask_us_median']} by the "
                   f"median step, {best['mask_us_mean']} by the mean step; whole answer: {best['answer_ms']}")
    for r in ok:
        if r["lines"] == BIG_LINES:
            met = "meets" if r["compile_ms"] <= TARGET_COMPILE_MS else "misses"
            out.append(f"{BIG_LINES}-line parent, {r['mode']}, {r['library']}: compile {r['compile_ms']:.2f} ms "
                       f"{met} the {TARGET_COMPILE_MS:.0f} ms target")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="smollm2", help="tokenizer alias (smollm2, tinycoder), .gguf or folder")
    ap.add_argument("--repeats", type=int, default=5, help="compiles per grammar and library (median shown)")
    ap.add_argument("--baselines", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, of {', '.join(LIBS)}")
    ap.add_argument("--max-regex", type=int, default=200_000,
                    help="outlines-core: the longest inlined regex to try (characters)")
    ap.add_argument("--max-compile-s", type=float, default=2.0,
                    help="no more repeats for a grammar once one compile took longer than this")
    ap.add_argument("--lib-budget-s", type=float, default=300.0,
                    help="a library that has spent this many seconds compiling skips its remaining rows")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="lenet and the 200-line parent, tinycoder, one repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokenizer, args.repeats, args.baselines = "tinycoder", 1, "lenet"
    args.baselines = [x for x in args.baselines.split(",") if x] or None
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    unknown = set(libs) - set(LIBS)
    if unknown:
        ap.error(f"unknown libraries: {', '.join(sorted(unknown))}")
    args.libs = [x for x in LIBS if x in libs or x == "llguidance"]  # llguidance: the reference, always
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    res = measure(args)
    info = res["info"]
    print(f"grammar libraries, tokenizer {info['tokenizer']} ({info['vocab']:,} tokens), {info['machine']} "
          f"(load {info['load_average'][0]} -> {info['load_average'][1]}), median of {info['repeats']} compile(s); "
          "masks: every step along one admitted answer")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
          + "; tokenizer setup s: " + ", ".join(f"{k} {v}" for k, v in info["setup_s"].items() if v is not None))
    print(HEAD)
    for r in res["rows"]:
        print(_line(r))
    for line in summary_lines(res):
        print(line)
    for pname, a in res["answers"].items():
        if a.get("refused_windows"):
            print(f"WARNING {pname}: llguidance refuses the site-window grammar at layer lines "
                  f"{', '.join(sorted(a['refused_windows'], key=int))} (0-based): a grammar builder bug, "
                  f"not measured: {' '.join(next(iter(a['refused_windows'].values())).split())[:200]}")
        if a.get("error"):
            print(f"WARNING {pname}: the grammar builder failed: {' '.join(a['error'].split())[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
