"""Delta against full generation, on the same model and the same budget.

    python bench/compare_modes.py --llm hf:smollm2 --cycles 3 --candidates 4
    python bench/compare_modes.py --llm openai:MODEL@http://127.0.0.1:8000/v1 -- --preset paper

Runs `deltanas run` twice with identical settings (model, seed, baselines, cycles,
candidates, token cap, dataset), once with `--mode delta` and once with `--mode full`,
then reads both archives and prints, per mode: valid rate, applied rate, mean and
best first-epoch accuracy, output tokens per candidate, generation seconds per
candidate and wall time. Delta is the figure; full generation is its baseline.
Arguments after `--` go to both runs as they are. LoRA updates are off unless
`--lora` is given, so that the two modes differ in the prompt and answer only.
Given the `--out` of an interrupted comparison, each unfinished run is resumed (its
wall time is then not shown; generation seconds come from the archive).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import passthrough  # bench/passthrough.py: a script's own folder is first on sys.path

from deltanas.agent.archive import Store
from deltanas.agent.run.report import run_metrics


ROWS = (("valid_rate", "valid rate", "{:.1%}"), ("applied_rate", "applied rate", "{:.1%}"),
        ("mean_accuracy", "mean accuracy", "{:.2%}"), ("best_accuracy", "best accuracy", "{:.2%}"),
        ("completion_tokens", "output tokens / candidate", "{:.0f}"),
        ("gen_per_candidate", "generation s / candidate", "{:.1f}"), ("wall_s", "wall time (s)", "{:.0f}"))


def run_mode(mode: str, args: argparse.Namespace, extra: list[str], root: Path) -> dict:
    run_dir = root / mode
    resumed = (run_dir / "archive.sqlite").is_file()
    if resumed:  # --out of an interrupted comparison: finish that run rather than start again
        cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--resume", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--plain", "--run-dir", str(run_dir), "--mode",
               mode, "--llm", args.llm, "--cycles", str(args.cycles), "--candidates", str(args.candidates),
               "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), *extra]
        cfg = root / f"{mode}.toml"
        cfg.write_text(f"[learn]\nenabled = {'true' if args.lora else 'false'}\n")
        cmd += ["--config", str(cfg)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    store = Store(run_dir / "archive.sqlite", readonly=True)
    try:
        overall = run_metrics(store)["overall"]
    finally:
        store.close()
    n = overall["candidates"] or 1
    return {**overall, "gen_per_candidate": overall["gen_seconds"] / n, "wall_s": None if resumed else wall,
            "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> int:
    argv, extra = passthrough.split(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="hf:smollm2")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the same cap for both modes (the paper's 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="LoRA updates after each cycle in both runs")
    p.add_argument("--out", help="where the two runs go (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deltanas-modes-"))
    root.mkdir(parents=True, exist_ok=True)
    res = {mode: run_mode(mode, args, extra, root) for mode in ("delta", "full")}
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    print(f"model {args.llm}; {args.cycles} cycles x {args.candidates} candidates each; "
          f"token cap {args.max_new_tokens}; seed {args.seed}; LoRA {'on' if args.lora else 'off'}")
    print(f"{'':28}{'delta':>12}{'full (baseline)':>18}")
    for key, label, fmt in ROWS:
        cells = [("—" if res[m].get(key) is None else fmt.format(res[m][key])) for m in ("delta", "full")]
        print(f"{label:28}{cells[0]:>12}{cells[1]:>18}")
    d, f = res["delta"]["completion_tokens"], res["full"]["completion_tokens"]
    if d and f:
        print(f"delta output tokens = {d / f:.0%} of full generation's")
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
