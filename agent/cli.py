"""deltanas command line.

    deltanas run                          the offline CPU demo: SmolLM2 + MNIST + the zoo
    deltanas run --llm mutate --cycles 5  the no-LLM baseline
    deltanas run --resume runs/run        continue a stopped or killed run
    deltanas run --review                 ask before training each candidate: yes, no or your edit
    deltanas chat [RUN_DIR]               an interactive session: ask, review, revise, train
    deltanas status runs/run [--json]
    deltanas verify runs/run [--top K] [--sample M] [--epochs N] [--device D]   proxy fidelity
    deltanas export runs/run [--format jsonl|hf] [--output PATH] [--successful-only] [--cycle K]
    deltanas report runs/run [--output DIR] [--against runs/control]
    deltanas serve smollm2 --run runs/run [--python .venv-vllm/bin/python] [--port 8000]
    deltanas diff apply BASE.py DIFF [--output FILE] [--json]
    deltanas eval MODEL.py [--config FILE] [--dataset mnist] [--json]
    deltanas bootstrap [--pairs N] [--output DIR] [--from PATH ...] [--no-adapter]
    deltanas zoo list [--json] | deltanas zoo show NAME
    deltanas sandbox build [--mode auto|online|offline] | deltanas sandbox check [--json]

Heavy libraries (torch, transformers, langgraph) are imported inside commands, so
`deltanas --help` starts at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


def _positive_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return x


UNSAFE_HELP = ("with the process sandbox: run model-written code even where it gets no filesystem view of its own "
               "(no Docker, bubblewrap or Landlock here), so that it can read the test labels and your files; "
               "without it such a run is refused")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltanas", description="Delta-based neural architecture search driven by a "
                                "language model that proposes unified diffs to PyTorch networks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="start a search (or --resume one)",
                       description="Start a search on the embedded defaults (offline SmolLM2 + MNIST), "
                                   "or continue one with --resume.")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped")
    r.add_argument("--config", metavar="FILE", help="TOML config (see `deltanas run --print-config`)")
    r.add_argument("--llm", metavar="SPEC", help="hf:smollm2 | hf:PATH | openai:MODEL@URL | vllm:MODEL | mutate")
    r.add_argument("--dataset", help="mnist, cifar10, cifar100, svhn, imagenette, celeba-gender, synthetic, digits; several (a,b) search them as one pool")
    r.add_argument("--data-dir", metavar="DIR", help="where torchvision-format dataset files are")
    r.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on a fixed subset of N images")
    r.add_argument("--limit-test", type=_positive_int, metavar="N", help="score on a fixed subset of N images")
    r.add_argument("--cycles", type=_positive_int)
    r.add_argument("--candidates", type=_positive_int, help="candidates per cycle")
    r.add_argument("--mode", choices=["delta", "full"])
    r.add_argument("--baselines", metavar="A,B,..", help="zoo networks to start from")
    r.add_argument("--sandbox", choices=["auto", "docker", "process"])
    r.add_argument("--unsafe-no-isolation", action="store_true", default=None, help=UNSAFE_HELP)
    r.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="per-candidate wall-clock limit")
    r.add_argument("--device", help="proxy-training device: cpu, cuda, cuda:N")
    r.add_argument("--workers", type=_positive_int, help="candidates trained at once")
    r.add_argument("--executor", choices=["local", "ray"],
                   help="local sandbox slots, or one Ray actor per worker (one GPU each on cuda); needs deltanas[ray]")
    r.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster to join (default: a local Ray instance)")
    r.add_argument("--max-new-tokens", type=_positive_int)
    r.add_argument("--constrain", choices=["grammar", "prefix", "none"],
                   help="hold answers to a grammar of the diffs that apply (default), pre-fill the header, "
                        "or leave them free (the paper's protocol)")
    r.add_argument("--sites", choices=["sampled", "free"],
                   help="under the grammar: the search draws the layer lines each answer edits (default), "
                        "or the model chooses")
    r.add_argument("--layers", choices=["typed", "free"],
                   help="under the grammar: a line added inside an nn.Sequential is a layer that keeps the "
                        "shapes there (default), or any constructor call")
    r.add_argument("--seed", type=int)
    r.add_argument("--name", help="run name (default: run)")
    r.add_argument("--run-dir", metavar="DIR", help="default: runs/<name>")
    r.add_argument("--preset", choices=["paper", "quick"],
                   help="paper: the paper's protocol (22 x 50, its decoding and LoRA settings); quick: a CPU-sized "
                        "loop with a mutator cold start. --config and flags override it")
    r.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    r.add_argument("--plain", action="store_true", help="line-by-line output instead of the live view")
    r.add_argument("--review", action="store_true", default=None,
                   help="ask before training each novel candidate: yes, no (with a reason) or your own edit")

    c = sub.add_parser("chat", help="an interactive session: say what to try, review the model's diffs, train them",
                       description="An interactive search in the terminal, on the same graph, archive and sandbox "
                                   "as `run`. RUN_DIR is a new run (made with the options given) or an existing "
                                   "one (its config is kept); /help inside lists the commands.")
    c.add_argument("dir", nargs="?", metavar="RUN_DIR", help="default: a new runs/chat (runs/chat-2, ...)")
    c.add_argument("--config", metavar="FILE", help="TOML config, as for run")
    c.add_argument("--llm", metavar="SPEC", help="as for run (default: the offline SmolLM2)")
    c.add_argument("--dataset")
    c.add_argument("--data-dir", metavar="DIR")
    c.add_argument("--limit-train", type=_positive_int, metavar="N")
    c.add_argument("--limit-test", type=_positive_int, metavar="N")
    c.add_argument("--baselines", metavar="A,B,..")
    c.add_argument("--proposals", type=_positive_int, metavar="N", help="proposals per request (search.candidates)")
    c.add_argument("--mode", choices=["delta", "full"])
    c.add_argument("--constrain", choices=["grammar", "prefix", "none"])
    c.add_argument("--sandbox", choices=["auto", "docker", "process"])
    c.add_argument("--unsafe-no-isolation", action="store_true", default=None, help=UNSAFE_HELP)
    c.add_argument("--timeout", type=_positive_float, metavar="SECONDS")
    c.add_argument("--device")
    c.add_argument("--workers", type=_positive_int, help="candidates trained at once")
    c.add_argument("--seed", type=int)
    c.add_argument("--name")
    c.add_argument("--preset", choices=["paper", "quick"])

    v = sub.add_parser("verify", help="retrain the best candidates and a sample of the rest for N epochs: does the "
                                      "one-epoch proxy rank them as longer training does?",
                       description="Retrains the top-K candidates by proxy accuracy and a stratified sample of M of "
                                   "the rest for N epochs, through the run's own sandbox and executor, and reports "
                                   "Spearman's rho and Kendall's tau with 95%% bootstrap intervals and how many of the "
                                   "proxy's top-K stay in the top-K. Results are stored in the archive as they come: "
                                   "run it again to resume.")
    v.add_argument("dir")
    v.add_argument("--top", type=_positive_int, default=5, metavar="K")
    v.add_argument("--sample", type=int, default=10, metavar="M", help="from the rest, one per accuracy band (0: none)")
    v.add_argument("--epochs", type=_positive_int, default=5, metavar="N")
    v.add_argument("--device", help="cpu, cuda, cuda:N (default: the run's)")
    v.add_argument("--workers", type=_positive_int, help="candidates retrained at once (default: the run's)")
    v.add_argument("--executor", choices=["local", "ray"], help="default: the run's")
    v.add_argument("--seed", type=int, default=0, help="draws the sample")
    v.add_argument("--unsafe-no-isolation", action="store_true", default=None, help=UNSAFE_HELP)
    v.add_argument("--json", action="store_true", help="the summary as JSON on stdout")

    s = sub.add_parser("status", help="summarise a run, finished or not")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--tree", type=int, nargs="?", const=5, metavar="N",
                   help="also the lineage in text: the paths from the baselines to the N best (5)")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                   help="redraw the summary and the lineage every SECONDS (2) until Ctrl-C")

    x = sub.add_parser("export", help="write a run's trajectories for fine-tuning (TRL/OpenAI messages + tools)")
    x.add_argument("dir")
    x.add_argument("--format", choices=["jsonl", "hf"], default="jsonl",
                   help="JSONL, or a Hugging Face datasets folder (datasets.load_from_disk)")
    x.add_argument("--output", help="default: DIR/export/trajectories.jsonl or DIR/export/hf")
    x.add_argument("--successful-only", action="store_true", help="only those passing the run's success rule")
    x.add_argument("--rule", choices=["improved", "valid", "top_k"], help="the success rule (default: the run's)")
    x.add_argument("--cycle", type=int, help="one cycle only")

    rp = sub.add_parser("report", help="per-cycle metrics from the archive: PNG plots and a markdown summary")
    rp.add_argument("dir")
    rp.add_argument("--output", help="default: DIR/report")
    rp.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    rp.add_argument("--against", action="append", default=[], metavar="DIR",
                    help="another run to draw beside this one (a control without learning; repeatable): "
                         "compare.png and a table in summary.md")
    rp.add_argument("--html", action="store_true",
                    help="also report.html: one self-contained page (opens offline) with the lineage tree, each "
                         "candidate's diff on a click, filters, the per-cycle curves and verify's results")

    sv = sub.add_parser("serve", help="a vLLM OpenAI-compatible server for a model and a run's LoRA adapters",
                        description="Start `vllm serve` with LoRA and runtime adapter loading on, for MODEL (an "
                                    "alias, a .gguf file or a folder; GGUF files are converted once to a folder) and "
                                    "the finished adapters of a run. Point a run at it with the printed --llm spec.")
    sv.add_argument("model", metavar="MODEL")
    sv.add_argument("--run", metavar="DIR", help="load this run's adapters (adapters/cycle-<k>) at start")
    sv.add_argument("--python", metavar="PATH", help="the Python of an environment with vLLM "
                    "(default: $DELTANAS_VLLM_PYTHON, else this one)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--max-lora-rank", type=_positive_int, default=32)
    sv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    sv.add_argument("--max-model-len", type=_positive_int)
    sv.add_argument("--seed", type=int, default=0, help="the engine's sampling seed")
    sv.add_argument("--print-command", action="store_true", help="print the server command and exit")
    sv.set_defaults(vllm_args=[])  # what follows `--` goes to vllm serve as it is (split off in main)

    d = sub.add_parser("diff", help="diff tools")
    dsub = d.add_subparsers(dest="diff_command", required=True, metavar="SUBCOMMAND")
    da = dsub.add_parser("apply", help="apply a model-written diff to a file, exactly as the loop does")
    da.add_argument("base", metavar="BASE")
    da.add_argument("diff", metavar="DIFF", help="the diff or raw model text; - for stdin")
    da.add_argument("--output", "-o", metavar="FILE")
    da.add_argument("--json", action="store_true")
    da.add_argument("--allow-train-changes", action="store_true")
    da.add_argument("--full", action="store_true", help="DIFF is a whole new file (full-generation mode)")

    e = sub.add_parser("eval", help="proxy-train one model file as the loop would",
                       description="Proxy-train one model file with the job settings a run gets from its config "
                                   "(the defaults, or --config FILE, e.g. a run's config.toml); the flags override.")
    e.add_argument("model", metavar="MODEL.py")
    e.add_argument("--config", metavar="FILE", help="TOML config whose [train], [sandbox] and [data] apply")
    e.add_argument("--dataset")
    e.add_argument("--data-dir", metavar="DIR")
    e.add_argument("--timeout", type=_positive_float, metavar="SECONDS")
    e.add_argument("--epochs", type=_positive_int)
    e.add_argument("--device")
    e.add_argument("--sandbox", choices=["auto", "docker", "process"])
    e.add_argument("--unsafe-no-isolation", action="store_true", help=UNSAFE_HELP)
    e.add_argument("--limit-train", type=_positive_int)
    e.add_argument("--json", action="store_true")

    sb = sub.add_parser("sandbox", help="the sandbox candidates run in")
    sbsub = sb.add_subparsers(dest="sandbox_command", required=True, metavar="SUBCOMMAND")
    sbb = sbsub.add_parser("build", help="build the Docker image (online from sandbox/Dockerfile, or offline)")
    sbb.add_argument("--mode", choices=["auto", "online", "offline"], default="auto",
                     help="auto tries the registry first, then builds from local parts")
    sbb.add_argument("--tag", default="deltanas-sandbox:base")
    sbc = sbsub.add_parser("check", help="say which sandbox and which isolation are in force, and why")
    sbc.add_argument("--sandbox", choices=["auto", "docker", "process"], default="auto")
    sbc.add_argument("--image", default="deltanas-sandbox:base")
    sbc.add_argument("--json", action="store_true")

    bs = sub.add_parser("bootstrap", help="make format-teaching pairs with the mutator, and train an adapter on them",
                        description="Write N mutator pairs (a zoo network or a variant, and a further variant that "
                                    "applies, compiles and runs forward) in the run's own prompt format, plus the "
                                    "improvement pairs of --from sources, to DIR/examples.jsonl; then train a LoRA "
                                    "adapter on them into DIR/adapter. Use DIR as a [learn] cold_start_from source. "
                                    "The same flags give the same folder; an interrupted one is finished.")
    bs.add_argument("--pairs", type=_positive_int, default=2000, help="mutator (format) pairs to make (default 2000)")
    bs.add_argument("--output", metavar="DIR", default="runs/bootstrap", help="default: runs/bootstrap")
    bs.add_argument("--from", dest="sources", action="append", default=[], metavar="PATH",
                    help="also take improvement pairs from a run, an archive or LEMUR data (repeatable)")
    bs.add_argument("--config", metavar="FILE", help="TOML config: its [llm], [search], [novelty] and [learn] apply")
    bs.add_argument("--llm", metavar="SPEC", help="the model the adapter is for (default: the config's, hf:smollm2)")
    bs.add_argument("--dataset", help="the dataset the prompts name (default mnist)")
    bs.add_argument("--baselines", metavar="A,B,..", help="zoo networks to mutate (default: the whole zoo)")
    bs.add_argument("--seed", type=int)
    bs.add_argument("--device", help="where the adapter trains: cpu, cuda, cuda:N (default: cuda if there is one)")
    bs.add_argument("--epochs", type=_positive_float)
    bs.add_argument("--lr", type=_positive_float)
    bs.add_argument("--batch-size", type=_positive_int)
    bs.add_argument("--grad-accum", type=_positive_int)
    bs.add_argument("--no-adapter", action="store_true", help="write the examples only")

    z = sub.add_parser("zoo", help="the embedded baseline networks")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="SUBCOMMAND")
    zl = zsub.add_parser("list", help="list the baselines with their parameter counts")
    zl.add_argument("--json", action="store_true")
    zs = zsub.add_parser("show", help="print a baseline's source")
    zs.add_argument("name")
    return p


def _run_overrides(a: argparse.Namespace) -> dict:
    return {
        "name": a.name, "llm.spec": a.llm, "data.dataset": a.dataset, "data.data_dir": a.data_dir,
        "data.limit_train": a.limit_train, "data.limit_test": a.limit_test, "search.cycles": a.cycles, "search.candidates": a.candidates, "search.mode": a.mode,
        "search.seed": a.seed, "sandbox.type": a.sandbox, "sandbox.timeout_s": a.timeout,
        "sandbox.device": a.device, "sandbox.workers": a.workers, "llm.max_new_tokens": a.max_new_tokens,
        "sandbox.executor": a.executor, "sandbox.ray_address": a.ray_address,
        "sandbox.unsafe_no_isolation": a.unsafe_no_isolation,
        "llm.constrain": a.constrain, "llm.sites": a.sites, "llm.layers": a.layers, "search.review": a.review,
        "baselines": [b.strip() for b in a.baselines.split(",") if b.strip()] if a.baselines else None,
    }


def cmd_run(a: argparse.Namespace) -> int:
    from deltanas.agent.config import dump_toml, load_config
    from deltanas.agent.run import rundir

    if a.resume:
        if a.config or a.run_dir:
            raise CLIError("--resume takes its config from the run directory; drop --config/--run-dir")
        # Where candidates train does not change what a run is: a resume may move it onto Ray, or
        # onto a machine without isolation (the archive records each session's).
        allowed = {"search.cycles": a.cycles, "sandbox.executor": a.executor, "sandbox.ray_address": a.ray_address,
                   "sandbox.unsafe_no_isolation": a.unsafe_no_isolation}
        other = {k: v for k, v in _run_overrides(a).items() if v is not None and k not in allowed}
        if a.preset:
            other["--preset"] = a.preset
        if other:
            raise CLIError(f"--resume can only extend --cycles (and pick --executor, --ray-address, "
                           f"--unsafe-no-isolation); these would change the run: {', '.join(other)}")
        run_dir = Path(a.resume)
        cfg = rundir.open_run_dir(run_dir, allowed)
    else:
        cfg = load_config(a.config, _run_overrides(a), preset=a.preset)
        run_dir = Path(a.run_dir) if a.run_dir else rundir.default_run_dir(cfg)
    if a.print_config:
        print(dump_toml(cfg), end="")
        return EXIT_OK
    if not a.resume and run_dir.exists():
        rundir.create_run_dir(run_dir, cfg, dry_run=True)  # refuse a used directory before slow checks
    if cfg.search.review and not sys.stdin.isatty():
        raise CLIError("this run asks before training each candidate (search.review), and standard input is not a "
                       "terminal to answer from; run it in a terminal")
    cfg, dataset = _preflight(cfg, new=not a.resume)
    if not a.resume:
        rundir.create_run_dir(run_dir, cfg)
    elif a.cycles:
        (run_dir / rundir.CONFIG_FILE).write_text(dump_toml(cfg))
    from deltanas.agent.run.terminal import run_session

    return run_session(cfg, run_dir, plain=a.plain or not sys.stdout.isatty(), dataset=dataset)


def _preflight(cfg, *, new: bool):
    """(the config, the datasets by name) once the machine's checks pass (agent/run/build.py). A new
    pool run goes on with the datasets found here, saying how to provide the missing ones."""
    from deltanas.agent.run.build import preflight

    if not new:
        return cfg, preflight(cfg)
    cfg, datasets, missing = preflight(cfg, new_pool=True)
    for line in missing:
        print(f"deltanas: missing from the pool: {line}", file=sys.stderr)
    if missing:
        print(f"deltanas: the pool runs on {cfg.data.dataset}", file=sys.stderr)
    return cfg, datasets


def cmd_chat(a: argparse.Namespace) -> int:
    from deltanas.agent.config import load_config
    from deltanas.agent.run import rundir

    overrides = {
        "name": a.name or (None if a.config else "chat"), "llm.spec": a.llm, "data.dataset": a.dataset,
        "data.data_dir": a.data_dir, "data.limit_train": a.limit_train, "data.limit_test": a.limit_test,
        "search.candidates": a.proposals,
        "search.mode": a.mode, "llm.constrain": a.constrain, "sandbox.type": a.sandbox, "sandbox.timeout_s": a.timeout,
        "sandbox.device": a.device, "sandbox.workers": a.workers, "search.seed": a.seed,
        "sandbox.unsafe_no_isolation": a.unsafe_no_isolation,
        "baselines": [b.strip() for b in a.baselines.split(",") if b.strip()] if a.baselines else None,
    }
    existing = a.dir and (Path(a.dir) / rundir.CONFIG_FILE).exists()
    if existing:
        allowed = {"sandbox.workers": a.workers, "sandbox.unsafe_no_isolation": a.unsafe_no_isolation}
        other = [k for k, v in overrides.items() if v is not None and k not in allowed and not (k == "name" and not a.name)]
        other += ["--config"] * bool(a.config) + ["--preset"] * bool(a.preset)
        if other:
            raise CLIError(f"{a.dir} holds a run, whose config stays as it is; drop {', '.join(other)}")
        cfg = rundir.open_run_dir(Path(a.dir), allowed)
        run_dir = Path(a.dir)
    else:
        cfg = load_config(a.config, overrides, preset=a.preset)
        run_dir = Path(a.dir) if a.dir else rundir.default_run_dir(cfg)
        rundir.create_run_dir(run_dir, cfg, dry_run=True)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CLIError("deltanas chat is interactive: run it in a terminal (`deltanas run` is the unattended search)")
    cfg, dataset = _preflight(cfg, new=not existing)
    if not existing:
        rundir.create_run_dir(run_dir, cfg)
    from deltanas.agent.run.chat_session import chat

    return chat(cfg, run_dir, dataset=dataset)


def cmd_verify(a: argparse.Namespace) -> int:
    from deltanas.agent.run import rundir
    from deltanas.agent.run.build import preflight
    from deltanas.agent.run.verify import describe, verify

    if a.sample < 0:
        raise CLIError("--sample must be 0 or more")
    run_dir = Path(a.dir)
    if not (run_dir / rundir.ARCHIVE_FILE).exists():
        raise CLIError(f"{run_dir}: no {rundir.ARCHIVE_FILE} here; is it a deltanas run directory?")
    cfg = rundir.open_run_dir(run_dir, {"sandbox.device": a.device, "sandbox.workers": a.workers,
                                        "sandbox.executor": a.executor,
                                        "sandbox.unsafe_no_isolation": a.unsafe_no_isolation})
    preflight(cfg)
    say = (lambda line: print(line, file=sys.stderr)) if a.json else print
    try:
        found = verify(cfg, run_dir, top=a.top, sample=a.sample, epochs=a.epochs, seed=a.seed, say=say)
    except KeyboardInterrupt:
        print("stopped; what finished is stored. Continue with the same command", file=sys.stderr)
        return EXIT_STOPPED
    if a.json:  # one summary for a run on one dataset, a list of them (one per dataset) for a pool
        print(json.dumps(found[0] if len(found) == 1 else found, indent=2))
    else:
        print("\n".join(describe(s) for s in found))
    return EXIT_OK


def cmd_status(a: argparse.Namespace) -> int:
    from rich.console import Console

    from deltanas.agent.archive import Store
    from deltanas.agent.run.progress import lineage_tree, print_status, status_view, summarise
    from deltanas.agent.run.rundir import ARCHIVE_FILE

    path = Path(a.dir)
    if not (path / ARCHIVE_FILE).exists():
        raise CLIError(f"{path}: no {ARCHIVE_FILE} here; is it a deltanas run directory?")
    store = Store(path / ARCHIVE_FILE, readonly=True)
    if a.json:
        print(json.dumps(summarise(store), indent=2))
        return EXIT_OK
    if a.watch is None:
        print_status(Console(), store, summarise(store))
        if a.tree:
            Console().print(lineage_tree(store, a.tree))
        return EXIT_OK
    import time

    from rich.console import Group
    from rich.live import Live

    def frame():
        return Group(status_view(store, summarise(store)), lineage_tree(store, a.tree or 5))

    try:
        with Live(frame(), refresh_per_second=1, screen=False) as live:
            while True:
                time.sleep(max(0.2, a.watch))
                live.update(frame())
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    from deltanas.agent.archive import Store
    from deltanas.agent.config import load_config
    from deltanas.agent.learning.examples import export_records, write_hf, write_jsonl
    from deltanas.agent.run.rundir import ARCHIVE_FILE

    path = Path(a.dir)
    if not (path / ARCHIVE_FILE).exists():
        raise CLIError(f"{path}: no {ARCHIVE_FILE} here; is it a deltanas run directory?")
    cfg = load_config(path / "config.toml" if (path / "config.toml").exists() else None, {})
    store = Store(path / ARCHIVE_FILE, readonly=True)
    records = export_records(store, successful_only=a.successful_only, rule=a.rule or cfg.learn.rule,
                             top_k=cfg.learn.top_k, cycle=a.cycle)
    default = path / "export" / ("trajectories.jsonl" if a.format == "jsonl" else "hf")
    out = Path(a.output) if a.output else default
    if a.format == "jsonl":
        write_jsonl(records, out)
    else:
        try:
            write_hf(records, out)
        except FileExistsError as e:
            raise CLIError(str(e)) from None
    print(f"{len(records)} trajectories written to {out}")
    return EXIT_OK


def cmd_report(a: argparse.Namespace) -> int:
    from rich.console import Console

    from deltanas.agent.archive import Store
    from deltanas.agent.run.report import print_table, write_report
    from deltanas.agent.run.rundir import ARCHIVE_FILE

    path = Path(a.dir)
    if not (path / ARCHIVE_FILE).exists():
        raise CLIError(f"{path}: no {ARCHIVE_FILE} here; is it a deltanas run directory?")
    against = {}
    for other in map(Path, a.against):
        if not (other / ARCHIVE_FILE).exists():
            raise CLIError(f"--against {other}: no {ARCHIVE_FILE} here; is it a deltanas run directory?")
        label = other.name if other.name not in against and other.name != path.name else str(other)
        against[label] = Store(other / ARCHIVE_FILE, readonly=True)
    store = Store(path / ARCHIVE_FILE, readonly=True)
    metrics, out = write_report(path, store, a.output, against=against)
    page = None
    if a.html:
        from deltanas.agent.run.html_report import write_html

        page = write_html(store, metrics, out / "report.html", title=path.name)
    if a.json:
        print(json.dumps(metrics, indent=2))
    else:
        print_table(Console(), metrics)
        extra = f", compare.png against {', '.join(against)}" if against else ""
        print(f"report written to {out}/ (summary.md and 4 plots{extra})" + (f"; open {page} in a browser" if page else ""))
    return EXIT_OK


def cmd_serve(a: argparse.Namespace) -> int:
    from deltanas.agent.llm import vllm_server
    try:
        p = vllm_server.plan(a.model, run_dir=Path(a.run) if a.run else None, python=a.python, host=a.host, port=a.port,
                       max_lora_rank=a.max_lora_rank, dtype=a.dtype, max_model_len=a.max_model_len,
                       seed=a.seed, extra=a.vllm_args)
    except (vllm_server.ServeError, ValueError) as e:
        raise CLIError(str(e)) from None
    if a.print_command:
        print(json.dumps({"argv": p.argv, "env": p.env, "llm": p.llm_spec, "adapters": p.adapters}, indent=2))
        return EXIT_OK
    names = ", ".join(n for n, _ in p.adapters) or "none"
    print(f"serving {a.model} at {p.url} (adapters: {names}); run with --llm {p.llm_spec}", flush=True)
    return vllm_server.serve_forever(p)


def _read_text(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{what} {p}: no such file")
    return p.read_text(encoding="utf-8", errors="replace")


def cmd_diff_apply(a: argparse.Namespace) -> int:
    from deltanas.tools.diff_apply import apply_model_output
    from deltanas.tools.full_extract import apply_full_output

    base = _read_text(a.base, "base file")
    text = _read_text(a.diff, "diff file")
    if a.full:
        res = apply_full_output(base, text, allow_train_changes=a.allow_train_changes)
    else:
        res = apply_model_output(base, text, target=Path(a.base).name, allow_train_changes=a.allow_train_changes)
    if res.ok and a.output:
        tmp = Path(a.output + ".tmp")
        tmp.write_text(res.source)
        tmp.replace(a.output)
    if a.json:
        print(json.dumps({**res.to_json(), "output": a.output if res.ok else None}, indent=2))
    elif res.ok:
        if getattr(res, "fuzzy", 0):
            print(f"deltanas: {res.fuzzy} hunk(s) placed with wrong context lines tolerated; the diff as applied:\n"
                  f"{res.corrected}", file=sys.stderr, end="")
        if not a.output:
            sys.stdout.write(res.source)
        else:
            print(f"applied: +{res.added} -{res.removed} in {res.hunks} hunk(s) -> {a.output}", file=sys.stderr)
    else:
        print(f"deltanas: {res.error.code.value}: {res.error.message}", file=sys.stderr)
        if res.error.hint:
            print(res.error.hint, file=sys.stderr)
    return EXIT_OK if res.ok else EXIT_FAIL


def eval_config(a: argparse.Namespace):
    """`deltanas eval`'s config: --config (or the defaults) under its flags."""
    from deltanas.agent.config import load_config

    return load_config(a.config, {"data.dataset": a.dataset, "data.data_dir": a.data_dir, "sandbox.type": a.sandbox,
                                  "sandbox.timeout_s": a.timeout, "sandbox.device": a.device,
                                  "data.limit_train": a.limit_train, "train.epochs": a.epochs})


