"""`deltanas verify` (agent/run/verify.py) on a small real run (MNIST, CPU, the process sandbox):
the chosen candidates are retrained for more epochs, stored, summarised with statistics that this
test recomputes on its own, resumed without retraining, and shown by `status` and `report`."""
from __future__ import annotations

import json
from itertools import combinations

import pytest

from deltanas.agent.archive import CandidateRow, Store
from deltanas.agent.cli import main
from deltanas.agent.run.verify import choose, fidelity


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean of their places."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5


def _kendall_b(x: list[float], y: list[float]) -> float:
    conc = disc = tx = ty = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx * dy > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / ((conc + disc + tx) * (conc + disc + ty)) ** 0.5


def test_fidelity_matches_hand_computed_ranks():
    proxy = [0.91, 0.85, 0.85, 0.70, 0.95, 0.60, 0.88]
    long = [0.97, 0.90, 0.93, 0.80, 0.96, 0.75, 0.89]
    got = fidelity(proxy, long, top=3)
    assert got["spearman"] == pytest.approx(_pearson(_ranks(proxy), _ranks(long)))
    assert got["kendall"] == pytest.approx(_kendall_b(proxy, long))
    lo, hi = got["spearman_ci95"]
    assert -1 <= lo <= hi <= 1 and got["n"] == 7
    # proxy top 3: 0.95, 0.91, 0.88 (ids 4, 0, 6); long top 3: 0.97, 0.96, 0.93 (ids 0, 4, 2): 2 kept
    assert got["top_k"] == 3 and got["top_kept"] == 2
    assert fidelity([0.5, 0.6], [0.5, 0.7], top=2)["spearman"] is None  # too few to rank


def test_choose_takes_the_top_and_one_from_each_band():
    rows = [CandidateRow(id=f"c{i:02d}", cycle=0, idx=i, kind="delta", dataset="mnist", status="ok",
                         source="x", accuracy=i / 100) for i in range(20)]
    rows.append(CandidateRow(id="bad", cycle=0, idx=99, kind="delta", dataset="mnist", status="crashed"))
    got = choose(rows, top=3, sample=4, seed=1)
    assert [r.id for r, how in got if how == "top"] == ["c19", "c18", "c17"]
    sample = sorted((r.accuracy for r, how in got if how == "sample"), reverse=True)
    assert len(sample) == 4
    # the rest (0.16 .. 0.00, 17 rows) in 4 bands: [0.16..0.13], [0.12..0.09], [0.08..0.05], [0.04..0.00]
    for acc, (hi, lo) in zip(sample, [(0.16, 0.13), (0.12, 0.09), (0.08, 0.05), (0.04, 0.0)]):
        assert lo - 1e-9 <= acc <= hi + 1e-9, sample
    assert choose(rows, top=3, sample=4, seed=1) == got  # the same draw again
    assert len(choose(rows, top=3, sample=50)) == 20  # all of the rest when the sample asks for more


@pytest.mark.slow
def test_verify_on_a_small_mnist_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--llm", "mutate", "--cycles", "1", "--candidates", "6", "--dataset", "mnist",
                 "--limit-train", "1000", "--limit-test", "500", "--baselines", "lenet,alexnet", "--sandbox",
                 "process", "--plain", "--run-dir", str(run), "--timeout", "120"]) == 0
    capsys.readouterr()
    trained = [r for r in Store(run / "archive.sqlite", readonly=True).candidates(status="ok")]
    assert len(trained) >= 4, [(r.id, r.status) for r in trained]

    argv = ["verify", str(run), "--top", "2", "--sample", "2", "--epochs", "2", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = Store(run / "archive.sqlite", readonly=True).verifications(2)
    assert len(rows) == 4 and {r["chosen_as"] for r in rows} == {"top", "sample"}
    assert all(r["status"] == "ok" and r["device"] == "cpu" for r in rows), rows
    assert sorted(r["candidate_id"] for r in rows if r["chosen_as"] == "top") == sorted(
        r.id for r in sorted(trained, key=lambda r: -r.accuracy)[:2])
    for r in rows:  # the proxy accuracy is the archived one
        assert r["proxy_accuracy"] == next(t.accuracy for t in trained if t.id == r["candidate_id"])
    proxy, long = [r["proxy_accuracy"] for r in rows], [r["accuracy"] for r in rows]
    assert summary["n"] == 4 and summary["epochs"] == 2
    assert summary["spearman"] == pytest.approx(_pearson(_ranks(proxy), _ranks(long)))
    assert summary["kendall"] == pytest.approx(_kendall_b(proxy, long))
    top_proxy = set(sorted(range(4), key=lambda i: -proxy[i])[:2])
    top_long = set(sorted(range(4), key=lambda i: -long[i])[:2])
    assert summary["top_kept"] == len(top_proxy & top_long)

    # Again: everything is stored, nothing is retrained, the summary is the same.
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "0 to retrain" in out.err and json.loads(out.out) == summary
    assert [r["finished_at"] for r in Store(run / "archive.sqlite", readonly=True).verifications(2)] == \
        [r["finished_at"] for r in rows]

    assert main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"] == [summary]
    assert main(["report", str(run)]) == 0
    text = (run / "report" / "summary.md").read_text()
    assert "Proxy fidelity" in text and f"spearman {summary['spearman']:.3f}" in text
    assert (run / "report" / "verify.png").stat().st_size > 1000
