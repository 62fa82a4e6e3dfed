"""Every figure of DESIGN.md at a small size on the CPU, in one table: the smoke run CI keeps.

    python bench/summary.py                    # all figures, small CPU sizes (about 3 minutes on 2 cores)
    python bench/summary.py --json             # the rows as one JSON object
    python bench/summary.py --only tokens,novelty_scale --timeout 60

Each script under `bench/` runs as its own process group, one after another, with its
`--json` flag and a time limit; a script that overruns is killed with its whole group.
The summary reads each script's figure and its baseline from that JSON and prints, per
figure: measured, baseline, the target from DESIGN.md ("Figures to reach"), whether the
small run meets it, and the seconds the script took. The sizes here only check that
every benchmark still runs and still prints its figure: the GPU figures run on the CPU,
and "met" compares a small CPU number with a target set for the full size on a GPU. The
full commands, their hardware and their numbers are in bench/RESULTS.md.

A script that fails, times out or prints no figure shows as failed with its last lines,
and the summary exits 1. `--extra PATH` adds any other script to the run (it gets
`--json`; a JSON object with "measured" and "baseline" fills its row).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Figure:
    """One row: how to read the measured number and its baseline from the script's JSON."""

    name: str
    target: str  # as DESIGN.md states it
    unit: str
    read: Callable[[dict], tuple[float, float | None]]
    met: Callable[[float, float | None], bool] | None
    note: str = ""


@dataclass(frozen=True)
class Bench:
    script: str  # a file under bench/, or a path (--extra)
    args: tuple[str, ...]
    limit_s: float
    figures: tuple[Figure, ...]


@dataclass
class Row:
    figure: str
    script: str
    target: str
    unit: str
    note: str
    status: str = "ok"  # ok | failed | timed out
    measured: float | None = None
    baseline: float | None = None
    met: bool | None = None
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)
    data: dict | None = None  # the script's own JSON, in --json output


def _first(rows: list[dict], key: str) -> float:
    return rows[0][key]


