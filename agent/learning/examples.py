"""Which trajectories teach the model, and the records they become.

Two forms leave the archive:

- **Export records** (`export_record`): a candidate's whole trajectory, as TRL's
  conversational `messages` + `tools` format with OpenAI-style tool calls: the
  system and user turns, each `propose_diff` / `apply_diff` / `check_novelty` /
  `proxy_train` call as an assistant turn with `tool_calls` (arguments as a JSON
  string) and its result as a `tool` turn, repairs as user turns. Metadata
  (candidate id, cycle, status, accuracies) rides along in a `meta` column.
- **Training examples** (`sft_example`): what the LoRA update trains on. The
  model is served the plain chat of `chat_view` (system, user, its own earlier
  answers, the repair turns), so it is trained on the same chat: a conversational
  prompt-completion pair whose completion is the answer that succeeded. The loss
  falls on that answer's tokens only, rendered with the tokenizer's own template.
  The cold-start pairs of `learn.cold_start_from` (agent/learning/cold_start_pairs.py) are stored
  in the same form and join every update's examples.
- **Preference examples** (`preference_set`): for `learn.method = "dpo"` or `"sft+dpo"`, a
  valid first answer against a failed first answer for the same parent, as trl's DPOTrainer
  takes them (conversational prompt, chosen, rejected).

The success rule says which candidates count (`learn.rule`): `improved` (valid,
novel, and at least as accurate as the parent), `valid` (valid and novel), or
`top_k` (the `learn.top_k` most accurate valid, novel candidates of each cycle, and in a pool
run of each dataset: accuracies are compared within a dataset only).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from deltanas.agent.archive import CandidateRow, Store
from deltanas.tools.trajectory import TOOL_SCHEMAS, chat_view, human_verdict

Rule = Literal["improved", "valid", "top_k"]
RULES: tuple[str, ...] = Rule.__args__  # type: ignore[attr-defined]


def successful(store: Store, rule: Rule = "improved", top_k: int = 5, cycle: int | None = None,
               up_to_cycle: int | None = None) -> list[CandidateRow]:
    """The candidates that pass `rule`, of one cycle, of cycles up to one, or of the whole run."""
    if rule not in RULES:
        raise ValueError(f"unknown success rule {rule!r}; use one of {', '.join(RULES)}")
    rows = [r for r in store.candidates(cycle=cycle) if r.kind != "baseline" and r.status == "ok"
            and r.accuracy is not None and (up_to_cycle is None or r.cycle <= up_to_cycle)]
    if rule == "valid":
        return rows
    if rule == "improved":
        out = []
        for r in rows:
            parent = store.get(r.parent_id) if r.parent_id else None
            if parent is None or parent.accuracy is None or r.accuracy >= parent.accuracy:
                out.append(r)
        return out
    by_cycle: dict[tuple[int, str], list[CandidateRow]] = {}  # a pool's top-k are each dataset's
    for r in rows:
        by_cycle.setdefault((r.cycle, r.dataset), []).append(r)
    return [r for c in sorted(by_cycle) for r in sorted(by_cycle[c], key=lambda r: -(r.accuracy or 0))[:top_k]]


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The archived trajectory with every tool call's arguments as a JSON string (OpenAI's
    form, and one column type for Arrow whatever the tool)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _as_json(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _as_json(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True)


def export_record(row: CandidateRow, messages: list[dict[str, Any]], parent_accuracy: float | None) -> dict[str, Any]:
    human = human_verdict(messages)
    return {"messages": openai_messages(messages), "tools": json.loads(json.dumps(TOOL_SCHEMAS)),
            "meta": {"candidate_id": row.id, "cycle": row.cycle, "parent_id": row.parent_id, "kind": row.kind,
                     "status": row.status, "accuracy": row.accuracy, "parent_accuracy": parent_accuracy,
                     "human": {"verdict": human["verdict"], "reason": human["reason"]} if human else None}}


def sft_example(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, str]]] | None:
    """The conversational prompt-completion pair of a successful trajectory: the chat as the
    model saw it up to its last answer, and that answer; where a person edited that answer in
    review (agent/loop/review.py), their diff instead. None when it holds no answer."""
    chat = chat_view(messages)
    last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
    if last is None or not chat[last]["content"].strip():
        return None
    human = human_verdict(messages)
    if human and human.get("answer"):
        return {"prompt": chat[:last], "completion": [{"role": "assistant", "content": human["answer"]}]}
    corrected = _corrected(messages)
    if corrected:  # applied with wrong context lines tolerated: learn the diff as it applied
        return {"prompt": chat[:last], "completion": [{"role": "assistant", "content": f"```diff\n{corrected}```"}]}
    return {"prompt": chat[:last], "completion": [chat[last]]}


def _corrected(messages: list[dict[str, Any]]) -> str:
    """The diff as applied, where the last answer's hunks were placed by the applier's fuzzy tier
    (tools/diff_apply.py: its context lines copied from the parent), else ""."""
    for m in reversed(messages):
        if m.get("role") == "tool" and m.get("name") == "apply_diff":
            try:
                return str(json.loads(m["content"]).get("corrected") or "")
            except (ValueError, AttributeError):
                return ""
    return ""


def export_records(store: Store, *, successful_only: bool = False, rule: Rule = "improved", top_k: int = 5,
                   cycle: int | None = None) -> list[dict[str, Any]]:
    """Records for every finished candidate with a trajectory (or only the successful ones)."""
    if successful_only:
        rows = successful(store, rule, top_k, cycle=cycle)
    else:
        rows = [r for r in store.candidates(cycle=cycle) if r.kind != "baseline" and r.final]
    out = []
    for r in rows:
        messages = store.get_trajectory(r.id)
        if not messages:
            continue
        parent = store.get(r.parent_id) if r.parent_id else None
        out.append(export_record(r, messages, parent.accuracy if parent else None))
    return out


def training_set(store: Store, rule: Rule, top_k: int, up_to_cycle: int) -> tuple[list[str], list[dict[str, Any]]]:
    """(ids, training pairs): the cold-start pairs taken from outside the run (agent/learning/cold_start_pairs.py), then
    the successful candidates of every cycle up to `up_to_cycle`. Every update keeps the cold-start
    pairs, as it keeps earlier cycles' successes: each adapter is trained afresh on all of them."""
    pairs = store.pairs()
    ids, out = [p["id"] for p in pairs], [p["example"] for p in pairs]
    for r in successful(store, rule, top_k, up_to_cycle=up_to_cycle):
        example = sft_example(store.get_trajectory(r.id) or [])
        if example is not None:
            ids.append(r.id)
            out.append(example)
    return ids, out


