"""Cold-start training pairs from outside the run's own cycles: another run's archive, or LEMUR.

A pair is a network, a variant that trained better on the same dataset, and, as
the target, the diff from one to the other: the paper's way of teaching a model
deltas before its first LoRA update. Each pair becomes the exact chat the run
sends (`propose_messages`) with the answer the system prompt asks for, so the
model is trained on what it will be asked.

Where pairs come from (`learn.cold_start_from`), told apart by what is at the path:

- **another run**: a run directory (it holds `archive.sqlite`) or an archive file.
  Every `ok` candidate more accurate than its parent gives (parent, candidate).
- **a LEMUR database**: nn-dataset's SQLite file (`db/ab.nn.db`: tables `nn(name,
  code, id)` and `stat(accuracy, epoch, task, dataset, nn, ...)`), or a folder
  holding `db/ab.nn.db`.
- **a LEMUR checkout**: a folder with `ab/nn/nn/<Name>.py` and
  `ab/nn/stat/train/<task>_<dataset>_<metric>_<Name>/<epoch>.json` (a JSON list of
  trials, each with an `accuracy`); the `ab/nn` folder itself works too.
- **a bootstrap folder** (`deltanas bootstrap`, agent/learning/bootstrap.py): `manifest.json` and
  `examples.jsonl`, one pair per line with both sources. Its format pairs (mutator variants that
  apply, compile and run forward, never trained) are asked of the run's dataset; its improvement
  pairs count only on the dataset they were measured on.

LEMUR networks are ranked by their best accuracy after `epoch` epochs on the
task and dataset. For every network, its partner is the less accurate network
closest to it by diff size. Only pairs the run itself would accept are kept:
at most `max_diff_lines` changed lines, and the diff, fed back through the
project's own applier, reproduces the variant (no protected region touched,
no no-op). What is left out is counted, never dropped silently.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deltanas.agent.archive import Store, StoreError
from deltanas.agent.run.rundir import ARCHIVE_FILE
from deltanas.tools import prompting, pyast
from deltanas.tools.diff_apply import apply_diff
from deltanas.tools.diff_write import make_diff

Kind = Literal["run", "lemur-db", "lemur-checkout", "bootstrap"]
Purpose = Literal["improvement", "format"]
"""What a pair teaches: a variant that trained better than its base, or only the answer's form
(a mutator's variant that applies, compiles and runs forward, never trained)."""
Distinct = Callable[[str, str], bool]
"""(base, variant) -> whether the variant is different enough to count as novel."""


def novel_against_base(threshold: float, num_perm: int, shingle: int) -> Distinct:
    """The run's novelty rule (`[novelty]`) against the base alone: a closer variant the run
    would call a duplicate of its parent."""
    from deltanas.tools.novelty import NoveltyIndex

    index = NoveltyIndex(threshold=threshold, num_perm=num_perm, shingle=shingle)  # empty: parents only
    return lambda base, variant: index.check(variant, base).novel

LEMUR_DB = Path("db") / "ab.nn.db"
BOOTSTRAP_MANIFEST = "manifest.json"
BOOTSTRAP_EXAMPLES = "examples.jsonl"
BOOTSTRAP_ADAPTER = "adapter"
# The run's dataset names that LEMUR spells differently.
LEMUR_DATASETS = {"cifar10": "cifar-10", "cifar100": "cifar-100"}
DEFAULT_LIMIT = 64
_SQLITE_MAGIC = b"SQLite format 3\x00"
_LEMUR_COLUMNS = {"nn": {"name", "code"}, "stat": {"nn", "accuracy", "epoch", "task", "dataset"}}
_WANTED = ("a run directory (holding archive.sqlite), an archive.sqlite, a LEMUR nn-dataset database "
           "(ab.nn.db), an nn-dataset checkout (ab/nn/nn and ab/nn/stat/train) or a `deltanas bootstrap` "
           "folder (manifest.json and examples.jsonl)")


@dataclass(frozen=True)
class Pair:
    id: str  # "run:<candidate id>:<digest>" or "lemur:<variant name>:<digest>"; the digest is of both sources
    origin: str  # the path it was read from
    dataset: str
    base_source: str
    variant_source: str
    base_accuracy: float | None
    variant_accuracy: float | None  # None for a format pair: never trained
    base_name: str = ""
    variant_name: str = ""
    purpose: Purpose = "improvement"
    source: str = ""  # "run", "lemur" or "mutator": where the pair was first made

    @property
    def digest(self) -> str:
        return pair_digest(self.base_source, self.variant_source)

    def meta(self) -> dict[str, Any]:
        """What the archive keeps beside the training example, so a pair can be traced."""
        return {"origin": self.origin, "source": self.source or self.id.split(":", 1)[0], "purpose": self.purpose,
                "dataset": self.dataset, "base": self.base_name, "variant": self.variant_name,
                "base_accuracy": self.base_accuracy, "variant_accuracy": self.variant_accuracy,
                "diff_lines": changed_lines(make_diff(self.base_source, self.variant_source))}


@dataclass
class Harvest:
    """What one source gave: its pairs, and how many networks it had and why some were left out."""

    origin: str
    kind: Kind
    pairs: list[Pair] = field(default_factory=list)
    networks: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        out = f"{len(self.pairs)} pairs from {self.networks} networks ({self.kind})"
        if self.skipped:
            out += "; left out: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return out


# --- the training example ------------------------------------------------------------------------------------------

def answer(pair: Pair, mode: str = "delta") -> str:
    """The reply the system prompt asks for (prompts/system.j2): one fenced diff, or the whole file."""
    if mode == "full":
        return f"```python\n{pair.variant_source}```"
    return f"```diff\n{make_diff(pair.base_source, pair.variant_source)}```"


def pair_example(pair: Pair, *, in_shape: tuple, num_classes: int, mode: str = "delta",
                 goal: str = "improve the first-epoch test accuracy",
                 allow_train_changes: bool = False) -> dict[str, list[dict[str, str]]]:
    """A conversational prompt-completion SFT example: the chat the run sends for this parent
    (agent/cycle_nodes.propose), and the answer that turns it into the better variant."""
    prompt = prompting.propose_messages(
        parent_source=pair.base_source, dataset=pair.dataset, in_shape=in_shape, num_classes=num_classes,
        parent_accuracy=pair.base_accuracy, goal=goal, mode=mode, allow_train_changes=allow_train_changes)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer(pair, mode)}]}


