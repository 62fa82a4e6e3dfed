"""The outer graph's nodes: baselines → cold start, then one cycle is parents → batched proposals →
(candidates) → gather → LoRA update. Each node is idempotent: run again after a crash or a resume,
it finds its earlier work in the archive instead of doing it twice."""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deltanas.agent.learning import cold_start_pairs

from deltanas.agent.archive import CandidateRow
from deltanas.agent.learning.examples import preference_set, training_set
from deltanas.agent.learning.lora import META_FILE, adapter_complete, clear_partials, copy_adapter
from deltanas.agent.loop import answer_format
from deltanas.agent.loop.deps import Deps
from deltanas.agent.loop.selection import select_parents as tournament
from deltanas.agent.loop.state import Proposal, RunState
from deltanas.agent.stopping import RunStopped
from deltanas.tools.trajectory import TOOL_SCHEMAS, proposal_step
from deltanas.tools.zoo import get_baseline, is_path

log = logging.getLogger(__name__)


def candidate_id(cycle: int, idx: int) -> str:
    return f"c{cycle:03d}-{idx:03d}"


CHAT_PREFIX = "h"


def chat_id(turn: int, idx: int) -> str:
    """A chat session's candidate (agent/loop/chat.py): its request's number and its own."""
    return f"{CHAT_PREFIX}{turn:03d}-{idx:02d}"


def is_chat(cand_id: str) -> bool:
    return cand_id.startswith(CHAT_PREFIX)


def baseline_id(name: str, dataset: str, pool: bool) -> str:
    """A baseline's id: `base-NAME`, and in a pool run, where each trains on every dataset, `base-NAME.DATASET`."""
    return f"base-{name}.{dataset}" if pool else f"base-{name}"


def baseline_ids(deps: Deps) -> dict[str, list[str]]:
    """Every baseline's id, by dataset."""
    pool = len(deps.datasets) > 1
    names = [get_baseline(spec).name for spec in deps.config.baselines]
    return {d: [baseline_id(n, d, pool) for n in names] for d in deps.datasets}


def evaluate_baselines(state: RunState, deps: Deps) -> dict[str, Any]:
    """Train every baseline once on each of the run's datasets (the pool's baselines are balanced
    across them), so prompts carry real parent accuracies."""
    todo = []
    for dataset, ids in baseline_ids(deps).items():
        for i, (spec, cid) in enumerate(zip(deps.config.baselines, ids)):
            row = deps.store.get(cid)
            if row is None or not row.final:
                todo.append((i, spec, cid, dataset))

    def run(item: tuple[int, str, str, str]) -> None:
        i, spec, cid, dataset = item
        deps.check_stop()
        source = get_baseline(spec).source
        started = time.time()
        outcome = deps.executor.evaluate(source, cid, deps.candidate_dir(cid), dataset=dataset)
        if outcome.status != "ok" and is_path(spec):
            # The user's own file: say so now, before a search starts from it. Nothing is recorded,
            # so a resume after the fix trains it again.
            raise RuntimeError(f"baseline {spec} did not train in the sandbox on {dataset} ({outcome.status}): "
                               f"{outcome.error}; "
                               f"see {deps.candidate_dir(cid) / 'log.txt'}")
        deps.store.upsert(CandidateRow(
            id=cid, cycle=-1, idx=i, kind="baseline", dataset=dataset, status=outcome.status,
            error_message=outcome.error or None, source=source, accuracy=outcome.accuracy,
            param_count=outcome.param_count, train_seconds=outcome.train_seconds,
            eval_seconds=outcome.total_seconds, novel=True, created_at=started, finished_at=time.time(),
            minhash=deps.novelty.signature(source).hashvalues.tobytes()))

    if todo:
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            list(pool.map(run, todo))
    for dataset, ids in baseline_ids(deps).items():
        for cid in ids:
            row = deps.store.get(cid)
            deps.novelty.add(row.id, deps.novelty.from_hashvalues(row.minhash))
        if not any(deps.store.get(cid).status == "ok" for cid in ids):
            logs = ", ".join(str(deps.candidate_dir(cid) / "log.txt") for cid in ids)
            raise RuntimeError(f"no baseline trained on {dataset}; see {logs}")
    return {"baselines_ready": True, "cycle": state.get("cycle", 0)}


def slot_datasets(datasets: list[str], n: int) -> list[str]:
    """The dataset of each of a cycle's `n` candidates: in turn, so that a pool's are spread evenly."""
    return [datasets[i % len(datasets)] for i in range(n)]


