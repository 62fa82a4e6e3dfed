"""What flows between the layers of an `nn.Sequential`, read from the parent's source, and the
layers that fit there.

A small model asked to add a layer writes one whose channels do not match (the measured crashes:
`Conv2d(32, 64, ...)` after a 16-channel layer, `BatchNorm2d` on flat features). Each gap of an
`nn.Sequential` written one element per line carries a flow: its dimensionality (`spatial` for
N×C×H×W feature maps, `flat` for N×F) and its channel count as the source spells it (`16`,
`out_channels`, `32 * 5 * 5`). The flow is read forward from the elements above the gap and,
where those do not say (a helper call such as `BasicBlock(24, 48)`), backward from the ones below.

`menu(flow)` is the set of layers that keep that flow, so adding any number of them cannot break
the network's shapes: activations and dropout anywhere; batch/group norm, same-padding
convolutions (full or depthwise) and stride-1 pooling on spatial maps with a known channel count;
`Linear(F, F)`, `LayerNorm(F)` and `BatchNorm1d(F)` on flat features. `removable_lines` are the
one-line elements whose removal keeps the flow (activations, dropout, norms, a same-shape
convolution), which a group may replace with layers from the same menu.

Only the parent's text is read (its AST); nothing of it runs on the host.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

TRANSPARENT = {"ReLU", "ReLU6", "GELU", "SiLU", "Mish", "ELU", "CELU", "SELU", "Hardswish", "Hardsigmoid",
               "LeakyReLU", "PReLU", "Tanh", "Sigmoid", "Softplus", "Hardtanh", "Identity", "Dropout",
               "AlphaDropout"}
SPATIAL_SAME = {"Dropout2d"}  # spatial in, the same out
OUTPUT_BACKWARD = {"ReLU", "Sigmoid", "Tanh"}  # their backward reads their output (in place, every one does)
NORM2D = {"BatchNorm2d": 0, "InstanceNorm2d": 0, "GroupNorm": 1}  # the argument that names the channels
NORM1D = {"BatchNorm1d": 0, "LayerNorm": 0}
POOL2D = {"MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"}


@dataclass(frozen=True)
class Flow:
    dim: str | None = None  # "spatial", "flat", or not known
    channels: str | None = None  # the source's expression for the channel (or feature) count
    before_inplace: bool = False  # the layer after the gap works in place (`inplace=True`)


@dataclass(frozen=True)
class _Element:
    first: int  # 0-based lines
    last: int
    kind: str  # transparent | spatial_same | norm2d | norm1d | pool | conv | linear | flatten | unknown
    c_in: str | None = None
    c_out: str | None = None
    keeps_shape: bool = False  # removing it leaves the flow as it was
    inplace: bool = False  # it overwrites its input (`inplace=True`)
    keeps_output: bool = False  # its backward reads its own output: a layer in place after it breaks that


def _name(call: ast.expr) -> str:
    f = call.func if isinstance(call, ast.Call) else None
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return ""


def _arg(call: ast.Call, pos: int, kw: str) -> ast.expr | None:
    if pos < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[:pos + 1]):
        return call.args[pos]
    return next((k.value for k in call.keywords if k.arg == kw), None)


def _int(node: ast.expr | None) -> int | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Tuple) and node.elts and all(_int(e) == _int(node.elts[0]) for e in node.elts):
        return _int(node.elts[0])
    return None


def _lines(source: str) -> list[bytes]:
    """The source's lines as the parser counts them (ending in \n, \r\n or \r), in UTF-8, the
    unit of a node's column offsets."""
    return re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", source.encode())


def _segment(lines: list[bytes], n: ast.expr) -> str:
    """The source text of `n`, like `ast.get_source_segment`, which splits the whole source on
    every call: quadratic over a long nn.Sequential."""
    first, last = n.lineno - 1, n.end_lineno - 1
    if first == last:
        return lines[first][n.col_offset:n.end_col_offset].decode()
    return b"".join([lines[first][n.col_offset:], *lines[first + 1:last], lines[last][:n.end_col_offset]]).decode()