# --- what is at a path ----------------------------------------------------------------------------------------------

def source_kind(path: str | Path) -> Kind:
    """Which kind of source `path` is; FileNotFoundError or ValueError (naming the path) otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; expected {_WANTED}")
    if p.is_dir():
        if (p / ARCHIVE_FILE).is_file():
            return "run"
        if (p / BOOTSTRAP_MANIFEST).is_file() and (p / BOOTSTRAP_EXAMPLES).is_file():
            return "bootstrap"
        if _checkout_root(p) is not None:
            return "lemur-checkout"
        if (p / LEMUR_DB).is_file():
            return "lemur-db"
        raise ValueError(f"{p}: a folder, but no {ARCHIVE_FILE}, no ab/nn/nn with ab/nn/stat/train and no "
                         f"{LEMUR_DB}; expected {_WANTED}")
    tables = _sqlite_tables(p)
    if "candidates" in tables:
        return "run"
    if {"nn", "stat"} <= tables:
        return "lemur-db"
    raise ValueError(f"{p}: a SQLite database, but neither a deltanas archive (table candidates) nor a LEMUR "
                     f"database (tables nn and stat); its tables: {', '.join(sorted(tables)) or 'none'}")


def source_kind_or_none(path: str | Path) -> Kind | None:
    try:
        return source_kind(path)
    except (OSError, ValueError, sqlite3.Error):
        return None


def harvest(path: str | Path, *, dataset: str, task: str = "img-classification", epoch: int = 1,
            max_diff_lines: int = 40, limit: int = DEFAULT_LIMIT, allow_train_changes: bool = False,
            distinct: Distinct | None = None) -> Harvest:
    """The pairs of one source, whatever its kind (see the module docstring)."""
    kind = source_kind(path)
    common = dict(max_diff_lines=max_diff_lines, limit=limit, allow_train_changes=allow_train_changes,
                  distinct=distinct)
    if kind == "run":
        return archive_pairs(path, dataset=dataset, **common)
    if kind == "bootstrap":
        return bootstrap_pairs(path, dataset=dataset, **common)
    return lemur_pairs(path, task=task, dataset=dataset, epoch=epoch, **common)


def _checkout_root(p: Path) -> Path | None:
    for root in (p / "ab" / "nn", p):
        if (root / "nn").is_dir() and (root / "stat" / "train").is_dir():
            return root
    return None


def _sqlite_tables(p: Path) -> set[str]:
    with open(p, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if head and head != _SQLITE_MAGIC:
        raise ValueError(f"{p}: not a SQLite database (its first bytes are {head[:15]!r}); expected {_WANTED}")
    with _readonly(p) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@contextmanager
def _readonly(p: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection whose errors name the file (a file that is no database, or a
    corrupt one, fails on the first query rather than on open)."""
    try:
        conn = sqlite3.connect(f"{Path(p).resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise ValueError(f"{p}: cannot open the database read-only ({e})") from None
    try:
        yield conn
    except sqlite3.Error as e:
        raise ValueError(f"{p}: cannot read the database ({e})") from None
    finally:
        conn.close()


# --- another run's archive ------------------------------------------------------------------------------------------

def archive_pairs(path: str | Path, dataset: str | None = None, *, max_diff_lines: int = 40,
                  limit: int = DEFAULT_LIMIT, allow_train_changes: bool = False,
                  distinct: Distinct | None = None) -> Harvest:
    """(parent, candidate) for every `ok` candidate of another run that beat its parent."""
    p = Path(path).expanduser()
    db = p / ARCHIVE_FILE if p.is_dir() else p
    if not db.exists():
        raise FileNotFoundError(f"{db}: no such archive; expected a run directory or its {ARCHIVE_FILE}")
    try:
        store = Store(db, readonly=True)
    except StoreError as e:
        raise ValueError(str(e)) from None
    try:
        rows = [r for r in store.candidates(status="ok") if r.kind != "baseline"]
        if dataset is not None:
            others = sorted({r.dataset for r in rows} - {dataset})
            rows = [r for r in rows if r.dataset == dataset]
            if not rows and others:
                raise ValueError(f"{db}: no candidates on {dataset!r}; the archive holds {', '.join(others)}")
        out = Harvest(origin=str(p), kind="run", networks=len(rows))
        for r in rows:
            parent = store.get(r.parent_id) if r.parent_id else None
            if parent is None or not parent.source or not r.source:
                out.skipped["without a parent in the archive"] += 1
                continue
            if parent.accuracy is None or r.accuracy is None or r.accuracy <= parent.accuracy:
                out.skipped["not better than the parent"] += 1
                continue
            base, variant = clean_source(parent.source), clean_source(r.source)
            why = refusal(base, variant, max_diff_lines, allow_train_changes, distinct)
            if why:
                out.skipped[why] += 1
                continue
            out.pairs.append(Pair(id=f"run:{r.id}:{pair_digest(base, variant)}", origin=str(p), dataset=r.dataset,
                                  base_source=base, variant_source=variant, base_accuracy=parent.accuracy,
                                  variant_accuracy=r.accuracy, base_name=parent.id, variant_name=r.id))
    finally:
        store.close()
    out.pairs = _best_first(out.pairs)[:limit]
    return out


# --- LEMUR ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Net:
    name: str
    accuracy: float
    code: str


def lemur_pairs(path: str | Path, *, task: str = "img-classification", dataset: str = "mnist", epoch: int = 1,
                max_diff_lines: int = 40, limit: int = DEFAULT_LIMIT, allow_train_changes: bool = False,
                distinct: Distinct | None = None) -> Harvest:
    """Pairs of LEMUR networks on one task and dataset, from its database or a checkout.
    `dataset` may be the run's name (`cifar10`) or LEMUR's (`cifar-10`)."""
    p = Path(path).expanduser()
    name = LEMUR_DATASETS.get(dataset, dataset)
    skipped: Counter = Counter()
    kind = source_kind(p)
    if kind in ("run", "bootstrap"):
        raise ValueError(f"{p}: a deltanas {kind}, not LEMUR data; expected an nn-dataset database or checkout")
    if kind == "lemur-checkout":
        nets = _checkout_networks(_checkout_root(p), task, name, epoch, skipped)
    else:
        nets = _db_networks(p if p.is_file() else p / LEMUR_DB, task, name, epoch, skipped)
    nets = _usable(nets, skipped)
    out = Harvest(origin=str(p), kind=kind, networks=len(nets), skipped=skipped)
    out.pairs = _closest_pairs(nets, str(p), dataset, max_diff_lines, limit, allow_train_changes, distinct,
                               skipped)
    return out


def _db_networks(db: Path, task: str, dataset: str, epoch: int, skipped: Counter) -> list[_Net]:
    """Each network's best accuracy at `epoch` on the task and dataset, with its code."""
    with _readonly(db) as conn:
        for table, wanted in _LEMUR_COLUMNS.items():
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if not have:
                raise ValueError(f"{db}: no table {table}; expected LEMUR's schema (nn(name, code, id) and "
                                 "stat(accuracy, epoch, task, dataset, nn, ...))")
            if wanted - have:
                raise ValueError(f"{db}: table {table} lacks column(s) {', '.join(sorted(wanted - have))}; "
                                 "expected LEMUR's schema")
        where = "s.task = ? AND s.dataset = ? AND s.epoch = ? AND s.accuracy IS NOT NULL"
        rows = conn.execute(
            f"SELECT s.nn, MAX(s.accuracy), n.code FROM stat s LEFT JOIN nn n ON n.name = s.nn WHERE {where} "
            "GROUP BY s.nn ORDER BY s.nn", (task, dataset, epoch)).fetchall()
        if not rows:
            there = conn.execute("SELECT DISTINCT task, dataset, epoch FROM stat ORDER BY 1, 2, 3 LIMIT 12").fetchall()
            raise ValueError(f"{db}: no statistics for task {task!r}, dataset {dataset!r}, epoch {epoch}; "
                             f"it has: {'; '.join(' '.join(map(str, r)) for r in there) or 'nothing'}")
    nets = []
    for name, acc, code in rows:
        if not isinstance(code, str) or not code.strip():
            skipped["without code in table nn"] += 1
        else:
            nets.append(_Net(str(name), float(acc), code))
    return nets


def _checkout_networks(root: Path, task: str, dataset: str, epoch: int, skipped: Counter) -> list[_Net]:
    """The same, from the stat JSON files and model files of a checkout. A bad stat file is
    counted and passed over (LEMUR's own importer does the same); none usable is an error."""
    best: dict[str, float] = {}
    there: set[str] = set()
    bad: list[str] = []
    for folder in sorted((root / "stat" / "train").iterdir()):
        parts = folder.name.split("_", 3)
        if not folder.is_dir() or len(parts) != 4:
            continue
        f_task, f_dataset, _metric, nn = parts
        if f_task != task or f_dataset != dataset:
            there.add(f"{f_task} {f_dataset}")
            continue
        stat = folder / f"{epoch}.json"
        if not stat.is_file():
            there.update(f"{task} {dataset} epoch {e.stem}" for e in folder.glob("*.json"))
            continue
        accs = _trial_accuracies(stat)
        if accs is None:
            skipped["stat files unreadable or not a JSON list"] += 1
            bad.append(str(stat))
        elif not accs:
            skipped["stat files without an accuracy"] += 1
        else:
            best[nn] = max(best.get(nn, float("-inf")), *accs)
    if not best:
        why = f"; unreadable: {', '.join(bad[:3])} (expected a JSON list of trials with an accuracy)" if bad else ""
        raise ValueError(f"{root}: no statistics for task {task!r}, dataset {dataset!r}, epoch {epoch} in "
                         f"stat/train/{task}_{dataset}_<metric>_<Name>/{epoch}.json{why}; it has: "
                         f"{'; '.join(sorted(there)[:12]) or 'nothing'}")
    nets = []
    for nn, acc in sorted(best.items()):
        try:
            code = (root / "nn" / f"{nn}.py").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped["without a readable nn/<Name>.py"] += 1
            continue
        nets.append(_Net(nn, acc, code))
    return nets


def _trial_accuracies(stat: Path) -> list[float] | None:
    try:
        trials = json.loads(stat.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(trials, list):
        return None
    accs = [t.get("accuracy") for t in trials if isinstance(t, dict)]
    return [float(a) for a in accs if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)]


def _usable(nets: list[_Net], skipped: Counter) -> list[_Net]:
    """Valid Python that defines Net; one network per distinct code (the more accurate name)."""
    by_code: dict[str, _Net] = {}
    for n in nets:
        code = clean_source(n.code)
        try:
            tree = pyast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            skipped["not valid Python"] += 1
            continue
        if not any(getattr(node, "name", None) == "Net" for node in tree.body):
            skipped["without class Net"] += 1
            continue
        other = by_code.get(code)
        if other is not None:
            skipped["same code as another network"] += 1
            if (other.accuracy, other.name) >= (n.accuracy, n.name):
                continue
        by_code[code] = _Net(n.name, n.accuracy, code)
    return sorted(by_code.values(), key=lambda n: n.name)


def _closest_pairs(nets: list[_Net], origin: str, dataset: str, max_lines: int, limit: int,
                   allow_train_changes: bool, distinct: Distinct | None, skipped: Counter) -> list[Pair]:
    """For each network, best first, its closest less accurate partner that the run would accept.

    Diffing every pair is quadratic, so two cheap lower bounds on a diff's changed lines
    come first: the difference in line counts, and the lines one file has and the other lacks.
    """
    lines = {n.name: n.code.splitlines() for n in nets}
    sets = {n.name: frozenset(lines[n.name]) for n in nets}
    counts = {n.name: Counter(lines[n.name]) for n in nets}
    by_len = sorted(nets, key=lambda n: (len(lines[n.name]), n.name))
    lens = [len(lines[n.name]) for n in by_len]
    out: list[Pair] = []
    for b in sorted(nets, key=lambda n: (-n.accuracy, n.name)):
        if len(out) >= limit:
            break
        nb = len(lines[b.name])
        near = by_len[bisect.bisect_left(lens, nb - max_lines):bisect.bisect_right(lens, nb + max_lines)]
        options = []
        for a in near:
            if a.accuracy >= b.accuracy or len(sets[a.name] ^ sets[b.name]) > max_lines:
                continue
            ca, cb = counts[a.name], counts[b.name]
            if sum(((ca - cb) + (cb - ca)).values()) > max_lines:
                continue
            n = changed_lines(make_diff(a.code, b.code))
            if n <= max_lines:
                options.append((n, a.name, a))
        for _n, _name, a in sorted(options, key=lambda o: o[:2]):
            why = refusal(a.code, b.code, max_lines, allow_train_changes, distinct)
            if why:
                skipped[why] += 1
                continue
            out.append(Pair(id=f"lemur:{b.name}:{pair_digest(a.code, b.code)}", origin=origin, dataset=dataset,
                            base_source=a.code, variant_source=b.code, base_accuracy=a.accuracy,
                            variant_accuracy=b.accuracy, base_name=a.name, variant_name=b.name))
            break
    return out


# --- a bootstrap folder ---------------------------------------------------------------------------------------------

def pair_record(pair: Pair) -> dict[str, Any]:
    """A pair as one line of a bootstrap folder's examples.jsonl (its example rides beside it)."""
    return {"id": pair.id, "origin": pair.origin, "source": pair.source, "purpose": pair.purpose,
            "dataset": pair.dataset, "base_name": pair.base_name, "variant_name": pair.variant_name,
            "base_accuracy": pair.base_accuracy, "variant_accuracy": pair.variant_accuracy,
            "base_source": pair.base_source, "variant_source": pair.variant_source}


def bootstrap_pairs(path: str | Path, dataset: str, *, max_diff_lines: int = 40, limit: int = DEFAULT_LIMIT,
                    allow_train_changes: bool = False, distinct: Distinct | None = None) -> Harvest:
    """The pairs of a bootstrap folder that this run would accept: improvement pairs measured on
    `dataset` first, then format pairs (asked of `dataset`, as the run will ask). Every pair passes
    the run's own rules again, since its settings may differ from the bootstrap's."""
    p = Path(path).expanduser()
    out = Harvest(origin=str(p), kind="bootstrap")
    improving, forming = [], []
    try:
        lines = (p / BOOTSTRAP_EXAMPLES).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p / BOOTSTRAP_EXAMPLES}: cannot read it ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pair = Pair(id=str(rec["id"]), origin=str(p), dataset=str(rec["dataset"]),
                        base_source=clean_source(rec["base_source"]), variant_source=clean_source(rec["variant_source"]),
                        base_accuracy=rec.get("base_accuracy"), variant_accuracy=rec.get("variant_accuracy"),
                        base_name=str(rec.get("base_name", "")), variant_name=str(rec.get("variant_name", "")),
                        purpose="format" if rec.get("purpose") == "format" else "improvement",
                        source=str(rec.get("source", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            out.skipped["lines that are not a pair record"] += 1
            continue
        out.networks += 1
        if pair.purpose == "improvement" and pair.dataset != dataset:
            out.skipped[f"improvement pairs measured on another dataset than {dataset}"] += 1
            continue
        why = refusal(pair.base_source, pair.variant_source, max_diff_lines, allow_train_changes, distinct)
        if why:
            out.skipped[why] += 1
            continue
        if pair.purpose == "format":
            forming.append(replace(pair, dataset=dataset))
        else:
            improving.append(pair)
    if not out.networks and not out.skipped:
        raise ValueError(f"{p / BOOTSTRAP_EXAMPLES}: holds no pairs")
    out.pairs = (improving + forming)[:limit]
    return out


# --- what a pair must pass ------------------------------------------------------------------------------------------

def changed_lines(diff: str) -> int:
    """Added plus removed lines of a unified diff (its file headers excluded)."""
    return sum(1 for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++ ", "--- ")))


def refusal(base: str, variant: str, max_lines: int, allow_train_changes: bool,
            distinct: Distinct | None = None) -> str | None:
    """Why the run would not accept `variant` as a delta of `base` (a short reason for the
    counts), or None: the diff is small, and the project's applier turns it back into `variant`."""
    diff = make_diff(base, variant)
    n = changed_lines(diff)
    if n == 0:
        return "identical to the base"
    if n > max_lines:
        return f"diffs over {max_lines} lines"
    res = apply_diff(base, diff, allow_train_changes=allow_train_changes)
    if not res.ok:
        return f"refused by the applier ({res.error.code.value})"
    if res.source != variant:
        return "not reproduced by the applier"
    if distinct is not None and not distinct(base, variant):
        return "too similar to the base to be novel"
    return None


def clean_source(source: str) -> str:
    """One spelling of a file: LF line ends and one final newline, as the applier writes it."""
    return source.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n") + "\n"


def pair_digest(base: str, variant: str) -> str:
    return hashlib.sha1(f"{base}\0{variant}".encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _best_first(pairs: list[Pair]) -> list[Pair]:
    return sorted(pairs, key=lambda p: (-(p.variant_accuracy or 0.0), p.id))


# --- several sources ------------------------------------------------------------------------------------------------

def gather(paths: list[str], *, dataset: str, task: str = "img-classification", epoch: int = 1,
           max_diff_lines: int = 40, limit: int = DEFAULT_LIMIT, allow_train_changes: bool = False,
           distinct: Distinct | None = None) -> tuple[list[Pair], list[dict[str, Any]]]:
    """The pairs of every path in turn, up to `limit` in all, each pair once however many
    sources hold it; and one report per path. A path that cannot be read is reported, not raised:
    the run that asked goes on without it."""
    pairs: list[Pair] = []
    seen: set[str] = set()
    reports: list[dict[str, Any]] = []
    for path in paths:
        if len(pairs) >= limit:
            reports.append({"path": str(path), "kind": None, "pairs": 0, "error": None,
                            "summary": f"not read: {limit} pairs were found before it"})
            continue
        try:
            got = harvest(path, dataset=dataset, task=task, epoch=epoch, max_diff_lines=max_diff_lines,
                          limit=limit - len(pairs), allow_train_changes=allow_train_changes, distinct=distinct)
        except (OSError, ValueError, sqlite3.Error) as e:
            reports.append({"path": str(path), "kind": None, "pairs": 0, "error": f"cannot read: {e}"})
            continue
        new = [p for p in got.pairs if p.digest not in seen]
        seen.update(p.digest for p in new)
        pairs.extend(new)
        reports.append({"path": str(path), "kind": got.kind, "pairs": len(new), "networks": got.networks,
                        "skipped": dict(got.skipped), "summary": got.summary(), "error": None})
    return pairs, reports


def describe(reports: list[dict[str, Any]]) -> str:
    """One line for the archive's adapter note: what each source gave, or why it gave nothing."""
    return "; ".join(f"{r['path']}: {r['error'] or r['summary']}" for r in reports)
