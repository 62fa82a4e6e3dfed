"""Rule-based structural mutations of a candidate network, written as small text edits.

This is the no-LLM baseline and the source of cold-start training pairs. Each
mutation locates its target with the AST and rewrites only the characters it
must, so the unified diff stays a few lines long and the file keeps its
formatting. Only the architecture changes: nothing inside
`supported_hyperparameters`, `train_setup` or `learn` is ever touched.

Shape consistency is preferred, not guaranteed: a width change follows the
channel count to the next layer that consumes it, and a kernel change keeps the
output size by adjusting the padding. A shape error that slips through is
caught by the sandbox, as it would be for a model's proposal.
"""
from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from deltanas.tools import pyast
from deltanas.tools.protected import PROTECTED_NAMES, protected_definitions

# Functions of these names, wherever they stand, are left alone: a wider rule than the check of
# tools/protected.py, which every result passes too.
PROTECTED_FUNCTIONS = frozenset(PROTECTED_NAMES)

MUTATIONS: tuple[str, ...] = (
    "widen",  # more channels / features in a layer, and in the layer that consumes them
    "narrow",  # fewer channels / features, the same way
    "kernel_size",  # another conv kernel size, padding adjusted so the output size stays
    "activation",  # ReLU <-> GELU / SiLU / LeakyReLU (modules and functional calls)
    "batchnorm",  # a BatchNorm2d after a conv that has none
    "dropout",  # insert a Dropout, or change a literal dropout probability
    "conv_block",  # an extra 3x3 conv (same channels, padding 1) after a conv's activation
    "pooling",  # MaxPool <-> AvgPool (modules, adaptive modules and functional calls)
)

_ACTIVATIONS = ("ReLU", "GELU", "SiLU", "LeakyReLU")
_INPLACE_OK = frozenset({"ReLU", "SiLU", "LeakyReLU"})  # GELU has no inplace argument
_FUNCTIONAL_ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu")
_POOL_SWAP = {"MaxPool2d": "AvgPool2d", "AvgPool2d": "MaxPool2d",
              "AdaptiveMaxPool2d": "AdaptiveAvgPool2d", "AdaptiveAvgPool2d": "AdaptiveMaxPool2d"}
_MAXPOOL_ONLY_ARGS = frozenset({"dilation", "return_indices"})
_FUNCTIONAL_POOL_SWAP = {"max_pool2d": "avg_pool2d", "avg_pool2d": "max_pool2d"}
_NORMS = frozenset({"BatchNorm1d", "BatchNorm2d", "InstanceNorm2d", "LayerNorm"})
_DROPOUT_PS = (0.1, 0.2, 0.3, 0.5)
_KERNELS = (1, 3, 5, 7)
_MAX_WIDTH = 2048
_MIN_WIDTH = 4


# --- text edits located by the AST -------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    start: int  # character offsets into the source
    end: int
    text: str


def _apply(source: str, edits: list[Edit]) -> str:
    out = source
    for e in sorted(edits, key=lambda e: (e.start, e.end), reverse=True):
        out = out[:e.start] + e.text + out[e.end:]
    return out