def select_parents(state: RunState, deps: Deps) -> dict[str, Any]:
    """A tournament among the trained networks; in a pool run, among each dataset's own for its
    share of the slots, so that a child trains on its parent's dataset and is compared with it."""
    cycle = state["cycle"]
    deps.check_stop()
    deps.store.start_cycle(cycle)
    trained = [c for c in deps.store.candidates(status="ok") if c.cycle < cycle or is_chat(c.id)]
    s = deps.config.search
    names = list(deps.datasets)
    if len(names) == 1:
        return {"parent_ids": tournament(trained, s.candidates, tournament_size=s.tournament_size,
                                         explore=s.explore, seed=f"{s.seed}-{cycle}")}
    slots = slot_datasets(names, s.candidates)
    picked = {d: iter(tournament([c for c in trained if c.dataset == d], slots.count(d),
                                 tournament_size=s.tournament_size, explore=s.explore, seed=f"{s.seed}-{cycle}-{d}"))
              for d in names if d in slots}
    return {"parent_ids": [next(picked[d]) for d in slots]}


def _stored_proposals(deps: Deps, cycle: int, n: int) -> list[Proposal] | None:
    rows = [r for r in deps.store.candidates(cycle=cycle) if not is_chat(r.id)]
    if len(rows) < n:
        return None
    out: list[Proposal] = []
    for r in rows[:n]:
        out.append(Proposal(candidate_id=r.id, cycle=cycle, idx=r.idx, parent_id=r.parent_id,
                            messages=deps.store.get_trajectory(r.id) or [], completion=r.completion or "",
                            prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                            constrain=r.constrain or "none", sites=r.sites))
    return out


def propose(state: RunState, deps: Deps) -> dict[str, Any]:
    """One batched backend call for the whole cycle; the answers are archived at once,
    so a resume reuses them instead of asking the model again."""
    cycle, parent_ids = state["cycle"], state["parent_ids"]
    stored = _stored_proposals(deps, cycle, len(parent_ids))
    if stored is not None:
        return {"proposals": stored}
    deps.check_stop()
    s = deps.config.search
    llm = deps.proposer(cycle)
    parents = [deps.store.get(pid) for pid in parent_ids]
    asks = [answer_format.proposal(deps.config, llm, parent, deps.info(parent.dataset), cycle, idx, s.goal)
            for idx, parent in enumerate(parents)]
    deps.store.set_meta(f"proposer:{cycle}", getattr(llm, "name", type(llm).__name__))
    proposals = ask_model(deps, llm, [candidate_id(cycle, i) for i in range(len(asks))], cycle, parents, asks)
    stats = getattr(llm, "constraint_stats", None)
    if stats is not None:  # what constraining has cost so far: grammar compiles and token masks
        deps.store.set_meta(f"constraint:{cycle}", stats())
    return {"proposals": proposals}


def ask_model(deps: Deps, llm: Any, ids: list[str], cycle: int, parents: list[CandidateRow], asks: list[tuple],
              turn: int | None = None) -> list[Proposal]:
    """One batched backend call for `asks` (answer_format.proposal's chat, format, sites and prompt, one
    per parent); each answer is archived at once as `proposed` under its id, so a resume reuses them
    instead of asking the model again. Answers the grammar ended early are recorded under
    `grammar_errors:<cycle>`, or `grammar_errors:h<turn>` for a chat session's request."""
    chats, formats, placed, prompts = (list(x) for x in zip(*asks))
    started = time.perf_counter()
    completions = llm.generate(prompts, deps.sampling)
    per_candidate = (time.perf_counter() - started) / max(1, len(prompts))
    broken = {cid: c.meta["grammar_error"] for cid, c in zip(ids, completions) if c.meta.get("grammar_error")}
    if broken:  # the grammar ended these answers early: a tokenizer or grammar fault, never the model's
        deps.store.set_meta(f"grammar_errors:{cycle if turn is None else f'h{turn}'}", broken)
        log.warning("%s: the answer grammar stopped %d of %d answers early (%s: %s)",
                    f"chat turn {turn}" if turn is not None else f"cycle {cycle}", len(broken), len(completions),
                    *next(iter(broken.items())))
    proposals: list[Proposal] = []
    for idx, (cid, parent, chat, comp, fmt, sites) in enumerate(zip(ids, parents, chats, completions, formats, placed)):
        messages = proposal_step(chat, comp.text)
        # A server that turned out to ignore the grammar answered unconstrained: say what happened.
        mode = "prefix" if fmt.constrain == "grammar" and comp.meta.get("constrained") is False else fmt.constrain
        deps.store.put_trajectory(cid, messages)
        deps.store.upsert(CandidateRow(
            id=cid, cycle=cycle, idx=idx, kind=deps.config.search.mode, parent_id=parent.id, dataset=parent.dataset,
            status="proposed", completion=comp.text, prompt_tokens=comp.prompt_tokens,
            completion_tokens=comp.completion_tokens, gen_seconds=per_candidate, constrain=mode, sites=sites))
        proposals.append(Proposal(candidate_id=cid, cycle=cycle, idx=idx, parent_id=parent.id, messages=messages,
                                  completion=comp.text, prompt_tokens=comp.prompt_tokens,
                                  completion_tokens=comp.completion_tokens, constrain=mode, sites=sites,
                                  **({"turn": turn} if turn is not None else {})))
    return proposals