BENCHES = (
    Bench("proxy_epoch.py",
          ("--n", "32", "--n-test", "32", "--batches", "32", "--small-batch", "32", "--epochs", "2", "--workers", "1",
           "--threads", "1", "--small", "lenet", "--device", "cpu"), 180,
          (Figure("proxy epoch, ResNet-18: ours vs DataLoader",
                  "<= 1 s at 50k on H100/H200, >= 8x", "s/epoch",
                  lambda j: (_first(j["resnet18"], "ours_first_s"), _first(j["resnet18"], "baseline_first_s")),
                  lambda m, b: m <= 1.0 and b / m >= 8, "smoke: GPU figure; CPU, 32 images"),
           Figure("candidates/device-hour, lenet: warm vs cold",
                  ">= 3,000 per GPU-hour", "/h",
                  lambda j: (j["small"]["lenet"]["per_hour"], j["baseline_small"]["lenet"]["per_hour"]),
                  lambda m, b: m >= 3000, "smoke: GPU figure; CPU, 32 images"))),
    Bench("sandbox_overhead.py", ("--jobs", "2", "--train", "256", "--test", "128", "--backends", "process"), 180,
          (Figure("per-candidate overhead: warm vs cold worker",
                  "<= 0.5 s", "s",
                  lambda j: (j["backends"]["process"]["warm_median_s"], j["backends"]["process"]["cold_median_s"]),
                  lambda m, b: m <= 0.5, "CPU, process sandbox, no CUDA context"),)),
    Bench("generation_batch.py",
          ("--model", "config", "--layers", "2", "--hidden", "128", "--prompts", "4", "--batch", "4",
           "--max-new-tokens", "8"), 180,
          (Figure("LLM output tokens/s: batched vs one by one", ">= 5x", "tok/s",
                  lambda j: (j["batch_tokens_per_s"], j["one_tokens_per_s"]),
                  lambda m, b: b is not None and m >= 5 * b,
                  "smoke: GPU figure; 2-layer random Llama"),)),
    Bench("novelty_scale.py", ("--n", "2000", "--real", "100", "--checks", "150", "--scan-checks", "10"), 120,
          (Figure("novelty check: LSH index vs linear scan", "<= 1 ms at 100k", "ms",
                  lambda j: (j["lsh_ms"], j["scan_ms"]), lambda m, b: m <= 1.0, "2,000 archived, not 100k"),)),
    Bench("tokens.py", ("--mutations", "4", "--baselines", "lenet,resnet"), 180,
          (Figure("output tokens/candidate: delta vs full file", "<= 25% of full", "tokens",
                  lambda j: (j["delta_tokens"], j["full_tokens"]), lambda m, b: b is not None and m <= 0.25 * b,
                  "4 mutations of lenet, resnet each"),)),
    Bench("compare_modes.py",
          ("--llm", "mutate", "--cycles", "1", "--candidates", "2", "--", "--limit-train", "512", "--limit-test", "256",
           "--sandbox", "process", "--baselines", "lenet"), 300,
          (Figure("valid rate: delta vs full generation",
                  "> full (paper: 75.3% vs 50.6%)", "%",
                  lambda j: (100 * j["delta"]["valid_rate"], 100 * j["full"]["valid_rate"]),
                  lambda m, b: b is not None and m > b, "smoke: mutate, 2 candidates per mode"),)),
    Bench("valid_rate.py",
          ("--llm", "hf:tinycoder", "--candidates", "2", "--quick", "--max-new-tokens", "320", "--modes", "grammar,none",
           "--dataset", "digits", "--baselines", "lenet", "--", "--sandbox", "process"), 600,
          (Figure("answers whose hunks place: grammar vs unconstrained", "100% under the grammar, any model", "%",
                  lambda j: (100 * j["modes"]["grammar"]["placed_first"], 100 * j["modes"]["none"]["placed_first"]),
                  lambda m, b: m == 100, "smoke: a random 1M-parameter model, 2 answers per mode"),)),
    Bench("grammar_cost.py", ("--llm", "hf:tinycoder", "--prompts", "2", "--max-new-tokens", "24", "--rounds", "1"),
          240,
          (Figure("decoding step: under the grammar vs free", "<= 15% slower", "s/step",
                  lambda j: (j["seconds_per_step"]["grammar"], j["seconds_per_step"]["none"]),
                  lambda m, b: m <= 1.15 * b, "smoke: a random 1M-parameter model, 2 prompts, 24 tokens"),)),
    Bench("ray_scaling.py", ("--device", "cpu", "--workers", "1", "--candidates", "2", "--n", "512", "--kill"), 300,
          (Figure("Ray executor: candidates/hour, an actor killed vs none", "scales with GPUs; a kill loses nothing",
                  "/h", lambda j: (j["rows"][-1]["per_hour"] if all(r["recorded"] == r["candidates"] for r in j["rows"])
                                   else 0.0, j["rows"][0]["per_hour"]),
                  lambda m, b: m > 0, "smoke: 1 CPU actor; 0 if a candidate went unrecorded"),)),
    Bench("cpu_demo.py",
          ("--", "--llm", "mutate", "--cycles", "1", "--candidates", "1", "--limit-train", "512", "--limit-test", "256",
           "--sandbox", "process", "--baselines", "lenet"), 240,
          (Figure("CPU demo wall time (a budget, no baseline)", "<= 600 s, README job", "s",
                  lambda j: (j["wall_s"], None), lambda m, b: m <= 600,
                  "smoke: mutate, 1 candidate, 512 images"),)),
)


def extra_bench(path: str) -> Bench:
    return Bench(str(Path(path).resolve()), (), 120, (Figure(Path(path).stem, "-", "", lambda j: (j["measured"], j.get("baseline")), None),))


