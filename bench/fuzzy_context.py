"""What the applier's fuzzy tier recovers when a diff's context lines are wrong, and what it misplaces.

    python bench/fuzzy_context.py [--pairs 200] [--seed 7] [--json]

Free answers of a small model fail mostly on context (`context_mismatch`): a hunk copies a context
line the parent does not have (bench/RESULTS.md, the format bootstrap). This benchmark makes such
answers on purpose, from correct ones: the mutator's format pairs (a zoo network and an applied,
compiled, forward-checked variant, `agent/learning/bootstrap.py`), each written as the project's
diff (one context line a side), then one hunk's context spoilt in one of three ways:
- `near`: a context line with one number or name changed (`MaxPool2d(2)` -> `MaxPool2d(3)`);
- `invented-end`: a line the parent does not have added as context at the hunk's first or last line;
- `invented-mid`: a context line replaced by a layer line of another zoo network.
Each spoilt diff is applied with the fuzzy tier (the figure) and without it (the baseline: the
exact, whitespace and indentation tiers only). An application counts as right when the patched
source is the variant itself, and as misplaced when it applies but gives anything else.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time

from deltanas.agent.learning.bootstrap import mutator_pairs
from deltanas.tools.diff_apply import apply_diff
from deltanas.tools.diff_write import make_diff
from deltanas.tools.zoo import list_baselines

MODES = ("near", "invented-end", "invented-mid")


def _context_lines(lines: list[str]) -> list[int]:
    """Indices of the diff's non-blank context lines (past its first @@)."""
    first = next((i for i, x in enumerate(lines) if x.startswith("@@")), len(lines))
    return [i for i in range(first, len(lines)) if lines[i].startswith(" ") and lines[i].strip()]


def _near(line: str, rng: random.Random) -> str | None:
    numbers = list(re.finditer(r"\d+", line))
    if numbers:
        m = rng.choice(numbers)
        return line[:m.start()] + str(int(m.group()) + rng.randint(1, 3)) + line[m.end():]
    names = list(re.finditer(r"[A-Za-z_]\w{2,}", line))
    if names:
        m = rng.choice(names)
        return line[:m.start()] + m.group() + "_x" + line[m.end():]
    return None


def spoil(diff: str, parent: str, mode: str, foreign: list[str], rng: random.Random) -> str | None:
    """The diff with one hunk's context spoilt as `mode` says, or None where it cannot be."""
    lines = diff.split("\n")
    have = {x.strip() for x in parent.splitlines()}
    ctx = _context_lines(lines)
    if not ctx:
        return None
    if mode == "near":
        i = rng.choice(ctx)
        new = _near(lines[i], rng)
        if new is None or new.strip() in have:
            return None
        lines[i] = new
        return "\n".join(lines)
    extra = [x for x in foreign if x.strip() not in have]
    if not extra:
        return None
    if mode == "invented-mid":
        i = rng.choice(ctx)
        indent = lines[i][1:len(lines[i]) - len(lines[i][1:].lstrip())]
        lines[i] = " " + indent + rng.choice(extra).strip()
        return "\n".join(lines)
    heads = [i for i, x in enumerate(lines) if x.startswith("@@")]
    h = rng.choice(heads)
    end = next((j for j in heads if j > h), len(lines))
    while end > h + 1 and not lines[end - 1].strip():
        end -= 1
    at = h + 1 if rng.random() < 0.5 else end
    near = lines[h + 1] if at == h + 1 else lines[end - 1]
    indent = near[1:len(near) - len(near[1:].lstrip())]
    lines.insert(at, " " + indent + rng.choice(extra).strip())
    return "\n".join(lines)


def measure(n_pairs: int, seed: int) -> dict:
    started = time.perf_counter()
    pairs = mutator_pairs(n_pairs, seed=seed).pairs
    made_s = time.perf_counter() - started
    rng = random.Random(seed)
    layer = re.compile(r"^\s+(self\.\w+ = )?nn\.\w+\(.*\)[,]?$")
    foreign_by = {b.name: [x for x in b.source.splitlines() if layer.match(x)] for b in list_baselines()}
    rows = {m: {"diffs": 0, "fuzzy": {"right": 0, "misplaced": 0, "failed": 0},
                "exact": {"right": 0, "misplaced": 0, "failed": 0}} for m in MODES}
    seconds = {"fuzzy": 0.0, "exact": 0.0}
    for pair in pairs:
        diff = make_diff(pair.base_source, pair.variant_source)
        foreign = [x for name, xs in foreign_by.items() if name != pair.base_name for x in xs]
        for mode in MODES:
            bad = spoil(diff, pair.base_source, mode, foreign, rng)
            if bad is None:
                continue
            rows[mode]["diffs"] += 1
            for arm, fuzz in (("fuzzy", True), ("exact", False)):
                t0 = time.perf_counter()
                res = apply_diff(pair.base_source, bad, fuzz=fuzz)
                seconds[arm] += time.perf_counter() - t0
                key = "failed" if not res.ok else "right" if res.source == pair.variant_source else "misplaced"
                rows[mode][arm][key] += 1
    total = sum(r["diffs"] for r in rows.values())
    right = {arm: sum(r[arm]["right"] for r in rows.values()) for arm in ("fuzzy", "exact")}
    wrong = {arm: sum(r[arm]["misplaced"] for r in rows.values()) for arm in ("fuzzy", "exact")}
    return {"pairs": len(pairs), "diffs": total, "per_mode": rows,
            "measured": right["fuzzy"] / total if total else None, "baseline": right["exact"] / total if total else None,
            "misplaced": wrong, "ms_per_apply": {k: 1000 * v / max(1, total) for k, v in seconds.items()},
            "pairs_seconds": made_s, "seed": seed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = measure(a.pairs, a.seed)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['diffs']} spoilt diffs from {out['pairs']} mutator pairs (seed {a.seed}); placed right: "
          f"{100 * out['measured']:.1f}% with the fuzzy tier, {100 * out['baseline']:.1f}% without; misplaced: "
          f"{out['misplaced']['fuzzy']} with, {out['misplaced']['exact']} without")
    for mode, r in out["per_mode"].items():
        n = r["diffs"]
        print(f"  {mode:13s} {n:4d} diffs   fuzzy: {r['fuzzy']['right']} right, {r['fuzzy']['misplaced']} misplaced, "
              f"{r['fuzzy']['failed']} failed   exact tiers: {r['exact']['right']} right, "
              f"{r['exact']['misplaced']} misplaced, {r['exact']['failed']} failed")
    ms = out["ms_per_apply"]
    print(f"  apply time: {ms['fuzzy']:.2f} ms with the fuzzy tier, {ms['exact']:.2f} ms without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
