"""The format bootstrap: thousands of training pairs made by the mutator, in the run's own prompt.

A small model does not learn the diff format from the handful of pairs a run's first cycles give.
The paper's data is programmatic and large (unified diffs between LEMUR networks), and so is this:
the rule-based mutator (tools/mutator.py) rewrites every zoo network, a chain of edits at a time,
into variants that

- the project's applier reproduces from the diff (no protected region, no no-op, the run's size cap),
- compile, and
- build and run forward on the dataset's input shape to `num_classes` outputs.

None is trained, so these pairs teach the *format* only. Pairs that teach *improvement* (a variant
that trained better than its base) come from earlier runs' archives and LEMUR data
(agent/learning/cold_start_pairs.py) and are kept apart: each pair records its purpose and source.

Parents are drawn as a run's are: a zoo network or a variant of one a few edits away; the answer
is a further one to three edits. The same seed gives the same pairs.

`deltanas bootstrap` writes a folder (`cold_start_pairs.BOOTSTRAP_*`):
- `examples.jsonl`: one pair per line, its sources and, as `prompt` / `completion`, the chat the run
  sends and the answer, as trl trains on them;
- `manifest.json`: the command, the seed, what each source gave and why pairs were left out, and
  the time each step took;
- `adapter/`: the LoRA adapter trained on every example (unless `--no-adapter`).

The folder is a `learn.cold_start_from` source: the run takes its pairs, and when its adapter was
trained on the run's model, starts from that adapter (agent/loop/cycle_nodes.cold_start).

The forward check runs the mutator's variants of the zoo (or of the user's own baseline files) in
this process, as `tools.zoo.count_parameters` does: trusted code, never a model's.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltanas.agent.learning import cold_start_pairs
from deltanas.agent.learning.cold_start_pairs import (
    Distinct, Pair, clean_source, pair_digest, pair_example, pair_record, refusal)
from deltanas.tools import pyast
from deltanas.tools.mutator import NoMutation, mutate_source
from deltanas.tools.zoo import DEFAULT_PRM, get_baseline, list_baselines

# The input shape and class count each dataset gives its networks (tools/datasets.py), so that
# prompts can be written and variants checked without loading the data.
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10), "digits": ((1, 28, 28), 10), "synthetic": ((3, 32, 32), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10),
    "imagenette": ((3, 64, 64), 10), "celeba-gender": ((3, 64, 64), 2),
}
PARENT_EDITS = (0, 2)  # a parent is a zoo network or a variant this many edits away (inclusive)
ANSWER_EDITS = (2, 4)  # the answer makes this many edits (one small edit of a long file is seldom novel)
PER_TURN = 10  # tries a network gets for one pair before the next network's turn
STREAMS = 8  # independent random streams of `deltanas bootstrap`, whatever the cores (parallel_pairs)
FORMAT_VERSION = 1


@dataclass
class Made:
    """The mutator's pairs, and what it tried and left out."""

    pairs: list[Pair] = field(default_factory=list)
    tried: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def shape_of(dataset: str) -> tuple[tuple[int, int, int], int]:
    try:
        return SHAPES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r} for the bootstrap's prompts; use one of "
                         f"{', '.join(sorted(SHAPES))}") from None


def forward_error(source: str, in_shape: tuple[int, int, int], num_classes: int) -> str | None:
    """Why `source`'s Net does not build and map a batch of 2 inputs to (2, num_classes), or None.
    Runs the code here: for the mutator's variants of trusted networks only."""
    import torch

    module = types.ModuleType("deltanas_bootstrap_candidate")
    try:
        exec(pyast.compile_code(source), module.__dict__)  # noqa: S102 - trusted code (see the module docstring)
        net = module.Net((2, *in_shape), (num_classes,), dict(DEFAULT_PRM), torch.device("cpu"))
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(2, *in_shape))
    except Exception as e:  # noqa: BLE001 - any failure of the variant is a reason to leave it out
        return type(e).__name__
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        return "wrong output shape"
    if not torch.isfinite(out).all():
        return "non-finite output"
    return None