def _element(lines: list[bytes], node: ast.expr) -> _Element:
    first, last = node.lineno - 1, node.end_lineno - 1
    if not isinstance(node, ast.Call):
        return _Element(first, last, "unknown")
    name = _name(node)
    inplace = any(k.arg == "inplace" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                  for k in node.keywords)
    if name in TRANSPARENT and inplace:
        return _Element(first, last, "transparent", keeps_shape=True, inplace=True, keeps_output=True)

    def text(n: ast.expr | None) -> str | None:
        return None if n is None else _segment(lines, n)

    if name in TRANSPARENT:
        return _Element(first, last, "transparent", keeps_shape=True, keeps_output=name in OUTPUT_BACKWARD)
    if name in SPATIAL_SAME:
        return _Element(first, last, "spatial_same", keeps_shape=True)
    if name in NORM2D:
        c = text(_arg(node, NORM2D[name], "num_channels" if name == "GroupNorm" else "num_features"))
        return _Element(first, last, "norm2d", c, c, keeps_shape=c is not None)
    if name in NORM1D:
        c = text(_arg(node, 0, "normalized_shape" if name == "LayerNorm" else "num_features"))
        return _Element(first, last, "norm1d", c, c, keeps_shape=c is not None)
    if name in POOL2D:
        return _Element(first, last, "pool")
    if name == "Flatten":
        return _Element(first, last, "flatten")
    if name == "Conv2d":
        c_in, c_out = text(_arg(node, 0, "in_channels")), text(_arg(node, 1, "out_channels"))
        k, pad = _int(_arg(node, 2, "kernel_size")), _arg(node, 4, "padding")
        stride, dilation = _arg(node, 3, "stride"), _arg(node, 5, "dilation")
        same = (k is not None and k % 2 == 1 and (_int(pad) if pad is not None else 0) == k // 2
                and (stride is None or _int(stride) == 1) and (dilation is None or _int(dilation) == 1))
        return _Element(first, last, "conv", c_in, c_out, keeps_shape=same and c_in is not None and c_in == c_out)
    if name == "Linear":
        c_in, c_out = text(_arg(node, 0, "in_features")), text(_arg(node, 1, "out_features"))
        return _Element(first, last, "linear", c_in, c_out, keeps_shape=c_in is not None and c_in == c_out)
    return _Element(first, last, "unknown")


def _through(e: _Element, f: Flow, forward: bool) -> Flow:
    """The flow on the far side of `e`, given the flow `f` on this side: its output when going
    forward, its input when going backward."""
    if e.kind == "transparent":
        return f
    if e.kind in ("spatial_same", "pool"):
        return Flow("spatial", f.channels)
    c = e.c_out if forward else e.c_in
    if e.kind in ("norm2d", "conv"):
        return Flow("spatial", c)
    if e.kind in ("norm1d", "linear"):
        return Flow("flat", c)
    if e.kind == "flatten" and forward:
        return Flow("flat", None)
    return Flow()  # flatten takes any rank; an unknown layer says nothing


def _sequentials(source: str, tree: ast.AST) -> list[list[_Element]]:
    """The `nn.Sequential(...)` calls written one element per line (no element shares a line with
    another or with the call's opening), each as its elements."""
    out = []
    lines = _lines(source)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _name(node) == "Sequential" and node.args and not node.keywords):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args):
            continue
        elems = [_element(lines, a) for a in node.args]
        opened = node.func.end_lineno - 1
        if elems[0].first <= opened or any(b.first <= a.last for a, b in zip(elems, elems[1:])):
            continue
        if node.end_lineno - 1 <= elems[-1].last:
            continue  # the closing bracket shares the last element's line
        out.append(elems)
    return out


def flows(source: str) -> dict[int, Flow]:
    """The flow at each gap (gap i lies before line i, 0-based) inside a one-element-per-line
    `nn.Sequential` of the parent, where anything about it is known."""
    tree = ast.parse(source)
    out: dict[int, Flow] = {}
    for elems in _sequentials(source, tree):
        n = len(elems)
        fwd, bwd = [Flow()] * (n + 1), [Flow()] * (n + 1)
        for k, e in enumerate(elems):
            fwd[k + 1] = _through(e, fwd[k], forward=True)
        for k in range(n - 1, -1, -1):
            bwd[k] = _through(elems[k], bwd[k + 1], forward=False)
        for k in range(n + 1):
            f = Flow(fwd[k].dim or bwd[k].dim, fwd[k].channels or bwd[k].channels)
            if f == Flow():
                continue
            if k < n and elems[k].inplace:
                f = Flow(f.dim, f.channels, before_inplace=True)
            lo = elems[k - 1].last + 1 if k > 0 else elems[0].first
            hi = elems[k].first if k < n else elems[-1].last + 1
            for gap in range(lo, hi + 1):
                out[gap] = f
    return out


