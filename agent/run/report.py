"""Per-cycle metrics of a run, recomputed from its archive, and `deltanas report`'s output:
PNG plots and a markdown summary under `report/`, and the same table in the terminal.

Definitions (every number comes from the candidates table and the adapters table):

- valid rate: candidates whose change applied and trained to an `ok` result, over all
  candidates of the cycle (duplicates are not trained, so they are not valid here);
- applied rate: candidates whose change applied (any status but `apply_failed`);
- novel and valid rate: valid candidates the novelty check passed (a run that trains its
  near-copies too, `search.train_duplicates`, records them as valid but not novel);
- improved rate: valid candidates more accurate than their parent, over all candidates;
- novelty rejections: candidates that applied but were near-copies (`duplicate`);
- repair success: of the candidates that needed a repair, those whose change finally applied;
- accuracy: first-epoch test accuracy of the cycle's `ok` candidates (mean and best);
- diff lines: lines added plus removed, over the candidates that applied;
- tokens: prompt and completion tokens per candidate (the first proposal and every repair);
- seconds: generation and proxy-training time summed over the cycle; the LoRA update's time;
- best: the most accurate candidates, each with where it came from: the loop, or a person's
  request in `deltanas chat` (its words, from the prompt's goal) and their verdict;
- isolation: each session's sandbox and whether candidates had a filesystem view of their own
  (the archive's `sandbox:isolation`, agent/run/isolation.py); without one, an accuracy may come
  from a candidate that read the test labels.
"""
from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.loop.cycle_nodes import is_chat
from deltanas.agent.run import isolation, verify
from deltanas.tools.trajectory import human_verdict

BEST_SHOWN = 10

COLUMNS = [("cycle", "cycle"), ("proposer", "proposer"), ("constrain", "held by"), ("candidates", "n"), ("valid_rate", "valid"),
           ("applied_rate", "applied"), ("novel_valid_rate", "novel+valid"), ("improved_rate", "improved"),
           ("novelty_rejections", "dup"), ("repair_success", "repair ok"), ("mean_accuracy", "mean acc"),
           ("best_accuracy", "best acc"), ("mean_diff_lines", "diff lines"), ("prompt_tokens", "in tok/cand"),
           ("completion_tokens", "out tok/cand"), ("gen_seconds", "gen s"), ("train_seconds", "train s"),
           ("lora", "LoRA update")]


def cycle_metrics(rows: list[CandidateRow], accuracy_of: dict[str, float | None] | None = None) -> dict[str, Any]:
    """One cycle's figures; `accuracy_of` (every candidate's accuracy by id) gives the improved rate."""
    n = len(rows)
    applied = [r for r in rows if r.status != "apply_failed"]
    ok = [r for r in rows if r.status == "ok" and r.accuracy is not None]
    repaired = [r for r in rows if r.attempts > 0]
    return {
        "candidates": n,
        "valid_rate": len(ok) / n if n else None,
        "applied_rate": len(applied) / n if n else None,
        "novel_valid_rate": sum(1 for r in ok if r.novel is not False) / n if n else None,
        "improved_rate": (sum(1 for r in ok if (accuracy_of.get(r.parent_id) is not None
                                                and r.accuracy > accuracy_of[r.parent_id])) / n
                          if n and accuracy_of is not None else None),
        "novelty_rejections": sum(1 for r in rows if r.status == "duplicate"),
        "repair_success": (sum(1 for r in repaired if r.status != "apply_failed") / len(repaired)
                           if repaired else None),
        "mean_accuracy": mean(r.accuracy for r in ok) if ok else None,
        "best_accuracy": max(r.accuracy for r in ok) if ok else None,
        "accuracies": [r.accuracy for r in ok],
        "mean_diff_lines": mean((r.added or 0) + (r.removed or 0) for r in applied) if applied else None,
        "diff_lines": [(r.added or 0) + (r.removed or 0) for r in applied],
        "prompt_tokens": mean(r.prompt_tokens for r in rows) if rows else None,
        "completion_tokens": mean(r.completion_tokens for r in rows) if rows else None,
        "gen_seconds": sum(r.gen_seconds for r in rows),
        "train_seconds": sum(r.train_seconds or 0.0 for r in rows),
        "modes": sorted({r.kind for r in rows}),
        "constrain": ", ".join(sorted({r.constrain or "none" for r in rows})),
    }


def pooled_metrics(rows: list[CandidateRow], accuracy_of: dict[str, float | None],
                   datasets: list[str]) -> dict[str, Any]:
    """`cycle_metrics` of rows from one dataset or a pool's: in a pool the accuracies are each
    dataset's (`per_dataset`), never averaged across datasets; the rates count every row."""
    m = cycle_metrics(rows, accuracy_of)
    if len(datasets) > 1:
        m.update(mean_accuracy=None, best_accuracy=None, per_dataset={
            d: cycle_metrics([r for r in rows if r.dataset == d], accuracy_of) for d in datasets})
    return m


