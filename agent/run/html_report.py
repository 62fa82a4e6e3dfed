"""`deltanas report RUN --html`: the run as one self-contained page that opens offline.

- The lineage tree: every candidate a node, placed by its generation (how many edits from its
  baseline) and its branch, an edge to its parent. Trained candidates are coloured by accuracy
  (in a pool run of several datasets, by its rank within its own dataset); the others are grey crosses. Clicking a node shows its id, status, parent (itself a link), the
  error or the accuracy, its diff coloured, and the model's answer.
- Filters for status and dataset.
- The per-cycle curves (valid, novel-and-valid, mean and best accuracy; a pool's, per dataset).
- `deltanas verify`'s table and scatter plot, when the run has them.

Drawn with plotly.js (WebGL scatter, so 10,000 candidates stay responsive), which the page
carries inline. Everything a candidate wrote is shown as text (`textContent`), never as markup,
and the embedded JSON cannot close its script tag.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltanas.agent.archive import CandidateRow, Store

MAX_TEXT = 6000  # characters kept of a diff, an answer or an error


def layout(rows: list[CandidateRow]) -> dict[str, tuple[float, float]]:
    """(x, y) per candidate id: x its generation below its root, y its place among the leaves
    (a parent midway between its first and last child), roots one after another."""
    ids = {r.id for r in rows}
    children: dict[str | None, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r.cycle, r.created_at, r.id)):
        parent = r.parent_id if r.parent_id in ids else None
        children.setdefault(parent, []).append(r.id)
    pos: dict[str, tuple[float, float]] = {}
    next_leaf = 0.0
    for root in children.get(None, []):
        stack: list[tuple[str, int, bool]] = [(root, 0, False)]
        while stack:  # iterative post-order: deep lineages need no recursion
            node, depth, done = stack.pop()
            kids = children.get(node, [])
            if not kids:
                pos[node] = (depth, next_leaf)
                next_leaf += 1
            elif done:
                ys = [pos[k][1] for k in kids]
                pos[node] = (depth, (min(ys) + max(ys)) / 2)
            else:
                stack.append((node, depth, True))
                stack.extend((k, depth + 1, False) for k in reversed(kids))
    return pos


def _trim(text: str | None) -> str:
    if not text:
        return ""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT} more characters)"


def page_data(store: Store, metrics: dict[str, Any]) -> dict[str, Any]:
    rows = store.candidates()
    pos = layout(rows)
    pool = len({r.dataset for r in rows}) > 1
    shade = _ranks_within_datasets(rows) if pool else {}
    nodes = []
    for r in rows:
        x, y = pos[r.id]
        nodes.append({"id": r.id, "parent": r.parent_id, "status": r.status, "acc": r.accuracy, "cycle": r.cycle,
                      "shade": shade.get(r.id, r.accuracy),
                      "dataset": r.dataset, "x": x, "y": y, "params": r.param_count,
                      "error": _trim(r.error_message), "diff": _trim(r.diff or (r.source if r.kind == "baseline" else "")),
                      "answer": _trim(r.completion), "kind": r.kind})
    cycles = [{**{k: m.get(k) for k in ("cycle", "valid_rate", "novel_valid_rate", "mean_accuracy", "best_accuracy")},
               "per_dataset": {d: {"mean_accuracy": x["mean_accuracy"], "best_accuracy": x["best_accuracy"]}
                               for d, x in (m.get("per_dataset") or {}).items()}}
              for m in metrics["cycles"]]
    return {"nodes": nodes, "cycles": cycles, "pool": pool, "verify": metrics.get("verify") or [],
            "verify_points": metrics.get("verify_points") or []}


def _ranks_within_datasets(rows: list) -> dict[str, float]:
    """A pool run's colour for each trained candidate: its accuracy's percentile rank among its own
    dataset's (0..1), since accuracies are compared within a dataset, never across."""
    out: dict[str, float] = {}
    for d in {r.dataset for r in rows}:
        mine = sorted((r for r in rows if r.dataset == d and r.accuracy is not None), key=lambda r: r.accuracy)
        for i, r in enumerate(mine):
            out[r.id] = i / (len(mine) - 1) if len(mine) > 1 else 1.0
    return out


def write_html(store: Store, metrics: dict[str, Any], path: Path, title: str) -> Path:
    from plotly.offline import get_plotlyjs

    data = json.dumps(page_data(store, metrics), separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # no "</script>" or "<!--" inside the script element
    html = (_PAGE.replace("{{TITLE}}", _escape(title)).replace("{{PLOTLY}}", get_plotlyjs())
            .replace("{{DATA}}", data))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>deltanas: {{TITLE}}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; display: grid; grid-template-columns: 1fr 460px; height: 100vh; }
