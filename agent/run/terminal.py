"""One `deltanas run` in the terminal: build the run's parts, show it live, handle Ctrl-C."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from deltanas.agent.config import Config
from deltanas.agent.run.build import build_deps
from deltanas.agent.run.driver import run_with_signals, sqlite_saver
from deltanas.agent.run.progress import LiveView, candidates_table, print_status, summarise
from deltanas.agent.run.review_prompt import AnswerBook, ask_all
from deltanas.agent.run.rundir import REVIEW_ANSWERS_FILE


def run_session(cfg: Config, run_dir: Path, *, plain: bool, dataset=None) -> int:
    console = Console()
    console.print(f"[b]deltanas[/] run [b]{cfg.name}[/] in {run_dir}: {cfg.search.cycles} cycle(s) × "
                  f"{cfg.search.candidates} candidate(s), llm {cfg.llm.spec}, dataset {cfg.data.dataset}"
                  + (f" (a {cfg.data.limit_train}-image training subset: data.limit_train)" if cfg.data.limit_train
                     else "") + f", mode {cfg.search.mode}")
    t0 = time.perf_counter()
    console.print("loading the dataset, the sandbox and the model …")
    deps = build_deps(cfg, run_dir, dataset=dataset)
    console.print(f"ready in {time.perf_counter() - t0:.1f}s; sandbox: {deps.executor.isolation()}")
    try:
        saver = sqlite_saver(deps)
    except Exception:
        deps.executor.close()
        raise
    view = LiveView(cfg, deps.store)
    seen: set[str] = set()

    def print_new() -> None:
        new = [r for r in deps.store.candidates() if r.final and r.id not in seen]
        if new:
            seen.update(r.id for r in new)
            console.print(candidates_table(new, title=""))

    def drain_msg() -> None:
        view.message = "stopping: finishing the candidates in flight (Ctrl-C again to kill them now)"
        if plain:
            console.print(view.message)

    def kill_msg() -> None:
        view.message = "stopping now: generation cancelled, sandboxes killed; a resume redoes what they were doing"
        if plain:
            console.print(view.message)

    def drive(answers=None):
        if plain:
            out = run_with_signals(deps, saver, tick=print_new, on_drain=drain_msg, on_kill=kill_msg, period_s=1.0,
                                   answers=answers)
            print_new()
            return out
        with Live(view.frame(), console=console, refresh_per_second=2, transient=False) as live:
            out = run_with_signals(deps, saver, tick=lambda: live.update(view.frame()), on_drain=drain_msg,
                                   on_kill=kill_msg, answers=answers)
            live.update(view.frame())
            return out

    try:
        outcome = drive()
        book = AnswerBook(run_dir / REVIEW_ANSWERS_FILE)
        while outcome.status == "waiting" and not deps.stop.is_set():  # search.review: ask, then go on
            answers, go_on = ask_all(console, outcome.questions, allow_train_changes=cfg.search.allow_train_changes,
                                     book=book)
            if not answers:
                break
            outcome = drive(answers)  # the checkpoint holds the answers from here on
            book.save({})
            if not go_on:
                break
    finally:
        deps.close()
    print_status(console, deps.store, summarise(deps.store))
    took = time.perf_counter() - t0
    if outcome.status == "finished":
        console.print(f"[green]finished[/] in {took:.0f}s. Archive: {run_dir / 'archive.sqlite'}; "
                      f"trajectories: {run_dir / 'trajectories.jsonl'}")
        return 0
    if outcome.status == "stopped":
        console.print(f"[yellow]stopped[/] after {took:.0f}s; everything finished is saved. "
                      f"Continue with: deltanas run --resume {run_dir}")
        if outcome.stuck:  # Python would wait at exit for threads that did not end when killed
            console.print("[yellow]some work did not end when killed; exiting without it[/]")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    if outcome.status == "waiting":
        console.print(f"[yellow]paused[/] after {took:.0f}s: {len(outcome.questions)} candidate(s) wait for review; "
                      f"everything else is saved. Answer them with: deltanas run --resume {run_dir}")
        return 130
    console.print(f"[red]the run failed[/]: {type(outcome.error).__name__}: {outcome.error}\n"
                  f"The archive is intact; after fixing the cause, continue with: deltanas run --resume {run_dir}")
    return 1
