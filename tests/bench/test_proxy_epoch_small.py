"""bench/proxy_epoch.py at a tiny CPU size: it runs, and prints both epoch figures and the estimate."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "proxy_epoch.py"


@pytest.mark.slow
def test_proxy_epoch_prints_ours_beside_the_dataloader_baseline():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--n", "96", "--n-test", "32", "--batches", "32", "--small-batch", "32",
         "--epochs", "2", "--workers", "1", "--threads", "1", "--small", "lenet", "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    ours = re.search(r"ours: worker path +first +([\d.]+) s/epoch +steady +([\d.]+) s/epoch", out)
    base = re.search(r"baseline: torchvision DataLoader +first +([\d.]+) s/epoch +steady +([\d.]+) s/epoch", out)
    assert ours and base, out
    assert all(float(v) > 0 for v in ours.groups() + base.groups())
    ratio = re.search(r"ours ([\d.]+) s/epoch vs DataLoader ([\d.]+) s/epoch: ([\d.]+)x faster", out)
    assert ratio and float(ratio.group(1)) == float(ours.group(1)) and float(ratio.group(2)) == float(base.group(1))
    assert "1 workers" in out and "(float32 (worker's choice), default loop)" in out  # on the CPU: no autocast
    estimate = re.search(r"lenet: per candidate .* -> ([\d,]+) candidates per device-hour", out)
    baseline_estimate = re.search(r"baseline lenet: .* -> ([\d,]+) candidates per device-hour", out)
    assert estimate and baseline_estimate, out
    assert int(estimate.group(1).replace(",", "")) > 0 and int(baseline_estimate.group(1).replace(",", "")) > 0