def cmd_eval(a: argparse.Namespace) -> int:
    import tempfile

    from deltanas.agent.run import isolation
    from deltanas.agent.run.build import load_run_datasets, make_sandbox, run_targets
    from deltanas.sandbox.sizing import check_device
    from deltanas.tools.proxy import evaluate_source

    source = _read_text(a.model, "model file")
    cfg = eval_config(a)
    check_device(cfg.sandbox.device)
    with tempfile.TemporaryDirectory(prefix="deltanas-eval-") as tmp:
        sandbox = make_sandbox(cfg, Path(tmp))
        try:
            # Any file may be model-written: no trusted-code exemption here.
            missing = isolation.fs_isolation(sandbox)
            isolation.require(missing, model_code=True, opted_in=a.unsafe_no_isolation, config_key=False)
            if missing is not None:
                print(f"deltanas: warning: {a.model} runs without filesystem isolation ({missing}), as "
                      f"{isolation.OPT_IN_FLAG} asks", file=sys.stderr)
            outs = {name: evaluate_source(source, sandbox=sandbox, dataset=t.data, spec=t.spec,
                                          candidate_id=Path(a.model).stem)
                    for name, t in run_targets(cfg, load_run_datasets(cfg)).items()}  # each of a pool's datasets
        finally:
            sandbox.close()
    if a.json:
        found = [{"dataset": name, **out.to_json()} for name, out in outs.items()]
        print(json.dumps(found[0] if len(found) == 1 else found, indent=2))
    else:
        for name, out in outs.items():
            acc = "" if out.accuracy is None else f"  accuracy {100 * out.accuracy:.2f}%"
            params = "" if out.param_count is None else f"  params {out.param_count:,}"
            print(f"{a.model}: {out.status}{acc}{params}  ({out.total_seconds:.1f}s on {name})")
            if out.status != "ok":
                print(f"  {out.error}")
                if out.log_tail:
                    print("  log tail:\n    " + "\n    ".join(out.log_tail.strip().splitlines()[-8:]))
    return EXIT_OK if all(out.status == "ok" for out in outs.values()) else EXIT_FAIL