def run_metrics(store: Store) -> dict[str, Any]:
    rows = store.candidates()
    datasets = list(dict.fromkeys(r.dataset for r in rows))  # baselines first: the run's order
    cycles = sorted({r.cycle for r in rows if r.cycle >= 0})
    adapters = {a["cycle"]: a for a in store.adapters()}
    accuracy_of = {r.id: r.accuracy for r in rows}
    per_cycle = []
    for c in cycles:
        m = {"cycle": c, "proposer": store.get_meta(f"proposer:{c}"),
             **pooled_metrics([r for r in rows if r.cycle == c], accuracy_of, datasets)}
        a = adapters.get(c)
        m["lora"] = ({"status": a["status"], "examples": a["examples"], "loss": a["loss"], "seconds": a["seconds"],
                      "note": a["note"]} if a else None)
        per_cycle.append(m)
    searched = [r for r in rows if r.cycle >= 0]
    cold = adapters.get(-1)  # the cold-start update, before cycle 0 (learn.cold_start_from)
    trained = [r for r in searched if r.status == "ok" and r.accuracy is not None]
    return {"datasets": datasets, "baselines": {r.id: r.accuracy for r in rows if r.cycle < 0}, "cycles": per_cycle,
            "verify": verify.summaries(store),
            "verify_points": store.verifications(),
            "best": [_best_entry(store, r, accuracy_of) for d in datasets for r in sorted(
                (r for r in trained if r.dataset == d), key=lambda r: -r.accuracy)[:BEST_SHOWN]],
            "overall": pooled_metrics(searched, accuracy_of, datasets), "isolation": store.get_meta(isolation.ISOLATION_META),
            "cold_start": ({"status": cold["status"], "examples": cold["examples"], "loss": cold["loss"],
                            "seconds": cold["seconds"], "note": cold["note"]} if cold else None)}


def _best_entry(store: Store, r: CandidateRow, accuracy_of: dict[str, float | None]) -> dict[str, Any]:
    messages = store.get_trajectory(r.id) or []
    human = human_verdict(messages)
    request = None
    if is_chat(r.id):
        first = next((m["content"] for m in messages if m.get("role") == "user"), "")
        request = next((line[len("Goal: "):].rstrip(".") for line in first.splitlines() if line.startswith("Goal: ")),
                       None)
    return {"id": r.id, "dataset": r.dataset, "cycle": r.cycle, "parent_id": r.parent_id, "accuracy": r.accuracy,
            "parent_accuracy": accuracy_of.get(r.parent_id), "param_count": r.param_count,
            "origin": "chat" if is_chat(r.id) else "loop", "request": request,
            "human": human["verdict"] if human else None}


def _best_lines(best: list[dict[str, Any]]) -> list[str]:
    """The best candidates' table; in a pool run, each dataset's best, with the dataset first."""
    if not best:
        return []
    pool = len({b.get("dataset") for b in best}) > 1
    lines = ["## Best candidates", "", "| " + "dataset | " * pool + "id | cycle | parent | accuracy | parent's | "
             "params | from | human |", "|" + " --- |" * (8 + pool)]
    for b in best:
        origin = f"chat: {b['request']}" if b["origin"] == "chat" else "loop"
        lines.append("| " + f"{b['dataset']} | " * pool + f"{b['id']} | {b['cycle']} | {b['parent_id'] or '—'} | "
                     f"{_cell('accuracy', b['accuracy'])} | "
                     f"{_cell('accuracy', b['parent_accuracy'])} | {b['param_count'] or '—'} | "
                     f"{origin.replace('|', '/')} | {b['human'] or '—'} |")
    return [*lines, ""]


def _verify_lines(metrics: dict[str, Any]) -> list[str]:
    """`deltanas verify`'s results: a line per number of epochs, the table, the scatter plot."""
    points = metrics.get("verify_points") or []
    if not points:
        return []
    lines = ["## Proxy fidelity (`deltanas verify`)", "", *[verify.describe(v) + "." for v in metrics["verify"]], "",
             "| candidate | chosen as | proxy (1 epoch) | epochs | accuracy | status |", "|" + " --- |" * 6]
    for p in sorted(points, key=lambda p: (p["epochs"], -(p["proxy_accuracy"] or 0))):
        lines.append(f"| {p['candidate_id']} | {p['chosen_as']} | {_cell('accuracy', p['proxy_accuracy'])} | "
                     f"{p['epochs']} | {_cell('accuracy', p['accuracy'])} | {p['status']} |")
    return [*lines, "", "![proxy against longer training](verify.png)", ""]


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if key.endswith("_rate") or key == "repair_success":
        return f"{100 * v:.1f}%"
    if key.endswith("accuracy"):
        return f"{100 * v:.2f}%"
    if key == "lora":
        if v["status"] == "reused":
            return f"reused ({v['note']})"
        if v["status"] != "trained":
            return v["status"]
        return f"{v['examples']} ex, loss {v['loss']:.3f}, {v['seconds']:.0f} s"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


