"""Asking a person in the terminal about the candidates a `--review` run holds back.

Each question (agent/loop/review.py) is shown as its diff, coloured, with its size, its
novelty and its parent's accuracy. The answers: `y` trains it, `n` rejects it (a reason may
follow), `r` sends feedback to the model, whose revised diff is asked about next, `e` opens the patched model.py in $EDITOR (or $VISUAL, else vi) and trains the
saved version, `s` leaves it for later, `q` stops asking (the answers given so far still
count). An edit is checked here as the graph will check it, so a refused one is said at once
and asked again. End of input
(Ctrl-D) and Ctrl-C stop asking too: the questions stay in the checkpoint, and
`deltanas run --resume` asks them again. Each answer is saved in the run directory as it is
given (`AnswerBook`), so a session killed between two questions does not ask the first again.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

from deltanas.agent.loop.review import check_edit

Read = Callable[[str], str]
Edit = Callable[[str], str | None]
CHOICES = ("[y]es train it, [n]o, [r]evise with feedback, [e]dit in $EDITOR, [s]kip for now, "
           "[q]uit (the questions wait) > ")


def open_editor(source: str) -> str | None:
    """The text after the person saved and closed their editor on `source`; None if the
    editor failed to start or exited with an error."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory(prefix="deltanas-edit-") as tmp:
        path = Path(tmp) / "model.py"
        path.write_text(source)
        try:
            done = subprocess.run([*shlex.split(editor), str(path)])
        except OSError:
            return None
        return path.read_text() if done.returncode == 0 else None


def show(console: Console, q: dict[str, Any], n: int, total: int) -> None:
    acc = q.get("parent_accuracy")
    sim = q.get("similarity")
    console.rule(f"[b]{n}/{total}[/] candidate {escape(str(q['candidate_id']))} (cycle {q['cycle']})")
    console.print(f"parent {escape(str(q['parent_id']))}" + (f" at {100 * acc:.2f}%" if acc is not None else "")
                  + f"; +{q.get('added') or 0} -{q.get('removed') or 0} lines"
                  + (f"; similarity {sim:.3f} to {escape(str(q.get('nearest_id')))}" if sim is not None else "")
                  + (f"; after {q['attempts']} repair(s)" if q.get("attempts") else ""))
    console.print(Syntax(q.get("diff") or "(no diff)", "diff", theme="ansi_dark", word_wrap=True))
    if q.get("error"):
        console.print(f"[red]the last answer was refused:[/] {escape(q['error'])}")


def ask_one(console: Console, q: dict[str, Any], read: Read, edit: Edit,
            allow_train_changes: bool) -> dict[str, str] | str:
    """The answer to one question, or "skip" / "quit"."""
    while True:
        choice = read(CHOICES).strip().lower()
        if choice in ("y", "yes"):
            return {"verdict": "yes"}
        if choice in ("n", "no"):
            return {"verdict": "no", "reason": read("why not? (optional) > ").strip()}
        if choice in ("r", "revise"):
            if not q.get("can_revise", True):
                console.print("[yellow]this one was revised as often as it may be[/]")
                continue
            feedback = read("feedback for the model > ").strip()
            if feedback:
                return {"verdict": "revise", "reason": feedback}
            console.print("[yellow]a revision needs feedback: say what to change[/]")
            continue
        if choice in ("s", "skip"):
            return "skip"
        if choice in ("q", "quit"):
            return "quit"
        if choice in ("e", "edit"):
            new = edit(q["source"])
            if new is None:
                console.print("[red]the editor did not finish cleanly[/]; nothing changed")
                continue
            try:
                check_edit(q["parent_source"], new, allow_train_changes)
            except ValueError as e:
                console.print(f"[red]{escape(str(e))}[/]")
                continue
            return {"verdict": "edit", "source": new, "reason": read("what did you change? (optional) > ").strip()}
        console.print("[yellow]answer y, n, r, e, s or q[/]" if choice else "[yellow]an answer is needed[/]")


class AnswerBook:
    """The answers given and not yet handed to the graph, in a JSON file of the run directory,
    written whole after each one: a session killed between two questions keeps the first answer."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, str]]:
        try:
            got = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return got if isinstance(got, dict) else {}

    def save(self, answers: dict[str, dict[str, str]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(answers))
        os.replace(tmp, self.path)


def ask_all(console: Console, questions: list[dict[str, Any]], *, allow_train_changes: bool,
            read: Read = input, edit: Edit = open_editor,
            book: AnswerBook | None = None) -> tuple[dict[str, dict[str, str]], bool]:
    """(answers keyed by question id, whether to go on asking after the run acts on them). A
    question answered in `book` (before a kill) is not asked again. A quit still returns the
    answers given before it: those candidates go on, the rest wait."""
    answers = {k: v for k, v in (book.load() if book else {}).items() if k in {q["id"] for q in questions}}
    todo = [q for q in questions if q["id"] not in answers]
    for n, q in enumerate(todo, 1):
        show(console, q, n, len(todo))
        try:
            got = ask_one(console, q, read, edit, allow_train_changes)
        except (EOFError, KeyboardInterrupt):
            console.print()
            got = "quit"
        if got == "quit":
            return answers, False
        if got != "skip":
            answers[q["id"]] = got
            if book:
                book.save(answers)
    return answers, bool(answers)  # all skipped: asking again now would show the same questions
