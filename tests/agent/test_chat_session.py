"""The chat session's terminal side (agent/run/chat_session.py) with typed lines: a whole session
through requests, answers and commands; how a request names its parent; each command's answers,
wrong uses included. The graph, archive, checkpoint and trainer are the real ones; the model is
scripted and training instant (tests/support.py)."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from deltanas.agent.run.chat_session import ChatSession
from deltanas.agent.run.driver import run_chat, sqlite_saver
from deltanas.agent.run.report import write_report

from support import loop_deps


def _typed(*lines: str):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            line = next(it)
        except StopIteration:
            raise EOFError from None
        if line == "^C":
            raise KeyboardInterrupt
        return line
    return read


def _session(tmp_path, *lines: str, **over) -> tuple[ChatSession, io.StringIO]:
    deps = loop_deps(tmp_path, None, **{"search.candidates": 2, **over})
    out = io.StringIO()
    talk = ChatSession(deps.config, deps.run_dir, deps, sqlite_saver(deps),
                       Console(file=out, width=150, color_system=None), read=_typed(*lines), edit=lambda s: None)
    return talk, out


def test_a_whole_session_of_typed_lines(tmp_path):
    talk, out = _session(tmp_path, "", "/nope", "y", "^C", "make lenet wider", "maybe", "^C", "/best",
                         "y", "n", "too wide", "/show h000-00", "/diff h000-00", "/export", "/quit")
    assert talk.run() == 0
    text = out.getvalue()
    for said in ("type what to try", "training the baselines first (base-lenet)", "unknown command /nope", "no proposal is waiting", "the line was dropped",
                 "asking the model", "answer y, n, r or e", "the question waits", "the 1 best",
                 "h000-01 rejected: too wide", "trajectories (2 human-labelled)", "saved. Continue with"):
        assert said in text, (said, text[-3000:])
    store = talk.deps.store
    assert store.get("h000-00").status == "ok" and store.get("h000-01").status == "rejected"
    assert "trained h000-00" in text  # printed by the trainer when ready
    _, out_dir = write_report(tmp_path / "run", store)  # the report names the request the candidate came from
    assert "| h000-00 | 0 | base-lenet |" in (out_dir / "summary.md").read_text()
    assert "chat: make lenet wider | yes |" in (out_dir / "summary.md").read_text()
    exported = [json.loads(x) for x in (tmp_path / "run" / "export" / "trajectories.jsonl").read_text().splitlines()]
    assert {r["meta"]["candidate_id"]: r["meta"]["human"]["verdict"] for r in exported} == {"h000-00": "yes",
                                                                                           "h000-01": "no"}


def test_ctrl_d_at_a_question_leaves_and_the_question_waits(tmp_path):
    talk, _ = _session(tmp_path, "go wider")
    assert talk.run() == 0
    out = run_chat(talk.deps, sqlite_saver(talk.deps))
    assert out.status == "waiting" and {q["kind"] for q in out.questions} == {"review"}


def test_a_request_names_its_parent(tmp_path):
    talk, out = _session(tmp_path)
    run_chat(talk.deps, talk.saver)  # trains the baseline
    assert talk.parent_for("make lenet wider") == "base-lenet"  # a baseline's name
    assert talk.parent_for("wider please") is None  # the best so far
    assert talk.parent_for("@h009-00 wider") == "h009-00"  # named: the graph says if it is unknown
    talk.command("/parent base-lenet")
    assert talk.parent == "base-lenet" and talk.parent_for("wider") == "base-lenet"
    talk.command("/parent")
    assert talk.parent is None and "requests start from the best so far" in out.getvalue()


def test_a_pool_sessions_requests_name_a_dataset_and_best_is_per_dataset(tmp_path):
    from deltanas.agent.loop.deps import DatasetInfo

    talk, out = _session(tmp_path)
    talk.deps.datasets = {"mnist": DatasetInfo("mnist", (1, 28, 28), 10),
                          "digits": DatasetInfo("digits", (1, 28, 28), 10)}
    run_chat(talk.deps, talk.saver)  # trains lenet on each dataset
    assert {r.id: r.dataset for r in talk.deps.store.candidates()} == {"base-lenet.mnist": "mnist",
                                                                       "base-lenet.digits": "digits"}
    assert talk.parent_for("make lenet wider") == "base-lenet.mnist"  # the pool's first dataset
    assert talk.parent_for("make lenet wider on digits") == "base-lenet.digits"
    assert talk.parent_for("wider please, on digits") == "base-lenet.digits"  # the best on the dataset named
    assert talk.parent_for("wider please") == "base-lenet.mnist"  # the best on the pool's first dataset
    talk.command("/best")
    assert "the 1 best on mnist" in out.getvalue() and "the 1 best on digits" in out.getvalue()


@pytest.mark.parametrize("line, said", [
    ("/best 0", "usage: /best N, N from 1 to 100"), ("/best x", "usage: /best N"), ("/show", "usage: /show ID"),
    ("/show nope", "no candidate 'nope'"), ("/diff", "usage: /diff ID [ID2]"), ("/diff base-lenet", "no source or no parent"),
    ("/parent nope", "no candidate 'nope'"), ("/run", "usage: /run N"), ("/run 1000", "N from 1 to 100"),
    ("/help", "/run N"), ("/status", "training now or next: nothing"), ("/BEST", "the 1 best"),
])
def test_each_command_says_something_clear(tmp_path, line, said):
    talk, out = _session(tmp_path)
    run_chat(talk.deps, talk.saver)
    talk.command(line)
    assert said in out.getvalue(), out.getvalue()


def test_run_hands_cycles_to_the_loop_and_takes_control_back(tmp_path):
    talk, out = _session(tmp_path, **{"learn.updates": False})
    run_chat(talk.deps, talk.saver)
    talk.command("/run 1")
    assert "back to you: 1 cycle(s) ran" in out.getvalue()
    assert len([r for r in talk.deps.store.candidates() if r.id.startswith("c000-")]) == 2
    assert not talk.deps.stop.is_set()  # the session goes on


def test_the_command_refuses_what_it_cannot_do(tmp_path, capsys):
    from deltanas.agent.cli import main

    # Not a terminal: said at once, and no run directory is made.
    assert main(["chat", str(tmp_path / "new"), "--llm", "mutate"]) == 2
    assert "interactive: run it in a terminal" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # An existing run keeps its config: options that would change it are refused by name.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.toml").write_text('name = "old"\n')
    assert main(["chat", str(tmp_path / "old"), "--llm", "mutate", "--proposals", "3"]) == 2
    assert "drop llm.spec, search.candidates" in capsys.readouterr().err