def removable_lines(source: str) -> set[int]:
    """Lines (0-based) that are a whole one-line element of such an `nn.Sequential` and whose
    removal keeps the flow: activations, dropout, norms, a same-shape convolution or linear."""
    tree = ast.parse(source)
    return {e.first for elems in _sequentials(source, tree) for e in elems if e.keeps_shape and e.first == e.last}


def output_keepers(source: str) -> set[int]:
    """The last lines (0-based) of the elements of such an `nn.Sequential` whose backward reads
    their own output (`ReLU`, and any layer in place): removing what follows one must not leave a
    layer in place right after it, which would overwrite that output (autograd then refuses)."""
    tree = ast.parse(source)
    return {e.last for elems in _sequentials(source, tree) for e in elems if e.keeps_output}


def nn_prefix(source: str) -> str:
    """How the parent names torch.nn: `nn.` when it imports it so, else `torch.nn.`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "torch.nn" and a.asname == "nn" for a in node.names):
            return "nn."
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                a.name == "nn" and a.asname in (None, "nn") for a in node.names):
            return "nn."
    return "torch.nn."


# The kinds of layer a typed `+` line may add: where each fits, and the name a prompt gives it.
FAMILIES = {
    "relu": ("any", "ReLU"), "gelu": ("any", "GELU"), "silu": ("any", "SiLU"), "mish": ("any", "Mish"),
    "elu": ("any", "ELU"), "hardswish": ("any", "Hardswish"), "leakyrelu": ("any", "LeakyReLU"),
    "dropout": ("any", "Dropout"),
    "dropout2d": ("spatial", "Dropout2d"), "maxpool": ("spatial", "MaxPool2d(3, stride=1, padding=1)"),
    "avgpool": ("spatial", "AvgPool2d(3, stride=1, padding=1)"), "batchnorm": ("spatial", "BatchNorm2d"),
    "groupnorm": ("spatial", "GroupNorm"), "conv1x1": ("spatial", "1x1 Conv2d"),
    "conv3x3": ("spatial", "3x3 Conv2d"), "conv5x5": ("spatial", "5x5 Conv2d"),
    "depthwise": ("spatial", "3x3 depthwise Conv2d"),
    "linear": ("flat", "Linear"), "layernorm": ("flat", "LayerNorm"), "batchnorm1d": ("flat", "BatchNorm1d"),
}


# How a kind shows in a parent's source.
_PRESENT = {
    "relu": r"\bReLU\(", "gelu": r"\bGELU\(", "silu": r"\bSiLU\(", "mish": r"\bMish\(", "elu": r"\bELU\(",
    "hardswish": r"\bHardswish\(", "leakyrelu": r"\bLeakyReLU\(", "dropout": r"\bDropout\(",
    "dropout2d": r"\bDropout2d\(", "maxpool": r"\bMaxPool2d\(", "avgpool": r"\bAvgPool2d\(",
    "batchnorm": r"\bBatchNorm2d\(", "groupnorm": r"\bGroupNorm\(", "conv1x1": r"kernel_size=1\b",
    "conv3x3": r"kernel_size=3\b", "conv5x5": r"kernel_size=5\b", "depthwise": r"\bgroups=",
    "linear": r"\bLinear\(", "layernorm": r"\bLayerNorm\(", "batchnorm1d": r"\bBatchNorm1d\(",
}


def pick_families(key: str, parent_source: str = "", *, any_: int = 2, spatial: int = 3,
                  flat: int = 1) -> tuple[str, ...]:
    """The kinds of layer one candidate may add, drawn from `key`: a different idea per candidate,
    so the candidates of one cycle (and of one parent) do not all make the same edit. Kinds the
    parent does not use yet come first: they are what makes a child new (a layer the parent already
    has repeats its seven-token shingles, and the paper's novelty rule counts the child a
    near-copy). Two that fit anywhere are always among them, so every gap keeps a choice."""
    import random
    import re

    rng = random.Random(key)
    out: list[str] = []
    for where, n in (("any", any_), ("spatial", spatial), ("flat", flat)):
        kinds = [f for f, (w, _) in FAMILIES.items() if w == where]
        new = [f for f in kinds if not re.search(_PRESENT[f], parent_source)]
        old = [f for f in kinds if f not in new]
        rng.shuffle(new)
        rng.shuffle(old)
        out += (new + old)[:n]
    return tuple(f for f in FAMILIES if f in out)


def family_names(families: tuple[str, ...] | None) -> list[str]:
    return [FAMILIES[f][1] for f in families or ()]


def _alternatives(family: str, nn: str, c: str | None) -> list[str]:
    q = json.dumps
    p = nn.replace(".", r"\.")
    rate = r"0\.[0-9][0-9]?"
    simple = {"relu": "ReLU()", "gelu": "GELU()", "silu": "SiLU()", "mish": "Mish()", "elu": "ELU()",
              "hardswish": "Hardswish()", "maxpool": "MaxPool2d(3, stride=1, padding=1)",
              "avgpool": "AvgPool2d(3, stride=1, padding=1)"}
    if family in simple:
        return [q(nn + simple[family])]
    if family in ("leakyrelu", "dropout", "dropout2d"):
        name = {"leakyrelu": "LeakyReLU", "dropout": "Dropout", "dropout2d": "Dropout2d"}[family]
        return [f"/{p}{name}\\({rate}\\)/"]
    if c is None:
        return []
    if family == "batchnorm":
        return [q(f"{nn}BatchNorm2d({c})")]
    if family == "groupnorm":
        return [q(f"{nn}GroupNorm(1, {c})")]
    if family.startswith("conv"):
        k = int(family[4])
        conv = f"{nn}Conv2d({c}, {c}, kernel_size={k}, padding={k // 2}"
        return [q(conv + ")"), q(conv + ", bias=False)")]
    if family == "depthwise":
        return [q(f"{nn}Conv2d({c}, {c}, kernel_size=3, padding=1, groups={c}, bias=False)")]
    return [q(f"{nn}{ {'linear': 'Linear', 'layernorm': 'LayerNorm', 'batchnorm1d': 'BatchNorm1d'}[family]}("
              + (f"{c}, {c})" if family == "linear" else f"{c})"))]


def _fitting(flow: Flow | None, nn: str, families: tuple[str, ...] | None) -> dict[str, list[str]]:
    """Each kind's alternatives for one layer that keeps `flow`, of the given kinds (default: all),
    for the kinds that fit there. Before a layer that works in place, no `ReLU`: its backward needs
    the output the next layer overwrites. Where none of the kinds fits, a GELU: an activation
    always fits."""
    f = flow or Flow()
    out: dict[str, list[str]] = {}
    for fam in families or tuple(FAMILIES):
        if fam == "relu" and f.before_inplace:
            continue
        alts = _alternatives(fam, nn, f.channels) if FAMILIES[fam][0] in ("any", f.dim) else []
        if alts:
            out[fam] = alts
    return out or {"gelu": _alternatives("gelu", nn, None)}


def _terminal(alts: list[str]) -> str:
    return "(" + " | ".join(alts) + r') /,[ \t]*/'


def menu(flow: Flow | None, nn: str = "nn.", families: tuple[str, ...] | None = None) -> str:
    """A Lark terminal expression for one layer (with its comma) that keeps `flow`, of the given
    kinds (default: all)."""
    return _terminal([a for alts in _fitting(flow, nn, families).values() for a in alts])


def menu_parts(flow: Flow | None, nn: str = "nn.", families: tuple[str, ...] | None = None) -> dict[str, str]:
    """`menu`, one terminal expression per kind that fits: a grammar that tells the kinds apart can
    ask two layers added one after the other to be of different kinds."""
    return {fam: _terminal(alts) for fam, alts in _fitting(flow, nn, families).items()}
