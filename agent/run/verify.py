"""`deltanas verify`: does the one-epoch proxy rank networks the way longer training does?

The top-K trained candidates by proxy accuracy, and a stratified sample of M of the rest (the
rest split by proxy accuracy into M bands of near-equal size, one drawn from each), are retrained
for N epochs through the run's own sandbox and executor: the job spec the loop uses, with only
the epochs (and the wall-clock limit, N times the loop's) changed. Each result is stored in the
archive's `verify` table as it comes, so a verify that is stopped resumes without retraining
what finished.

Reported, over the candidates that trained both ways (scipy.stats):
- Spearman's rho and Kendall's tau between the proxy and the N-epoch accuracy, each with a 95%
  percentile bootstrap interval (the pairs resampled BOOTSTRAP_RESAMPLES times);
- top-K kept: of the proxy's K best among those retrained, how many are among the K best after
  N epochs.
The paper reports rho = 0.926 between its one-epoch proxy and longer training.

In a pool run (several datasets) all of this is done per dataset: the top-K and the sample are
each dataset's, and the statistics compare accuracies within a dataset, never across.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.config import Config

BOOTSTRAP_RESAMPLES = 2000
VERIFY_DIR = "verify"


def choose(rows: list[CandidateRow], top: int, sample: int, seed: int = 0) -> list[tuple[CandidateRow, str]]:
    """(row, "top" | "sample"), for each dataset of the rows in turn: the `top` best trained candidates
    by proxy accuracy, then one candidate from each of `sample` accuracy bands of the rest (all of
    the rest if fewer)."""
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    if len(datasets) > 1:
        return [c for d in datasets for c in choose([r for r in rows if r.dataset == d], top, sample, seed)]
    ranked = sorted((r for r in rows if r.status == "ok" and r.accuracy is not None and r.source),
                    key=lambda r: (-r.accuracy, r.id))
    best, rest = ranked[:top], ranked[top:]
    if sample >= len(rest):
        picked = rest
    else:
        rng = random.Random(f"verify-{seed}")
        bounds = [round(i * len(rest) / sample) for i in range(sample + 1)]
        picked = [rest[rng.randrange(bounds[i], bounds[i + 1])] for i in range(sample)]
    return [(r, "top") for r in best] + [(r, "sample") for r in picked]


def fidelity(proxy: list[float], long: list[float], top: int, seed: int = 0,
             resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Rank agreement between the proxy and the longer training (see the module's text)."""
    import numpy as np
    from scipy import stats

    n = len(proxy)
    out: dict[str, Any] = {"n": n, "spearman": None, "spearman_ci95": None, "kendall": None, "kendall_ci95": None,
                           "top_k": min(top, n), "top_kept": None}
    if n < 3:
        return out
    x, y = np.asarray(proxy, float), np.asarray(long, float)
    rho, tau = stats.spearmanr(x, y).statistic, stats.kendalltau(x, y).statistic
    rng = np.random.default_rng(seed)
    rhos, taus = [], []
    for idx in rng.integers(0, n, size=(resamples, n)):
        a, b = x[idx], y[idx]
        if np.ptp(a) == 0 or np.ptp(b) == 0:  # a resample of one value has no ranks to compare
            continue
        rhos.append(stats.spearmanr(a, b).statistic)
        taus.append(stats.kendalltau(a, b).statistic)
    k = min(top, n)
    by_proxy = set(np.argsort(-x, kind="stable")[:k].tolist())
    by_long = set(np.argsort(-y, kind="stable")[:k].tolist())

    def ci(values: list[float]) -> list[float] | None:
        return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))] if values else None

    out.update(spearman=_num(rho), spearman_ci95=ci(rhos), kendall=_num(tau), kendall_ci95=ci(taus),
               top_kept=len(by_proxy & by_long))
    return out


def _num(v: float) -> float | None:
    return None if v != v else float(v)  # NaN (constant accuracies): no rank agreement to report