def _chain(source: str, rng: random.Random, steps: int) -> tuple[str, list[str]]:
    names = []
    for _ in range(steps):
        try:
            name, source = mutate_source(source, rng)
        except NoMutation:
            break
        names.append(name)
    return source, names


def mutator_pairs(n: int, *, dataset: str = "mnist", baselines: Sequence[str] | None = None, seed: int = 0,
                  max_diff_lines: int = 40, allow_train_changes: bool = False, distinct: Distinct | None = None,
                  max_tries: int | None = None, progress: Callable[[int, int], None] | None = None,
                  stream: int = 0) -> Made:
    """Up to `n` distinct format pairs over `baselines` (the whole zoo by default), in turn; `stream`
    picks one of the independent random streams (and the network it starts with)."""
    started = time.perf_counter()
    in_shape, num_classes = shape_of(dataset)
    nets = [(b.name, b.source) for b in (list_baselines() if not baselines else map(get_baseline, baselines))]
    nets = nets[stream % len(nets):] + nets[:stream % len(nets)]
    rng = random.Random(f"bootstrap:{seed}" if stream == 0 else f"bootstrap:{seed}:{stream}")
    out, seen = Made(), set()
    checked: dict[str, str | None] = {}

    def check(src: str) -> str | None:
        key = pair_digest(src, "")
        if key not in checked:
            checked[key] = forward_error(src, in_shape, num_classes)
        return checked[key]

    limit = max_tries if max_tries is not None else 20 * n + 100
    turn = tries = 0
    while len(out.pairs) < n and out.tried < limit:
        # The networks take turns by pairs made, not by tries, so that one whose edits are seldom
        # novel (a long file, where a small edit stays similar) still gets its share.
        name, zoo_source = nets[turn % len(nets)]
        pair = _one_pair(name, zoo_source, dataset, rng, out, seen, check, max_diff_lines, allow_train_changes,
                         distinct)
        tries += 1
        if pair is not None or tries == PER_TURN:
            turn, tries = turn + 1, 0
        if pair is None:
            continue
        out.pairs.append(pair)
        if progress is not None:
            progress(len(out.pairs), n)
    out.seconds = time.perf_counter() - started
    return out