def cmd_sandbox(a: argparse.Namespace) -> int:
    from deltanas.sandbox.docker import DockerUnavailable
    from deltanas.sandbox.choose import check
    from deltanas.sandbox.image import ImageBuildError, build_image

    if a.sandbox_command == "build":
        try:
            tag, done = build_image(a.tag, a.mode)
        except (ImageBuildError, DockerUnavailable) as e:
            print(f"deltanas: sandbox build failed: {e}", file=sys.stderr)
            return EXIT_FAIL
        print(f"{tag}: {done}")
        return EXIT_OK
    info = check(a.sandbox, a.image)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"sandbox: {info['sandbox'] or 'none'}  ({info['reason']})")
        print(f"docker: {'available' if info['docker']['available'] else 'not available'}: {info['docker']['detail']}")
        print(f"image {info['image']['tag']}: {'present' if info['image']['present'] else 'missing'}")
        print(f"isolation: {info['isolation']}")
        for layer in info.get("layers") or ():
            print(f"  {layer['name']}: {'in force' if layer['in_force'] else 'NOT in force'}: {layer['why']}")
        if info["sandbox"] == "process" and info.get("layers") is not None:
            from deltanas.agent.run.isolation import FS_LAYERS, OPT_IN_FLAG

            fs = any(layer["in_force"] for layer in info["layers"] if layer["name"] in FS_LAYERS)
            print("model-written code: " + ("runs, each job in a filesystem view of its own" if fs else
                                            f"refused (no filesystem isolation) unless {OPT_IN_FLAG} is given"))
    return EXIT_OK if info["sandbox"] else EXIT_FAIL


