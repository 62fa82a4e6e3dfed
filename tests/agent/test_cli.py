"""The CLI as a user meets it: fast --help, refusals with one clear message, diff apply."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deltanas.agent.cli import main

PY = sys.executable


def run_cli(*args, **kw):
    return subprocess.run([PY, "-m", "deltanas.agent.cli", *args], capture_output=True, text=True, **kw)


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t=time.perf_counter(); from deltanas.agent import cli; "
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print(time.perf_counter()-t, [m for m in ('torch','transformers','langgraph','vllm') if m in sys.modules])")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert float(out[0]) < 1.0
    assert out[1].strip() == "[]"


def test_run_help_lists_the_surface():
    out = run_cli("run", "--help").stdout
    for flag in ("--config", "--llm", "--dataset", "--cycles", "--candidates", "--sandbox", "--run-dir", "--resume"):
        assert flag in out


def test_resume_of_missing_dir_is_refused(tmp_path):
    r = run_cli("run", "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run directory" in r.stderr
    assert not (tmp_path / "nope").exists()


def test_bad_config_creates_nothing(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[search]\ncycles = 0\n")
    r = run_cli("run", "--config", str(cfg), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "search.cycles" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()
    r = run_cli("run", "--llm", "chatgpt", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "llm.spec" in r.stderr
    r = run_cli("run", "--dataset", "imagenet", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "unknown dataset" in r.stderr
    r = run_cli("run", "--timeout", "0", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "must be > 0" in r.stderr
    assert not (tmp_path / "r").exists()


def test_offline_dataset_failure_is_clear_and_creates_nothing(tmp_path):
    r = run_cli("run", "--llm", "mutate", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"),
                "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "cifar" in r.stderr.lower()
    assert not (tmp_path / "r").exists()
    r = run_cli("run", "--llm", "hf:/nonexistent/model.gguf", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("run", "--llm", "mutate", "--device", "cuda:7", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "cuda:7" in r.stderr
    assert not (tmp_path / "r").exists()


def test_reusing_a_run_dir_is_refused(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.toml").write_text("")
    r = run_cli("run", "--llm", "mutate", "--run-dir", str(d))
    assert r.returncode == 2 and "--resume" in r.stderr


def test_status_of_non_run_dir(tmp_path):
    assert main(["status", str(tmp_path)]) == 2


def test_diff_apply_json_and_output(tmp_path):
    base = tmp_path / "net.py"
    base.write_text("import torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.act = nn.ReLU()\n")
    diff = tmp_path / "d.txt"
    diff.write_text("Sure!\n```diff\n--- a/net.py\n+++ b/net.py\n@@ -5,2 +5,2 @@\n         super().__init__()\n"
                    "-        self.act = nn.ReLU()\n+        self.act = nn.GELU()\n```\n")
    r = run_cli("diff", "apply", str(base), str(diff), "--json", "--output", str(tmp_path / "out.py"))
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["ok"] is True and j["code"] is None and j["added"] == 1 and j["removed"] == 1
    assert "nn.GELU()" in (tmp_path / "out.py").read_text()
    diff.write_text("--- a/../../etc/passwd\n+++ b/../../etc/passwd\n@@ -1 +1 @@\n-x\n+y\n")
    r = run_cli("diff", "apply", str(base), str(diff), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["code"] == "unsafe_path"


def test_zoo_list_json():
    r = run_cli("zoo", "list", "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert len(rows) >= 8 and all(row["params_mnist"] > 0 for row in rows)
    assert len({row["family"] for row in rows}) >= 8


@pytest.mark.slow
def test_corrupt_databases_are_named(tmp_path):
    d = tmp_path / "r"
    r = run_cli("run", "--llm", "mutate", "--dataset", "digits", "--baselines", "lenet", "--cycles", "1",
                "--candidates", "1", "--sandbox", "process", "--run-dir", str(d), "--plain")
    assert r.returncode == 0, r.stderr
    (d / "checkpoints.sqlite").write_bytes(b"garbage" * 1000)
    for f in d.glob("checkpoints.sqlite-*"):
        f.unlink()
    r = run_cli("run", "--resume", str(d), "--cycles", "2", "--plain")
    assert r.returncode == 2 and "checkpoints.sqlite" in r.stderr and "corrupt" in r.stderr
    (d / "archive.sqlite").write_bytes(b"garbage" * 1000)
    for f in d.glob("archive.sqlite-*"):
        f.unlink()
    r = run_cli("status", str(d))
    assert r.returncode == 2 and "archive.sqlite" in r.stderr
