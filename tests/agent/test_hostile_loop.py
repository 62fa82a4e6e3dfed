"""Hostile candidates inside whole runs: the real process sandbox, a scripted model whose
diffs make the network hang, crash, allocate without bound or diverge. Each ends
in its typed status, the run goes on, and the archive holds exactly one row per candidate."""
from __future__ import annotations

import difflib
import json
import random
import subprocess
import sys

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from deltanas.agent.config import load_config
from deltanas.agent.llm.coalesce import CoalescingBackend
from deltanas.agent.llm.scripted import ScriptedBackend
from deltanas.agent.run.build import build_deps
from deltanas.agent.run.driver import run_graph

# Each payload goes at the top of Net.__init__, so it runs inside the sandbox when the net is built;
# the padding lines make every candidate structurally novel against its parent.
PAYLOADS = {
    "timeout": "while True:\n    pass",
    "crashed": "raise RuntimeError('candidate blew up on purpose')",
    "oom": "hog = bytearray(64 * 2**30)",
    "diverged": "self.register_forward_hook(lambda module, inputs, output: output * float('nan'))",
}
# The files are the test's own; where the process sandbox gets no filesystem view (no bubblewrap
# or Landlock), `deltanas eval` runs them only when told to.
UNSAFE = ("--unsafe-no-isolation",)
LAYERS = ("nn.GELU()", "nn.SiLU()", "nn.Tanh()", "nn.Hardswish()", "nn.ELU(alpha=0.5)", "nn.Softsign()",
          "nn.Mish()", "nn.PReLU()", "nn.CELU()", "nn.SELU()", "nn.Softplus()", "nn.ReLU6()")


def padding(seed: int) -> str:
    """Unused layers, different for each payload, so siblings are not near-copies of each other."""
    rng = random.Random(seed)
    return "\n".join(f"pad_{i} = [nn.Conv2d({rng.randint(1, 99)}, {rng.randint(1, 99)}, {rng.randint(1, 7)}), "
                     f"{rng.choice(LAYERS)}, nn.Dropout(0.{rng.randint(1, 9)})]" for i in range(8))


def hostile_diff(base: str, payload: str) -> str:
    lines = base.splitlines(keepends=True)
    at = next(i for i, l in enumerate(lines) if "super().__init__()" in l) + 1
    indent = lines[at - 1][: len(lines[at - 1]) - len(lines[at - 1].lstrip())]
    block = [indent + l + "\n" for l in (payload + "\n" + padding(len(payload))).splitlines()]
    new = lines[:at] + block + lines[at:]
    return "".join(difflib.unified_diff(lines, new, "a/model.py", "b/model.py"))


def _need(sandbox: str) -> None:
    if sandbox == "docker":
        from deltanas.sandbox.docker import docker_available, image_available

        ok, why = docker_available()
        if not ok or not image_available():
            pytest.skip(f"needs a Docker daemon and the sandbox image: {why}")


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["process", "docker"])
def test_hostile_candidates_get_typed_statuses_and_the_run_goes_on(tmp_path, sandbox):
    _need(sandbox)
    order = list(PAYLOADS.values())
    answers = iter(order)
    llm = ScriptedBackend(lambda p: f"```diff\n{hostile_diff(p.base_source, next(answers))}```")
    cfg = load_config(None, {"llm.spec": "mutate", "data.dataset": "digits", "baselines": ["lenet"],
                             "search.cycles": 1, "search.candidates": len(order), "sandbox.type": sandbox,
                             "sandbox.timeout_s": 15, "sandbox.memory_mb": 3000, "search.max_repairs": 0})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    deps = build_deps(cfg, run_dir, llm=CoalescingBackend(llm))
    try:
        out = run_graph(deps, InMemorySaver())
    finally:
        deps.executor.close()
    assert out.status == "finished", repr(out.error)
    rows = deps.store.candidates(cycle=0)
    assert [r.status for r in rows] == list(PAYLOADS), [(r.status, r.similarity, r.nearest_id, r.error_message) for r in rows]
    assert all(r.accuracy is None for r in rows)
    assert deps.store.get("base-lenet").status == "ok"
    assert len(deps.store.candidates()) == 1 + len(order)
    for r in rows:  # every failure is kept with its files, for a person to read
        assert json.loads((run_dir / "candidates" / r.id / "result.json").read_text())["status"] == r.status


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["process", "docker"])
def test_eval_cli_on_hostile_files(tmp_path, sandbox):
    _need(sandbox)
    hang = tmp_path / "hang.py"
    hang.write_text("import time\nwhile True:\n    time.sleep(0.1)\n")
    r = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "eval", str(hang), "--dataset", "digits",
                        "--timeout", "5", "--sandbox", sandbox, "--json", *UNSAFE], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    j = json.loads(r.stdout)
    assert j["status"] == "timeout" and j["accuracy"] is None
    liar = tmp_path / "liar.py"
    liar.write_text("import torch.nn as nn\nprint('accuracy: 1.0')\n"
                    "class Net(nn.Module):\n    def __init__(self, in_shape, out_shape, prm, device):\n"
                    "        super().__init__()\n        self.fc = nn.Linear(in_shape[1] * in_shape[2] * in_shape[3], "
                    "out_shape[0])\n    def forward(self, x):\n        return self.fc(x.flatten(1)) * 0\n")
    r = subprocess.run([sys.executable, "-m", "deltanas.agent.cli", "eval", str(liar), "--dataset", "digits",
                        "--sandbox", sandbox, "--json", *UNSAFE], capture_output=True, text=True, timeout=120)
    j = json.loads(r.stdout)
    assert j["status"] == "ok" and j["accuracy"] < 0.2  # constant logits: the printed 1.0 counts for nothing
