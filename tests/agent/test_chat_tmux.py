"""`deltanas chat` in a real terminal (tmux), as a person would drive it: garbage at every prompt,
a request, a revision with feedback, an accepted proposal trained in the background, a rejected
one, /best, then a kill while a question waits and a resume at that question. The real CLI,
process sandbox, prompt_toolkit and SQLite checkpoint; the no-LLM mutator proposes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from deltanas.agent.archive import Store
from deltanas.tools.trajectory import human_verdict

from support import Pane, require_tmux

require_tmux()

REQUEST = "deltanas (the best so far) >"
QUESTION = "[r]evise with feedback"


def _state(pane: Pane, after: int) -> tuple[str, str]:
    """("question" | "request", the new text) once the pane, past offset `after`, waits for one."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        new = pane.text()[after:]
        q, r = new.rfind(QUESTION), new.rfind(REQUEST)
        if q > r and new.rstrip().endswith("/command >"):
            return "question", new
        if r > q and new.rstrip().endswith(">"):
            return "request", new
        time.sleep(0.5)
    raise AssertionError(f"no prompt came; the pane shows:\n{pane.text()[-3000:]}")


def _key(pane: Pane, key: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", pane.name, key], check=True)


@pytest.mark.slow
def test_a_chat_session_in_a_terminal(tmp_path):
    run = tmp_path / "run"
    cli = (f"{sys.executable} -m deltanas.agent.cli chat {run} --llm mutate --proposals 3 --dataset digits "
           f"--baselines lenet --sandbox process --timeout 120")
    env = {"DELTANAS_CACHE": os.environ["DELTANAS_CACHE"], "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
    pane = Pane(cli, env)
    try:
        pane.wait_for(REQUEST)
        # Garbage at the request prompt: each gets its message, and the prompt comes back.
        pane.type("")
        pane.wait_for("type what to try")
        pane.type("/frobnicate")
        pane.wait_for("unknown command /frobnicate")
        pane.type("y")
        pane.wait_for("no proposal is waiting")
        _key(pane, "C-c")
        pane.wait_for("the line was dropped")
        (tmp_path / "paste").write_text("wider " * 1000)
        subprocess.run(["tmux", "load-buffer", str(tmp_path / "paste")], check=True)
        subprocess.run(["tmux", "paste-buffer", "-p", "-t", pane.name], check=True)
        pane.type("")
        pane.wait_for("a request is at most 2000")

        mark = len(pane.text())
        pane.type("make lenet wider")
        kind, text = _state(pane, mark)
        assert kind == "question" and "parent base-lenet" in text and "+++ b/model.py" in text
        assert "proposal for: make lenet wider;" in text
        # Garbage at a question.
        pane.type("maybe")
        pane.wait_for("answer y, n, r or e")
        _key(pane, "C-c")
        pane.wait_for("the question waits")
        pane.type("/best")
        pane.wait_for("the 1 best")
        # A revision with feedback, then every question answered: accept the first, reject the rest.
        mark = len(pane.text())
        pane.type("r", "fewer channels in the first conv")
        answers = {"y": 0, "n": 0}
        kind, text = _state(pane, mark)
        while kind == "question":
            verdict = "y" if answers["y"] == 0 else "n"
            answers[verdict] += 1
            mark = len(pane.text())
            pane.type(*(["y"] if verdict == "y" else ["n", "not now"]))
            kind, text = _state(pane, mark)
        pane.wait_for("trained h0")
        pane.type("/best 3")
        text = pane.wait_for("the 2 best")
        accepted = re.search(r"trained (h\d{3}-\d{2})", text).group(1)
        assert accepted in text[text.rindex("the 2 best"):]

        # A new request; the session is killed while its question waits.
        mark = len(pane.text())
        pane.type("@" + accepted + " add dropout")
        kind, text = _state(pane, mark)
        assert kind == "question" and f"parent {accepted}" in text
        waiting = re.findall(r"candidate (h\d{3}-\d{2})", text)[-1]
    finally:
        pane.kill()
    time.sleep(1)

    pane = Pane(f"{sys.executable} -m deltanas.agent.cli chat {run}", env)
    try:  # Ctrl-D at a question leaves; the question stays for the next session
        kind, text = _state(pane, 0)
        assert kind == "question" and f"candidate {waiting}" in text  # the same question
        _key(pane, "C-d")
        assert "EXITED=0" in pane.wait_for("EXITED=")
    finally:
        pane.kill()

    pane = Pane(f"{sys.executable} -m deltanas.agent.cli chat {run}", env)
    try:
        kind, text = _state(pane, 0)
        assert kind == "question" and f"candidate {waiting}" in text
        while kind == "question":
            mark = len(pane.text())
            pane.type("n", "")
            kind, text = _state(pane, mark)
        _key(pane, "C-d")
        text = pane.wait_for("EXITED=")
        assert "EXITED=0" in text and "saved. Continue with: deltanas chat" in text
    finally:
        pane.kill()

    store = Store(run / "archive.sqlite", readonly=True)
    rows = {r.id: r for r in store.candidates() if r.id.startswith("h")}
    assert rows[accepted].status == "ok" and rows[accepted].accuracy is not None
    assert rows[waiting].status == "rejected"
    assert not [r for r in rows.values() if not r.final]  # nothing left proposed or queued
    # The revision's feedback is in the revised candidate's trajectory, sent to the model as a message.
    revised = [cid for cid in rows if any("fewer channels in the first conv" in (m.get("content") or "")
                                          for m in store.get_trajectory(cid) if m["role"] == "user")]
    assert len(revised) == 1
    assert human_verdict(store.get_trajectory(accepted))["verdict"] == "yes"


@pytest.mark.slow
def test_a_chat_session_with_the_embedded_model(tmp_path):
    """The default model (SmolLM2-135M, offline) under the default grammar: a request is proposed,
    every proposal accepted and trained, /best, and Ctrl-D; each proposal is recorded once."""
    run = tmp_path / "run"
    cli = (f"{sys.executable} -m deltanas.agent.cli chat {run} --proposals 2 --dataset digits --baselines lenet "
           f"--sandbox process --timeout 120")
    env = {"DELTANAS_CACHE": os.environ["DELTANAS_CACHE"], "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
    pane = Pane(cli, env)
    try:
        pane.wait_for(REQUEST, timeout=300)
        mark = len(pane.text())
        pane.type("make lenet wider")
        kind, _ = _state(pane, mark)
        accepted = 0
        while kind == "question":
            accepted += 1
            mark = len(pane.text())
            pane.type("y")
            kind, _ = _state(pane, mark)
        deadline = time.monotonic() + 240
        while accepted and pane.text().count("trained h000") + pane.text().count("did not train") < accepted:
            assert time.monotonic() < deadline, pane.text()[-3000:]
            time.sleep(1)
        mark = len(pane.text())
        pane.type("/best")
        assert _state(pane, mark)[0] == "request" and re.search(r"the \d+ best", pane.text()[mark:])
        _key(pane, "C-d")
        assert "EXITED=0" in pane.wait_for("EXITED=", timeout=240)
    finally:
        pane.kill()
    store = Store(run / "archive.sqlite", readonly=True)
    rows = [r for r in store.candidates() if r.id.startswith("h")]
    assert sorted(r.id for r in rows) == ["h000-00", "h000-01"]
    assert all(r.final for r in rows), [(r.id, r.status) for r in rows]
    assert all("Goal: make lenet wider" in store.get_trajectory(r.id)[1]["content"] for r in rows)
    print("embedded model chat:", [(r.id, r.status, r.error_code, r.accuracy) for r in rows])