def parallel_pairs(n: int, *, novelty: tuple[float, int, int], streams: int = STREAMS, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None, **kw: Any) -> Made:
    """`mutator_pairs` over `streams` independent random streams, `n / streams` pairs each, in as
    many processes as there are cores (at most `streams`). The stream count is fixed, not the cores
    a machine has, so the same seed gives the same pairs on a laptop and on a GPU box. `novelty` is
    the run's (threshold, num_perm, shingle): a pair the run would call a duplicate is left out."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    started = time.perf_counter()
    ask = n + n // 10 + 1  # streams can repeat each other's pairs (a zoo network with the same edits)
    shares = [ask // streams + (i < ask % streams) for i in range(streams)]
    jobs = [(share, i, novelty, kw) for i, share in enumerate(shares) if share]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    out, seen = Made(), set()
    if workers <= 1:
        results = map(_stream, jobs)
    else:  # spawned, not forked: the parent may hold threads (torch's, a run's)
        # Ctrl-C reaches the whole process group. The parent stops the work; a worker must not
        # print its own traceback, even one still starting up: the workers start with SIGINT
        # blocked (a mask survives exec) and ignore it before they unblock it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_start)
            results = pool.map(_stream, jobs)  # submits every job: the workers are spawned here
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        for made in results:
            out.tried += made.tried
            out.skipped.update(made.skipped)
            for p in made.pairs:
                if p.digest in seen:
                    out.skipped["the same pair again"] += 1
                    continue
                seen.add(p.digest)
                out.pairs.append(p)
            if progress is not None:
                progress(min(len(out.pairs), n), n)
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    out.pairs = out.pairs[:n]  # in stream order, so the same seed keeps the same pairs
    out.seconds = time.perf_counter() - started
    return out


def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    import torch

    torch.set_num_threads(1)  # a process per core already; the forward checks are tiny


def _stream(job: tuple[int, int, tuple[float, int, int], dict[str, Any]]) -> Made:
    share, stream, novelty, kw = job
    return mutator_pairs(share, stream=stream, distinct=cold_start_pairs.novel_against_base(*novelty), **kw)


def _one_pair(name: str, zoo_source: str, dataset: str, rng: random.Random, out: Made, seen: set[str],
              check: Callable[[str], str | None], max_diff_lines: int, allow_train_changes: bool,
              distinct: Distinct | None) -> Pair | None:
    out.tried += 1
    parent, parent_edits = _chain(clean_source(zoo_source), rng, rng.randint(*PARENT_EDITS))
    if parent_edits and check(parent):
        out.skipped["a parent that does not run forward"] += 1
        return None
    child, edits = _chain(parent, rng, rng.randint(*ANSWER_EDITS))
    if not edits:
        out.skipped["no mutation applies"] += 1
        return None
    key = pair_digest(parent, child)
    if key in seen:
        out.skipped["the same pair again"] += 1
        return None
    why = refusal(parent, child, max_diff_lines, allow_train_changes, distinct)
    if why is None and (error := check(child)):
        why = f"a variant that does not run forward ({error})"
    if why:
        out.skipped[why] += 1
        return None
    seen.add(key)
    return Pair(id=f"mutator:{name}:{key}", origin="mutator", dataset=dataset, base_source=parent,
                variant_source=child, base_accuracy=None, variant_accuracy=None,
                base_name="+".join([name, *parent_edits]), variant_name="+".join(edits), purpose="format",
                source="mutator")


def example_line(pair: Pair, *, mode: str = "delta", goal: str = "improve the first-epoch test accuracy",
                 allow_train_changes: bool = False) -> dict[str, Any]:
    """One line of examples.jsonl: the pair and the chat the run would send for it, with its answer."""
    in_shape, num_classes = shape_of(pair.dataset)
    return {**pair_record(pair), **pair_example(pair, in_shape=in_shape, num_classes=num_classes, mode=mode,
                                                goal=goal, allow_train_changes=allow_train_changes)}


def write_folder(out_dir: Path, lines: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """examples.jsonl, then manifest.json last: a folder with a manifest is whole."""
    from deltanas.agent.learning.examples import write_jsonl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / cold_start_pairs.BOOTSTRAP_MANIFEST).unlink(missing_ok=True)
    write_jsonl(lines, out_dir / cold_start_pairs.BOOTSTRAP_EXAMPLES)
    write_manifest(out_dir, manifest)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = Path(out_dir) / cold_start_pairs.BOOTSTRAP_MANIFEST
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, **manifest}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / cold_start_pairs.BOOTSTRAP_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a bootstrap manifest ({e})") from None


def training_examples(folder: Path) -> list[dict[str, Any]]:
    """The prompt-completion pairs of a bootstrap folder, as trl takes them."""
    out = []
    for line in (Path(folder) / cold_start_pairs.BOOTSTRAP_EXAMPLES).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append({"prompt": rec["prompt"], "completion": rec["completion"]})
    return out


# --- `deltanas bootstrap` -------------------------------------------------------------------------------------------

def request_of(cfg, *, pairs: int, sources: Sequence[str], baselines: Sequence[str] | None) -> dict[str, Any]:
    """What decides a bootstrap folder's examples: the same request gives the same folder."""
    s = cfg.search
    return {"pairs": pairs, "seed": s.seed, "dataset": cfg.data.dataset, "baselines": list(baselines or []),
            "from": [str(p) for p in sources], "mode": s.mode, "goal": s.goal,
            "allow_train_changes": s.allow_train_changes, "max_diff_lines": cfg.learn.cold_start_max_diff_lines,
            "max_improvement_pairs": cfg.learn.cold_start_max_pairs,
            "novelty": {"threshold": cfg.novelty.threshold, "num_perm": cfg.novelty.num_perm,
                        "shingle": cfg.novelty.shingle}}


