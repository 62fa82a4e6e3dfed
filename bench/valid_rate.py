"""How many of the model's answers apply and train, under each way of holding them to the format.

    python bench/valid_rate.py                                   # SmolLM2, grammar / prefix / none
    python bench/valid_rate.py --llm openai:MODEL@http://127.0.0.1:8000/v1 --candidates 16
    python bench/valid_rate.py --llm hf:tinycoder --dataset digits --candidates 2 --quick

Runs `deltanas run` once per `--constrain` mode with identical settings (model, seed, baselines,
cycles, candidates, token cap, dataset, repairs; LoRA off, so the modes differ only in how the
answer is held), then reads each archive and prints, per mode:
- applied: the model's first answer applies to its parent (re-applied here from the archive);
- valid: trained to a recorded accuracy after repairs; the runs train near-copies too
  (`search.train_duplicates`), which stay duplicates and never become parents;
- novel and valid: valid, and under 0.90 MinHash similarity to its parent and the archive;
- improved: valid with a higher first-epoch accuracy than its parent;
- distinct edits per parent: different first answers among the candidates of one parent;
- output tokens and generation seconds per candidate, tokens per second;
- under the grammar: its compile time and the per-token mask cost (from the run's archive).
`none` is the paper's unconstrained protocol and the baseline the others are read against.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import passthrough  # bench/passthrough.py: a script's own folder is first on sys.path

from deltanas.agent.archive import Store
from deltanas.tools.diff_apply import apply_model_output
from deltanas.tools.full_extract import apply_full_output


MODES = ("grammar", "prefix", "none")
ROWS = (("placed_first", "placed, first answer", "{:.1%}"), ("applied_first", "applied, first answer", "{:.1%}"), ("valid", "valid after repairs", "{:.1%}"),
        ("novel_valid", "novel and valid", "{:.1%}"), ("duplicates", "duplicates", "{:.1%}"),
        ("improved", "improved over parent", "{:.1%}"),
        ("distinct_per_parent", "distinct edits / parent", "{:.2f}"),
        ("tokens", "output tokens / candidate", "{:.0f}"), ("gen_s", "generation s / candidate", "{:.1f}"),
        ("tokens_per_s", "tokens / s", "{:.1f}"), ("compile_ms", "grammar compile ms (mean)", "{:.1f}"),
        ("mask_ms", "mask ms / token", "{:.3f}"), ("wall_s", "wall time (s)", "{:.0f}"))


def run_mode(constrain: str, args: argparse.Namespace, extra: list[str], root: Path) -> Path:
    run_dir = root / constrain
    if (run_dir / "archive.sqlite").is_file():  # an interrupted comparison: finish that run
        cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--resume", str(run_dir)]
    else:
        cfg = root / f"{constrain}.toml"
        cfg.write_text(f"[learn]\nenabled = false\n\n[search]\nmax_repairs = {args.repairs}\ntrain_duplicates = true\n")
        cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--run-dir", str(run_dir),
               "--constrain", constrain, "--mode", args.mode, "--llm", args.llm, "--cycles", str(args.cycles),
               "--candidates", str(args.candidates), "--max-new-tokens", str(args.max_new_tokens),
               "--seed", str(args.seed), "--dataset", args.dataset, "--baselines", args.baselines,
               "--config", str(cfg), *extra]
        if args.limit_train:
            cmd += ["--limit-train", str(args.limit_train)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (root / f"{constrain}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{constrain} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (run_dir / "bench-wall.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return run_dir


def _changes(diff: str) -> str:
    return "\n".join(x for x in diff.splitlines() if x[:1] in "+-" and not x.startswith(("+++", "---")))


def measure(run_dir: Path, mode: str) -> dict:
    store = Store(run_dir / "archive.sqlite", readonly=True)
    try:
        rows = [r for r in store.candidates() if r.kind != "baseline" and r.final]
        parents = {r.parent_id: store.get(r.parent_id) for r in rows}
        stats = [store.get_meta(f"constraint:{c}") for c in sorted({r.cycle for r in rows})]
    finally:
        store.close()
    n = len(rows) or 1
    applier = apply_full_output if mode == "full" else apply_model_output
    first = [applier(parents[r.parent_id].source, r.completion or "") for r in rows]
    distinct = defaultdict(set)
    for r, res in zip(rows, first):
        distinct[r.parent_id].add(_changes(res.diff) if res.ok else f"failed:{r.id}")
    ok = [r for r in rows if r.status == "ok"]
    valid = [r for r in rows if r.accuracy is not None]  # duplicates trained for the record count too
    improved = [r for r in ok if r.accuracy is not None and parents[r.parent_id].accuracy is not None
                and r.accuracy > parents[r.parent_id].accuracy]
    tokens = sum(r.completion_tokens for r in rows)
    gen = sum(r.gen_seconds for r in rows)
    last = next((s for s in reversed(stats) if s), None)  # the backend's totals so far
    wall = run_dir / "bench-wall.txt"
    return {
        "candidates": len(rows), "constrain": sorted({r.constrain or "none" for r in rows}),
        # placed: the hunks found their place (what the grammar guarantees); the file may still not compile
        "placed_first": sum(x.ok or x.error.code.value in ("syntax_error", "no_op") for x in first) / n,
        "applied_first": sum(x.ok for x in first) / n, "valid": len(valid) / n, "novel_valid": len(ok) / n,
        "duplicates": sum(r.status == "duplicate" for r in rows) / n, "improved": len(improved) / n,
        "distinct_per_parent": sum(len(v) for v in distinct.values()) / max(1, len(distinct)),
        "parents": len(distinct), "tokens": tokens / n, "gen_s": gen / n,
        "tokens_per_s": tokens / gen if gen else None,
        "compile_ms": 1e3 * last["compile_seconds"] / last["compiles"] if last and last["compiles"] else None,
        "mask_ms": last["mask_ms"] if last else None,
        "wall_s": float(wall.read_text()) if wall.is_file() else None,
        "by_status": {s: sum(r.status == s for r in rows) for s in sorted({r.status for r in rows})},
        "errors": sorted({r.error_code for r in rows if r.error_code}),
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    argv, extra = passthrough.split(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="hf:smollm2")
    p.add_argument("--modes", default=",".join(MODES), help="constrain modes, in the order shown")
    p.add_argument("--mode", choices=["delta", "full"], default="delta")
    p.add_argument("--cycles", type=int, default=1)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--repairs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--baselines", default="lenet,resnet,mobilenet")
    p.add_argument("--out", help="where the runs go (default: a temporary folder); an existing one is resumed")
    p.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout, no table")
    p.add_argument("--quick", action="store_true", help="CI size: 1 cycle, the --candidates given, 1 repair")
    args = p.parse_args(argv)
    if args.quick:
        args.cycles, args.repairs = 1, min(args.repairs, 1)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deltanas-valid-"))
    root.mkdir(parents=True, exist_ok=True)
    res = {m: measure(run_mode(m, args, extra, root), args.mode) for m in modes}
    (root / "valid_rate.json").write_text(json.dumps({"args": vars(args), "modes": res}, indent=2, default=str))
    if args.json:
        print(json.dumps({"args": vars(args), "modes": res}, indent=2, default=str))
        return 0
    print(f"model {args.llm}; {args.mode} mode; {args.cycles} cycle(s) x {args.candidates} candidates; "
          f"baselines {args.baselines}; {args.repairs} repairs; token cap {args.max_new_tokens}; seed {args.seed}; "
          f"dataset {args.dataset}")
    print(f"{'':28}" + "".join(f"{m + (' (baseline)' if m == 'none' else ''):>18}" for m in modes))
    for key, label, fmt in ROWS:
        cells = ["—" if res[m].get(key) is None else fmt.format(res[m][key]) for m in modes]
        print(f"{label:28}" + "".join(f"{c:>18}" for c in cells))
    for m in modes:
        print(f"{m}: {res[m]['by_status']} errors {res[m]['errors']}")
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