def summaries(store: Store, top: int | None = None) -> list[dict[str, Any]]:
    """One summary per number of epochs verified and dataset: the counts and `fidelity` of what is stored."""
    rows = store.verifications()
    dataset = {r["candidate_id"]: (c.dataset if (c := store.get(r["candidate_id"])) else "?") for r in rows}
    out = []
    for epochs, name in sorted({(r["epochs"], dataset[r["candidate_id"]]) for r in rows}):
        mine = [r for r in rows if r["epochs"] == epochs and dataset[r["candidate_id"]] == name]
        ok = [r for r in mine if r["status"] == "ok" and r["accuracy"] is not None and r["proxy_accuracy"] is not None]
        k = top if top is not None else max(1, sum(r["chosen_as"] == "top" for r in mine))
        out.append({"epochs": epochs, "dataset": name, "retrained": len(mine), "failed": len(mine) - len(ok),
                    "seconds": sum(r["seconds"] or 0.0 for r in mine),
                    **fidelity([r["proxy_accuracy"] for r in ok], [r["accuracy"] for r in ok], k)})
    return out


def describe(s: dict[str, Any]) -> str:
    """One summary in a line of text."""
    def stat(name: str) -> str:
        v, ci = s[name], s[f"{name}_ci95"]
        if v is None:
            return f"{name} —"
        return f"{name} {v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    kept = f"; top-{s['top_k']} kept {s['top_kept']}/{s['top_k']}" if s["top_kept"] is not None else ""
    on = f" on {s['dataset']}" if s.get("dataset") else ""
    return (f"verify{on}, {s['epochs']} epochs: {s['n']} of {s['retrained']} retrained candidates compared; "
            f"{stat('spearman')}, {stat('kendall')} (95% bootstrap intervals){kept}")


def verify(cfg: Config, run_dir: Path, *, top: int, sample: int, epochs: int, seed: int = 0,
           say: Callable[[str], None] = print, stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Retrains the chosen candidates that this many epochs has not trained yet, then returns the
    summaries for `epochs`, one per dataset. `cfg` is the run's, with the device and workers to use."""
    from deltanas.agent.run import isolation
    from deltanas.agent.run.build import load_run_datasets, make_executor, run_targets
    from deltanas.agent.run.rundir import ARCHIVE_FILE

    store = Store(Path(run_dir) / ARCHIVE_FILE)
    chosen = choose(store.candidates(status="ok"), top, sample, seed)
    done = {v["candidate_id"] for v in store.verifications(epochs)}
    todo = [(r, how) for r, how in chosen if r.id not in done]
    say(f"{len(chosen)} candidates chosen (top {min(top, len(chosen))}, a sample of the rest); "
        f"{len(chosen) - len(todo)} retrained before, {len(todo)} to retrain for {epochs} epochs")
    if todo:
        s = cfg.sandbox
        long = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs}),
                                      "sandbox": s.model_copy(update={"timeout_s": s.timeout_s * epochs})})
        stop = stop or threading.Event()
        executor = make_executor(long, run_targets(long, load_run_datasets(long)), Path(run_dir) / ".verify-work",
                                 stop)
        try:
            sandbox = getattr(executor, "sandbox", None)
            if sandbox is not None:  # model-written code: isolated, unless the run opted out
                isolation.require(isolation.fs_isolation(sandbox), model_code=True,
                                  opted_in=s.unsafe_no_isolation)

            def one(item: tuple[CandidateRow, str]) -> None:
                row, how = item
                if stop.is_set():
                    return
                started = time.perf_counter()
                out = executor.evaluate(row.source, f"verify-{row.id}",
                                        Path(run_dir) / VERIFY_DIR / f"{epochs}ep" / row.id, dataset=row.dataset)
                if stop.is_set() and out.status != "ok":
                    return  # cut short by the stop: retrained on the next verify
                store.put_verify({"candidate_id": row.id, "epochs": epochs, "device": s.device, "status": out.status,
                                  "accuracy": out.accuracy, "proxy_accuracy": row.accuracy, "chosen_as": how,
                                  "seconds": time.perf_counter() - started, "error": out.error or None})
                acc = "—" if out.accuracy is None else f"{100 * out.accuracy:.2f}%"
                say(f"{row.id}: proxy {100 * row.accuracy:.2f}%, {epochs} epochs {acc} ({out.status})")

            pool = ThreadPoolExecutor(max_workers=max(1, s.workers))
            try:
                list(pool.map(one, todo))
            except KeyboardInterrupt:  # the jobs in flight are killed; what finished is stored
                stop.set()
                executor.close()
                raise
            finally:
                pool.shutdown(wait=True)
        finally:
            executor.close()
    found = [x for x in summaries(store, top=top) if x["epochs"] == epochs]
    return found or [{"epochs": epochs, "dataset": cfg.data.dataset, "retrained": 0, "failed": 0, "seconds": 0.0,
                      **fidelity([], [], top)}]