def preference_set(store: Store, rule: Rule, top_k: int, up_to_cycle: int) -> tuple[list[str], list[dict[str, Any]]]:
    """(ids, preference examples) for DPO, as EvoTune pairs them: an answer that passed `rule` at its
    first try against a first answer that failed (did not apply, did not train, or was a near-copy)
    for the same parent in the same cycle. The prompt is the chat both were sent; where the cycle
    sent each candidate its own prompt (sampled edit sites), the chosen answer's. Each failed answer
    is used once, so one bad parent cannot fill the set. Before those, `revision_pairs` of every
    successful candidate: a person's feedback as a preference. Conversational: trl's DPOTrainer
    renders them with the tokenizer's chat template."""
    good = [r for r in successful(store, rule, top_k, up_to_cycle=up_to_cycle) if r.attempts == 0 and r.completion]
    bad: dict[tuple[int, str | None], list[CandidateRow]] = {}
    for r in store.candidates():
        if (r.kind != "baseline" and r.final and r.status != "ok" and r.cycle <= up_to_cycle
                and r.completion and r.completion.strip()):
            bad.setdefault((r.cycle, r.parent_id), []).append(r)
    ids, out = [], []
    for g in successful(store, rule, top_k, up_to_cycle=up_to_cycle):  # a person's feedback, first
        for n, pair in enumerate(revision_pairs(store.get_trajectory(g.id) or [])):
            ids.append(f"{g.id}>revised-{n}")
            out.append(pair)
    for g in good:
        pool = bad.get((g.cycle, g.parent_id))
        prompt = chat_view(store.get_trajectory(g.id) or [])[:2]
        if not pool or len(prompt) < 2:
            continue
        same = next((b for b in pool if chat_view(store.get_trajectory(b.id) or [])[:2] == prompt), pool[0])
        pool.remove(same)
        ids.append(f"{g.id}>{same.id}")
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": g.completion}],
                    "rejected": [{"role": "assistant", "content": same.completion}]})
    return ids, out


def revision_pairs(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a person asked for a revision (agent/loop/review.py) and the candidate then trained: the
    final answer (the person's edit where they made one) preferred over each answer they sent back,
    for the first prompt."""
    example = sft_example(messages)
    prompt = chat_view(messages)[:2]
    if example is None or len(prompt) < 2:
        return []
    names: dict[str, str] = {}
    answers, sent_back = [], []
    for m in messages:
        for call in m.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
            if call["function"]["name"] == "propose_diff":
                answers.append(call["function"]["arguments"]["diff"])
        if m.get("role") == "tool" and names.get(m.get("tool_call_id")) == "human_review" and answers:
            if json.loads(m["content"]).get("verdict") == "revise":
                sent_back.append(answers[-1])
    chosen = example["completion"]
    return [{"prompt": prompt, "chosen": chosen, "rejected": [{"role": "assistant", "content": a}]}
            for a in sent_back if a.strip() and a != chosen[0]["content"]]


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """Writes atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def as_dataset(rows: list[dict[str, Any]]):
    """The examples as a `datasets.Dataset`, fingerprinted by their JSON. `Dataset.from_list`
    fingerprints by pickling the table's state with dill, which fails on Python 3.12 with
    pyarrow 26 ("Can't pickle <class 'MonthDayNano'>"); the fingerprint given here is also
    stable across runs, where datasets' own would depend on the environment."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable(pa.Table.from_pylist(rows)), fingerprint=digest)


def write_hf(records: list[dict[str, Any]], path: Path) -> None:
    """A Hugging Face `datasets` folder (`datasets.load_from_disk`)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    as_dataset(records).save_to_disk(str(path))
