"""The terminal side of search.review (agent/run/review_prompt.py): what a person is shown, and how
their keys become answers. Typed input is scripted here; tests/agent/test_review_tmux.py drives a
real terminal."""
from __future__ import annotations

import io

from rich.console import Console

from deltanas.agent.run.review_prompt import ask_all
from deltanas.tools.diff_write import make_diff
from deltanas.tools.zoo import get_baseline

LENET = get_baseline("lenet").source
MINE = LENET.replace("super().__init__()", "super().__init__()\n        self.extra = nn.Identity()", 1)


def _q(i: int, source: str = MINE) -> dict:
    return {"id": f"q{i}", "kind": "review", "candidate_id": f"c000-00{i}", "cycle": 0, "parent_id": "base-lenet",
            "parent_accuracy": 0.8363, "source": source, "parent_source": LENET, "diff": make_diff(LENET, source),
            "added": 1, "removed": 0, "similarity": 0.81, "nearest_id": "base-lenet", "attempts": 0, "error": None}


def _typed(*keys: str):
    it = iter(keys)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120, color_system=None), out


def test_each_key_gives_its_answer_and_the_candidate_is_shown():
    console, out = _console()
    edited = MINE.replace("nn.Identity()", "nn.Dropout(p=0.1)")
    answers, go_on = ask_all(console, [_q(1), _q(2), _q(3), _q(4), _q(5)], allow_train_changes=False,
                             read=_typed("", "what", "y", "n", "too big", "s", "e", "dropout instead",
                                         "r", " ", "r", "fewer channels"),
                             edit=lambda src: edited)
    text = out.getvalue()
    assert "c000-001" in text and "83.63%" in text and "+1 -0 lines" in text and "similarity 0.810" in text
    assert "+        self.extra = nn.Identity()" in text  # the diff itself
    assert "an answer is needed" in text and "answer y, n, r, e, s or q" in text
    assert answers == {"q1": {"verdict": "yes"}, "q2": {"verdict": "no", "reason": "too big"},
                       "q4": {"verdict": "edit", "source": edited, "reason": "dropout instead"},
                       "q5": {"verdict": "revise", "reason": "fewer channels"}}
    assert "a revision needs feedback" in text
    assert go_on


def test_a_refused_edit_is_said_at_once_and_asked_again():
    console, out = _console()
    edits = iter(["def broken(:\n", None, MINE.replace("nn.Identity()", "nn.ReLU()")])
    answers, _ = ask_all(console, [_q(1)], allow_train_changes=False, read=_typed("e", "e", "e", ""),
                         edit=lambda src: next(edits))
    text = out.getvalue()
    assert "the edit was refused" in text and "the editor did not finish cleanly" in text
    assert answers["q1"]["verdict"] == "edit" and "nn.ReLU()" in answers["q1"]["source"]


def test_quit_ctrl_d_and_ctrl_c_stop_asking_and_keep_the_answers_given():
    console, _ = _console()
    assert ask_all(console, [_q(1), _q(2)], allow_train_changes=False, read=_typed("y", "q")) == (
        {"q1": {"verdict": "yes"}}, False)
    assert ask_all(console, [_q(1), _q(2)], allow_train_changes=False, read=_typed()) == ({}, False)  # Ctrl-D

    def ctrl_c(prompt):
        raise KeyboardInterrupt
    assert ask_all(console, [_q(1)], allow_train_changes=False, read=ctrl_c) == ({}, False)
    # Everything skipped: asking again now would show the same questions, so the session pauses.
    assert ask_all(console, [_q(1), _q(2)], allow_train_changes=False, read=_typed("s", "s")) == ({}, False)


def test_a_shown_error_is_the_graphs_reason_for_asking_again():
    console, out = _console()
    q = {**_q(1), "error": "the verdict must be one of yes, no, edit, not '[/maybe]' (x[0])"}
    ask_all(console, [q], allow_train_changes=False, read=_typed("y"))  # brackets are text, not markup
    assert "the last answer was refused" in out.getvalue() and "'[/maybe]' (x[0])" in out.getvalue()


def test_answers_given_before_a_kill_are_not_asked_again(tmp_path):
    from deltanas.agent.run.review_prompt import AnswerBook

    console, out = _console()
    book = AnswerBook(tmp_path / "review-answers.json")
    answers, go_on = ask_all(console, [_q(1), _q(2)], allow_train_changes=False, read=_typed("y"), book=book)
    assert (answers, go_on) == ({"q1": {"verdict": "yes"}}, False)  # Ctrl-D at the second: the session ends
    assert book.load() == {"q1": {"verdict": "yes"}}  # saved as it was given
    console, out = _console()  # the next session: q1 is answered already, q2 is asked
    answers, _ = ask_all(console, [_q(1), _q(2)], allow_train_changes=False, read=_typed("n", ""), book=book)
    assert answers == {"q1": {"verdict": "yes"}, "q2": {"verdict": "no", "reason": ""}}
    assert "c000-001" not in out.getvalue() and "c000-002" in out.getvalue()
    (tmp_path / "review-answers.json").write_text("{not json")  # a damaged file is an empty book
    assert book.load() == {}
