"""bench/tokens.py reading a run's archive. Every figure's own small run is in test_summary.py
(bench/summary.py, which CI keeps); this is the one path the summary does not take."""
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


def _tokenizer_available() -> bool:
    from deltanas.agent.llm.model_folder import resolve_model

    try:
        resolve_model("smollm2")
    except FileNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _tokenizer_available(), reason="the SmolLM2 GGUF package is not installed")


def _fake_run(run_dir: Path) -> None:
    from deltanas.agent.archive import CandidateRow, Store
    from deltanas.agent.run.rundir import ARCHIVE_FILE
    from deltanas.tools.diff_write import make_diff
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
def test_tokens_reads_a_runs_archive(tmp_path):
    _fake_run(tmp_path / "run")
    out = run_bench("tokens.py", "--mutations", "2", "--baselines", "lenet", "--archive", str(tmp_path / "run"))
    m = re.search(r"RESULT output tokens per candidate: delta (\d+) \(1 context line\(s\)\) against full-file "
                  r"(\d+) \(baseline\), ([\d.]+)%", out)
    assert m and int(m[1]) < int(m[2]), out  # the human output, which the summary does not read
    wide = re.search(r"3 context lines per hunk side \(diff -u\): (\d+) tokens", out)
    assert wide and int(wide[1]) > int(m[1]), out
    assert re.search(r"^lenet\s+\d+\s+2\s", out, re.M), out
    # the archive part: real completion_tokens per mode, and the first answers re-counted
    assert re.search(r"delta\s+hf\s+1\s+1\s+100\s", out) and re.search(r"full\s+hf\s+1\s+1\s+200\s", out), out
    m = re.search(r"first answers: delta (\d+) tokens against full (\d+): ([\d.]+)%", out)
    assert m and int(m[1]) < int(m[2])
