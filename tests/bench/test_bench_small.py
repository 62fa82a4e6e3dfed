"""Each benchmark under bench/ runs at a tiny size and prints its figure beside its baseline."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_novelty_scale_small():
    out = run_bench("novelty_scale.py", "--n", "2000", "--real", "100", "--checks", "150", "--scan-checks", "10")
    m = re.search(r"RESULT novelty check at N=(\d+): ([\d.]+) ms/check \(LSH index\) against ([\d.]+) ms/check "
                  r"\(linear scan baseline\)", out)
    assert m, out
    n, lsh_ms, scan_ms = int(m[1]), float(m[2]), float(m[3])
    assert n == 2000 and 0 < lsh_ms < scan_ms
    assert re.search(r"signatures: [\d.]+ ms per real source", out)
    # the index of this change agrees with the exact scan on every check at or above the threshold
    above = int(re.search(r"exact answers at or above the threshold: (\d+) of 150 checks", out)[1])
    assert above > 0
    assert re.search(rf"NoveltyIndex: .*\(this change\): 0 of {above} missed, 0 with another", out), out
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^(.+?)\s+[\d.]+\s+[\d.]+\s+\d+\s+([\d.]+)\s+[\d.]+$", out, re.M)}
    names = ["NoveltyIndex", "zero-miss bands", "previous index", "numpy scan", "linear scan"]
    assert [next((k for k in rows if n in k), None) is not None for n in names] == [True] * 5, rows
    assert all(ms > 0 for ms in rows.values())


def _tokenizer_available() -> bool:
    from deltanas.agent.llm.hf import resolve_model

    try:
        resolve_model("smollm2")
    except FileNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _tokenizer_available(), reason="the SmolLM2 GGUF package is not installed")


def _fake_run(run_dir: Path) -> None:
    from deltanas.agent.rundir import ARCHIVE_FILE
    from deltanas.agent.store import CandidateRow, Store
    from deltanas.tools.mutator import make_diff
    from deltanas.tools.zoo import get_baseline

    base = get_baseline("lenet").source
    new = base.replace("nn.ReLU(inplace=True)", "nn.GELU()", 1)
    assert new != base
    run_dir.mkdir()
    store = Store(run_dir / ARCHIVE_FILE)
    store.set_meta("proposer:0", "hf")
    for i, (kind, text) in enumerate([("delta", f"```diff\n{make_diff(base, new)}```\n"),
                                      ("full", f"```python\n{new}```\n")]):
        store.upsert(CandidateRow(id=f"c{i}", cycle=0, idx=i, kind=kind, dataset="mnist", status="ok",
                                  completion=text, completion_tokens=100 * (i + 1)))
    store.close()


@needs_smollm2
def test_tokens_small(tmp_path):
    _fake_run(tmp_path / "run")
    out = run_bench("tokens.py", "--mutations", "4", "--baselines", "lenet,resnet", "--archive", str(tmp_path / "run"))
    m = re.search(r"RESULT output tokens per candidate: delta (\d+) against full-file (\d+) \(baseline\), "
                  r"([\d.]+)%", out)
    assert m, out
    delta, full, pct = int(m[1]), int(m[2]), float(m[3])
    assert 0 < delta < full and abs(pct - 100 * delta / full) < 0.1
    rows = re.findall(r"^(lenet|resnet)\s+(\d+)\s+4\s+[\d.]+\s+(\d+)\s+(\d+)\s+([\d.]+)%$", out, re.M)
    assert [r[0] for r in rows] == ["lenet", "resnet"], out
    assert all(int(r[3]) < int(r[2]) for r in rows)  # each baseline: delta answer shorter than the whole file
    # the archive part: real completion_tokens per mode, and the first answers re-counted
    assert re.search(r"delta\s+hf\s+1\s+1\s+100\s", out) and re.search(r"full\s+hf\s+1\s+1\s+200\s", out), out
    m = re.search(r"first answers: delta (\d+) tokens against full (\d+): ([\d.]+)%", out)
    assert m and int(m[1]) < int(m[2])