def cmd_zoo(a: argparse.Namespace) -> int:
    from deltanas.tools.zoo import count_parameters, get_baseline, list_baselines

    if a.zoo_command == "show":
        try:
            sys.stdout.write(get_baseline(a.name).source)
        except KeyError as e:
            raise CLIError(str(e.args[0])) from None
        return EXIT_OK
    rows = [{"name": b.name, "family": b.family, "description": b.description,
             "params_mnist": count_parameters(b.source, (1, 28, 28), 10),
             "params_cifar10": count_parameters(b.source, (3, 32, 32), 10),
             "lines": b.source.count("\n")} for b in list_baselines()]
    if a.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    t = Table(title="baseline zoo")
    for col in ("name", "family", "params (1×28×28)", "params (3×32×32)", "lines", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["family"], f"{r['params_mnist']:,}", f"{r['params_cifar10']:,}", str(r["lines"]),
                  r["description"])
    Console().print(t)
    return EXIT_OK


def cmd_bootstrap(a: argparse.Namespace) -> int:
    from deltanas.agent.config import load_config
    from deltanas.agent.learning.bootstrap import run_bootstrap

    over = {"llm.spec": a.llm, "data.dataset": a.dataset, "search.seed": a.seed, "llm.device": a.device,
            "learn.epochs": a.epochs, "learn.lr": a.lr, "learn.batch_size": a.batch_size,
            "learn.grad_accum": a.grad_accum}
    cfg = load_config(a.config, over)  # an unknown dataset is refused here; bootstrap.SHAPES has every known one
    if len(cfg.data.datasets) > 1:
        raise CLIError(f"bootstrap writes one dataset's prompts, not a pool's ({cfg.data.dataset}): run it once "
                       "per dataset, with --dataset NAME")
    learner, device = None, ""
    if not a.no_adapter:
        from deltanas.agent.run.build import device_words, make_learner

        learner, why = make_learner(cfg.model_copy(update={"learn": cfg.learn.model_copy(update={"enabled": True})}))
        if learner is None:
            raise CLIError(f"no adapter can be trained for --llm {cfg.llm.spec}: {why} (or pass --no-adapter)")
        device = device_words(cfg.llm.device)
    baselines = [b.strip() for b in a.baselines.split(",") if b.strip()] if a.baselines else None
    try:
        run_bootstrap(cfg, Path(a.output), pairs=a.pairs, sources=a.sources, baselines=baselines, learner=learner,
                      device=device)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:
        print(f"deltanas: stopped; {a.output} holds only what was finished (the examples once all are made, the "
              "adapter once trained): the same command goes on from there", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if passthrough:
        args.vllm_args = passthrough
    from deltanas.agent.archive import StoreError
    from deltanas.agent.config import ConfigError
    from deltanas.sandbox.sizing import SandboxUnfit

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "diff":
            return cmd_diff_apply(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "bootstrap":
            return cmd_bootstrap(args)
        if args.command == "zoo":
            return cmd_zoo(args)
        if args.command == "sandbox":
            return cmd_sandbox(args)
    except (CLIError, ConfigError, StoreError, SandboxUnfit) as e:
        print(f"deltanas: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
