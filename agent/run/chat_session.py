"""`deltanas chat`: a person and the model search together, in the terminal.

The person types what to try, in plain words ("make lenet half the parameters"). The model
proposes `search.candidates` diffs against the parent the request names (`@ID` or a candidate's
id in the text), else the one `/parent ID` set, else a baseline the text names, else the best so far.
Each proposal is shown coloured, with its size, its novelty and its parent's accuracy, and the
person answers: `y` trains it (in the background: the prompt stays free, and the result is
printed when it is ready), `n` rejects it with an optional reason, `r` sends feedback to the
model for a revised diff, `e` opens it in $EDITOR and trains the saved version. Slash commands
work at every prompt; `/help` lists them.

The session is the chat graph (agent/loop/chat.py) on the run's SQLite checkpoint: every
answer is committed to it as it is given, so a session killed anywhere, a question waiting or
a training in flight, resumes with `deltanas chat RUN_DIR` at the same question, and what was
accepted but not trained trains then. Line editing and history (run_dir/chat-history) come
from prompt_toolkit.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

from deltanas.agent.archive import CandidateRow
from deltanas.agent.config import Config
from deltanas.agent.loop.chat import MAX_REQUEST_CHARS, best, loop_cycle
from deltanas.agent.loop.cycle_nodes import baseline_id, baseline_ids, is_chat
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.review import MAX_REASON_CHARS, check_edit
from deltanas.agent.run.driver import RunOutcome, run_chat, run_with_signals
from deltanas.agent.run.progress import candidates_table, print_status, summarise
from deltanas.agent.run.review_prompt import open_editor, show
from deltanas.agent.run.trainer import Trainer
from deltanas.tools.diff_write import make_diff

Read = Callable[[str], str]
HISTORY_FILE = "chat-history"
CHOICES = "[y]es train it, [n]o, [r]evise with feedback, [e]dit in $EDITOR, or a /command > "
MAX_RUN_CYCLES = 100
MIN_REQUEST_CHARS = 3  # "y" or "n" typed after the last question was answered is no request
HELP = """\
Type what to try, in plain words, e.g. "make lenet half the parameters" or "@h000-01 add dropout".
The parent is the candidate named with @ID (or its id in the text), else the one set with /parent,
else a baseline the text names, else the best so far. The model proposes; for each proposal answer
  y  train it (in the background; the result shows when ready)   n  reject it (a reason may follow)
  r  ask the model for a revision, with your feedback            e  edit it in $EDITOR, then train it
