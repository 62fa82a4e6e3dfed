"""Near-copies sent back to the model (`search.retry_duplicates`) against near-copies recorded as they are.

    python bench/retry_duplicates.py --llm hf:smollm2 --seeds 0,1,2,3,4,5 --cycles 3 --candidates 4 \
        --dataset digits --quick
    python bench/retry_duplicates.py --seeds 0,1,2 --cycles 4 --candidates 8 -- --device cuda --limit-train 10000

Per seed, `deltanas run` twice with identical settings and LoRA off: `on` sends a near-copy back
to the model with its similarity and newly drawn edit sites (within `search.max_repairs`), `off`
records it as `duplicate` at once (the search before this option). `--arms wide,on` measures
wider retries against the default ones: `wide` draws 2 more edit sites at each near-copy retry
(`search.retry_widen = 2`), `on` as many as the first answer had (0, the default). `--arms on,repeat`
and `on,apart` measure `search.layer_repeats`: `on` (the default, `no`) adds each kind of layer once
at most in a change group, `apart` never twice in a row, `repeat` (`yes`) as the model likes. Each
arm differs from the defaults in its one setting. Each archive's candidates from
`--from-cycle` on (default 1: cycle 0 is the cold-start mutator's) are read, and per arm it prints:
- novel and valid: trained, and under the novelty threshold (the figure the option is for);
- improved: novel and valid, and more accurate than its parent;
- near-copies left, other failures, near-copy retries asked;
- output tokens per candidate (retries included) and each run's span in the archive;
then on − off in novel-and-valid and in improved, each with a 95% bootstrap interval that
resamples seeds and, within each, candidates (bench/learning_curve.py's). Flags after `--` go on
to `deltanas run`. Runs already in `--root` are read, not run again (`--no-run` only reads).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import passthrough  # bench/passthrough.py: a script's own folder is first on sys.path

from learning_curve import bootstrap_diff

from deltanas.agent.archive import Store

SETTINGS = {"on": "",  # the defaults: near-copies retried at as many sites, each kind of layer once a group
            "off": "retry_duplicates = false",  # near-copies recorded at once, the search before the retry
            "wide": "retry_widen = 2",  # 2 more sites at each retry
            "apart": "layer_repeats = \"apart\"",  # a kind of layer never twice in a row
            "repeat": "layer_repeats = \"yes\""}  # a kind of layer again as the model likes


def run_arm(root: Path, seed: int, arm: str, args: argparse.Namespace, extra: list[str]) -> Path:
    run_dir = root / f"s{seed}-{arm}"
    if (run_dir / "archive.sqlite").is_file() or args.no_run:
        return run_dir
    cfg = root / f"{arm}.toml"
    cfg.write_text(f"[learn]\nenabled = false\n\n[search]\n{SETTINGS[arm]}\n")
    cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--run-dir", str(run_dir), "--config",
           str(cfg), "--llm", args.llm, "--cycles", str(args.cycles), "--candidates", str(args.candidates),
           "--seed", str(seed), "--dataset", args.dataset, *(["--preset", "quick"] if args.quick else []), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} {arm} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return run_dir


def read_arm(run_dir: Path, from_cycle: int) -> dict:
    store = Store(run_dir / "archive.sqlite", readonly=True)
    rows = [r for r in store.candidates() if r.kind != "baseline" and r.cycle >= from_cycle and r.final]
    retries = 0
    for r in rows:
        chat = store.get_trajectory(r.id) or []
        retries += sum(1 for m in chat if m.get("role") == "user" and "Error `duplicate`" in (m.get("content") or ""))
    every = [r for r in store.candidates() if r.created_at]
    span = max(r.finished_at or r.created_at for r in every) - min(r.created_at for r in every) if every else 0.0
    accuracy = {r.id: r.accuracy for r in store.candidates()}
    better = [int(r.status == "ok" and r.accuracy is not None and accuracy.get(r.parent_id) is not None
                  and r.accuracy > accuracy[r.parent_id]) for r in rows]
    return {"novel_valid": [int(r.status == "ok") for r in rows], "improved": better, "duplicates": sum(r.status == "duplicate" for r in rows),
            "failed": sum(r.status not in ("ok", "duplicate") for r in rows), "retries": retries,
            "tokens": sum(r.completion_tokens or 0 for r in rows), "span_s": span}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="hf:smollm2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--quick", action="store_true", help="pass --preset quick")
    ap.add_argument("--from-cycle", type=int, default=1, help="the first cycle counted (0 is the mutator's)")
    ap.add_argument("--root", type=Path, default=Path("runs/retry-duplicates"))
    ap.add_argument("--no-run", action="store_true", help="read the archives under --root as they are")
    ap.add_argument("--arms", default="on,off", help="the arm measured, then its baseline, of "
                    f"{', '.join(SETTINGS)} (default on,off)")
    argv, extra = passthrough.split(sys.argv[1:])
    args = ap.parse_args(argv)
    arm, _, base = args.arms.partition(",")
    if arm == base or not {arm, base} <= set(SETTINGS):
        ap.error(f"--arms: two different arms of {', '.join(SETTINGS)}, the measured one first")
    args.root.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: dict[int, dict[str, list[int]]] = {}
    improved: dict[int, dict[str, list[int]]] = {}
    totals = {a: {"n": 0, "novel_valid": 0, "improved": 0, "duplicates": 0, "failed": 0, "retries": 0, "tokens": 0,
                  "span_s": 0.0} for a in (arm, base)}
    for seed in seeds:
        for a in (arm, base):
            got = read_arm(run_arm(args.root, seed, a, args, extra), args.from_cycle)
            per_seed.setdefault(seed, {})["control" if a == base else a] = got["novel_valid"]
            improved.setdefault(seed, {})["control" if a == base else a] = got["improved"]
            t = totals[a]
            t["n"] += len(got["novel_valid"])
            t["novel_valid"] += sum(got["novel_valid"])
            t["improved"] += sum(got["improved"])
            for k in ("duplicates", "failed", "retries", "tokens", "span_s"):
                t[k] += got[k]
    diff = bootstrap_diff(per_seed, arm=arm)
    diff_improved = bootstrap_diff(improved, arm=arm)
    print(f"{args.llm}, seeds {args.seeds}, cycles {args.from_cycle}..{args.cycles - 1} of {args.cycles}, "
          f"{args.candidates} candidates a cycle, {args.dataset}")
    print(f"{'':28s}{arm:>12s}{base + ' (baseline)':>20s}")
    rows = (("candidates", lambda t: f"{t['n']}"),
            ("novel and valid", lambda t: f"{t['novel_valid'] / max(1, t['n']):.1%}"),
            ("improved over parent", lambda t: f"{t['improved'] / max(1, t['n']):.1%}"),
            ("near-copies left", lambda t: f"{t['duplicates'] / max(1, t['n']):.1%}"),
            ("other failures", lambda t: f"{t['failed'] / max(1, t['n']):.1%}"),
            ("near-copy retries asked", lambda t: f"{t['retries']}"),
            ("output tokens / candidate", lambda t: f"{t['tokens'] / max(1, t['n']):.0f}"),
            ("run span, all seeds (s)", lambda t: f"{t['span_s']:.0f}"))
    for name, show in rows:
        print(f"{name:28s}{show(totals[arm]):>12s}{show(totals[base]):>20s}")
    for name, d in (("novel and valid", diff), ("improved over parent", diff_improved)):
        print(f"{arm} - {base}, {name}: {d['diff']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]")
    (args.root / "retry_duplicates.json").write_text(json.dumps({"totals": totals, "difference": diff,
                                                                 "difference_improved": diff_improved,
                                                                 "args": {k: str(v) for k, v in vars(args).items()}},
                                                                indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
