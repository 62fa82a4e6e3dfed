"""Output tokens per candidate: the delta answer against full-file generation, on the same baselines.

    python bench/tokens.py [--mutations 50] [--steps 2,4] [--model smollm2] [--archive RUN_DIR ...] [--json]

For every zoo baseline it makes `--mutations` rule-based candidates (`tools/mutator.py`,
`--steps` stacked mutations each, as the `mutate` backend proposes them) and counts,
with the model's own tokenizer (SmolLM2-135M-Instruct's by default, loaded offline
from its GGUF), the tokens of the answer each mode asks for (`prompts/system.j2`):
- delta: the unified diff against model.py in one ```diff fence, as `make_diff` writes it:
  `DIFF_CONTEXT` (one) context lines (`--context` for another count), and line numbers only on
  the @@ lines of hunks whose old lines repeat in the file (both also shown numbered throughout,
  and with diff -u's three context lines);
- full, the baseline: the whole new model.py in one ```python fence.
The same candidate gives both answers, so the ratio compares like with like.

With `--archive RUN_DIR` (repeatable) it also reads what a run really generated:
`completion_tokens` per candidate (all attempts, repairs included) from the run's
archive, by mode and proposer, and the first answers re-counted with the tokenizer
(the `mutate` proposer counts words, not tokens). `--json` prints the figures as one JSON
object on stdout and the prose on stderr.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from deltanas.tools.diff_write import DIFF_CONTEXT, make_diff
from deltanas.tools.mutator import NoMutation, mutate_source
from deltanas.tools.zoo import list_baselines


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    from deltanas.agent.llm.model_folder import resolve_model

    loc = resolve_model(model)
    kwargs = {"local_files_only": True}
    if loc.gguf_file:
        kwargs["gguf_file"] = loc.gguf_file
    return AutoTokenizer.from_pretrained(loc.path, **kwargs)


def delta_answer(base: str, new: str, context: int = DIFF_CONTEXT, numbered: bool = False) -> str:
    return f"```diff\n{make_diff(base, new, context=context, numbered=numbered)}```\n"


def full_answer(new: str) -> str:
    return f"```python\n{new if new.endswith(chr(10)) else new + chr(10)}```\n"


def candidates(source: str, n: int, steps: tuple[int, int], rng: random.Random) -> list[str]:
    out, tries = [], 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        new = source
        for _ in range(rng.randint(*steps)):
            try:
                _, new = mutate_source(new, rng)
            except NoMutation:
                break
        if new != source:
            out.append(new)
    return out


def changed_lines(diff: str) -> int:
    return sum(1 for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---")))


def archive_report(run_dir: Path, count) -> list[str]:
    """Lines on one run's archive: real completion tokens per candidate, by mode and proposer."""
    from deltanas.agent.archive import Store
    from deltanas.agent.run.rundir import ARCHIVE_FILE

    store = Store(run_dir / ARCHIVE_FILE, readonly=True)
    try:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for row in store.candidates():
            if row.kind == "baseline":
                continue
            proposer = store.get_meta(f"proposer:{row.cycle}", "?")
            groups[(row.kind, str(proposer))].append(row)
    finally:
        store.close()
    lines = [f"archive {run_dir}:"]
    if not groups:
        return lines + ["  no proposed candidates"]
    lines.append(f"  {'mode':<6} {'proposer':<9} {'cands':>6} {'applied':>8} {'completion_tokens/cand':>23} "
                 f"{'first answer, tokens':>21}")
    means: dict[str, list[float]] = defaultdict(list)
    for (kind, proposer), rows in sorted(groups.items()):
        tokens = statistics.mean(r.completion_tokens for r in rows)
        firsts = [count(r.completion) for r in rows if r.completion]
        first = f"{statistics.mean(firsts):.0f}" if firsts else "-"
        applied = sum(1 for r in rows if r.status not in ("apply_failed", "proposed"))
        unit = " (words)" if proposer == "mutate" else ""
        lines.append(f"  {kind:<6} {proposer:<9} {len(rows):>6} {applied:>8} {tokens:>15.0f}{unit:<8} {first:>21}")
        if firsts:
            means[kind] += firsts
    if means.get("delta") and means.get("full"):
        d, f = statistics.mean(means["delta"]), statistics.mean(means["full"])
        lines.append(f"  first answers: delta {d:.0f} tokens against full {f:.0f}: {d / f:.1%}")
    else:
        lines.append(f"  only {', '.join(means) or 'no'} answers here: give a run of the other mode too "
                     "for a ratio (--archive DELTA_RUN --archive FULL_RUN)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutations", type=int, default=50, help="candidates per baseline")
    ap.add_argument("--steps", default="2,4", help="stacked mutations per candidate, MIN,MAX")
    ap.add_argument("--model", default="smollm2", help="whose tokenizer counts (alias, .gguf or folder)")
    ap.add_argument("--baselines", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--archive", action="append", default=[], type=Path, metavar="RUN_DIR",
                    help="also report the real completion tokens of a run (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context", type=int, default=DIFF_CONTEXT, help="context lines per hunk side in the delta answer")
    ap.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout, the prose on stderr")
    args = ap.parse_args(argv)
    stdout, per_baseline = sys.stdout, {}
    if args.json:
        sys.stdout = sys.stderr
    lo, hi = (int(x) for x in args.steps.split(","))
    tok = load_tokenizer(args.model)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    wanted = {b for b in args.baselines.split(",") if b}
    baselines = [b for b in list_baselines() if not wanted or b.name in wanted]
    rng = random.Random(args.seed)
    print(f"tokens per candidate: {platform.machine()}, tokenizer of {args.model} ({type(tok).__name__}), "
          f"{args.mutations} candidates per baseline, {lo}-{hi} stacked rule-based mutations each")
    print(f"{'baseline':<10} {'file lines':>10} {'cands':>6} {'changed lines':>14} {'full tokens (baseline)':>23} "
          f"{'delta tokens':>13} {'delta/full':>11} {'numbered @@':>12} {'3 context':>10}")
    all_delta, all_full, all_wide, all_numbered, ratios = [], [], [], [], []
    for b in baselines:
        cands = candidates(b.source, args.mutations, (lo, hi), rng)
        if not cands:
            print(f"{b.name:<10} no mutation applies")
            continue
        delta = [count(delta_answer(b.source, c, args.context)) for c in cands]
        wide = [count(delta_answer(b.source, c, 3, numbered=True)) for c in cands]
        numbered = [count(delta_answer(b.source, c, args.context, numbered=True)) for c in cands]
        full = [count(full_answer(c)) for c in cands]
        changed = statistics.mean(changed_lines(make_diff(b.source, c)) for c in cands)
        all_delta += delta
        all_full += full
        all_wide += wide
        all_numbered += numbered
        ratios += [d / f for d, f in zip(delta, full)]
        md, mf = statistics.mean(delta), statistics.mean(full)
        mn, mw = statistics.mean(numbered), statistics.mean(wide)
        print(f"{b.name:<10} {len(b.source.splitlines()):>10} {len(cands):>6} {changed:>14.1f} {mf:>23.0f} "
              f"{md:>13.0f} {md / mf:>11.1%} {mn / mf:>12.1%} {mw / mf:>10.1%}")
        per_baseline[b.name] = {"candidates": len(cands), "changed_lines": changed, "full_tokens": mf,
                                "delta_tokens": md, "ratio": md / mf,
                                "ratio_numbered": mn / mf, "ratio_context3": mw / mf}
    md, mf = statistics.mean(all_delta), statistics.mean(all_full)
    mw, mn = statistics.mean(all_wide), statistics.mean(all_numbered)
    print(f"{'all':<10} {'':>10} {len(all_delta):>6} {'':>14} {mf:>23.0f} {md:>13.0f} {md / mf:>11.1%} "
          f"{mn / mf:>12.1%} {mw / mf:>10.1%}")
    print(f"the same candidates with 3 context lines per hunk side (diff -u): {mw:.0f} tokens, {mw / mf:.1%} of full")
    print(f"the same candidates with line numbers on every @@ line (make_diff(numbered=True)): {mn:.0f} tokens, "
          f"{mn / mf:.1%} of full")
    by_steps = []
    for k in range(1, 5):
        d = f = 0
        for b in baselines:
            for c in candidates(b.source, max(1, args.mutations // 5), (k, k), rng):
                d, f = d + count(delta_answer(b.source, c, args.context)), f + count(full_answer(c))
        by_steps.append(f"{k}: {d / f:.1%}" if f else f"{k}: -")
    print(f"delta/full by stacked mutations per candidate ({max(1, args.mutations // 5)} per baseline each): "
          + ", ".join(by_steps))
    print(f"per-candidate ratio: median {statistics.median(ratios):.1%}, max {max(ratios):.1%}, "
          f"{sum(r <= 0.25 for r in ratios) / len(ratios):.0%} of candidates at or under 25%")
    print(f"RESULT output tokens per candidate: delta {md:.0f} ({args.context} context line(s)) against full-file "
          f"{mf:.0f} (baseline), {md / mf:.1%} (target <= 25%)")
    for run_dir in args.archive:
        print()
        print("\n".join(archive_report(run_dir, count)))
    if args.json:
        print(json.dumps({"model": args.model, "candidates": len(all_delta), "delta_tokens": md, "full_tokens": mf,
                          "ratio": md / mf, "context": args.context, "ratio_context3": mw / mf,
                          "ratio_numbered": mn / mf, "median_ratio": statistics.median(ratios),
                          "per_baseline": per_baseline}), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
