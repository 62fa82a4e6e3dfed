"""The terminal view of a run: progress bars, the latest candidates, the best so far.

It reads the archive through its own read-only connection, so it shows exactly
what is saved, and `deltanas status` renders the same summary for a stopped run.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from deltanas.agent.archive import CandidateRow, Store, best_per_dataset
from deltanas.agent.config import Config
from deltanas.agent.run import isolation, verify


def summarise(store: Store) -> dict[str, Any]:
    """The JSON summary of `deltanas status`: candidates per cycle and per status."""
    rows = store.candidates()
    per_cycle: dict[str, dict[str, int]] = {}
    per_status: dict[str, int] = {}
    for r in rows:
        key = "baselines" if r.cycle < 0 else str(r.cycle)
        per_cycle.setdefault(key, {})
        per_cycle[key][r.status] = per_cycle[key].get(r.status, 0) + 1
        if r.cycle >= 0:
            per_status[r.status] = per_status.get(r.status, 0) + 1
    searched = [r for r in rows if r.cycle >= 0 and r.final]
    ok = [r for r in searched if r.status == "ok"]
    applied = [r for r in searched if r.status != "apply_failed"]
    by_dataset = best_per_dataset(rows)  # accuracies are compared within a dataset, never across
    best = next(iter(by_dataset.values())) if len(by_dataset) == 1 else None
    return {
        "candidates": len(searched),
        "baselines": {r.id: r.accuracy for r in rows if r.cycle < 0},
        "per_cycle": per_cycle,
        "per_status": per_status,
        "applied_rate": len(applied) / len(searched) if searched else None,
        "valid_novel_rate": len(ok) / len(searched) if searched else None,
        # how answers were held to the format (llm.constrain), candidates per mode
        "constrain": {m: sum((r.constrain or "none") == m for r in searched)
                      for m in sorted({r.constrain or "none" for r in searched})},
        "best": {"id": best.id, "accuracy": best.accuracy, "parent_id": best.parent_id} if best else None,
        "best_by_dataset": {d: {"id": b.id, "accuracy": b.accuracy, "parent_id": b.parent_id}
                            for d, b in by_dataset.items()},
        "cycles_finished": sum(1 for c in store.cycles() if c["finished_at"]),
        # one entry per session: the sandbox, whether it isolated the filesystem, any opt-in
        "isolation": store.get_meta(isolation.ISOLATION_META),
        "verify": verify.summaries(store),  # `deltanas verify`: the proxy's rank agreement with longer training
    }


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _fmt_acc(a: float | None) -> str:
    return "—" if a is None else f"{100 * a:.2f}%"


def candidates_table(rows: list[CandidateRow], title: str = "latest candidates") -> Table:
    t = Table(title=title, expand=True, title_justify="left")
    pool = len({r.dataset for r in rows}) > 1  # a pool run's rows say their dataset
    for col in ("dataset",) * pool + ("id", "parent", "held", "diff ±", "status", "novelty", "accuracy", "secs"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        status = r.status if r.status in ("ok", "proposed") else f"{r.status}" + (
            f" ({r.error_code})" if r.error_code and r.error_code != r.status else "")
        style = {"ok": "green", "proposed": "dim"}.get(r.status, "yellow")
        diff = f"+{r.added}/-{r.removed}" if r.added is not None else "—"
        nov = "—" if r.similarity is None else f"{r.similarity:.3f}"
        secs = "—" if r.eval_seconds is None else f"{r.eval_seconds:.1f}"
        held = "—" if r.constrain is None else r.constrain  # its edit sites are in the archive (`sites`)
        t.add_row(*(r.dataset,) * pool, r.id, r.parent_id or "", held, diff, f"[{style}]{status}[/]", nov,
                  _fmt_acc(r.accuracy), secs)
    return t


class LiveView:
    """Builds one frame of the live view from the archive."""

    def __init__(self, cfg: Config, store: Store):
        self.cfg = cfg
        self.store = store
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), expand=True)
        self._cycles = self.progress.add_task("cycles", total=cfg.search.cycles)
        self._cands = self.progress.add_task("candidates", total=cfg.search.cycles * cfg.search.candidates)
        self.message = ""

    def frame(self) -> Group:
        rows = self.store.candidates()
        searched = [r for r in rows if r.cycle >= 0]
        done = sum(1 for r in searched if r.final)
        self.progress.update(self._cycles, completed=sum(1 for c in self.store.cycles() if c["finished_at"]))
        self.progress.update(self._cands, completed=done)
        recent = sorted((r for r in rows), key=lambda r: (r.finished_at or r.created_at))[-10:]
        ok = sum(1 for r in searched if r.status == "ok")
        head = (f"[b]{self.cfg.name}[/]  llm={self.cfg.llm.spec}  dataset={self.cfg.data.dataset}  "
                f"mode={self.cfg.search.mode}   valid+novel {ok}/{done}")
        if isolation.unsafe(self.store.get_meta(isolation.ISOLATION_META)):
            head += f"   [b red]NO filesystem isolation ({isolation.OPT_IN_FLAG})[/]"
        by_dataset = best_per_dataset(rows)
        pool = len(self.cfg.data.datasets) > 1
        best_line = ("best so far: " + "; ".join(
            (f"{d} " if pool else "") + f"[b green]{b.id}[/] {_fmt_acc(b.accuracy)} (parent {b.parent_id or '—'})"
            for d, b in by_dataset.items())) if by_dataset else "best so far: —"
        parts = [head, self.progress, candidates_table(recent), best_line]
        if self.message:
            parts.append(f"[yellow]{self.message}[/]")
        return Group(*parts)


def status_view(store: Store, summary: dict[str, Any]) -> Group:
    """`deltanas status` as one renderable: per-cycle counts, the top candidates, the totals,
    verify's results and the isolation line."""
    t = Table(title="candidates per cycle", title_justify="left")
    statuses = sorted({s for c in summary["per_cycle"].values() for s in c})
    t.add_column("cycle")
    for s in statuses:
        t.add_column(s, justify="right")
    for cyc, counts in summary["per_cycle"].items():
        t.add_row(cyc, *(str(counts.get(s, 0)) for s in statuses))
    trained = [r for r in store.candidates() if r.accuracy is not None]
    datasets = list(dict.fromkeys(r.dataset for r in trained))
    each = 10 if len(datasets) <= 1 else max(3, 10 // len(datasets))  # a pool's top of each dataset
    rows = [r for d in datasets for r in sorted((r for r in trained if r.dataset == d), key=lambda r: -r.accuracy)[:each]]
    by_dataset = summary.get("best_by_dataset") or {}
    best = "; ".join((f"on {d} " if len(by_dataset) > 1 else "") + f"{b['id']} {_fmt_acc(b['accuracy'])}"
                     for d, b in by_dataset.items()) or "—"
    parts: list[Any] = [t, candidates_table(rows, title="top candidates" + (" of each dataset" if len(datasets) > 1
                                                                           else "")), Panel(
        f"searched {summary['candidates']} candidates; applied {_pct(summary['applied_rate'])}; "
        f"valid and novel {_pct(summary['valid_novel_rate'])}; cycles finished {summary['cycles_finished']}; "
        f"answers held by {', '.join(f'{m} {n}' for m, n in summary['constrain'].items()) or '—'}; "
        f"best {best}")]
    parts += [Text(verify.describe(v)) for v in summary.get("verify") or []]
    parts.append(Text(isolation.describe(summary["isolation"]),
                      style="bold red" if isolation.unsafe(summary["isolation"]) else ""))
    return Group(*parts)


def print_status(console: Console, store: Store, summary: dict[str, Any]) -> None:
    console.print(status_view(store, summary))


def lineage_tree(store: Store, best: int = 5) -> Tree:
    """The lineage in text: from each baseline, the paths down to the `best` most accurate
    candidates, with each node's accuracy, diff size and status; the children off those paths
    are counted, not drawn (the whole tree is in `deltanas report --html`)."""
    rows = {r.id: r for r in store.candidates()}
    children: dict[str | None, list[CandidateRow]] = {}
    for r in rows.values():
        children.setdefault(r.parent_id if r.parent_id in rows else None, []).append(r)
    trained = [r for r in rows.values() if r.status == "ok" and r.accuracy is not None and r.cycle >= 0]
    # a pool run's best of each dataset, ranked within it (accuracies are never compared across datasets)
    top = [r for d in dict.fromkeys(r.dataset for r in rows.values())
           for r in sorted((r for r in trained if r.dataset == d), key=lambda r: -r.accuracy)[:best]]
    on_path: set[str] = set()
    for r in top:
        cur: CandidateRow | None = r
        while cur is not None and cur.id not in on_path:
            on_path.add(cur.id)
            cur = rows.get(cur.parent_id) if cur.parent_id else None
    marks: dict[str, int] = {}
    for r in top:
        marks[r.id] = sum(1 for m in top if m.id in marks and m.dataset == r.dataset) + 1

    def label(r: CandidateRow) -> str:
        diff = f" +{r.added}/-{r.removed}" if r.added is not None else ""
        style = "green" if r.status == "ok" else "yellow"
        rank = f" [b]#{marks[r.id]}[/]" if r.id in marks else ""
        return f"[b]{r.id}[/] {_fmt_acc(r.accuracy)}{diff} [{style}]{r.status}[/]{rank}"

    pool = len({r.dataset for r in rows.values()}) > 1
    tree = Tree(f"lineage of the {best if pool else len(top)} best" + (" of each dataset" if pool else "")
                + " (the whole tree: deltanas report --html)")
    stack = [(tree, r) for r in sorted(children.get(None, []), key=lambda r: r.id, reverse=True)
             if r.id in on_path or r.kind == "baseline"]
    while stack:
        node, r = stack.pop()
        branch = node.add(label(r))
        kids = sorted(children.get(r.id, []), key=lambda k: k.id)
        shown = [k for k in kids if k.id in on_path]
        if len(kids) > len(shown):
            ok = sum(1 for k in kids if k.id not in on_path and k.status == "ok")
            branch.add(f"[dim]{len(kids) - len(shown)} other child(ren), {ok} trained[/]")
        stack.extend((branch, k) for k in reversed(shown))
    return tree