def run_script(path: Path, args: tuple[str, ...], limit_s: float) -> tuple[str, dict | None, float, list[str]]:
    """(status, the last JSON object printed on stdout, seconds, last lines) of one script in its own group."""
    argv = list(args)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv.insert(cut, "--json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(path), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script's workers and sandboxes go with it
        out, err = proc.communicate()
        status = f"timed out ({limit_s:.0f} s)"
    seconds = time.perf_counter() - started
    found = None
    # the whole stdout (compare_modes indents its JSON), else its last JSON line (a library may print first)
    for text in (out, *(ln for ln in reversed(out.splitlines()) if ln.startswith("{"))):
        try:
            found = json.loads(text)
            break
        except json.JSONDecodeError:
            continue
    tail = [ln for ln in (err + out).splitlines() if ln.strip()][-12:]
    return status, found, seconds, tail


def run_bench(bench: Bench, timeout: float | None) -> list[Row]:
    path = Path(bench.script) if os.sep in bench.script else BENCH / bench.script
    status, data, seconds, tail = run_script(path, bench.args, timeout or bench.limit_s)
    rows = []
    for fig in bench.figures:
        row = Row(fig.name, path.name, fig.target, fig.unit, fig.note, status=status, seconds=seconds, data=data)
        if status == "ok":
            try:
                row.measured, row.baseline = (float(v) if v is not None else None for v in fig.read(data or {}))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                row.status = f"failed (no figure in its JSON: {type(e).__name__} {e})"
            else:
                row.met = fig.met(row.measured, row.baseline) if fig.met else None
        if row.status != "ok":
            row.tail = tail
        rows.append(row)
    return rows


def _num(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    head = ("figure", "measured", "baseline", "target (DESIGN.md)", "met", "s", "script", "notes")
    body = []
    for r in rows:
        met = {True: "yes", False: "no", None: "-"}[r.met] if r.status == "ok" else r.status
        body.append((r.figure, _num(r.measured, r.unit), _num(r.baseline, r.unit), r.target, met, f"{r.seconds:.0f}",
                     r.script, r.note))
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated script names to run (e.g. tokens,novelty_scale); empty: none")
    p.add_argument("--extra", action="append", default=[], metavar="PATH", help="also run this script (repeatable)")
    p.add_argument("--timeout", type=float, help="seconds per script, instead of each script's own limit")
    p.add_argument("--json", action="store_true", help="the rows as one JSON object")
    a = p.parse_args(argv)
    benches = list(BENCHES)
    if a.only is not None:
        wanted = {n.removesuffix(".py") for n in a.only.split(",") if n}
        unknown = wanted - {b.script.removesuffix(".py") for b in BENCHES}
        if unknown:
            p.error(f"unknown script(s): {', '.join(sorted(unknown))}")
        benches = [b for b in benches if b.script.removesuffix(".py") in wanted]
    benches += [extra_bench(x) for x in a.extra]
    started = time.perf_counter()
    rows: list[Row] = []
    for bench in benches:
        if not a.json:
            print(f"running {bench.script} ...", file=sys.stderr, flush=True)
        rows += run_bench(bench, a.timeout)
    failed = sorted({r.script for r in rows if r.status != "ok"})
    wall = time.perf_counter() - started
    if a.json:
        print(json.dumps({"rows": [r.__dict__ for r in rows], "failed": failed, "seconds": wall,
                          "cores": os.cpu_count()}, indent=2))
        return 1 if failed else 0
    print(f"bench summary: small CPU sizes, {os.cpu_count()} cores, {wall:.0f} s in all. A smoke check that every")
    print("figure's script runs: 'met' compares a small CPU number with a full-size target (bench/RESULTS.md).\n")
    print(table(rows))
    for script in failed:
        row = next(r for r in rows if r.script == script)
        print(f"\n{script} {row.status}; its last lines:")
        print("\n".join(f"  {ln}" for ln in row.tail))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