TERMINAL = ("cycle", "proposer", "constrain", "candidates", "valid_rate", "applied_rate", "novelty_rejections", "mean_accuracy",
            "best_accuracy", "mean_diff_lines", "completion_tokens", "lora")  # the rest is in summary.md


def table_rows(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[list[str]]:
    keys = keys or tuple(k for k, _ in COLUMNS)
    return [[_cell(k, m.get(k)) for k in keys] for m in metrics["cycles"]]


def markdown(metrics: dict[str, Any], run_dir: Path) -> str:
    heads = [h for _, h in COLUMNS]
    iso = isolation.describe(metrics.get("isolation"))
    lines = [f"# Run report: {run_dir.name}", "",
             "Recomputed from `archive.sqlite`; definitions in `deltanas/agent/report.py`.", "",
             # up front: accuracies measured without isolation may have read the test labels
             f"**{iso}**" if isolation.unsafe(metrics.get("isolation")) else iso, "",
             "Baselines (first-epoch accuracy): " + ", ".join(
                 f"{k.removeprefix('base-')} {_cell('accuracy', v)}" for k, v in metrics["baselines"].items()), "",
             *([f"Cold-start LoRA update (before cycle 0): {_cell('lora', metrics['cold_start'])}; "
                f"{metrics['cold_start']['note'] or ''}", ""] if metrics.get("cold_start") else []),
             "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(metrics)]
    o = metrics["overall"]
    lines += ["", f"Overall: {o['candidates']} candidates, valid {_cell('valid_rate', o['valid_rate'])}, "
              f"applied {_cell('applied_rate', o['applied_rate'])}, mean accuracy "
              f"{_cell('mean_accuracy', o['mean_accuracy'])}, best {_cell('best_accuracy', o['best_accuracy'])}, "
              f"mode(s): {', '.join(o['modes']) or '—'}.", "",
              *[f"On {d}: {m['candidates']} candidates, valid {_cell('valid_rate', m['valid_rate'])}, improved "
                f"{_cell('improved_rate', m['improved_rate'])}, mean accuracy {_cell('mean_accuracy', m['mean_accuracy'])}"
                f", best {_cell('best_accuracy', m['best_accuracy'])}." for d, m in (o.get("per_dataset") or {}).items()],
              *([""] if o.get("per_dataset") else []),
              "![valid rate](valid_rate.png) ![accuracy](accuracy.png)",
              "![accuracy distribution](accuracy_hist.png) ![diff lines](diff_lines.png)", "",
              *_best_lines(metrics.get("best") or []), *_verify_lines(metrics)]
    return "\n".join(lines)


def plots(metrics: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cyc = [m["cycle"] for m in metrics["cycles"]]
    files = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(cyc, [100 * (m["valid_rate"] or 0) for m in metrics["cycles"]], marker="o", label="valid")
    ax.plot(cyc, [100 * (m["applied_rate"] or 0) for m in metrics["cycles"]], marker="s", label="applied")
    ax.set(xlabel="cycle", ylabel="% of candidates", title="valid rate per cycle", ylim=(0, 100))
    ax.legend()
    save(fig, "valid_rate.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pool = len(metrics.get("datasets") or []) > 1
    drawn = False
    for d in metrics["datasets"] if pool else [None]:  # a pool's datasets each get their own lines
        per = [(m["cycle"], (m["per_dataset"].get(d) or {}) if d else m) for m in metrics["cycles"]]
        pts = [(c, x["mean_accuracy"], x["best_accuracy"]) for c, x in per if x.get("mean_accuracy")]
        if pts:
            drawn = True
            mean_line = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o",
                                label=f"{d}: mean" if d else "mean")
            ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="^", label=f"{d}: best" if d else "best",
                    color=mean_line[0].get_color(), linestyle="--" if d else "-")
    for name, acc in metrics["baselines"].items():
        if acc is not None:
            ax.axhline(100 * acc, linestyle=":", linewidth=1, color="grey")
    ax.set(xlabel="cycle", ylabel="first-epoch accuracy (%)", title="accuracy per cycle (dotted: baselines)")
    if drawn:
        ax.legend(fontsize="small")
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    accs = [100 * a for m in metrics["cycles"] for a in m["accuracies"]]
    if pool:
        groups = [[100 * a for m in metrics["cycles"] for a in (m["per_dataset"].get(d) or {}).get("accuracies", [])]
                  for d in metrics["datasets"]]
        ax.hist(groups, bins=20, label=metrics["datasets"])
        ax.legend(fontsize="small")
    else:
        ax.hist(accs, bins=20)
    ax.set(xlabel="first-epoch accuracy (%)", ylabel="candidates", title=f"accuracy distribution ({len(accs)} valid)")
    save(fig, "accuracy_hist.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines = [d for m in metrics["cycles"] for d in m["diff_lines"]]
    ax.hist(lines, bins=20)
    ax.set(xlabel="diff lines (added + removed)", ylabel="candidates", title="diff length")
    save(fig, "diff_lines.png")

    points = [p for p in metrics.get("verify_points") or [] if p["accuracy"] is not None]
    if points:  # deltanas verify: the proxy against longer training, one colour per number of epochs
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for s in metrics["verify"]:
            mine = [p for p in points if p["epochs"] == s["epochs"]]
            rho = "—" if s["spearman"] is None else f"{s['spearman']:.3f}"
            ax.scatter([100 * p["proxy_accuracy"] for p in mine], [100 * p["accuracy"] for p in mine],
                       label=f"{s['epochs']} epochs (rho {rho}, n {s['n']})")
        ax.set(xlabel="proxy: first-epoch accuracy (%)", ylabel="accuracy after longer training (%)",
               title="proxy fidelity")
        ax.legend()
        save(fig, "verify.png")
    return files


CURVES = (("valid_rate", "valid"), ("novel_valid_rate", "novel and valid"), ("improved_rate", "improved over parent"),
          ("mean_accuracy", "mean first-epoch accuracy"))


def compare_plot(curves: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """One figure, a panel per figure of `CURVES`, a line per run (or per arm of a benchmark).
    Each point is a cycle's dict; `<key>_lo` and `<key>_hi`, where present, shade an interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.4))
    for ax, (key, name) in zip(axes, CURVES):
        for label, points in curves.items():
            pts = [p for p in points if p.get(key) is not None]
            xs = [p["cycle"] for p in pts]
            line, = ax.plot(xs, [100 * p[key] for p in pts], marker="o", label=label)
            band = [p for p in pts if p.get(f"{key}_lo") is not None]
            if band:
                ax.fill_between([p["cycle"] for p in band], [100 * p[f"{key}_lo"] for p in band],
                                [100 * p[f"{key}_hi"] for p in band], alpha=0.2, color=line.get_color())
        ax.set(xlabel="cycle", ylabel="%", title=name)
        if key.endswith("_rate"):
            ax.set_ylim(0, 100)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: Path, store: Store, out: Path | None = None,
                 against: dict[str, Store] | None = None) -> tuple[dict[str, Any], Path]:
    """The report of one run; with `against` (other runs by label: a control), also `compare.png`,
    their per-cycle curves in one figure, and their rows in the summary."""
    out = Path(out) if out else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_metrics(store)
    plots(metrics, out)
    text = markdown(metrics, Path(run_dir))
    if against:
        others = {label: run_metrics(s) for label, s in against.items()}
        compare_plot({Path(run_dir).name: metrics["cycles"], **{k: m["cycles"] for k, m in others.items()}},
                     out / "compare.png", title="per cycle, against " + ", ".join(others))
        keys = ("cycle", *(k for k, _ in CURVES))
        heads = dict(COLUMNS)
        text += "\n## Against " + ", ".join(others) + "\n\n| run | " + " | ".join(heads[k] for k in keys) + " |\n" \
            + "|" + " --- |" * (len(keys) + 1) + "\n"
        for label, m in {Path(run_dir).name: metrics, **others}.items():
            text += "".join(f"| {label} | " + " | ".join(row) + " |\n" for row in table_rows(m, keys))
        text += "\n![against](compare.png)\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return metrics, out


def print_table(console, metrics: dict[str, Any]) -> None:
    from rich.table import Table

    heads = dict(COLUMNS)
    t = Table(title="per-cycle metrics (all columns in report/summary.md)", title_justify="left")
    for key in TERMINAL:
        t.add_column(heads[key], overflow="fold")
    for row in table_rows(metrics, TERMINAL):
        t.add_row(*row)
    console.print(t)
    best = metrics.get("best") or []
    if best:
        b = Table(title="best candidates", title_justify="left")
        for col in ("id", "parent", "accuracy", "from"):
            b.add_column(col, overflow="fold")
        for e in best[:5]:
            b.add_row(e["id"], e["parent_id"] or "—", _cell("accuracy", e["accuracy"]),
                      f"chat: {e['request']}" if e["origin"] == "chat" else "loop")
        console.print(b)
    records = metrics.get("isolation")
    console.print(isolation.describe(records), style="bold red" if isolation.unsafe(records) else None, markup=False)
