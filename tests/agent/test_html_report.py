"""`deltanas report --html` (agent/run/html_report.py) opened in a real headless browser (Chromium
through Selenium): the page loads with no console error, the tree holds a node per candidate,
clicking a node shows its diff, the filters hide what they should, and a hostile answer stays
text. The layout is checked on its own too."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.cli import main
from deltanas.agent.run.html_report import layout

HOSTILE = "</script><script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"


def _row(cid: str, parent: str | None, cycle: int, status: str = "ok", acc: float | None = 0.9, **kw) -> CandidateRow:
    return CandidateRow(id=cid, cycle=cycle, idx=0, kind="baseline" if parent is None else "delta", parent_id=parent,
                        dataset=kw.pop("dataset", "mnist"), status=status, accuracy=acc if status == "ok" else None,
                        source="class Net: pass\n", created_at=time.time(), **kw)


def test_layout_places_children_after_their_parent_and_between_them():
    rows = [_row("base-a", None, -1), _row("a1", "base-a", 0), _row("a2", "base-a", 0), _row("a11", "a1", 1),
            _row("base-b", None, -1), _row("orphan", "gone", 0)]
    pos = layout(rows)
    assert pos["base-a"][0] == 0 and pos["a1"][0] == 1 and pos["a11"][0] == 2 and pos["orphan"][0] == 0
    assert pos["a1"][1] == pos["a11"][1] and pos["a1"][1] < pos["a2"][1]
    assert pos["base-a"][1] == (pos["a11"][1] + pos["a2"][1]) / 2
    assert len({y for _, y in pos.values()}) == 5  # every leaf a row of its own, the parent between
    chain = [_row("r", None, -1)] + [_row(f"n{i}", "r" if i == 0 else f"n{i - 1}", i) for i in range(5000)]
    assert layout(chain)["n4999"] == (5000, 0.0)  # deep lineages need no recursion


def _archive(path) -> tuple[Store, int]:
    store = Store(path / "archive.sqlite")
    rows = [_row("base-lenet", None, -1, acc=0.85), _row("base-resnet", None, -1, acc=0.91)]
    for i in range(12):
        parent = "base-lenet" if i % 2 else "base-resnet"
        rows.append(_row(f"c000-{i:03d}", parent, 0, acc=0.8 + i / 100,
                         diff=f"--- a/model.py\n+++ b/model.py\n@@\n-old line {i}\n+new line {i}\n"))
    rows.append(_row("c001-000", "c000-003", 1, status="crashed", error_message="shape mismatch " + HOSTILE,
                     diff="--- a/model.py\n+++ b/model.py\n@@\n+" + HOSTILE + "\n", completion=HOSTILE))
    rows.append(_row("c001-001", "c000-005", 1, status="apply_failed", error_message="context_mismatch"))
    rows.append(_row("c001-002", "c000-005", 1, acc=0.95, dataset="digits", diff="--- a/model.py\n+++ b/model.py\n"))
    for r in rows:
        store.upsert(r)
    store.put_verify({"candidate_id": "c000-011", "epochs": 3, "device": "cpu", "status": "ok", "accuracy": 0.97,
                      "proxy_accuracy": 0.91, "chosen_as": "top", "seconds": 1.0})
    return store, len(rows)


def _browser():
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        if os.environ.get("DELTANAS_REQUIRE_BROWSER") == "1":
            pytest.fail("DELTANAS_REQUIRE_BROWSER=1 but chromium or chromedriver is missing", pytrace=False)
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                "--enable-unsafe-swiftshader"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def _wait(driver, script: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = driver.execute_script(script)
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


@pytest.mark.slow
def test_a_pool_runs_nodes_are_shaded_by_their_rank_within_their_dataset(tmp_path):
    """Accuracies are compared within a dataset: on two datasets of very different scales, each
    one's best is the top of the colour scale, and the curves are per dataset."""
    from deltanas.agent.run.html_report import page_data
    from deltanas.agent.run.report import run_metrics

    store = Store(tmp_path / "archive.sqlite")
    for cid, parent, cycle, acc, d in [("base-a.easy", None, -1, 0.95, "easy"), ("base-a.hard", None, -1, 0.20, "hard"),
                                       ("c000-000", "base-a.easy", 0, 0.97, "easy"),
                                       ("c000-001", "base-a.hard", 0, 0.30, "hard"),
                                       ("c001-000", "c000-000", 1, 0.90, "easy")]:
        store.upsert(_row(cid, parent, cycle, acc=acc, dataset=d))
    data = page_data(store, run_metrics(store))
    shade = {n["id"]: n["shade"] for n in data["nodes"]}
    assert data["pool"] is True
    assert shade["c000-000"] == shade["c000-001"] == 1.0  # each dataset's best, whatever its accuracy
    assert shade["c001-000"] == 0.0 and shade["base-a.easy"] == 0.5 and shade["base-a.hard"] == 0.0
    assert data["cycles"][0]["mean_accuracy"] is None
    assert data["cycles"][0]["per_dataset"] == {"easy": {"mean_accuracy": 0.97, "best_accuracy": 0.97},
                                                "hard": {"mean_accuracy": 0.30, "best_accuracy": 0.30}}
    one = Store(tmp_path / "one.sqlite")
    one.upsert(_row("base-a", None, -1, acc=0.4))
    assert page_data(one, run_metrics(one))["nodes"][0]["shade"] == 0.4 and not page_data(one, run_metrics(one))["pool"]


