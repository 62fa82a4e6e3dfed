"""The CPU demo figure: `deltanas run` on its embedded defaults must finish in <= 10 minutes
on a 2-core CPU and show real first-epoch accuracies.

    python bench/cpu_demo.py            # prints the wall time beside the 600 s budget
    python bench/cpu_demo.py --json -- --llm mutate --limit-train 512   # a smaller run, JSON on stdout

It runs the README's main job exactly (SmolLM2-135M GGUF, the real MNIST, the default
baselines and budget) in a temporary run directory, then reads the archive's summary.
Arguments after `--` go to `deltanas run` as they are; the budget is the default job's,
so a smaller run is only a check that the job still runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import passthrough  # bench/passthrough.py: a script's own folder is first on sys.path


BUDGET_S = 600.0


def main(argv: list[str] | None = None) -> int:
    argv, extra = passthrough.split(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout")
    args = p.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="deltanas-bench-")) / "run"
    cmd = [sys.executable, "-m", "deltanas.agent.cli", "run", "--run-dir", str(run_dir), "--plain", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr if args.json else sys.stdout)
        return 1
    status = json.loads(subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "status", str(run_dir), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "wall_s": wall, "budget_s": BUDGET_S, "args": extra,
                          "baselines": status["baselines"], "candidates": status["candidates"],
                          "per_status": status["per_status"]}))
        return 0 if wall <= BUDGET_S else 2
    print(f"cpu cores: {os.cpu_count()}")
    print(f"demo wall time: {wall:.1f} s   budget: {BUDGET_S:.0f} s   ({'within' if wall <= BUDGET_S else 'OVER'})")
    print("baseline first-epoch accuracies: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in status["baselines"].items()))
    print(f"candidates: {status['candidates']}  per status: {status['per_status']}")
    return 0 if wall <= BUDGET_S else 2


if __name__ == "__main__":
    sys.exit(main())