#main { overflow: auto; padding: 8px 12px; } #side { border-left: 1px solid #ccc; overflow: auto; padding: 8px 12px; }
#tree { height: 70vh; } .plot { height: 320px; }
pre { white-space: pre-wrap; font: 12px ui-monospace, monospace; background: #f6f6f6; padding: 6px; }
.add { color: #116611; } .del { color: #aa1111; } .hunk { color: #1144aa; }
#filters label { margin-right: 10px; } table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
a.node { cursor: pointer; color: #1144aa; text-decoration: underline; }
</style>
<script>{{PLOTLY}}</script></head>
<body><div id="main">
<h2>deltanas run: {{TITLE}}</h2>
<div id="filters"></div>
<div id="tree"></div>
<h3>Per cycle</h3><div id="curves" class="plot"></div>
<div id="verify"></div>
</div>
<div id="side"><h3>Candidate</h3><div id="detail">Click a node.</div></div>
<script id="report-data" type="application/json">{{DATA}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const byId = new Map(DATA.nodes.map(n => [n.id, n]));
const statuses = [...new Set(DATA.nodes.map(n => n.status))].sort();
const datasets = [...new Set(DATA.nodes.map(n => n.dataset))].sort();
const shown = {status: new Set(statuses), dataset: new Set(datasets)};

function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function pct(v) { return v === null || v === undefined ? "—" : (100 * v).toFixed(2) + "%"; }

function filters() {
  const box = document.getElementById("filters");
  for (const [key, values] of [["status", statuses], ["dataset", datasets]]) {
    box.appendChild(el("b", key + ": "));
    for (const v of values) {
      const label = el("label"); const cb = document.createElement("input");
      cb.type = "checkbox"; cb.checked = true; cb.dataset.key = key; cb.value = v;
      cb.addEventListener("change", () => { cb.checked ? shown[key].add(v) : shown[key].delete(v); drawTree(); });
      label.appendChild(cb); label.appendChild(document.createTextNode(" " + v)); box.appendChild(label);
    }
    box.appendChild(el("br"));
  }
}

function visible() { return DATA.nodes.filter(n => shown.status.has(n.status) && shown.dataset.has(n.dataset)); }

function drawTree() {
  const nodes = visible(); const vis = new Set(nodes.map(n => n.id));
  const ex = [], ey = [];
  for (const n of nodes) {
    const p = n.parent && byId.get(n.parent);
    if (p && vis.has(p.id)) { ex.push(p.x, n.x, null); ey.push(p.y, n.y, null); }
  }
  const ok = nodes.filter(n => n.acc !== null && n.status === "ok"), other = nodes.filter(n => !(n.acc !== null && n.status === "ok"));
  const hover = n => n.id + "<br>" + n.status + (n.acc !== null ? " " + pct(n.acc) : "") + "<br>cycle " + n.cycle;
  const traces = [
    {type: "scattergl", mode: "lines", x: ex, y: ey, hoverinfo: "skip", line: {color: "#bbb", width: 1}, name: "lineage"},
    {type: "scattergl", mode: "markers", meta: "nodes", name: "trained", x: ok.map(n => n.x), y: ok.map(n => n.y),
     customdata: ok.map(n => n.id), text: ok.map(hover), hoverinfo: "text",
     marker: {size: 9, color: ok.map(n => 100 * n.shade), colorscale: "Viridis", showscale: true,
              colorbar: {title: {text: DATA.pool ? "rank in its dataset %" : "acc %"}}}},
    {type: "scattergl", mode: "markers", meta: "nodes", name: "failed or not trained", x: other.map(n => n.x), y: other.map(n => n.y),
     customdata: other.map(n => n.id), text: other.map(hover), hoverinfo: "text",
     marker: {size: 8, symbol: "x", color: "#999"}},
  ];
  Plotly.react("tree", traces, {margin: {l: 40, r: 10, t: 10, b: 40}, hovermode: "closest", showlegend: true,
    legend: {orientation: "h", x: 0, y: 1.02, yanchor: "bottom"},
    xaxis: {title: {text: "generation (edits from its baseline)"}, zeroline: false}, yaxis: {visible: false}});
  window.deltanasReport = {nodes: nodes.length, candidates: DATA.nodes.length, ready: true, readyAt: performance.now()};
}

function colourDiff(text) {
  const pre = el("pre");
  for (const line of text.split("\\n")) {
    const cls = line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del"
      : line.startsWith("@@") ? "hunk" : undefined;
    pre.appendChild(el("span", line + "\\n", cls));
  }
  return pre;
}

function show(id) {
  const n = byId.get(id); const box = document.getElementById("detail"); box.replaceChildren();
  if (!n) { box.textContent = "no candidate " + id; return; }
  box.appendChild(el("h4", n.id));
  const facts = el("div"); facts.id = "facts";
  facts.appendChild(document.createTextNode(n.status + "; accuracy " + pct(n.acc) + "; cycle " + n.cycle + "; " + n.dataset
    + (n.params ? "; " + n.params.toLocaleString() + " parameters" : "") + "; parent "));
  if (n.parent && byId.has(n.parent)) {
    const a = el("a", n.parent, "node"); a.addEventListener("click", () => show(n.parent)); facts.appendChild(a);
    facts.appendChild(document.createTextNode(" (" + pct(byId.get(n.parent).acc) + ")"));
  } else facts.appendChild(document.createTextNode(n.parent || "none"));
  box.appendChild(facts);
  if (n.error) { box.appendChild(el("h4", "error")); box.appendChild(el("pre", n.error)); }
  box.appendChild(el("h4", n.kind === "baseline" ? "source" : "diff"));
  const d = colourDiff(n.diff || "(none)"); d.id = "diff"; box.appendChild(d);
  if (n.answer) { box.appendChild(el("h4", "the model's answer")); box.appendChild(el("pre", n.answer)); }
}

function drawCurves() {
  const c = DATA.cycles; const x = c.map(m => m.cycle);
  const line = (key, name, axis) => ({x: x, y: c.map(m => m[key] === null ? null : 100 * m[key]), name: name, mode: "lines+markers", yaxis: axis});
  const per = (d, key, name) => ({x: x, y: c.map(m => (m.per_dataset[d] || {})[key] == null ? null : 100 * m.per_dataset[d][key]),
    name: d + ": " + name, mode: "lines+markers", yaxis: "y2"});
  const names = [...new Set(c.flatMap(m => Object.keys(m.per_dataset)))];
  const acc = DATA.pool ? names.flatMap(d => [per(d, "mean_accuracy", "mean accuracy %"), per(d, "best_accuracy", "best accuracy %")])
    : [line("mean_accuracy", "mean accuracy %", "y2"), line("best_accuracy", "best accuracy %", "y2")];
  Plotly.react("curves", [line("valid_rate", "valid %", "y"), line("novel_valid_rate", "novel and valid %", "y"), ...acc],
    {margin: {l: 50, r: 50, t: 10, b: 40}, xaxis: {title: {text: "cycle"}, dtick: 1}, yaxis: {title: {text: "% of candidates"}},
     yaxis2: {title: {text: "accuracy %"}, overlaying: "y", side: "right"}});
}

function drawVerify() {
  const pts = DATA.verify_points; if (!pts.length) return;
  const box = document.getElementById("verify"); box.appendChild(el("h3", "Proxy fidelity (deltanas verify)"));
  for (const s of DATA.verify) box.appendChild(el("p", s.epochs + " epochs: n " + s.n + ", Spearman " + (s.spearman === null ? "—" : s.spearman.toFixed(3))
    + ", Kendall " + (s.kendall === null ? "—" : s.kendall.toFixed(3)) + (s.top_kept === null ? "" : ", top-" + s.top_k + " kept " + s.top_kept)));
  const plot = el("div", undefined, "plot"); plot.id = "verify-plot"; box.appendChild(plot);
  const ok = pts.filter(p => p.accuracy !== null);
  Plotly.react(plot, [{type: "scatter", mode: "markers", x: ok.map(p => 100 * p.proxy_accuracy), y: ok.map(p => 100 * p.accuracy),
    text: ok.map(p => p.candidate_id + " (" + p.epochs + " epochs)"), customdata: ok.map(p => p.candidate_id)}],
    {margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "proxy accuracy %"}}, yaxis: {title: {text: "longer training %"}}});
  plot.on("plotly_click", ev => show(ev.points[0].customdata));
  const t = el("table"); const head = el("tr");
  for (const h of ["candidate", "chosen as", "proxy", "epochs", "accuracy", "status"]) head.appendChild(el("th", h));
  t.appendChild(head);
  for (const p of pts) { const tr = el("tr");
    for (const v of [p.candidate_id, p.chosen_as, pct(p.proxy_accuracy), p.epochs, pct(p.accuracy), p.status]) tr.appendChild(el("td", String(v)));
    t.appendChild(tr); }
  box.appendChild(t);
}

filters(); drawTree(); drawCurves(); drawVerify();
document.getElementById("tree").on("plotly_click", ev => show(ev.points[0].customdata));
</script></body></html>
"""
