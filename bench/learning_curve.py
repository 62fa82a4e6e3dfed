"""Does the LoRA loop help? The same search with the updates and without, from the same seeds (issue 17).

    python bench/learning_curve.py --llm hf:smollm2 --seeds 0,1,2 --cycles 5 --candidates 8 \
        --cold-start-from runs/bootstrap -- --limit-train 10000
    python bench/learning_curve.py --llm hf:tinycoder --seeds 0,1 --cycles 2 --candidates 2 --quick

For each seed it runs `deltanas run` once per arm with identical settings (model, seed, baselines,
cycles, candidates, dataset, grammar, cold start). `--arms` picks them (default `learn,control`):
- **learn**: a LoRA update after every cycle (`learn.updates = true`, `learn.method = "sft"`);
- **dpo**, **sft+dpo**: the same with `learn.method = "dpo"` or `"sft+dpo"` (preference pairs);
- **control**: no update (`learn.updates = false`); a `--cold-start-from` adapter is used by all,
  so the arms differ in the loop's updates alone.

Per cycle and arm it reads from each archive:
- valid, novel-and-valid and improved-over-parent rates (over all the cycle's candidates);
- mean and best first-epoch accuracy of the valid candidates;
- with `--probe`, the grammar's share of the work: the cycle's own prompts sent again with
  `constrain = "none"` to the model as it was in that cycle (its adapter then), and how many
  of those free answers apply.

Then, over the cycles of `--window` (default the last three), the difference of each arm from the
control with a 95% bootstrap interval that resamples seeds and, within each, candidates (10,000
draws). It writes
`learning_curve.json`, `learning_curve.md` and `learning_curve.png` (the arms' curves, shaded
with per-cycle intervals, drawn by `deltanas report`'s own compare_plot) under `--root`.
An interrupted benchmark is finished where it stopped: a run with an archive is resumed. `--parallel N`
runs N arms at once (each its own process, model and sandbox: on a large GPU they share the card);
`--no-run` reads the archives as they are. A cycle a run had not finished is left out of its
curve, and the difference is taken over the window's cycles that every run finished (it says so
when that is fewer than asked).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import passthrough  # bench/passthrough.py: a script's own folder is first on sys.path

from deltanas.agent.archive import Store
from deltanas.agent.run.report import CURVES, compare_plot

METHODS = {"learn": "sft", "dpo": "dpo", "sft+dpo": "sft+dpo"}  # the learning arms, and what each trains
METRICS = ("valid", "novel_valid", "improved")


def run_arm(root: Path, seed: int, arm: str, args: argparse.Namespace, extra: list[str]) -> Path:
    run_dir = root / f"seed-{seed}" / arm
    if args.no_run:
        if not (run_dir / "archive.sqlite").is_file():
            raise SystemExit(f"--no-run: {run_dir} has no archive")
        return run_dir
    if (run_dir / "archive.sqlite").is_file():
        cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--resume", str(run_dir)]
    else:
        cfg = root / f"{arm}.toml"
        cold = json.dumps([str(Path(args.cold_start_from).resolve())]) if args.cold_start_from else "[]"
        cfg.write_text(f"[learn]\nenabled = true\nupdates = {'false' if arm == 'control' else 'true'}\n"
                       f"method = \"{METHODS.get(arm, 'sft')}\"\nrule = \"{args.rule}\"\n"
                       f"cold_start_from = {cold}\ncold_start_max_pairs = {args.max_pairs}\n")
        cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--run-dir", str(run_dir),
               "--config", str(cfg), "--llm", args.llm, "--cycles", str(args.cycles), "--candidates",
               str(args.candidates), "--seed", str(seed), "--dataset", args.dataset, "--constrain", args.constrain,
               *(["--preset", "quick"] if args.quick else []), *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} {arm} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"seed {seed} {arm}: {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def outcomes(run_dir: Path) -> dict[int, list[dict]]:
    """Per finished cycle, each candidate's valid / novel_valid / improved as 0 or 1, and its
    accuracy. A cycle the run had not finished (a benchmark stopped early) is left out whole:
    its candidates that had ended are the quick ones, not a sample of the cycle."""
    store = Store(run_dir / "archive.sqlite", readonly=True)
    try:
        rows = store.candidates()
        finished = {c["cycle"] for c in store.cycles() if c["finished_at"] is not None}
    finally:
        store.close()
    acc = {r.id: r.accuracy for r in rows}
    out: dict[int, list[dict]] = {}
    for r in rows:
        if r.cycle < 0 or r.cycle not in finished or not r.final:
            continue
        ok = r.status == "ok" and r.accuracy is not None
        parent = acc.get(r.parent_id)
        out.setdefault(r.cycle, []).append({
            "valid": int(ok), "novel_valid": int(ok and r.novel is not False),
            "improved": int(ok and parent is not None and r.accuracy > parent),
            "accuracy": r.accuracy if ok else None})
    return out


def probe(run_dir: Path, llm: str, max_new_tokens: int) -> dict[int, float]:
    """Per cycle: the share of that cycle's prompts, sent again unconstrained to the model with the
    adapter it had then, whose answers apply. Nothing the model writes is run."""
    from deltanas.agent.llm.base import Prompt, Sampling
    from deltanas.agent.llm.factory import make_backend
    from deltanas.tools.diff_apply import apply_model_output

    store = Store(run_dir / "archive.sqlite", readonly=True)
    try:
        rows = [r for r in store.candidates() if r.cycle >= 0 and r.final]
        adapters = [a for a in store.adapters() if a["status"] in ("trained", "reused") and a.get("path")]
        prompts: dict[int, list[Prompt]] = {}
        for r in rows:
            chat = store.get_trajectory(r.id) or []
            parent = store.get(r.parent_id)
            if len(chat) >= 2 and parent is not None:
                msgs = [{"role": m["role"], "content": m["content"]} for m in chat[:2]]
                prompts.setdefault(r.cycle, []).append(Prompt(messages=msgs, base_source=parent.source))
    finally:
        store.close()

    def adapter_for(cycle: int) -> str | None:  # the newest adapter trained before the cycle proposed
        before = [a for a in adapters if a["cycle"] < cycle]
        return str(run_dir / before[-1]["path"]) if before else None

    backend = make_backend(llm)
    out: dict[int, float] = {}
    try:
        loaded = None
        for cycle in sorted(prompts, key=lambda c: (adapter_for(c) is not None, c)):
            want = adapter_for(cycle)
            if want != loaded and want is not None:
                backend.load_adapter(want)
                loaded = want
            got = backend.generate(prompts[cycle], Sampling(max_new_tokens=max_new_tokens, seed=cycle))
            out[cycle] = sum(apply_model_output(p.base_source, c.text).ok
                             for p, c in zip(prompts[cycle], got)) / len(got)
    finally:
        backend.close()
    return out


def bootstrap_diff(per_seed: dict[int, dict[str, list[int]]], draws: int = 10_000, rng_seed: int = 0,
                   arm: str = "learn") -> dict:
    """Mean `arm` − control over seeds, and its 95% interval: seeds resampled, then candidates
    within each seed and arm. `per_seed[seed][arm]` is a list of 0/1 (or values)."""
    seeds = sorted(per_seed)
    rng = random.Random(rng_seed)

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    def diff(chosen, resample):
        vals = []
        for s in chosen:
            arms = per_seed[s]
            pick = (lambda xs: [rng.choice(xs) for _ in xs]) if resample else (lambda xs: xs)
            vals.append(mean(pick(arms[arm])) - mean(pick(arms["control"])))
        return mean(vals)

    point = diff(seeds, False)
    stats = sorted(diff([rng.choice(seeds) for _ in seeds], True) for _ in range(draws))
    return {"diff": point, "ci95": [stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1]]}


def arm_interval(values_by_seed: list[list[float]], draws: int = 2000, rng_seed: int = 0) -> tuple[float, float]:
    rng = random.Random(rng_seed)
    nonempty = [v for v in values_by_seed if v]
    if not nonempty:
        return 0.0, 0.0
    means = []
    for _ in range(draws):
        seeds = [rng.choice(nonempty) for _ in nonempty]
        means.append(sum(sum(rng.choice(v) for _ in v) / len(v) for v in seeds) / len(seeds))
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def main() -> int:
    argv, extra = passthrough.split(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="hf:smollm2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--arms", default="learn,control",
                    help=f"the runs per seed: control and one or more of {', '.join(METHODS)} (default learn,control)")
    ap.add_argument("--constrain", default="grammar", choices=["grammar", "prefix", "none"])
    ap.add_argument("--rule", default="valid", choices=["improved", "valid", "top_k"])
    ap.add_argument("--cold-start-from", metavar="DIR", help="a bootstrap folder (or other source) every arm starts from")
    ap.add_argument("--max-pairs", type=int, default=64, help="learn.cold_start_max_pairs")
    ap.add_argument("--window", default=None, metavar="A:B", help="cycles compared, 0-based inclusive (default: last 3)")
    ap.add_argument("--probe", action="store_true", help="also measure the grammar's share (free answers that apply)")
    ap.add_argument("--probe-tokens", type=int, default=384)
    ap.add_argument("--quick", action="store_true", help="pass --preset quick (CPU-sized updates)")
    ap.add_argument("--root", default=None, help="where the runs go (default: a folder under /tmp)")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="runs (and probes) at once: on a large GPU, N arms share it (default 1, one after another)")
    ap.add_argument("--no-run", action="store_true",
                    help="read the archives under --root as they are (an arm stopped early gives the cycles it finished)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    learners = [a for a in arms if a != "control"]
    if "control" not in arms or not learners or any(a not in METHODS for a in learners) or len(set(arms)) < len(arms):
        ap.error(f"--arms: control and one or more of {', '.join(METHODS)}, each once (got {args.arms!r})")
    root = Path(args.root) if args.root else Path("/tmp") / f"deltanas-learning-curve-{int(time.time())}"
    root.mkdir(parents=True, exist_ok=True)
    lo, hi = (map(int, args.window.split(":")) if args.window else (max(0, args.cycles - 3), args.cycles - 1))

    keys = [(s, arm) for s in seeds for arm in arms]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # each run is a process of its own
        runs = dict(zip(keys, pool.map(lambda k: run_arm(root, k[0], k[1], args, extra), keys)))
    data = {key: outcomes(d) for key, d in runs.items()}
    probes = {}
    if args.probe:  # a process per probe: two models loading in one process's threads mix their dtypes
        with ProcessPoolExecutor(max(1, args.parallel), mp_context=multiprocessing.get_context("spawn")) as pool:
            probes = dict(zip(keys, pool.map(probe, [runs[k] for k in keys], [args.llm] * len(keys),
                                             [args.probe_tokens] * len(keys))))

    common = set.intersection(*(set(d) for d in data.values()))  # cycles every run finished
    window = [c for c in range(lo, hi + 1) if c in common]
    curves: dict[str, list[dict]] = {}
    for arm in arms:
        points = []
        for c in range(args.cycles):
            point = {"cycle": c, "runs": sum(c in data[(s, arm)] for s in seeds)}
            for key, name in (("valid_rate", "valid"), ("novel_valid_rate", "novel_valid"),
                              ("improved_rate", "improved")):
                by_seed = [[o[name] for o in data[(s, arm)].get(c, [])] for s in seeds]
                flat = [x for v in by_seed for x in v]
                point[key] = sum(flat) / len(flat) if flat else None
                point[f"{key}_lo"], point[f"{key}_hi"] = arm_interval(by_seed)
            accs = [o["accuracy"] for s in seeds for o in data[(s, arm)].get(c, []) if o["accuracy"] is not None]
            point["mean_accuracy"] = sum(accs) / len(accs) if accs else None
            point["best_accuracy"] = max(accs) if accs else None
            if probes:
                got = [probes[(s, arm)].get(c) for s in seeds if probes[(s, arm)].get(c) is not None]
                point["free_apply_rate"] = sum(got) / len(got) if got else None
            points.append(point)
        curves[arm] = points

    differences: dict[str, dict] = {}
    for arm in learners:
        differences[arm] = {}
        for name in METRICS:
            if not window:
                continue
            per_seed = {s: {a: [o[name] for c in window for o in data[(s, a)][c]] for a in (arm, "control")}
                        for s in seeds}
            differences[arm][name] = bootstrap_diff(per_seed, arm=arm)
    report = {"llm": args.llm, "seeds": seeds, "cycles": args.cycles, "candidates": args.candidates,
              "dataset": args.dataset, "constrain": args.constrain, "cold_start_from": args.cold_start_from,
              "extra": extra, "window": [lo, hi], "compared": window, "curves": curves,
              "difference": differences[learners[0]],
              "differences": differences,
              "runs": {f"{s}/{arm}": str(d) for (s, arm), d in runs.items()}}
    (root / "learning_curve.json").write_text(json.dumps(report, indent=2))
    compare_plot(curves, root / "learning_curve.png",
                 title=f"{args.llm}, {len(seeds)} seeds x {args.candidates} candidates per cycle")

    cols = [k for k, _ in CURVES] + ["best_accuracy"] + (["free_apply_rate"] if probes else [])
    lines = [f"{args.llm}, seeds {seeds}, {args.cycles} cycles x {args.candidates} candidates, {args.dataset}, "
             f"constrain={args.constrain}, cold start from {args.cold_start_from or 'nothing'}", "",
             "| arm | cycle | runs finished | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 3)]
    for arm, points in curves.items():
        for p in points:
            cells = ["—" if p.get(k) is None else f"{100 * p[k]:.1f}%" for k in cols]
            lines.append(f"| {arm} | {p['cycle']} | {p['runs']} of {len(seeds)} | " + " | ".join(cells) + " |")
    if window != list(range(lo, hi + 1)):
        lines += ["", f"Cycles {lo}–{hi} were asked for the comparison; every run had finished "
                  + (f"only cycles {', '.join(map(str, window))} of them." if window else "none of them: no difference.")]
    for arm, by_metric in differences.items():
        if not by_metric:
            continue
        lines += ["", f"{arm} − control over cycles {', '.join(map(str, window))} (0-based), 95% bootstrap interval "
                  "over seeds and candidates:"]
        for name, r in by_metric.items():
            a, b = r["ci95"]
            verdict = "excludes zero" if a > 0 or b < 0 else "includes zero"
            lines.append(f"- {name}: {100 * r['diff']:+.1f} points [{100 * a:+.1f}, {100 * b:+.1f}] ({verdict})")
    text = "\n".join(lines) + "\n"
    (root / "learning_curve.md").write_text(text)
    print(text)
    print(f"written: {root}/learning_curve.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