def cycle_summary(rows: list[CandidateRow]) -> dict[str, Any]:
    """A cycle's figures. In a pool run the accuracies are each dataset's (`per_dataset`), never
    averaged across datasets; the rates count every candidate."""
    n = len(rows)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    applied = [r for r in rows if r.status not in ("apply_failed", "proposed")]
    ok = [r for r in rows if r.status == "ok"]
    accs = [r.accuracy for r in ok if r.accuracy is not None]
    repaired = [r for r in applied if r.attempts > 0]
    out = {
        "candidates": n,
        "by_status": by_status,
        "applied_rate": len(applied) / n if n else 0.0,
        "valid_novel_rate": len(ok) / n if n else 0.0,
        "duplicates": by_status.get("duplicate", 0),
        "repaired": len(repaired),
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "mean_diff_lines": (sum((r.added or 0) + (r.removed or 0) for r in applied) / len(applied)) if applied else None,
        "mean_completion_tokens": sum(r.completion_tokens for r in rows) / n if n else None,
    }
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    if len(datasets) > 1:
        out.update(mean_accuracy=None, best_accuracy=None,
                   per_dataset={d: cycle_summary([r for r in rows if r.dataset == d]) for d in datasets})
    return out


def gather_trajectories(state: RunState, deps: Deps) -> dict[str, Any]:
    """Close the cycle: summarise it (its own candidates, not a chat session's) and rewrite
    trajectories.jsonl from the archive."""
    cycle = state["cycle"]
    rows = [r for r in deps.store.candidates(cycle=cycle) if not is_chat(r.id)]
    deps.store.finish_cycle(cycle, cycle_summary(rows))
    write_trajectories(deps)
    return {"cycle": cycle + 1, "proposals": [], "parent_ids": []}


