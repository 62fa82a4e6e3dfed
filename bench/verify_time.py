"""How long `deltanas verify` takes against the proxy epochs it stands for, and the rho it finds.

    python bench/verify_time.py [--candidates 40] [--top 5] [--sample 15] [--epochs 3]
                                [--dataset mnist] [--limit-train 2000] [--device cpu] [--json]

A run is made first with the rule-based mutator (`--llm mutate`, no model), its candidates
proxy-trained for one epoch each in the process sandbox, one at a time. Then `verify` retrains the
top-K and a sample of M of the rest for N epochs through the same sandbox and executor. The
figure is verify's wall time; the baseline is the time of the same candidates' N proxy epochs,
N times each one's one-epoch time as the run measured it, summed: `eval` (the whole job the loop
paid: the sandbox, the epoch, the test predictions) and, stricter, `train` (the epoch alone). The
issue's target: a verify within the `eval` baseline plus 10%.
Reported beside it: Spearman's rho and Kendall's tau with their 95% bootstrap intervals.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from deltanas.agent.archive import Store
from deltanas.agent.cli import main as cli


def measure(a: argparse.Namespace, root: Path) -> dict:
    run = root / "run"
    cycles = max(1, -(-a.candidates // a.per_cycle))
    argv = ["run", "--llm", "mutate", "--cycles", str(cycles), "--candidates", str(a.per_cycle), "--dataset",
            a.dataset, "--limit-train", str(a.limit_train), "--baselines", a.baselines, "--sandbox", "process",
            "--device", a.device, "--workers", "1", "--plain", "--run-dir", str(run), "--timeout", "600",
            *(["--unsafe-no-isolation"] if a.unsafe_no_isolation else [])]
    started = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit("the run failed")
    run_s = time.perf_counter() - started
    trained = Store(run / "archive.sqlite", readonly=True).candidates(status="ok")

    from deltanas.agent.run import rundir
    from deltanas.agent.run.verify import verify

    cfg = rundir.open_run_dir(run, {"sandbox.device": a.device, "sandbox.workers": 1})
    started = time.perf_counter()
    (summary, *_) = verify(cfg, run, top=a.top, sample=a.sample, epochs=a.epochs, say=lambda line: None)
    verify_s = time.perf_counter() - started
    ids = {v["candidate_id"] for v in Store(run / "archive.sqlite", readonly=True).verifications(a.epochs)}
    chosen = [r for r in trained if r.id in ids]
    budget_eval = sum(a.epochs * (r.eval_seconds or 0.0) for r in chosen)
    budget_train = sum(a.epochs * (r.train_seconds or 0.0) for r in chosen)
    return {"candidates_trained": len(trained), "retrained": len(chosen), "epochs": a.epochs, "run_seconds": run_s,
            "measured": verify_s, "baseline": budget_eval, "baseline_train_only": budget_train,
            "within_target": verify_s <= 1.1 * budget_eval, "spearman": summary["spearman"],
            "spearman_ci95": summary["spearman_ci95"], "kendall": summary["kendall"],
            "kendall_ci95": summary["kendall_ci95"], "top_k": summary["top_k"], "top_kept": summary["top_kept"],
            "dataset": a.dataset, "limit_train": a.limit_train, "device": a.device}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=40, help="candidates the run proposes (about)")
    p.add_argument("--per-cycle", type=int, default=10)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--sample", type=int, default=15)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--limit-train", type=int, default=2000)
    p.add_argument("--baselines", default="lenet,alexnet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--unsafe-no-isolation", action="store_true",
                   help="the run's flag: a process sandbox with no filesystem view (a machine where none works)")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="deltanas-verify-bench-"))
    try:
        out = measure(a, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0

    def ci(v):
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""

    print(f"verify of {out['retrained']} candidates x {a.epochs} epochs ({a.dataset}, {a.limit_train} train images, "
          f"{a.device}): {out['measured']:.1f} s; the same candidates' proxy epochs x {a.epochs}: "
          f"{out['baseline']:.1f} s as the loop paid them ({out['baseline_train_only']:.1f} s of training alone); "
          f"target <= {1.1 * out['baseline']:.1f} s: {'met' if out['within_target'] else 'NOT met'}")
    rho, tau = out["spearman"], out["kendall"]
    print(f"spearman {rho if rho is None else f'{rho:.3f}'}{ci(out['spearman_ci95'])}, kendall "
          f"{tau if tau is None else f'{tau:.3f}'}{ci(out['kendall_ci95'])}; top-{out['top_k']} kept "
          f"{out['top_kept']}/{out['top_k']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