def make_examples(cfg, out_dir: Path, request: dict[str, Any], say: Callable[[str], None] = print) -> dict[str, Any]:
    """Make the pairs a request asks for and write the folder; returns the manifest."""
    n = cfg.novelty
    distinct = cold_start_pairs.novel_against_base(n.threshold, n.num_perm, n.shingle)

    improving, reports = [], []
    if request["from"]:
        improving, reports = cold_start_pairs.gather(
            request["from"], dataset=request["dataset"], task=cfg.learn.lemur_task, epoch=cfg.learn.lemur_epoch,
            max_diff_lines=request["max_diff_lines"], limit=request["max_improvement_pairs"],
            allow_train_changes=request["allow_train_changes"], distinct=distinct)
        for r in reports:
            say(f"{r['path']}: {r['error'] or r['summary']}")
    def progress(k: int, total: int) -> None:
        say(f"mutator: {k}/{total} format pairs")

    nov = request["novelty"]
    made = parallel_pairs(request["pairs"], novelty=(nov["threshold"], nov["num_perm"], nov["shingle"]),
                          dataset=request["dataset"], baselines=request["baselines"] or None, seed=request["seed"],
                          max_diff_lines=request["max_diff_lines"], allow_train_changes=request["allow_train_changes"],
                          progress=progress)
    started = time.perf_counter()
    lines = [example_line(p, mode=request["mode"], goal=request["goal"],
                          allow_train_changes=request["allow_train_changes"]) for p in improving + made.pairs]
    counts = Counter(f"{line['source']} {line['purpose']}" for line in lines)
    manifest = {"request": request, "examples": len(lines), "by_source": dict(sorted(counts.items())),
                "mutator": {"made": len(made.pairs), "tried": made.tried, "left_out": dict(made.skipped),
                            "seconds": round(made.seconds, 2), "streams": STREAMS, "cores": os.cpu_count()},
                "improvement_sources": reports, "write_seconds": None, "adapter": None}
    write_folder(out_dir, lines, manifest)
    manifest["write_seconds"] = round(time.perf_counter() - started, 2)
    write_manifest(out_dir, manifest)
    return manifest


def run_bootstrap(cfg, out_dir: Path, *, pairs: int, sources: Sequence[str] = (),
                  baselines: Sequence[str] | None = None, learner: Callable[..., dict[str, Any]] | None = None,
                  device: str = "", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Make (or find) the folder's examples, then train its adapter on them with `learner`
    (agent/run/build.make_learner; None: no adapter), or find it trained. A folder made for another
    request is refused rather than mixed. Returns the manifest."""
    from deltanas.agent.learning.lora import adapter_complete

    out_dir = Path(out_dir)
    request = request_of(cfg, pairs=pairs, sources=sources, baselines=baselines)
    have = out_dir / cold_start_pairs.BOOTSTRAP_MANIFEST
    if have.is_file():
        manifest = read_manifest(out_dir)
        if manifest.get("request") != request:
            raise ValueError(f"{out_dir} holds a bootstrap made for another request ({have}); choose another "
                             "--output, or remove it")
        say(f"{out_dir}: {manifest['examples']} examples made before; kept")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not a bootstrap folder; choose another --output")
    else:
        manifest = make_examples(cfg, out_dir, request, say)
        made = ", ".join(f"{v} {k}" for k, v in manifest["by_source"].items())
        say(f"{out_dir}: {manifest['examples']} examples ({made}) in {manifest['mutator']['seconds']:.0f} s")
    target = out_dir / cold_start_pairs.BOOTSTRAP_ADAPTER
    if learner is None:
        return manifest
    if adapter_complete(target) and manifest.get("adapter"):
        say(f"{target}: trained before; kept")
        return manifest
    examples = training_examples(out_dir)
    say(f"training the adapter on {len(examples)} examples ({cfg.llm.backend.model} on {device or 'its device'}, "
        f"{cfg.learn.epochs:g} epoch(s), lr {cfg.learn.lr:g}, batch {cfg.learn.batch_size} x {cfg.learn.grad_accum})")
    info = learner(examples, target, None, progress=say)
    manifest["adapter"] = {**{k: info.get(k) for k in ("loss", "steps", "examples", "seconds", "base_model")},
                           "device": device}
    write_manifest(out_dir, manifest)
    say(f"{target}: loss {info['loss']:.4f}, {info['steps']} steps, {info['seconds']:.0f} s")
    return manifest
