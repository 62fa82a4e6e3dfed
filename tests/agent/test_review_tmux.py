"""`deltanas run --review` in a real terminal (tmux), as a person would drive it: the first question
is answered, the session is killed while the second waits, and `deltanas run --resume` asks the
second only. The real CLI, process sandbox and SQLite checkpoint; the no-LLM mutator proposes."""
from __future__ import annotations

import os
import sys
import time

import pytest

from deltanas.agent.archive import Store

from support import Pane, require_tmux

PROMPT = "[y]es train it"

require_tmux()


@pytest.mark.slow
def test_review_in_a_terminal_survives_a_kill_at_a_question(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "no-retry.toml"  # a near-copy is recorded at once, so that two of the three are asked
    config.write_text("[search]\nretry_duplicates = false\n")
    cli = (f"{sys.executable} -m deltanas.agent.cli run --review --plain --llm mutate --cycles 1 --candidates 3 "
           f"--dataset digits --baselines lenet --sandbox process --timeout 120 --config {config}")
    env = {"DELTANAS_CACHE": os.environ["DELTANAS_CACHE"], "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
    pane = Pane(f"{cli} --run-dir {run}", env)
    try:
        text = pane.wait_for(PROMPT)
        assert "1/2 candidate" in text and "parent base-lenet" in text and "+++ b/model.py" in text
        pane.type("maybe")  # not an answer: said so, and asked again
        pane.wait_for("answer y, n, r, e, s or q")
        pane.type("y")
        text = pane.wait_for(PROMPT, count=3)  # the second candidate's question
        assert "2/2 candidate" in text
        second = text[text.rindex("2/2 candidate"):].split()[2]
    finally:
        pane.kill()  # the terminal goes away while the second question waits
    time.sleep(1)

    pane = Pane(f"{sys.executable} -m deltanas.agent.cli run --resume {run} --plain", env)
    try:
        text = pane.wait_for(PROMPT)
        assert f"1/1 candidate {second}" in text  # the first answer was kept: only the second is asked
        pane.type("n", "two pools in a row")
        text = pane.wait_for("EXITED=")
        assert "EXITED=0" in text and "finished" in text, text[-2000:]
    finally:
        pane.kill()
    rows = [r for r in Store(run / "archive.sqlite", readonly=True).candidates() if r.kind != "baseline"]
    assert len(rows) == 3, rows  # each candidate once; the mutator's first (seed 0) is a near-copy, never asked
    by_status = {r.status: r for r in rows}
    assert set(by_status) == {"duplicate", "ok", "rejected"} and by_status["rejected"].id == second
    assert by_status["rejected"].error_message == "two pools in a row"
    assert by_status["ok"].accuracy is not None