Commands:
  /status         the run so far, and what is training
  /best [N]       the N best candidates (5)
  /show ID        a candidate: its status, accuracy, parent and diff
  /diff ID [ID2]  ID's diff against its parent, or against ID2
  /parent [ID]    start the next requests from ID (no ID: the best so far)
  /run N          hand N autonomous cycles to the loop, then take back control (Ctrl-C ends them early)
  /export         write the trajectories, human-labelled ones marked, to RUN_DIR/export/
  /help           this text
  /quit           leave (Ctrl-D too); the session resumes with `deltanas chat RUN_DIR`"""


class Quit(Exception):
    """The person leaves the session."""


class ChatSession:
    def __init__(self, cfg: Config, run_dir: Path, deps: Deps, saver, console: Console, read: Read,
                 edit: Callable[[str], str | None] = open_editor):
        self.cfg, self.run_dir, self.deps, self.saver = cfg, Path(run_dir), deps, saver
        self.console, self.read, self.edit = console, read, edit
        self.parent: str | None = None
        self.shown: set[str] = {r.id for r in deps.store.candidates() if r.final}
        self._print_lock = threading.Lock()
        self.trainer = Trainer(deps, self._trained, workers=cfg.sandbox.workers)

    # -- the session's loop --------------------------------------------------------------------

    def run(self) -> int:
        self.say("[b]deltanas chat[/]: type what to try, or /help. The session is saved as you go.")
        todo = [cid for ids in baseline_ids(self.deps).values() for cid in ids
                if (row := self.deps.store.get(cid)) is None or not row.final]
        if todo:  # a new session trains its starting points first: say so, it takes a while on a CPU
            self.say(f"[dim]training the baselines first ({escape(', '.join(todo))}) …[/]")
        outcome = self._step(None)
        while True:
            if outcome.status == "failed":
                self.say(f"[red]the session failed[/]: {escape(type(outcome.error).__name__)}: "
                         f"{escape(str(outcome.error))}\nEverything answered is saved; continue with: "
                         f"deltanas chat {escape(str(self.run_dir))}")
                self._leave(wait=False)
                return 1
            if outcome.status != "waiting":
                self.say(f"[yellow]stopped[/]; continue with: deltanas chat {escape(str(self.run_dir))}")
                self._leave(wait=False)
                return 130
            reviews = sorted((q for q in outcome.questions if q["kind"] == "review"),
                             key=lambda q: q["candidate_id"])
            try:
                if reviews:
                    q = reviews[0]
                    answer = self.review(q, len(reviews))
                else:
                    q = next(q for q in outcome.questions if q["kind"] == "request")
                    answer = self.request(q)
            except Quit:
                return self._leave(wait=True)
            outcome = self._step({q["id"]: answer})

    def _step(self, answers: dict[str, Any] | None) -> RunOutcome:
        """The graph, up to its next questions; then the trainer takes what was accepted."""
        if answers and any(a.get("verdict") == "revise" or "text" in a for a in answers.values()):
            self.say("[dim]asking the model …[/]")
        outcome = run_with_signals(self.deps, self.saver, answers=answers, run=run_chat)
        for cid in self.trainer.sweep():
            self.say(f"[cyan]{cid}[/] is training in the background")
        self._show_finished()
        return outcome

    def _show_finished(self) -> None:
        new = [r for r in self.deps.store.candidates()
               if r.final and r.id not in self.shown and is_chat(r.id) and r.status not in ("ok",)]
        for r in new:
            self.shown.add(r.id)
            why = f": {r.error_message}" if r.error_message else ""
            self.say(f"[yellow]{r.id}[/] {r.status}{escape(why[:300])}")

    def _trained(self, row: CandidateRow | None, error: BaseException | None) -> None:
        """From a trainer thread: the result, printed above the prompt."""
        if row is None:
            return
        self.shown.add(row.id)
        if error is not None:
            self.say(f"[red]{row.id} could not be trained[/]: {escape(str(error))}; it stays queued")
            return
        parent = self.deps.store.get(row.parent_id) if row.parent_id else None
        if row.status == "ok":
            delta = ""
            if parent and parent.accuracy is not None:
                delta = f" (parent {parent.id} {100 * parent.accuracy:.2f}%, {100 * (row.accuracy - parent.accuracy):+.2f})"
            self.say(f"[green]trained[/] [b]{row.id}[/]: {100 * row.accuracy:.2f}%{delta}")
        else:
            self.say(f"[yellow]{row.id}[/] did not train: {row.status}"
                     + escape(f" ({row.error_message[:300]})" if row.error_message else ""))

    def say(self, text: str) -> None:
        with self._print_lock:
            self.console.print(text)

    def _leave(self, wait: bool) -> int:
        pending = self.trainer.pending
        if pending and wait:
            self.say(f"waiting for {len(pending)} training(s) to finish (Ctrl-C leaves now; they train next session)")
            try:
                self.trainer.close()
            except KeyboardInterrupt:
                self.deps.kill()
        else:
            self.deps.stop.set()
            self.trainer.close(timeout=5)
        self.say(f"saved. Continue with: deltanas chat {escape(str(self.run_dir))}")
        return 0

    # -- reading the person --------------------------------------------------------------------

    def _line(self, prompt: str, on_interrupt: str) -> str:
        """One line; Ctrl-D is Quit, Ctrl-C says `on_interrupt` and reads again."""
        while True:
            try:
                return self.read(prompt)
            except EOFError:
                raise Quit from None
            except KeyboardInterrupt:
                self.say(f"[dim]{on_interrupt}[/]")

    def request(self, q: dict[str, Any]) -> dict[str, Any]:
        if q.get("error"):
            self.say(f"[red]{escape(q['error'])}[/]")
        while True:
            where = self.parent or "the best so far"
            line = self._line(f"deltanas ({where}) > ", "(the line was dropped; /quit or Ctrl-D leaves)").strip()
            if not line:
                self.say("type what to try, or /help")
                continue
            if line.startswith("/"):
                self.command(line)
                continue
            if len(line) < MIN_REQUEST_CHARS:
                self.say(f"[yellow]no proposal is waiting for {escape(line)!r}; type what to try, in words[/]")
                continue
            if len(line) > MAX_REQUEST_CHARS:
                self.say(f"[red]that is {len(line)} characters; a request is at most {MAX_REQUEST_CHARS}[/]")
                continue
            return {"text": line, "parent_id": self.parent_for(line)}

    def parent_for(self, line: str) -> str | None:
        """The parent a request names: @ID or a trained candidate's id in its words, else the one
        /parent set, else a baseline named in its words ("make lenet wider"), else in a pool run the
        best on the dataset named in its words (the pool's first where none is); None: the best."""
        store, datasets = self.deps.store, list(self.deps.datasets)
        for word in re.findall(r"@([\w.-]+)", line):
            return word  # the graph refuses an unknown one, with the reason
        words = re.findall(r"[\w.-]+", line)
        trained = [w for w in words if (row := store.get(w)) is not None and row.status == "ok"]
        if trained:
            return trained[0]
        if self.parent:
            return self.parent
        on = next((w for w in words if w in datasets), datasets[0])
        ids = [baseline_id(w, on, len(datasets) > 1) for w in words]
        named = [i for i in ids if (row := store.get(i)) is not None and row.status == "ok"]
        if named:
            return named[0]
        top = best(self.deps, on) if len(datasets) > 1 else None
        return top.id if top else None

    def review(self, q: dict[str, Any], waiting: int) -> dict[str, Any]:
        show(self.console, q, 1, waiting)
        if q.get("unchanged"):  # a small model may not follow the feedback: say so rather than look stuck
            self.say("[yellow]the model's revision is the same diff as before; r again with other words, e to "
                     "edit it yourself, or y/n[/]")
        parent = self.deps.store.get(q["parent_id"])
        self.say(f"[dim]proposal for: {escape(self._request_of(q))}; parent {escape(q['parent_id'])}"
                 + (f" {100 * parent.accuracy:.2f}%" if parent and parent.accuracy is not None else "") + "[/]")
        hint = "(the question waits: answer it, or /quit; it is asked again next session)"
        while True:
            line = self._line(CHOICES, hint).strip()
            if line.startswith("/"):
                self.command(line)
                continue
            choice = line.lower()
            try:
                if choice in ("y", "yes", "t", "train"):
                    return {"verdict": "yes"}
                if choice in ("n", "no"):
                    return {"verdict": "no", "reason": self._text("why not? (optional) > ", MAX_REASON_CHARS)}
                if choice in ("r", "revise"):
                    if not q.get("can_revise", True):
                        self.say("[yellow]this one was revised as often as it may be: y, n or e[/]")
                        continue
                    feedback = self._text("feedback for the model > ", MAX_REASON_CHARS)
                    if not feedback:
                        self.say("[yellow]a revision needs feedback: say what to change[/]")
                        continue
                    return {"verdict": "revise", "reason": feedback}
                if choice in ("e", "edit"):
                    got = self._edited(q)
                    if got is not None:
                        return got
                    continue
            except KeyboardInterrupt:
                self.say("[dim](cancelled; the question waits)[/]")
                continue
            self.say("[yellow]answer y, n, r or e, or a /command[/]" if choice else "[yellow]an answer is needed[/]")

    def _text(self, prompt: str, limit: int) -> str:
        """Free text after a choice: Ctrl-C cancels the choice, Ctrl-D leaves."""
        try:
            text = self.read(prompt).strip()
        except EOFError:
            raise Quit from None
        if len(text) > limit:
            self.say(f"[yellow]kept the first {limit} of {len(text)} characters[/]")
        return text[:limit]

    def _edited(self, q: dict[str, Any]) -> dict[str, Any] | None:
        new = self.edit(q["source"])
        if new is None:
            self.say("[red]the editor did not finish cleanly[/]; nothing changed")
            return None
        try:
            check_edit(q["parent_source"], new, self.cfg.search.allow_train_changes)
        except ValueError as e:
            self.say(f"[red]{escape(str(e))}[/]")
            return None
        return {"verdict": "edit", "source": new, "reason": self._text("what did you change? (optional) > ",
                                                                         MAX_REASON_CHARS)}

    def _request_of(self, q: dict[str, Any]) -> str:
        msgs = self.deps.store.get_trajectory(q["candidate_id"]) or []
        first = next((m["content"] for m in msgs if m.get("role") == "user"), "")
        goal = re.search(r"^Goal: (.*)$", first, re.M)
        return goal.group(1).rstrip(".") if goal else "?"

    # -- commands ------------------------------------------------------------------------------

    def command(self, line: str) -> None:
        name, *args = line.split()
        name = name.lower()
        handlers = {"/help": self.cmd_help, "/status": self.cmd_status, "/best": self.cmd_best,
                    "/show": self.cmd_show, "/diff": self.cmd_diff, "/parent": self.cmd_parent,
                    "/run": self.cmd_run, "/export": self.cmd_export}
        if name in ("/quit", "/exit", "/q"):
            raise Quit
        handler = handlers.get(name)
        if handler is None:
            self.say(f"[yellow]unknown command {escape(name[:40])}[/]; /help lists them")
            return
        try:
            handler(args)
        except _Usage as e:
            self.say(f"[yellow]{escape(str(e))}[/]")

    def cmd_help(self, args: list[str]) -> None:
        self.console.print(HELP, markup=False, highlight=False)

    def cmd_status(self, args: list[str]) -> None:
        print_status(self.console, self.deps.store, summarise(self.deps.store))
        pending = self.trainer.pending
        top = best(self.deps)
        self.say(f"training now or next: {', '.join(pending) if pending else 'nothing'}; "
                 f"requests start from {escape(self.parent or 'the best so far')}"
                 + (f" ({top.id} {100 * top.accuracy:.2f}%)" if top and not self.parent else ""))

    def cmd_best(self, args: list[str]) -> None:
        """The N best, of each dataset in a pool run (accuracies are compared within a dataset)."""
        n = _count(args, default=5, most=100, what="/best N")
        trained = [r for r in self.deps.store.candidates(status="ok") if r.accuracy is not None]
        if not trained:
            self.say("nothing has trained yet")
            return
        pool = len(self.deps.datasets) > 1
        for d in self.deps.datasets:
            rows = sorted((r for r in trained if r.dataset == d), key=lambda r: -r.accuracy)[:n]
            if rows:
                self.console.print(candidates_table(rows, title=f"the {len(rows)} best" + (f" on {d}" if pool else "")))

    def _row(self, cid: str) -> CandidateRow:
        row = self.deps.store.get(cid.lstrip("@"))
        if row is None:
            raise _Usage(f"no candidate {cid!r}; /best lists some")
        return row

    def cmd_show(self, args: list[str]) -> None:
        if len(args) != 1:
            raise _Usage("usage: /show ID")
        r = self._row(args[0])
        acc = "—" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        self.say(f"[b]{r.id}[/] {r.status}; accuracy {acc}; parent {r.parent_id or '—'}; "
                 f"params {r.param_count or '—'}" + escape(f"; {r.error_message}" if r.error_message else ""))
        text, lexer = (r.diff, "diff") if r.diff else (r.source or "(no source)", "python")
        self.console.print(Syntax(text, lexer, theme="ansi_dark", word_wrap=True))

    def cmd_diff(self, args: list[str]) -> None:
        if len(args) not in (1, 2):
            raise _Usage("usage: /diff ID [ID2]")
        a = self._row(args[0])
        b = self._row(args[1]) if len(args) == 2 else (self.deps.store.get(a.parent_id) if a.parent_id else None)
        if b is None or not a.source or not b.source:
            raise _Usage(f"{a.id} has no source or no parent to compare with")
        diff = make_diff(b.source, a.source)
        self.say(f"{b.id} → {a.id}")
        self.console.print(Syntax(diff or "(the same source)", "diff", theme="ansi_dark", word_wrap=True))

    def cmd_parent(self, args: list[str]) -> None:
        if not args:
            self.parent = None
            self.say("requests start from the best so far")
            return
        r = self._row(args[0])
        if r.status != "ok":
            raise _Usage(f"{r.id} did not train ({r.status}); a parent must have trained")
        self.parent = r.id
        self.say(f"requests start from {r.id}" + (f" ({100 * r.accuracy:.2f}%)" if r.accuracy is not None else ""))

    def cmd_run(self, args: list[str]) -> None:
        n = _count(args, default=None, most=MAX_RUN_CYCLES, what="/run N")
        s = self.cfg.search
        start = loop_cycle(self.deps)
        cfg = self.cfg.model_copy(update={"search": s.model_copy(update={"cycles": start + n, "review": False})})
        deps = dataclasses.replace(self.deps, config=cfg, stop=threading.Event())
        self.say(f"running cycles {start}..{start + n - 1} on their own (Ctrl-C finishes the candidates in flight "
                 f"and comes back)")
        seen = {r.id for r in self.deps.store.candidates() if r.final}

        def tick() -> None:
            new = [r for r in self.deps.store.candidates() if r.final and r.id not in seen and not is_chat(r.id)]
            if new:
                seen.update(r.id for r in new)
                self.console.print(candidates_table(new, title=""))

        out = run_with_signals(deps, self.saver, tick=tick, period_s=1.0,
                               on_drain=lambda: self.say("finishing the candidates in flight …"))
        tick()
        if out.status == "failed":
            self.say(f"[red]the cycles failed[/]: {escape(str(out.error))}; the archive is intact")
        self.say(f"back to you: {loop_cycle(self.deps) - start} cycle(s) ran")

    def cmd_export(self, args: list[str]) -> None:
        from deltanas.agent.learning.examples import export_records, write_jsonl

        records = export_records(self.deps.store, rule=self.cfg.learn.rule, top_k=self.cfg.learn.top_k)
        path = self.run_dir / "export" / "trajectories.jsonl"
        write_jsonl(records, path)
        human = sum(1 for r in records if r["meta"].get("human"))
        self.say(f"{len(records)} trajectories ({human} human-labelled) written to {escape(str(path))}")


class _Usage(ValueError):
    """A command used wrongly: said to the person, and the prompt comes back."""


def _count(args: list[str], *, default: int | None, most: int, what: str) -> int:
    if not args:
        if default is None:
            raise _Usage(f"usage: {what}")
        return default
    try:
        n = int(args[0])
    except ValueError:
        n = 0
    if len(args) > 1 or not 1 <= n <= most:
        raise _Usage(f"usage: {what}, N from 1 to {most}")
    return n


def chat(cfg: Config, run_dir: Path, *, dataset=None) -> int:
    """The `deltanas chat` command in a terminal: build the run's parts, then the session."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.patch_stdout import patch_stdout

    from deltanas.agent.run.build import build_deps
    from deltanas.agent.run.driver import sqlite_saver

    console = Console()
    console.print(f"[b]deltanas chat[/] in {escape(str(run_dir))}: llm {escape(cfg.llm.spec)}, dataset "
                  f"{escape(cfg.data.dataset)}, {cfg.search.candidates} proposal(s) per request; loading …")
    deps = build_deps(cfg, run_dir, dataset=dataset)
    try:
        saver = sqlite_saver(deps)
        console.print(f"sandbox: {escape(deps.executor.isolation())}")
        session = PromptSession(history=FileHistory(str(run_dir / HISTORY_FILE)))
        with patch_stdout(raw=True):
            # under patch_stdout, rich cannot ask the terminal its width
            width = shutil.get_terminal_size().columns
            talk = ChatSession(cfg, run_dir, deps, saver, Console(force_terminal=True, width=width),
                               read=lambda text: session.prompt(text))
            return talk.run()
    finally:
        deps.close()