class _Text:
    """Maps AST positions (1-based lines, UTF-8 byte columns) to character offsets."""

    def __init__(self, source: str):
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.starts: list[int] = []
        pos = 0
        for line in self.lines:
            self.starts.append(pos)
            pos += len(line)
        self.starts.append(pos)

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset))

    def seg(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.source[a:b]

    def replace(self, node: ast.AST, text: str) -> Edit:
        a, b = self.span(node)
        return Edit(a, b, text)

    def line_indent(self, lineno: int) -> str:
        line = self.lines[lineno - 1]
        return line[:len(line) - len(line.lstrip())]

    def line_end(self, lineno: int) -> int:
        """Offset just past the newline of `lineno`."""
        return self.starts[lineno]


# --- what the module contains -------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    call: ast.Call
    kind: str  # "Conv2d", "ReLU", ... for nn modules; "relu", "max_pool2d", ... for functional calls
    functional: bool
    scope: ast.AST  # the enclosing function (or the module)


class _Module:
    """The layer calls of a parsed source, outside the protected functions, in source order."""

    def __init__(self, source: str):
        self.text = _Text(source)
        self.tree = pyast.parse(source)
        self.nn_names, self.functional_names = _import_aliases(self.tree)
        self.layers: list[_Layer] = []
        self.sequentials: list[ast.Call] = []
        self._walk(self.tree, self.tree)
        self.layers.sort(key=lambda l: (l.call.lineno, l.call.col_offset))

    def _walk(self, node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name in PROTECTED_FUNCTIONS:
                    continue
                self._walk(child, child)
                continue
            if isinstance(child, ast.Call):
                kind = self._nn_kind(child.func)
                if kind == "Sequential":
                    self.sequentials.append(child)
                elif kind is not None:
                    self.layers.append(_Layer(child, kind, False, scope))
                else:
                    fkind = self._functional_kind(child.func)
                    if fkind is not None:
                        self.layers.append(_Layer(child, fkind, True, scope))
            self._walk(child, scope)

    def _nn_kind(self, func: ast.expr) -> str | None:
        if isinstance(func, ast.Attribute) and _dotted(func.value) in {"nn", "torch.nn"} | self.nn_names:
            return func.attr
        if isinstance(func, ast.Name) and func.id in self.nn_names:
            return func.id
        return None

    def _functional_kind(self, func: ast.expr) -> str | None:
        if not isinstance(func, ast.Attribute):
            return None
        owner = _dotted(func.value)
        if owner in {"torch.nn.functional", "nn.functional"} | self.functional_names:
            return func.attr
        if owner == "torch" and func.attr in {"relu", "max_pool2d", "avg_pool2d"}:
            return func.attr
        return None


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def _import_aliases(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to torch.nn members / to torch.nn.functional by the module's imports."""
    nn_members: set[str] = set()
    functional: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.nn.functional" and a.asname:
                    functional.add(a.asname)
                elif a.name == "torch.nn" and a.asname:
                    nn_members.add(a.asname)  # `import torch.nn as tnn`: tnn.Conv2d
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch.nn":
                for a in node.names:
                    if a.name == "functional":
                        functional.add(a.asname or a.name)
                    else:
                        nn_members.add(a.asname or a.name)
    # `from torch.nn import Conv2d` binds the class itself, used as a bare name
    return nn_members, functional


def _arg(call: ast.Call, pos: int, kw: str) -> ast.expr | None:
    for k in call.keywords:
        if k.arg == kw:
            return k.value
    if pos < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[:pos + 1]):
        return call.args[pos]
    return None


def _int(node: ast.expr | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _num(node: ast.expr | None) -> float | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    return None


def _func_prefix(m: _Module, call: ast.Call) -> str:
    """`nn.` in `nn.ReLU(...)`, so that a replacement keeps the file's own spelling."""
    if isinstance(call.func, ast.Attribute):
        return m.text.seg(call.func.value) + "."
    return ""


# --- mutations: each returns candidate edit lists, random choices already made --------------

Candidates = list[list[Edit]]


def _width_sites(m: _Module) -> Iterator[tuple[list[tuple[ast.expr, int]], int]]:
    """Groups of integer literals that must change together, with their current value.

    A producer (Conv2d/Linear with a literal output width) is followed, in the same
    function, by its consumer (the next Conv2d/Linear); the norm layers between them
    carry the same number. A consumer whose input is not that literal (or a product
    starting with it, as in `Linear(256 * 6 * 6, ...)`) makes the site unsafe, so it
    is skipped.
    """
    layers = [l for l in m.layers if not l.functional]
    for i, p in enumerate(layers):
        if p.kind not in ("Conv2d", "Linear") or _kw_int(p.call, "groups", 1) != 1:
            continue
        out_node = _arg(p.call, 1, "out_channels" if p.kind == "Conv2d" else "out_features")
        old = _int(out_node)
        if old is None:
            continue
        group: list[tuple[ast.expr, int]] = [(out_node, old)]
        consumer_ok = False
        for q in layers[i + 1:]:
            if q.scope is not p.scope:
                continue
            if q.kind in _NORMS and q.kind != "LayerNorm":
                nf = _arg(q.call, 0, "num_features")
                if _int(nf) == old:
                    group.append((nf, old))
                continue
            if q.kind in ("Conv2d", "Linear"):
                if _kw_int(q.call, "groups", 1) != 1:
                    break
                in_node = _arg(q.call, 0, "in_channels" if q.kind == "Conv2d" else "in_features")
                if _int(in_node) == old:
                    group.append((in_node, old))
                    consumer_ok = True
                elif q.kind == "Linear" and p.kind == "Conv2d":
                    lead = _leading_factor(in_node)
                    if lead is not None and _int(lead) == old:
                        group.append((lead, old))
                        consumer_ok = True
                break
        if consumer_ok:
            yield group, old


def _kw_int(call: ast.Call, name: str, default: int) -> int | None:
    for k in call.keywords:
        if k.arg == name:
            return _int(k.value)
    return default


def _leading_factor(node: ast.expr | None) -> ast.expr | None:
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        node = node.left
    return node if node is not None and not isinstance(node, ast.BinOp) else None


def _width_constants(m: _Module) -> Iterator[tuple[ast.expr, int]]:
    """`width = 64` / `self.channels = 32` whose name is a channel or feature count of a layer.

    Only the width arguments count, so that a kernel-size constant is never scaled.
    """
    used: set[str] = set()
    for l in m.layers:
        if l.functional:
            continue
        if l.kind in ("Conv2d", "Linear"):
            width_args = [_arg(l.call, 0, "in_channels" if l.kind == "Conv2d" else "in_features"),
                          _arg(l.call, 1, "out_channels" if l.kind == "Conv2d" else "out_features")]
        elif l.kind in _NORMS:
            width_args = [_arg(l.call, 0, "num_features")]
        else:
            continue
        for arg in width_args:
            for node in ast.walk(arg) if arg is not None else ():
                if isinstance(node, (ast.Name, ast.Attribute)):
                    used.add(_dotted(node))
    for node in _unprotected_nodes(m.tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = _dotted(node.targets[0])
            value = _int(node.value)
            if name and name in used and value is not None and value >= _MIN_WIDTH:
                yield node.value, value


def _unprotected_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name in PROTECTED_FUNCTIONS:
            continue
        yield child
        yield from _unprotected_nodes(child)


def _rescale(old: int, widen: bool, rng: random.Random) -> int | None:
    factor = rng.choice((1.5, 2.0)) if widen else rng.choice((0.5, 0.75))
    new = int(round(old * factor))
    if old >= 8:
        new = max(8, int(round(new / 8)) * 8)  # channel counts that are multiples of 8 stay so
    if new == old or new < _MIN_WIDTH or new > _MAX_WIDTH:
        return None
    return new


def _mutate_width(m: _Module, rng: random.Random, widen: bool) -> Candidates:
    out: Candidates = []
    for group, old in _width_sites(m):
        new = _rescale(old, widen, rng)
        if new is not None:
            out.append([m.text.replace(node, str(new)) for node, _ in group])
    for node, old in _width_constants(m):
        new = _rescale(old, widen, rng)
        if new is not None:
            out.append([m.text.replace(node, str(new))])
    return out


def _mutate_kernel(m: _Module, rng: random.Random) -> Candidates:
    out: Candidates = []
    for l in m.layers:
        if l.functional or l.kind != "Conv2d":
            continue
        k_node = _arg(l.call, 2, "kernel_size")
        k = _int(k_node)
        if k is None:
            continue
        pad_node = _arg(l.call, 4, "padding")
        pad = 0 if pad_node is None else _int(pad_node)
        dilation = _int(_arg(l.call, 5, "dilation")) if _arg(l.call, 5, "dilation") is not None else 1
        if pad is None or dilation is None:  # "same", a tuple or an expression: leave it alone
            continue
        # 2p - k stays constant, so the output size does too (same parity of k keeps p whole)
        choices = [c for c in _KERNELS if c != k and c % 2 == k % 2 and pad + dilation * (c - k) // 2 >= 0]
        if not choices:
            continue
        new_k = rng.choice(choices)
        new_pad = pad + dilation * (new_k - k) // 2
        edits = [m.text.replace(k_node, str(new_k))]
        if pad_node is not None:
            edits.append(m.text.replace(pad_node, str(new_pad)))
        elif new_pad:
            edits.append(_append_kwarg(m, l.call, f"padding={new_pad}"))
        out.append(edits)
    return out


def _append_kwarg(m: _Module, call: ast.Call, text: str) -> Edit:
    """Insert `, text` after the call's last argument (before any trailing comma)."""
    last = max([*call.args, *(k.value for k in call.keywords)], key=lambda n: (n.end_lineno, n.end_col_offset))
    _, end = m.text.span(last)
    return Edit(end, end, f", {text}")


def _mutate_activation(m: _Module, rng: random.Random) -> Candidates:
    out: Candidates = []
    for l in m.layers:
        if not l.functional and l.kind in _ACTIVATIONS:
            new = rng.choice(_swap_targets(l.kind, _ACTIVATIONS))
            inplace = _arg(l.call, 1 if l.kind == "LeakyReLU" else 0, "inplace")
            args = "inplace=True" if new in _INPLACE_OK and isinstance(inplace, ast.Constant) and inplace.value else ""
            out.append([m.text.replace(l.call, f"{_func_prefix(m, l.call)}{new}({args})")])
        elif l.functional and l.kind in _FUNCTIONAL_ACTIVATIONS and l.call.args:
            new = rng.choice(_swap_targets(l.kind, _FUNCTIONAL_ACTIVATIONS))
            owner = _dotted(l.call.func.value)
            prefix = "torch.nn.functional." if owner == "torch" else _func_prefix(m, l.call)
            out.append([m.text.replace(l.call, f"{prefix}{new}({m.text.seg(l.call.args[0])})")])
    return out


def _swap_targets(kind: str, family: tuple[str, ...]) -> list[str]:
    return [k for k in family if k != kind]


def _mutate_pooling(m: _Module, rng: random.Random) -> Candidates:
    out: Candidates = []
    for l in m.layers:
        if not l.functional and l.kind in _POOL_SWAP:
            if any(k.arg in _MAXPOOL_ONLY_ARGS for k in l.call.keywords) or len(l.call.args) > 3:
                continue  # dilation / return_indices have no AvgPool counterpart
            out.append([m.text.replace(l.call.func, f"{_func_prefix(m, l.call)}{_POOL_SWAP[l.kind]}")])
        elif l.functional and l.kind in _FUNCTIONAL_POOL_SWAP:
            if any(k.arg in _MAXPOOL_ONLY_ARGS for k in l.call.keywords) or len(l.call.args) > 4:
                continue
            owner = _dotted(l.call.func.value)
            prefix = "torch.nn.functional." if owner == "torch" else _func_prefix(m, l.call)
            out.append([m.text.replace(l.call.func, f"{prefix}{_FUNCTIONAL_POOL_SWAP[l.kind]}")])
    return out


def _seq_elements(m: _Module) -> Iterator[tuple[ast.Call, list[ast.expr]]]:
    for seq in m.sequentials:
        if seq.keywords or any(isinstance(a, ast.Starred) for a in seq.args):
            continue
        yield seq, list(seq.args)


def _insert_after(m: _Module, seq: ast.Call, elem: ast.expr, new: list[str]) -> Edit:
    """Insert new Sequential elements after `elem`, on their own lines when the file has one per line."""
    t = m.text
    _, end = t.span(elem)
    own_line = t.lines[elem.lineno - 1][:elem.col_offset].strip() == ""
    rest = t.source[end:t.line_end(elem.end_lineno)]
    if own_line and re.fullmatch(r"\s*,?\s*(#.*)?\n?", rest) and elem.end_lineno < seq.end_lineno:
        indent = t.line_indent(elem.lineno)
        lines = "".join(f"{indent}{n},\n" for n in new)
        if not rest.lstrip().startswith(","):  # the last element had no trailing comma
            return Edit(end, t.line_end(elem.end_lineno), "," + rest + ("" if rest.endswith("\n") else "\n") + lines)
        return Edit(t.line_end(elem.end_lineno), t.line_end(elem.end_lineno), lines)
    return Edit(end, end, "".join(f", {n}" for n in new))


def _channels_text(m: _Module, elem: ast.expr) -> str | None:
    """Source text of the output channel count of a Conv2d element, if it is one."""
    if isinstance(elem, ast.Call) and m._nn_kind(elem.func) == "Conv2d":
        node = _arg(elem, 1, "out_channels")
        if node is not None:
            return m.text.seg(node)
    return None


def _kind(m: _Module, elem: ast.expr) -> str | None:
    return m._nn_kind(elem.func) if isinstance(elem, ast.Call) else None


def _mutate_batchnorm(m: _Module, rng: random.Random) -> Candidates:
    out: Candidates = []
    for seq, elems in _seq_elements(m):
        for i, e in enumerate(elems):
            c = _channels_text(m, e)
            nxt = _kind(m, elems[i + 1]) if i + 1 < len(elems) else None
            if c is not None and nxt not in _NORMS and "\n" not in c:
                out.append([_insert_after(m, seq, e, [f"{_func_prefix(m, e)}BatchNorm2d({c})"])])
    out.extend(_batchnorm_for_attribute_convs(m))
    return out


def _batchnorm_for_attribute_convs(m: _Module) -> Candidates:
    """`self.conv1 = nn.Conv2d(...)` used as `self.conv1(x)` in forward gets `self.conv1_bn`."""
    out: Candidates = []
    classes = [n for n in ast.walk(m.tree) if isinstance(n, ast.ClassDef)]
    for cls in classes:
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        init, forward = methods.get("__init__"), methods.get("forward")
        if init is None or forward is None:
            continue
        attrs = {_dotted(t) for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets}
        for stmt in init.body:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.value, ast.Call)):
                continue
            target = _dotted(stmt.targets[0])
            c = _channels_text(m, stmt.value)
            if not target.startswith("self.") or c is None or "\n" in c:
                continue
            bn = f"{target}_bn"
            uses = [n for n in ast.walk(forward) if isinstance(n, ast.Call) and _dotted(n.func) == target]
            if bn in attrs or not uses or _next_is_norm(m, init, stmt) or _nested(uses):
                continue
            indent = m.text.line_indent(stmt.lineno)
            at = m.text.line_end(stmt.end_lineno)
            edits = [Edit(at, at, f"{indent}{bn} = {_func_prefix(m, stmt.value)}BatchNorm2d({c})\n")]
            for u in uses:
                edits.append(m.text.replace(u, f"{bn}({m.text.seg(u)})"))
            out.append(edits)
    return out


def _nested(calls: list[ast.Call]) -> bool:
    """Whether one call contains another (their wrapping edits would overlap)."""
    return any(inner is not outer and inner in ast.walk(outer) for outer in calls for inner in calls)


def _next_is_norm(m: _Module, init: ast.FunctionDef, stmt: ast.stmt) -> bool:
    i = init.body.index(stmt)
    if i + 1 >= len(init.body):
        return False
    nxt = init.body[i + 1]
    return isinstance(nxt, ast.Assign) and isinstance(nxt.value, ast.Call) and _kind(m, nxt.value) in _NORMS


def _mutate_dropout(m: _Module, rng: random.Random) -> Candidates:
    out: Candidates = []
    for l in m.layers:
        if not l.functional and l.kind in ("Dropout", "Dropout2d"):
            p_node = _arg(l.call, 0, "p")
            p = _num(p_node)
            if p_node is not None and p is not None:
                new = rng.choice([x for x in _DROPOUT_PS if abs(x - p) > 1e-9])
                out.append([m.text.replace(p_node, str(new))])
    for seq, elems in _seq_elements(m):
        for i, e in enumerate(elems[:-1]):
            k, nxt = _kind(m, e), _kind(m, elems[i + 1])
            if k in _ACTIVATIONS and nxt not in ("Dropout", "Dropout2d"):
                p = rng.choice(_DROPOUT_PS)
                out.append([_insert_after(m, seq, e, [f"{_func_prefix(m, e)}Dropout(p={p})"])])
    return out


def _mutate_conv_block(m: _Module, rng: random.Random) -> Candidates:
    """After conv (+ norm) + activation in a Sequential, repeat a 3x3 conv of the same width."""
    out: Candidates = []
    for seq, elems in _seq_elements(m):
        for i, e in enumerate(elems):
            c = _channels_text(m, e)
            if c is None or "\n" in c:
                continue
            j = i + 1
            norm = None
            if j < len(elems) and _kind(m, elems[j]) in _NORMS:
                norm = elems[j]
                j += 1
            if j >= len(elems) or _kind(m, elems[j]) not in _ACTIVATIONS:
                continue
            act = elems[j]
            pre = _func_prefix(m, e)
            new = [f"{pre}Conv2d({c}, {c}, kernel_size=3, padding=1)"]
            if norm is not None:
                new.append(f"{pre}{_kind(m, norm)}({c})")
            new.append(m.text.seg(act))
            out.append([_insert_after(m, seq, act, new)])
    return out


_MUTATORS: dict[str, Callable[[_Module, random.Random], Candidates]] = {
    "widen": lambda m, r: _mutate_width(m, r, widen=True),
    "narrow": lambda m, r: _mutate_width(m, r, widen=False),
    "kernel_size": _mutate_kernel,
    "activation": _mutate_activation,
    "batchnorm": _mutate_batchnorm,
    "dropout": _mutate_dropout,
    "conv_block": _mutate_conv_block,
    "pooling": _mutate_pooling,
}
assert set(_MUTATORS) == set(MUTATIONS)


# --- public API ---------------------------------------------------------------------------


class NoMutation(ValueError):
    """No mutation applies to this source, or none produced a valid file."""


def mutate_source(source: str, rng: random.Random, *, max_tries: int = 20) -> tuple[str, str]:
    """One random applicable mutation: (mutation name, new source).

    The result compiles, differs from `source`, and leaves the protected functions
    unchanged. Raises `NoMutation` when nothing applies within `max_tries`.
    """
    try:
        module = _Module(source)
    except SyntaxError as e:
        raise NoMutation(f"source does not parse: {e}") from None
    sites = {name: fn(module, rng) for name, fn in _MUTATORS.items()}
    sites = {name: c for name, c in sites.items() if c}
    protected = protected_definitions(module.tree)
    for _ in range(max_tries):
        if not sites:
            break
        name = rng.choice(sorted(sites))
        edits = sites[name].pop(rng.randrange(len(sites[name])))
        if not sites[name]:
            del sites[name]
        new = _apply(source, edits)
        if new == source:
            continue
        try:
            pyast.compile_code(new)
        except SyntaxError:
            continue
        if protected_definitions(pyast.parse(new)) != protected:
            continue
        return name, new
    raise NoMutation("no structural mutation applies to this source "
                     f"(looked for: {', '.join(MUTATIONS)})")

