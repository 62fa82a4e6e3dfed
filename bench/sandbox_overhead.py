"""Per-candidate sandbox overhead: warm workers against a fresh worker per candidate.

    python bench/sandbox_overhead.py [--jobs 8] [--dataset mnist] [--backends process,docker] [--device cuda:0] [--json]

For each backend that works here (process; docker where a daemon answers and the
image exists) and each mode (cold: a new worker process or container per candidate;
warm: one worker, a fresh forked child per candidate), it runs the same small LeNet
candidate `--jobs` times, one after another, and prints the per-candidate overhead:
the job's wall time outside its own training (start-up, data, model build,
prediction over `--test` images, read-back). The cold figure is the baseline each warm figure is set
beside. A warm worker's first job, which pays its start-up, is shown apart. On a GPU a warm worker
readies each job's child ahead of it (CUDA context, dataset, warm-up step: sandbox/warm.py); the
`warm, no spare` row turns that off. A spare is readied while the job before it runs, so it hides
its start-up fully only behind jobs at least that long (`--train`). `--json` prints the
figures as one JSON object on stdout and the table on stderr (`bench/summary.py` reads it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

CANDIDATE = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_shape[1], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.LazyLinear(84), nn.ReLU(), nn.Linear(84, out_shape[0]))
        self.body(torch.zeros(1, *in_shape[1:]))

    def forward(self, x):
        return self.body(x)
'''


def make_sandbox(backend: str, warm: bool, root: Path, spare: bool | None = None):
    if backend == "docker":
        from deltanas.sandbox.docker import DEFAULT_IMAGE, DockerSandbox, docker_available, image_available

        ok, why = docker_available()
        if not ok:
            return None, why
        if not image_available(DEFAULT_IMAGE):
            return None, f"image {DEFAULT_IMAGE} missing (deltanas sandbox build)"
        return DockerSandbox(root, warm=warm, spare=spare), ""
    from deltanas.sandbox.process import ProcessSandbox

    return ProcessSandbox(root, warm=warm, spare=spare), ""


def measure(sandbox, handle: Path, jobs: int, limit: dict, device: str) -> list[tuple[float, float]]:
    from deltanas.sandbox.base import Job, Limits

    out = []
    for i in range(jobs):
        job = Job(candidate_id=f"bench-{i}", source=CANDIDATE, dataset_dir=str(handle), batch_size=128, device=device,
                  limits=Limits(timeout_s=600, memory_mb=4096, cpu_threads=limit["threads"]))
        t0 = time.perf_counter()
        r = sandbox.run(job)
        wall = time.perf_counter() - t0
        if r.status != "ok":
            raise SystemExit(f"job {i} ended {r.status}: {r.error}\n{r.log_tail}")
        out.append((wall, wall - (r.train_seconds or 0.0)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--dataset", default="mnist", help="mnist (the real one, subset below) or synthetic")
    ap.add_argument("--train", type=int, default=2048, help="training images per job (overhead, not accuracy)")
    ap.add_argument("--test", type=int, default=1000, help="test images per job (prediction counts as overhead)")
    ap.add_argument("--backends", default="process,docker")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (a GPU job pays its CUDA context per candidate)")
    ap.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout, the table on stderr")
    args = ap.parse_args()
    stdout, res = sys.stdout, {"device": args.device, "jobs": args.jobs, "backends": {}}
    if args.json:
        sys.stdout = sys.stderr

    from deltanas.tools.datasets import load_dataset, prepare_handle

    tmp = Path(tempfile.mkdtemp(prefix="deltanas-bench-"))
    ds = load_dataset(args.dataset, limit_train=args.train, limit_test=args.test, seed=0)
    handle = prepare_handle(ds, tmp / "handles")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"dataset: {ds.name}, {len(ds.y_train)} train / {len(ds.y_test)} test images; "
          f"{args.jobs} jobs of a LeNet on {args.device}, {args.threads} thread(s) each\n")
    print(f"{'backend':<8} {'mode':<5} {'overhead median':>16} {'min':>7} {'max':>7} {'first job':>10}  vs cold")
    modes = [("cold", False, None), ("warm", True, None)]
    if args.device.startswith("cuda"):
        modes.append(("warm, no spare", True, False))
    for backend in args.backends.split(","):
        cold_median = None
        for mode, warm, spare in modes:
            sandbox, why = make_sandbox(backend, warm, tmp / f"work-{backend}-{len(mode)}", spare)
            if sandbox is None:
                print(f"{backend:<8} skipped: {why}")
                res["backends"][backend] = {"skipped": why}
                break
            if not warm:
                print(f"  ({backend}: {sandbox.isolation()[:150]}...)")
            try:
                rows = measure(sandbox, handle, args.jobs, {"threads": args.threads}, args.device)
            finally:
                sandbox.close()
            first, rest = rows[0], rows[1:] if warm else rows
            over = [o for _, o in rest]
            med = statistics.median(over)
            if not warm:
                cold_median = med
            ratio = f"{cold_median / med:5.1f}x less" if warm and cold_median else "baseline"
            first_txt = f"{first[1]:.3f}s" if warm else "—"
            key = mode.replace(", ", "_").replace(" ", "_")
            res["backends"].setdefault(backend, {})[f"{key}_median_s"] = med
            if warm:
                res["backends"][backend][f"{key}_first_s"] = first[1]
            print(f"{backend:<8} {mode:<5} {med:>14.3f} s {min(over):>6.3f} {max(over):>6.3f} "
                  f"{first_txt:>10}  {ratio}")
    if args.json:
        print(json.dumps(res), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