def test_the_page_in_a_headless_browser(tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    run = tmp_path / "run"
    run.mkdir()
    _, n = _archive(run)
    assert main(["report", str(run), "--html"]) == 0
    page = run / "report" / "report.html"
    assert "open " + str(page) in capsys.readouterr().out
    driver = _browser()
    try:
        driver.get(page.as_uri())
        _wait(driver, "return window.deltanasReport && window.deltanasReport.ready")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        assert driver.execute_script("return window.pwned") is None  # the hostile answer stayed text
        count = driver.execute_script("""const gd = document.getElementById('tree');
            return gd.data.filter(t => t.meta === 'nodes').reduce((a, t) => a + t.x.length, 0);""")
        assert count == n == driver.execute_script("return window.deltanasReport.nodes")

        def click(cid: str) -> None:  # a real mouse click on the node's place in the plot
            x, y = driver.execute_script("""const gd = document.getElementById('tree'), fl = gd._fullLayout;
                const t = gd.data.find(t => t.meta === 'nodes' && t.customdata.includes(arguments[0]));
                const i = t.customdata.indexOf(arguments[0]);
                return [fl._size.l + fl.xaxis.l2p(t.x[i]), fl._size.t + fl.yaxis.l2p(t.y[i])];""", cid)
            tree = driver.find_element(By.ID, "tree")
            ActionChains(driver).move_to_element_with_offset(tree, x - tree.size["width"] / 2,
                                                             y - tree.size["height"] / 2).click().perform()

        click("c000-007")
        _wait(driver, "const d = document.getElementById('diff'); return d && d.textContent.includes('+new line 7')")
        facts = driver.find_element(By.ID, "facts").text
        assert "ok; accuracy 87.00%" in facts and "parent base-lenet (85.00%)" in facts
        assert driver.find_element(By.CSS_SELECTOR, "#diff .add").text == "+new line 7"
        driver.find_element(By.CSS_SELECTOR, "a.node").click()  # the parent, from its link
        _wait(driver, "return document.querySelector('#detail h4').textContent === 'base-lenet'")

        click("c001-000")  # the failed one, with the hostile text shown as text
        _wait(driver, "return document.querySelector('#detail h4').textContent === 'c001-000'")
        assert HOSTILE in driver.find_element(By.ID, "detail").text and driver.execute_script("return window.pwned") is None

        driver.find_element(By.CSS_SELECTOR, "input[data-key=status][value=crashed]").click()
        driver.find_element(By.CSS_SELECTOR, "input[data-key=dataset][value=digits]").click()
        _wait(driver, f"return window.deltanasReport.nodes === {n - 2}")
        assert "Proxy fidelity" in driver.find_element(By.ID, "verify").text
    finally:
        driver.quit()


def test_status_draws_the_lineage_of_the_best_in_text(tmp_path, capsys):
    _archive(tmp_path)
    assert main(["status", str(tmp_path), "--tree", "2"]) == 0
    text = capsys.readouterr().out
    # the archive holds two datasets: the best of each, ranked within it
    tree = text[text.index("lineage of the 2 best of each dataset"):]
    # digits' best (c001-002, 95%) under c000-005 under base-lenet; mnist's (c000-011, 91%, then c000-010)
    assert tree.index("base-lenet") < tree.index("c000-005") < tree.index("c001-002 95.00%")
    assert "c001-002 95.00% ok #1" in tree and "c000-011 91.00% ok #1" in tree and "c000-010 90.00% ok #2" in tree
    assert "other child(ren)" in tree and "base-resnet" in tree
