"""How fast `deltanas report --html` draws a large run, in a real headless Chromium.

    python bench/html_report.py [--n 10000] [--repeat 3] [--screenshot docs/report-10k.png] [--json]

A synthetic archive of N candidates is written the way a run writes one: 8 zoo baselines, then
each candidate a child of a random earlier trained one, 70% trained (accuracies drift up the
generations), the rest failed or near-copies; each with a 10-line diff and a 600-character
answer. The page is written by `agent/run/html_report.py` and opened from file:// in Chromium
(Selenium); the figure is the time from navigation to the page's `ready` (the tree, the curves
and the filters drawn), median of `--repeat` loads. The baseline is the same page with the tree
drawn as SVG (plotly's `scatter`) instead of WebGL (`scattergl`), the default of most plotting
code. The issue's target: under 3 s for 10,000 candidates.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.run.html_report import write_html
from deltanas.agent.run.report import run_metrics


def synthetic_archive(path: Path, n: int, seed: int = 0) -> Store:
    rng = random.Random(seed)
    store = Store(path)
    trained: list[tuple[str, float, int]] = []
    now = time.time()
    for i, name in enumerate(("lenet", "alexnet", "vgg", "resnet", "densenet", "mobilenet", "senet", "convmixer")):
        acc = 0.8 + rng.random() * 0.15
        store.upsert(CandidateRow(id=f"base-{name}", cycle=-1, idx=i, kind="baseline", dataset="mnist", status="ok",
                                  source="class Net:\n    pass\n" * 30, accuracy=acc, created_at=now))
        trained.append((f"base-{name}", acc, 0))
    per_cycle = 50
    for i in range(n - 8):
        cycle, idx = divmod(i, per_cycle)
        pid, pacc, _ = rng.choice(trained[-400:])
        cid = f"c{cycle:03d}-{idx:03d}"
        diff = "--- a/model.py\n+++ b/model.py\n@@\n" + "".join(
            f"{'+' if k % 2 else '-'}            nn.Conv2d({k}, {k + 16}, kernel_size=3, padding=1),\n" for k in range(10))
        roll = rng.random()
        status = "ok" if roll < 0.7 else "duplicate" if roll < 0.85 else rng.choice(["apply_failed", "crashed", "oom"])
        acc = min(0.995, pacc + rng.gauss(0.002, 0.01)) if status == "ok" else None
        store.upsert(CandidateRow(id=cid, cycle=cycle, idx=idx, kind="delta", parent_id=pid, dataset="mnist",
                                  status=status, accuracy=acc, diff=diff, completion="x" * 600, added=5, removed=5,
                                  error_message=None if status == "ok" else f"{status}: a reason", created_at=now + i))
        if status == "ok":
            trained.append((cid, acc, cycle))
    return store


def load_seconds(driver, page: Path) -> float:
    driver.get("about:blank")
    driver.get(page.as_uri())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = driver.execute_script("return window.deltanasReport && window.deltanasReport.ready "
                                    "&& window.deltanasReport.readyAt")
        if got:
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            if severe:
                raise RuntimeError(f"console errors: {severe[:3]}")
            return got / 1000
        time.sleep(0.05)
    raise RuntimeError("the page never became ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--screenshot", help="save a screenshot of the WebGL page here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                "--enable-unsafe-swiftshader"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = synthetic_archive(Path(tmp) / "archive.sqlite", args.n)
        page = write_html(store, run_metrics(store), Path(tmp) / "report.html", title=f"synthetic, {args.n}")
        write_s = time.perf_counter() - t0
        svg = Path(tmp) / "report-svg.html"
        svg.write_text(page.read_text().replace('type: "scattergl"', 'type: "scatter"'))
        driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        try:
            ours = [load_seconds(driver, page) for _ in range(args.repeat)]
            if args.screenshot:
                driver.save_screenshot(args.screenshot)
            base = [load_seconds(driver, svg) for _ in range(args.repeat)]
        finally:
            driver.quit()
        size_mb = page.stat().st_size / 1e6
    out = {"candidates": args.n, "page_mb": round(size_mb, 2), "archive_and_page_s": round(write_s, 2),
           "webgl_ready_s": round(statistics.median(ours), 3), "svg_ready_s": round(statistics.median(base), 3),
           "webgl_runs": [round(x, 3) for x in ours], "svg_runs": [round(x, 3) for x in base]}
    text = (f"{args.n} candidates, a {size_mb:.1f} MB page (archive and page written in {write_s:.1f} s)\n"
            f"ready in Chromium: WebGL tree {out['webgl_ready_s']:.2f} s (ours) vs SVG tree {out['svg_ready_s']:.2f} s "
            f"(baseline), median of {args.repeat}; target under 3 s")
    print(json.dumps(out) if args.json else text)
    if args.json:
        print(text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