def write_trajectories(deps: Deps) -> None:
    """trajectories.jsonl from the archive: every finished candidate's, written atomically, so a
    crash never leaves half a file."""
    path = deps.run_dir / "trajectories.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for r in deps.store.candidates():
            if r.kind == "baseline" or not r.final:
                continue
            messages = deps.store.get_trajectory(r.id)
            if not messages:
                continue
            parent = deps.store.get(r.parent_id) if r.parent_id else None
            f.write(json.dumps({
                "candidate_id": r.id, "cycle": r.cycle, "parent_id": r.parent_id, "status": r.status,
                "accuracy": r.accuracy, "parent_accuracy": parent.accuracy if parent else None,
                "messages": messages, "tools": TOOL_SCHEMAS}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def lora_update(state: RunState, deps: Deps) -> dict[str, Any]:
    """After gather: train a LoRA adapter on the successful trajectories of every cycle so far
    (and the cold-start pairs, if any), then generate with it. Recorded in the archive as trained,
    skipped (and why) or failed; a failed update leaves the previous adapter in use and the run going."""
    k = state["cycle"] - 1  # gather has moved the counter on
    cfg = deps.config.learn
    if not cfg.enabled:
        return {}
    history = deps.store.adapters()
    done = {a["cycle"]: a for a in history}
    if k in done and done[k]["status"] in ("trained", "reused") and adapter_complete(deps.run_dir / done[k]["path"]):
        deps.llm.load_adapter(str(deps.run_dir / done[k]["path"]))  # a resume after the update: use it again
        return {}
    if k in done and done[k]["status"] in ("skipped", "failed"):
        return {}
    if not cfg.updates:
        deps.store.put_adapter(k, "skipped", note="learn.updates = false: the cold-start adapter, if any, stays")
        return {}
    if k == deps.config.search.cycles - 1 and not cfg.after_last_cycle:
        deps.store.put_adapter(k, "deferred", note="after the last cycle (learn.after_last_cycle = false): "
                                                   "trained first if the run is extended with --cycles")
        return {}
    if deps.learner is None:
        deps.store.put_adapter(k, "skipped", note=deps.learner_note)
        return {}
    ids, examples = training_set(deps.store, cfg.rule, cfg.top_k, up_to_cycle=k)
    pref_ids, preferences = ([], []) if cfg.method == "sft" else preference_set(deps.store, cfg.rule, cfg.top_k, k)
    if cfg.method == "dpo":
        ids, examples = pref_ids, preferences
        what = f"{len(examples)} preference pairs (a valid first answer against a failed one, same parent)"
    else:
        what = f"{len(examples)} successful trajectories (rule {cfg.rule}) and cold-start pairs"
    if len(examples) < cfg.min_examples:
        deps.store.put_adapter(k, "skipped", examples=len(examples),
                               note=f"{what}, fewer than learn.min_examples = {cfg.min_examples}")
        return {}
    if cfg.method == "sft+dpo":
        ids = ids + pref_ids
    last = next((a for a in reversed(history) if a["status"] in ("trained", "reused") and a["cycle"] < k), None)
    if last is not None and last["example_ids"] == ids and adapter_complete(deps.run_dir / last["path"]):
        # Nothing new to learn from: the adapter in use was trained on exactly these examples.
        deps.store.put_adapter(k, "reused", path=last["path"], examples=len(ids), loss=last["loss"], steps=0,
                               seconds=0.0, note=f"trained on the same examples: {last['path']}", example_ids=ids)
        return {}
    _train(deps, k, f"adapters/cycle-{k}", ids, examples, what=f"LoRA update after cycle {k}",
           preferences=preferences if cfg.method == "sft+dpo" else None,
           note=f"{cfg.method}: {len(preferences)} preference pairs" if cfg.method != "sft" else "")
    return {}


COLD_START = -1  # the adapters table's cycle for the cold-start adapter, trained before cycle 0
COLD_START_DIR = "adapters/cold-start"
COLD_START_SOURCES = "cold_start:sources"  # meta key: what each learn.cold_start_from path gave
COLD_START_ADOPTED = "cold_start:adopted"  # meta key: the bootstrap folder whose adapter the run started from


def cold_start(state: RunState, deps: Deps) -> dict[str, Any]:
    """Before cycle 0: teach the model deltas from pairs found outside this run (another run's
    archive, LEMUR data: agent/learning/cold_start_pairs.py), then generate with that adapter. The pairs are read
    once and kept in the archive, and every later update trains on them too. A path that cannot be
    read is recorded and the run goes on; the update is recorded like the others, under cycle -1.
    A run extended past its last cycle passes here too: it trains the update deferred then."""
    cfg = deps.config.learn
    if state.get("cycle", 0) > 0:  # an extended run: the update deferred after its old last cycle
        return lora_update(state, deps)
    if not cfg.enabled or not cfg.cold_start_from:
        return {}
    adapters = deps.store.adapters()
    done = next((a for a in adapters if a["cycle"] == COLD_START), None)
    if done is not None:  # a resume: never trained twice
        later = any(a["cycle"] > COLD_START and a["status"] in ("trained", "reused") for a in adapters)
        if not later and done["status"] in ("trained", "reused") and adapter_complete(deps.run_dir / done["path"]):
            deps.llm.load_adapter(str(deps.run_dir / done["path"]))
        return {}
    if deps.store.get_meta(COLD_START_SOURCES) is None:
        _store_cold_start_pairs(deps)
    pairs = deps.store.pairs()
    sources = cold_start_pairs.describe(deps.store.get_meta(COLD_START_SOURCES))
    if deps.learner is None:
        deps.store.put_adapter(COLD_START, "skipped", examples=len(pairs), note=f"{deps.learner_note} ({sources})")
        return {}
    if _adopt_bootstrap_adapter(deps, [p["id"] for p in pairs]):
        return {}
    if len(pairs) < cfg.min_examples:
        deps.store.put_adapter(COLD_START, "skipped", examples=len(pairs),
                               note=f"{len(pairs)} cold-start pairs, fewer than learn.min_examples = "
                                    f"{cfg.min_examples}: {sources}")
        return {}
    _train(deps, COLD_START, COLD_START_DIR, [p["id"] for p in pairs], [p["example"] for p in pairs],
           what="the cold-start LoRA update", note=sources)
    return {}


def _adopt_bootstrap_adapter(deps: Deps, pair_ids: list[str]) -> bool:
    """The first `learn.cold_start_from` bootstrap folder (`deltanas bootstrap`) whose adapter was
    trained on this run's model becomes the cold-start adapter as it is, copied into the run so the
    run stands alone; every later update starts from it rather than afresh, so what the bootstrap's
    thousands of examples taught is kept. Recorded as reused, with where it came from."""
    model = deps.config.llm.backend.model
    for path in deps.config.learn.cold_start_from:
        folder = Path(path).expanduser()
        adapter = folder / cold_start_pairs.BOOTSTRAP_ADAPTER
        if cold_start_pairs.source_kind_or_none(folder) != "bootstrap" or not adapter_complete(adapter):
            continue
        try:
            meta = json.loads((adapter / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("cold start: %s: unreadable adapter metadata (%s); not used", adapter, e)
            continue
        if meta.get("base_model") != model:
            log.warning("cold start: %s was trained on %r, this run's model is %r; its pairs are used, not its "
                        "adapter", adapter, meta.get("base_model"), model)
            continue
        copy_adapter(adapter, deps.run_dir / COLD_START_DIR)
        deps.store.put_adapter(COLD_START, "reused", path=COLD_START_DIR, examples=int(meta.get("examples") or 0),
                               loss=meta.get("loss"), steps=0, seconds=0.0, example_ids=pair_ids,
                               note=f"the bootstrap adapter of {folder} ({meta.get('examples')} examples); "
                                    "later updates start from it")
        deps.store.set_meta(COLD_START_ADOPTED, str(folder))
        deps.llm.load_adapter(str(deps.run_dir / COLD_START_DIR))
        return True
    return False


def _start_from(deps: Deps) -> Path | None:
    """The adopted bootstrap adapter later updates start from, or None (they start afresh)."""
    if deps.store.get_meta(COLD_START_ADOPTED) is None:
        return None
    path = deps.run_dir / COLD_START_DIR
    return path if adapter_complete(path) else None


def _store_cold_start_pairs(deps: Deps) -> None:
    """Read every `learn.cold_start_from` path once; keep the pairs as the training examples the
    run would build (its prompt, mode and rules), and what each path gave."""
    learn, s, n = deps.config.learn, deps.config.search, deps.config.novelty
    distinct = cold_start_pairs.novel_against_base(n.threshold, n.num_perm, n.shingle)
    all_reports = []
    for info in deps.datasets.values():  # a pool's pairs come from each of its datasets
        found, reports = cold_start_pairs.gather(
            [str(Path(p).expanduser()) for p in learn.cold_start_from], dataset=info.name,
            task=learn.lemur_task, epoch=learn.lemur_epoch, max_diff_lines=learn.cold_start_max_diff_lines,
            limit=learn.cold_start_max_pairs, allow_train_changes=s.allow_train_changes, distinct=distinct)
        for r in reports:
            if r["error"]:
                log.warning("cold start: %s (%s): %s", r["path"], info.name, r["error"])
        deps.store.put_pairs([{"id": p.id, "origin": p.origin, "meta": p.meta(),
                               "example": cold_start_pairs.pair_example(
                                   p, in_shape=info.in_shape, num_classes=info.num_classes, mode=s.mode, goal=s.goal,
                                   allow_train_changes=s.allow_train_changes)} for p in found])
        all_reports += [{**r, "dataset": info.name} for r in reports] if len(deps.datasets) > 1 else reports
    deps.store.set_meta(COLD_START_SOURCES, all_reports)  # last: the marker that the pairs are all stored


def _train(deps: Deps, cycle: int, rel: str, ids: list[str], examples: list[dict[str, Any]], *, what: str,
           note: str = "", preferences: list[dict[str, Any]] | None = None) -> None:
    """Train an adapter into `rel` (under the run directory), record the outcome under `cycle`,
    and generate with it. A failure is recorded and the run goes on with the adapter in use."""
    clear_partials(deps.run_dir / "adapters")
    deps.check_stop()
    start = _start_from(deps) if cycle != COLD_START else None
    try:
        extra = {"preferences": preferences} if preferences else {}  # sft+dpo: both sets
        info = deps.learner(examples, deps.run_dir / rel, deps.stop, start_from=start, **extra)
    except RunStopped:
        raise
    except Exception as e:  # noqa: BLE001 - a failed update is recorded; the run goes on with the last adapter
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        log.warning("%s failed: %s", what, text)
        deps.store.put_adapter(cycle, "failed", examples=len(examples), note=f"{type(e).__name__}: {text}")
        return
    deps.store.put_adapter(cycle, "trained", path=rel, examples=info.get("examples") or len(examples),
                           loss=info.get("loss"), steps=info.get("steps"), seconds=info.get("seconds"),
                           example_ids=ids, note=note)
    deps.llm.load_adapter(str(deps.run_dir / rel))
