"""Ray executor: candidate throughput against the number of GPUs, and a worker killed mid-candidate.

    python bench/ray_scaling.py --device cuda --workers 1,2 --candidates 16
    python bench/ray_scaling.py --device cpu --workers 1 --candidates 2 --n 512   # a CPU smoke run

For each worker count the same candidates (the zoo's LeNet and ResNet, alternating) are
trained for one epoch through `RayExecutor` (one actor per GPU, each with its own warm
process sandbox), with as many in flight as there are actors, on a fresh local Ray
instance. It prints candidates per hour for each count beside the one-worker baseline.
With `--kill`, the largest count runs once more while one actor is SIGKILLed in the
middle of a candidate: every candidate must still end with a recorded outcome. With
`--local`, one more row runs the same candidates through a warm process sandbox in the
driver, on one GPU, without Ray. Each row also prints medians of where a candidate's time
went (the driver's wait, training, and the spare child's readying and waiting).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _dataset(n: int):
    import numpy as np

    from deltanas.tools.datasets import DatasetArrays

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n + 1000)
    x = rng.integers(0, 60, (n + 1000, 1, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):  # a learnable signal: a bright block at the class's place
        x[i, 0, 2 * c:2 * c + 6, 4:10] = 250
    return DatasetArrays(name="bench-synthetic", x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:],
                         num_classes=10, mean=[0.2], std=[0.3])


def candidate_tag(i: int) -> str:
    return f"c000-{i:03d}"


def network(i: int) -> str:
    """The zoo network of candidate i: LeNet and ResNet alternate."""
    return ("lenet", "resnet")[i % 2]


SPARE_NOTE = re.compile(r"readied ahead of its job in ([\d.]+)s \((.*?)\), then waited ([\d.]+)s")
READY_PART = re.compile(r"(CUDA context|dataset|warm-up steps|wide) (?:\([^)]*\) )?([\d.]+)s")


def timings(outs: list, spans: list[tuple[float, float]]) -> dict:
    """Where a candidate's time went, per network (medians): in the driver's `evaluate`, in
    training, and in the spare child that ran it (readying its GPU part by part, then waiting
    for its job; "wide" counts the spares that had time for the wide warm-up)."""
    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    out: dict = {}
    for kind in ("lenet", "resnet"):
        mine = [(o, spans[i]) for i, o in enumerate(outs) if network(i) == kind]
        notes = [m for o, _ in mine if (m := SPARE_NOTE.search(o.log_tail))]
        parts = [dict((name, float(v)) for name, v in READY_PART.findall(m.group(2))) for m in notes]
        waits = [end - start for _, (start, end) in mine]
        out[kind] = {"evaluate_s": med(waits), "evaluate_mean_s": round(statistics.fmean(waits), 3),
                     "evaluate_max_s": round(max(waits), 3),
                     "train_s": med([o.train_seconds for o, _ in mine]),
                     "from_spare": len(notes), "spare_readied_s": med([float(m.group(1)) for m in notes]),
                     "spare_waited_s": med([float(m.group(3)) for m in notes]),
                     **{f"{name}_s": med([p.get(name) for p in parts])
                        for name in ("CUDA context", "dataset", "warm-up steps")},
                     "wide": sum(1 for p in parts if "wide" in p)}
    return out


def run_once(workers: int, sources: list[str], ds, handle: Path, device: str, kill: bool,
             local: bool = False) -> dict:
    """One row: the candidates through `workers` Ray actors, or (`local`) through the driver's own
    warm process sandbox on one GPU, without Ray: the same jobs with nothing of Ray's in between."""
    from deltanas.agent.config import SandboxConfig
    from deltanas.agent.run.executor import LocalExecutor, targets
    from deltanas.agent.run.executor_ray import RayExecutor
    from deltanas.sandbox.base import DEFAULT_HYPERPARAMETERS, JobSpec, Limits
    from deltanas.sandbox.process import ProcessSandbox
    from deltanas.tools.proxy import make_job

    root = Path(tempfile.mkdtemp(prefix=f"deltanas-ray-bench-{workers}-"))
    spec = JobSpec(str(handle.resolve()), dict(DEFAULT_HYPERPARAMETERS), epochs=1, batch_size=128, device=device,
                   limits=Limits(timeout_s=600, cpu_threads=2))
    started = time.perf_counter()
    if local:  # its warm worker started ahead, as an actor's is
        sandbox = ProcessSandbox(root / "work", warm=True)
        sandbox.prewarm(make_job(spec, "", "prewarm"))
        ex = LocalExecutor(sandbox, targets((ds, spec)), workers=workers)
    else:
        ex = RayExecutor(SandboxConfig(type="process", device=device, workers=workers), targets((ds, spec)), root / "work",
                         workers=workers)
    ready = time.perf_counter() - started
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = ex.busy()
            if busy:
                time.sleep(0.3)  # inside the candidate
                pid = next(iter(ex.busy().values()), None)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    try:
        t0 = time.perf_counter()
        if kill:
            threading.Thread(target=killer, daemon=True).start()
        spans: list[tuple[float, float]] = [(0.0, 0.0)] * len(sources)

        def evaluate(i: int):
            start = time.perf_counter()
            out = ex.evaluate(sources[i], candidate_tag(i), root / f"c{i}")
            spans[i] = (start, time.perf_counter())
            return out

        with ThreadPoolExecutor(max_workers=workers) as pool:
            outs = list(pool.map(evaluate, range(len(sources))))
        wall = time.perf_counter() - t0
    finally:
        ex.close()
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}  # what the candidates that did not end ok said, and how often
    for i, o in enumerate(outs):
        statuses[o.status] = statuses.get(o.status, 0) + 1
        if o.status != "ok":
            key = f"{o.status} ({network(i)}): {o.error[:300]}"
            errors[key] = errors.get(key, 0) + 1
            if errors[key] == 1:
                print(f"  {candidate_tag(i)} {key}\n    log tail: {o.log_tail[-1500:]}", file=sys.stderr)
    return {"workers": workers, "candidates": len(outs), "wall_s": wall, "start_s": ready,
            "per_hour": 3600 * len(outs) / wall, "statuses": statuses, "errors": errors, "killed": killed,
            "replaced": getattr(ex, "replaced", 0), "timings": timings(outs, spans), "local": local,
            "spans": [(round(a - t0, 3), round(b - t0, 3)) for a, b in spans],
            "train_s": [o.train_seconds for o in outs], "logs": [o.log_tail for o in outs],
            "recorded": sum(1 for i in range(len(sources)) if (root / f"c{i}" / "result.json").is_file())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", default="1,2", help="worker (actor) counts to compare; the first is the baseline")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--n", type=int, default=20000, help="training images per candidate")
    p.add_argument("--kill", action="store_true", help="rerun the largest count, killing one actor mid-candidate")
    p.add_argument("--local", action="store_true",
                   help="one more row: the same candidates in a warm process sandbox in this process, no Ray")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from deltanas.tools.datasets import prepare_handle
    from deltanas.tools.zoo import get_baseline

    ds = _dataset(a.n)
    handle = prepare_handle(ds, Path(tempfile.mkdtemp(prefix="deltanas-ray-handle-")))
    sources = [get_baseline(network(i)).source for i in range(a.candidates)]
    counts = [int(w) for w in a.workers.split(",")]
    rows = [run_once(w, sources, ds, handle, a.device, kill=False) for w in counts]
    if a.local:
        rows.append(run_once(1, sources, ds, handle, a.device, kill=False, local=True))
    if a.kill:
        rows.append({**run_once(counts[-1], sources, ds, handle, a.device, kill=True), "kill": True})
    if a.json:
        print(json.dumps({"rows": rows, "device": a.device, "n": a.n}))  # one line: other libraries print too
    base = rows[0]["per_hour"]
    out = sys.stderr if a.json else sys.stdout
    print(f"{a.candidates} candidates (lenet/resnet), {a.n} training images each, device {a.device}", file=out)
    for r in rows:
        tag = " (one actor killed mid-candidate)" if r.get("kill") else ""
        name = "no Ray (one sandbox)" if r["local"] else f"workers {r['workers']}"
        print(f"{name}: {r['per_hour']:8.0f} candidates/hour ({r['wall_s']:.1f} s, actors ready in "
              f"{r['start_s']:.1f} s) {r['per_hour'] / base:.2f}x the 1-worker baseline; outcomes {r['statuses']}, "
              f"recorded {r['recorded']}/{r['candidates']}, replaced {r['replaced']}{tag}", file=out)
        for kind, t in r["timings"].items():
            print(f"  {kind}, medians: {t}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
