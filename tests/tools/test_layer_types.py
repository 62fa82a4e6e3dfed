"""Typed layers: what flows between the layers of an nn.Sequential, and answers held to edit sites
that build a network whatever the model writes."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.diff_grammar import (
    DIFF_PREFIX,
    DiffShape,
    GrammarError,
    accepts,
    anchor_counts,
    delta_grammar,
    hunk_header,
    pick_sites,
)
from deltanas.tools.layer_types import Flow, flows, menu, nn_prefix, removable_lines
from deltanas.tools.zoo import get_baseline, list_baselines

llguidance = pytest.importorskip("llguidance")

LENET = get_baseline("lenet").source
LINES = LENET.splitlines()


def line_of(text: str, source: str = LENET, nth: int = 0) -> int:
    hits = [i for i, x in enumerate(source.splitlines()) if x.strip() == text]
    return hits[nth]


def test_flows_read_channels_forward_and_backward():
    f = flows(LENET)
    pool = line_of("nn.MaxPool2d(2),")
    assert f[pool] == Flow("spatial", "16") and f[pool + 1] == Flow("spatial", "16")
    first_linear = line_of("nn.Linear(32 * 5 * 5, 120),")
    assert f[first_linear] == Flow("flat", "32 * 5 * 5")  # read backward through Flatten's successor
    after = line_of("nn.Linear(120, 84),") + 1
    assert f[after] == Flow("flat", "84", before_inplace=True)  # ReLU(inplace=True) comes next
    assert '"nn.ReLU()"' not in menu(f[after]) and '"nn.ReLU()"' in menu(f[first_linear])
    resnet = get_baseline("resnet").source
    rf = flows(resnet)
    assert rf[line_of("nn.BatchNorm2d(out_channels),", resnet)] == Flow("spatial", "out_channels")
    mobile = get_baseline("mobilenet").source
    between = line_of("separable(32, 64, stride=2),", mobile)
    assert between not in flows(mobile)  # two helper calls say nothing of what passes between them
    assert nn_prefix(LENET) == "nn." and nn_prefix("import torch\nx = 1\n") == "torch.nn."


def test_only_layers_that_keep_the_flow_are_removable():
    r = removable_lines(LENET)
    assert line_of("nn.ReLU(inplace=True),") in r and line_of("nn.Dropout(prm['dropout']),") in r
    assert line_of("nn.Conv2d(16, 32, kernel_size=5),") not in r  # changes channels
    assert line_of("nn.MaxPool2d(2),") not in r  # changes the spatial size
    resnet = get_baseline("resnet").source
    same = "nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),"
    assert line_of(same, resnet) in removable_lines(resnet)
    strided = "nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),"
    assert line_of(strided, resnet) not in removable_lines(resnet)


def _sample(lark: str, rng: random.Random, cap: int = 6000) -> str:
    """An answer the grammar admits, byte by byte at random: what any model could write under it."""
    from deltanas.tools.diff_grammar import _byte_tokenizer

    m = llguidance.LLMatcher(_byte_tokenizer(), lark, log_level=0)
    assert not m.is_error(), m.get_error()
    out = []
    for _ in range(cap):
        bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
        allowed = [b for b in range(257) if bits[b // 8] >> (b % 8) & 1]
        if 256 in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            break
        b = rng.choice([b for b in allowed if b != 256])
        assert m.consume_token(b)
        out.append(b)
    return bytes(out).decode()


@pytest.mark.parametrize("name", [b.name for b in list_baselines()])
def test_any_answer_at_typed_sites_builds_a_network_that_runs(name):
    src = get_baseline(name).source
    ran = 0
    for t in range(4):
        rng = random.Random(t)
        anchors = pick_sites(src, f"typed-{t}", 4, typed=True)
        g = delta_grammar(src, anchors=anchors, typed=True, shape=DiffShape(max_added=3, repeats=("yes", "apart", "no", "no")[t]))
        ans = _sample(g.lark, rng)
        assert ans.count("\n@@") + ans.startswith("@@") == len(g.windows) == len(anchors) >= 3, ans  # each, once
        res = apply_model_output(src, DIFF_PREFIX + ans)
        assert res.ok, (res.error, ans)
        ns: dict = {}
        exec(compile(res.source, f"{name}-{t}", "exec"), ns)
        for shape in ((1, 1, 28, 28), (1, 3, 32, 32)):
            net = ns["Net"](shape, (10,), {"lr": 0.01, "momentum": 0.9, "dropout": 0.2}, torch.device("cpu"))
            net.train()
            y = net(torch.randn(4, *shape[1:]))
            assert y.shape == (4, 10), ans
            y.square().mean().backward()  # what training does: no layer overwrote what backward needs
        ran += 1
    assert ran == 4


def test_anchors_must_each_be_edited_in_order_with_layers_that_fit():
    relu, conv2 = line_of("nn.ReLU(inplace=True),"), line_of("nn.Conv2d(16, 32, kernel_size=5),")
    lin = line_of("nn.Linear(120, 84),")
    g = delta_grammar(LENET, anchors=[lin, relu], typed=True)  # given in any order, edited in file order
    assert len(g.windows) == 2

    counts = anchor_counts(LINES)

    def hunk(gap: int, add: str) -> str:  # layers added at a gap, between its two context lines
        return f"{hunk_header(counts, LINES, gap)}\n {LINES[gap - 1]}\n+{add}\n {LINES[gap]}\n"

    ind = " " * 12
    first = hunk(relu + 1, ind + "nn.BatchNorm2d(16),")
    second = hunk(lin + 1, ind + "nn.LayerNorm(84),")
    assert accepts(g.lark, first + second + "```")
    assert not accepts(g.lark, first + "```")  # the second site was not edited
    assert not accepts(g.lark, second + first + "```")  # out of order
    assert not accepts(g.lark, first.replace("BatchNorm2d(16)", "BatchNorm2d(32)") + second + "```")  # 16 flow here
    assert not accepts(g.lark, first + second.replace("LayerNorm(84)", "BatchNorm2d(84)") + "```")  # flat here
    assert not accepts(g.lark, first.replace("nn.BatchNorm2d(16)", "print(1)") + second + "```")
    # a layer that keeps the flow may be swapped; one that changes channels may not be removed
    swap = f"{hunk_header(counts, LINES, relu)}\n {LINES[relu - 1]}\n-{LINES[relu]}\n+{ind}nn.GELU(),\n {LINES[relu + 1]}\n"
    assert accepts(g.lark, swap + second + "```")
    gc = delta_grammar(LENET, anchors=[conv2, lin], typed=True)
    drop_conv = f"{hunk_header(counts, LINES, conv2)}\n {LINES[conv2 - 1]}\n-{LINES[conv2]}\n+{ind}nn.GELU(),\n {LINES[conv2 + 1]}\n"
    assert not accepts(gc.lark, drop_conv + second + "```")
    # free layers: any constructor call
    free = delta_grammar(LENET, anchors=[lin, relu], typed=False)
    assert accepts(free.lark, first.replace("BatchNorm2d(16)", "BatchNorm2d(32)") + second + "```")


def test_sites_are_drawn_apart_reproducibly_and_from_typed_layers_first():
    a = pick_sites(LENET, "0-1-2", 4, typed=True)
    assert a == pick_sites(LENET, "0-1-2", 4, typed=True) and a == sorted(a) and len(a) == 4
    assert all(y - x >= 2 for x, y in zip(a, a[1:]))
    f = flows(LENET)
    assert all(i in f and i + 1 in f for i in a)
    draws = {tuple(pick_sites(LENET, f"k{i}", 4, typed=True)) for i in range(20)}
    assert len(draws) > 5  # the candidates of a cycle spread over the network
    assert pick_sites("not python (", "k", 4) == []


def test_more_anchors_than_hunks_or_none_editable_are_typed_errors():
    relu = [i for i, x in enumerate(LINES) if x.strip() == "nn.ReLU(inplace=True),"]
    with pytest.raises(GrammarError) as e:
        delta_grammar(LENET, anchors=relu + [line_of("nn.Linear(120, 84),") - 5], shape=DiffShape(max_hunks=2))
    assert e.value.code == "too_many_anchors"
    learn = next(i for i, x in enumerate(LINES) if "self.optimizer.step()" in x)
    with pytest.raises(GrammarError) as e:
        delta_grammar(LENET, anchors=[learn])
    assert e.value.code == "no_edit_site"


def test_each_candidate_gets_its_own_kinds_of_layer_and_the_grammar_holds_it_to_them():
    from deltanas.tools.layer_types import FAMILIES, family_names, pick_families
    from deltanas.tools.prompting import propose_messages

    fams = pick_families("0-1-2")
    assert fams == pick_families("0-1-2") and len(fams) == 6
    assert sum(FAMILIES[f][0] == "any" for f in fams) == 2  # every gap keeps a choice
    assert len({pick_families(f"0-0-{i}") for i in range(8)}) >= 6  # a cycle's candidates differ
    for i in range(8):  # kinds the parent lacks come first: LeNet has ReLU, MaxPool2d, 5x5 convs, Linear
        f = pick_families(f"0-0-{i}", LENET)
        assert not {"relu", "maxpool", "conv5x5", "linear"} & set(f), f
    chosen = ("gelu", "elu", "maxpool", "batchnorm", "conv5x5", "linear")
    m = menu(Flow("spatial", "16"), "nn.", chosen)
    assert '"nn.BatchNorm2d(16)"' in m and '"nn.GELU()"' in m
    assert '"nn.ReLU()"' not in m and "GroupNorm" not in m and "kernel_size=3" not in m
    assert menu(Flow("flat", "84"), "nn.", ("gelu", "elu", "maxpool", "batchnorm", "conv5x5", "linear")).count(
        "|") == 2  # GELU, ELU and Linear(84, 84): the spatial kinds do not fit flat features
    relu = line_of("nn.ReLU(inplace=True),")
    g = delta_grammar(LENET, anchors=[relu], typed=True, families=chosen)
    add = f"{hunk_header(anchor_counts(LINES), LINES, relu + 1)}\n {LINES[relu]}\n+{' ' * 12}nn.%s,\n {LINES[relu + 1]}\n```"
    assert accepts(g.lark, add % "Conv2d(16, 16, kernel_size=5, padding=2)")
    assert not accepts(g.lark, add % "GroupNorm(1, 16)")
    chat = propose_messages(parent_source=LENET, dataset="mnist", in_shape=(1, 1, 28, 28), num_classes=10,
                            parent_accuracy=0.9, sites=[relu], families=chosen)
    assert ", ".join(family_names(chosen)) in chat[-1]["content"]


@pytest.mark.parametrize("repeats", ["apart", "no"])
def test_a_group_repeats_no_kind_of_layer_where_asked(repeats):
    """SmolLM2 asked for two lines wrote one layer twice (`nn.GELU()` and `nn.GELU()`), and kept
    from that, alternated two: a repeated line repeats its shingles and makes a near-copy. Under
    `apart` a kind never follows itself; under `no` a group adds each kind once at most."""
    chosen = ("gelu", "elu", "dropout2d", "batchnorm", "conv3x3", "linear")
    relu = line_of("nn.ReLU(inplace=True),")
    head = f"{hunk_header(anchor_counts(LINES), LINES, relu + 1)}\n {LINES[relu]}\n"

    def answer(*layers: str) -> str:
        return head + "".join(f"+{' ' * 12}nn.{x},\n" for x in layers) + f" {LINES[relu + 1]}\n```"

    shape = {"min_added": 2, "max_added": 4}
    same = delta_grammar(LENET, anchors=[relu], typed=True, families=chosen, shape=DiffShape(**shape))
    held = delta_grammar(LENET, anchors=[relu], typed=True, families=chosen, shape=DiffShape(**shape, repeats=repeats))
    twice = [("GELU()", "GELU()"), ("BatchNorm2d(16)", "BatchNorm2d(16)"), ("Dropout2d(0.2)", "Dropout2d(0.25)"),
             ("Conv2d(16, 16, kernel_size=3, padding=1)", "Conv2d(16, 16, kernel_size=3, padding=1, bias=False)"),
             ("GELU()", "ELU()", "ELU()")]
    for layers in twice:
        assert accepts(same.lark, answer(*layers)) and not accepts(held.lark, answer(*layers)), layers
    again = ("GELU()", "BatchNorm2d(16)", "GELU()")  # a kind again, not in a row
    assert accepts(same.lark, answer(*again)) and accepts(held.lark, answer(*again)) == (repeats == "apart")
    mixed = [("GELU()", "BatchNorm2d(16)"),
             ("Dropout2d(0.2)", "Conv2d(16, 16, kernel_size=3, padding=1)", "ELU()", "BatchNorm2d(16)")]
    for layers in mixed:
        assert accepts(same.lark, answer(*layers)) and accepts(held.lark, answer(*layers)), layers
    for g in (same, held):  # the counts still hold: two lines at least, four at most
        assert not accepts(g.lark, answer("GELU()"))
        assert not accepts(g.lark, answer("GELU()", "ELU()", "BatchNorm2d(16)", "Dropout2d(0.1)", "ELU()"))
    # a removed layer still cannot come back in its own place, and replacing it needs no second line
    swap = (f"{hunk_header(anchor_counts(LINES), LINES, relu)}\n {LINES[relu - 1]}\n-{LINES[relu]}\n"
            f"+{' ' * 12}%s\n {LINES[relu + 1]}\n```")
    narrow = delta_grammar(LENET, anchors=[relu], typed=True, shape=DiffShape(**shape, repeats=repeats),
                           families=("relu", "gelu", "batchnorm"))
    assert accepts(narrow.lark, swap % "nn.GELU(),")
    assert not accepts(narrow.lark, swap % "nn.ReLU(inplace=True),")
    # where too few kinds fit for the lines asked, they may repeat: the group must stay possible
    lin = line_of("nn.Linear(120, 84),")
    flat_head = f"{hunk_header(anchor_counts(LINES), LINES, lin + 1)}\n {LINES[lin]}\n"
    lone = delta_grammar(LENET, anchors=[lin], typed=True, families=("batchnorm", "linear"),
                         shape=DiffShape(**shape, repeats=repeats))
    assert accepts(lone.lark, flat_head + f"+{' ' * 12}nn.Linear(84, 84),\n" * 2 + f" {LINES[lin + 1]}\n```")
    three = delta_grammar(LENET, anchors=[lin], typed=True, families=("gelu", "linear", "batchnorm"),
                          shape=DiffShape(min_added=3, max_added=4, repeats=repeats))  # two kinds fit flat
    assert accepts(three.lark, flat_head + f"+{' ' * 12}nn.GELU(),\n+{' ' * 12}nn.Linear(84, 84),\n"
                   f"+{' ' * 12}nn.GELU(),\n" + f" {LINES[lin + 1]}\n```")
    # every kind offered (no draw), six lines a group: once at most would take thousands of rules,
    # so never twice in a row holds instead
    every = delta_grammar(LENET, anchors=[relu], typed=True, shape=DiffShape(min_added=2, max_added=6, repeats=repeats))
    assert every.rules < 400
    assert accepts(every.lark, answer(*again)) and not accepts(every.lark, answer("GELU()", "GELU()"))
    with pytest.raises(ValueError, match="repeats must be one of"):
        DiffShape(repeats="never")


def test_removing_a_layer_never_leaves_one_in_place_right_after_a_relu():
    """A run removed `nn.Conv2d(16, 16, 3, padding=1)` from between two `ReLU(inplace=True)`: the
    second then overwrote the output the first's backward reads, and training crashed. Such a
    removal must now put a layer in its place."""
    src = get_baseline("lenet").source.replace(
        "            nn.ReLU(inplace=True),\n            nn.MaxPool2d(2),\n            nn.Conv2d(16, 32",
        "            nn.ReLU(inplace=True),\n            nn.Conv2d(16, 16, kernel_size=3, padding=1),\n"
        "            nn.ReLU(inplace=True),\n            nn.MaxPool2d(2),\n            nn.Conv2d(16, 32", 1)
    lines = src.splitlines()
    conv = line_of("nn.Conv2d(16, 16, kernel_size=3, padding=1),", src)
    assert lines[conv - 1].strip() == lines[conv + 1].strip() == "nn.ReLU(inplace=True),"
    head = f"{hunk_header(anchor_counts(lines), lines, conv)}\n {lines[conv - 1]}\n-{lines[conv]}\n"
    bare = head + f" {lines[conv + 1]}\n```"
    kept = head + f"+{' ' * 12}nn.BatchNorm2d(16),\n {lines[conv + 1]}\n```"
    for repeats in ("yes", "no"):
        g = delta_grammar(src, anchors=[conv], typed=True, shape=DiffShape(repeats=repeats))
        assert not accepts(g.lark, bare) and accepts(g.lark, kept), repeats
    assert accepts(delta_grammar(src, anchors=[conv], typed=False).lark, bare)  # free layers: the repair loop's
    x = torch.randn(4, 1, 28, 28)
    for answer, fails in ((bare, True), (kept, False)):
        res = apply_model_output(src, DIFF_PREFIX + answer)
        assert res.ok, res.error
        ns: dict = {}
        exec(compile(res.source, "net", "exec"), ns)
        net = ns["Net"]((1, 1, 28, 28), (10,), {"lr": 0.01, "momentum": 0.9, "dropout": 0.2}, torch.device("cpu"))
        if fails:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                net(x).square().mean().backward()
        else:
            net(x).square().mean().backward()


def test_hostile_parents_get_a_typed_grammar_in_time_or_a_typed_error():
    """A 2,000-line nn.Sequential of repeated lines with odd characters around it: four typed
    sites are drawn, the grammar compiles within seconds and an answer there applies; a parent
    with no layer to edit is a typed error, never a hang."""
    import time

    layers = "".join("            nn.Conv2d(8, 8, kernel_size=3, padding=1),\n            nn.ReLU(),\n"
                     for _ in range(1000))
    src = ('"""Ünïcödé, ``` a fence, \\\\ and "quotes" ✓."""\nimport torch.nn as nn\n\n\nclass Net(nn.Module):\n'
           "    def __init__(self, in_shape, out_shape, prm, device):\n        super().__init__()\n"
           "        self.tag = 'tab\\there ✓ {}'\n        self.body = nn.Sequential(\n"
           "            nn.Conv2d(in_shape[1], 8, kernel_size=3, padding=1),\n" + layers +
           "            nn.Flatten(),\n            nn.Linear(8 * in_shape[2] * in_shape[3], out_shape[0]),\n"
           "        )\n\n    def forward(self, x):\n        return self.body(x)\n")
    assert len(src.splitlines()) > 2000
    started = time.perf_counter()
    sites = pick_sites(src, "0-0-0", 4, typed=True)
    g = delta_grammar(src, anchors=sites, typed=True)
    lines = src.splitlines()
    counts = anchor_counts(lines)
    text = "".join(f"{hunk_header(counts, lines, a + 1)}\n {lines[a]}\n+            nn.GELU(),\n {lines[a + 1]}\n"
                   for a in sorted(sites))
    assert len(sites) == 4 and accepts(g.lark, text + "```"), text  # compiles the grammar too
    assert time.perf_counter() - started < 30  # a guard against a hang, not a benchmark
    res = apply_model_output(src, DIFF_PREFIX + text + "```")
    assert res.ok, res.error
    bare = "import torch.nn as nn\n\n\nclass Net(nn.Module):\n    pass\n"
    with pytest.raises(GrammarError):
        delta_grammar(bare, anchors=pick_sites(bare, "0-0-0", 4, typed=True), typed=True)


def test_source_segments_match_the_parsers_own():
    """The linear-time segment reader gives what `ast.get_source_segment` gives, odd text included."""
    import ast

    from deltanas.tools.layer_types import _lines, _segment

    odd = ("x = nn.Sequential(\r\n    nn.Conv2d(ÜÜ, 'ü✓',\r\n              3),\r    nn.LayerNorm(84),\n"
           "    nn.Linear(in_f * 2, 'a\\tb'),\n)")
    for src in [b.source for b in list_baselines()] + [odd]:
        lines = _lines(src)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Call, ast.Name, ast.Constant, ast.BinOp)):
                assert _segment(lines, node) == ast.get_source_segment(src, node), ast.dump(node)
