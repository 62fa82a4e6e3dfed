"""MinHash novelty: is a candidate structurally new against its parent and the archive?

The paper's parameters: 128 permutations over 7-token shingles of the normalised
source; Jaccard similarity >= 0.90 to the parent or to any archived candidate means
"not novel". Normalising drops comments, docstrings and layout so that a diff that
only reformats or comments the code is caught as a duplicate.

Similarity is always MinHash's estimate: the fraction of the `num_perm` hash values
that two signatures share. The archive index is banded LSH whose bands are chosen so
that it cannot miss a pair at or above the threshold (see `lsh_bands`); the decision
is then made on the exact estimate of the LSH hits only. So `check` answers exactly
what a brute-force scan over the whole archive answers, for every candidate whose
best similarity reaches the threshold, at a few hundred microseconds per check
against 100k archived candidates (`bench/novelty_scale.py`).
"""
from __future__ import annotations

import io
import re
import threading
import tokenize
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENCODING, tokenize.ENDMARKER}
_FALLBACK_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+\.?\d*|\S")


def normalise_tokens(source: str) -> list[str]:
    """Python tokens of the source without comments, docstrings or whitespace."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return _FALLBACK_TOKEN.findall(source)
    out: list[str] = []
    prev_type = tokenize.NEWLINE
    for t in toks:
        if t.type in _SKIP:
            if t.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                prev_type = tokenize.NEWLINE
            continue
        # A string that starts a logical line is a docstring or a bare expression: drop it.
        if t.type == tokenize.STRING and prev_type == tokenize.NEWLINE:
            continue
        out.append(t.string)
        prev_type = t.type
    return out


def shingles(tokens: list[str], k: int) -> list[bytes]:
    if len(tokens) < k:
        return [" ".join(tokens).encode()] if tokens else [b""]
    return [" ".join(tokens[i:i + k]).encode() for i in range(len(tokens) - k + 1)]


def min_shared(threshold: float, num_perm: int) -> int:
    """The fewest shared hash values whose similarity estimate (shared / num_perm) is >= threshold.

    Computed with the same float division that the decision uses, so the two never disagree.
    """
    k = next((k for k in range(num_perm + 1) if k / num_perm >= threshold), None)
    if k is None or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return k


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for which LSH cannot miss a pair at or above `threshold`.

    A pair at the threshold shares at least `min_shared` of the `num_perm` values, so it
    differs in at most `m = num_perm - min_shared` positions. Each differing position
    spoils at most one band; with `m + 1` disjoint bands at least one band is identical
    in both signatures, and that band puts the pair in the same bucket. The
    false-negative rate at and above the threshold is therefore zero by construction,
    not merely small: for the paper's 0.90 and 128 permutations, m = 12 and the index
    uses 13 bands of 9 rows (117 of the 128 values). The default that datasketch's
    `MinHashLSH(threshold=0.8)` picks, 9 bands of 13 rows, missed 2.2% of pairs sharing
    116 values (estimate 0.906) in a simulation with random differing positions.

    The price is recall below the threshold, where hits only cost time: at 0.9 a
    pair of true similarity 0.8 is fetched 85% of the time and one of 0.5 about 2.5%.
    A low threshold means many bands of few rows, and the index degrades towards a
    full scan (at 0.5, 65 bands of one row), still exact.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be positive, got {num_perm!r}")
    bands = num_perm - min_shared(threshold, num_perm) + 1
    return bands, num_perm // bands


@dataclass(frozen=True)
class NoveltyResult:
    novel: bool
    parent_similarity: float
    max_similarity: float  # the highest of parent and archive similarity
    nearest_id: str | None  # the archived candidate (or parent) with the highest similarity

    def to_json(self) -> dict:
        return {"novel": self.novel, "parent_similarity": round(self.parent_similarity, 4),
                "max_similarity": round(self.max_similarity, 4), "nearest_id": self.nearest_id}


class _BandIndex:
    """Banded LSH over a growing matrix of signatures, in numpy arrays.

    Each band's values hash to one uint64 (a sum of products with random odd
    multipliers, per band, wrapping mod 2^64); a hash collision only adds a hit,
    which the exact comparison then discards. The bucket keys of all bands live in
    one sorted array searched with `np.searchsorted`; rows added since the last merge
    sit in a short unsorted tail compared in one vectorised step, and are merged in
    when the tail is full. Compared with datasketch's `MinHashLSH` (a dict of sets
    per band) it needs about a fifth of the memory at 100k signatures, and a query
    returns row numbers, so the exact similarities of all hits are one numpy
    comparison.
    """

    MERGE_AT = 2048  # tail rows; a merge is O(archive), so this bounds its amortised cost

    def __init__(self, num_perm: int, bands: int, rows: int, dtype: np.dtype, seed: int):
        self.bands, self.rows = bands, rows
        self.sigs = np.empty((64, num_perm), dtype=dtype)
        self.n = 0
        rng = np.random.default_rng(seed)
        self._mult = rng.integers(0, 1 << 63, size=(bands, rows), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._sorted_keys = np.empty(0, dtype=np.uint64)
        self._sorted_rows = np.empty(0, dtype=np.int32)
        self._merged = 0  # rows [0, _merged) are in the sorted arrays; the rest are the tail
        self._tail_keys = np.empty((self.MERGE_AT, bands), dtype=np.uint64)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, num_perm) signatures -> (n, bands) bucket keys."""
        used = sigs[:, :self.bands * self.rows].reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
        return (used * self._mult).sum(axis=2, dtype=np.uint64)

    def append(self, sig: np.ndarray) -> None:
        if self.n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs[:len(self.sigs) // 2])])
        self.sigs[self.n] = sig
        self._tail_keys[self.n - self._merged] = self.band_keys(sig[None, :])[0]
        self.n += 1
        if self.n - self._merged == self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        new_keys = self._tail_keys[:self.n - self._merged].ravel()
        new_rows = np.repeat(np.arange(self._merged, self.n, dtype=np.int32), self.bands)
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_rows = new_keys[order], new_rows[order]
        at = np.searchsorted(self._sorted_keys, new_keys, side="right")
        self._sorted_keys = np.insert(self._sorted_keys, at, new_keys)
        self._sorted_rows = np.insert(self._sorted_rows, at, new_rows)
        self._merged = self.n

    def nearest(self, sig: np.ndarray) -> tuple[int, int]:
        """(row, shared values) of the LSH hit sharing the most values with `sig`, the earliest
        row on a tie; (-1, -1) when nothing shares a bucket."""
        q = self.band_keys(sig[None, :])[0]
        lo = np.searchsorted(self._sorted_keys, q, side="left")
        hi = np.searchsorted(self._sorted_keys, q, side="right")
        parts = [self._sorted_rows[a:b] for a, b in zip(lo.tolist(), hi.tolist()) if b > a]
        if self.n > self._merged:
            tail = np.flatnonzero((self._tail_keys[:self.n - self._merged] == q).any(axis=1))
            if len(tail):
                parts.append(tail + self._merged)
        if not parts:
            return -1, -1
        hits = np.unique(np.concatenate(parts)) if len(parts) > 1 else np.sort(parts[0])
        shared = np.count_nonzero(self.sigs[hits] == sig, axis=1)
        best = int(np.argmax(shared))  # the first maximum: the earliest row
        return int(hits[best]), int(shared[best])

    def nbytes(self) -> int:
        return self.sigs.nbytes + self._tail_keys.nbytes + self._sorted_keys.nbytes + self._sorted_rows.nbytes


class NoveltyIndex:
    """The archive's MinHash signatures, with an LSH index for the check.

    `check` gives the same `novel`, `max_similarity` and `nearest_id` as a brute-force
    scan of every archived signature whenever that scan's best similarity reaches the
    threshold (ties go to the parent, then to the earliest archived candidate). Below the
    threshold the candidate is novel either way; the similarity and nearest id reported
    are then the best among the LSH hits, a lower bound of the scan's.

    Callers keep signatures as bytes (`sig.hashvalues.tobytes()`, the archive's `minhash`
    column) and rebuild an index on resume with `add(id, from_hashvalues(blob))`.
    Thread-safe: the graph checks candidates of one cycle concurrently.
    """

    PARENT_CACHE = 256  # parent signatures kept: a cycle's candidates share a few parents

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, shingle: int = 7, seed: int = 1):
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        if shingle < 1:
            raise ValueError(f"shingle must be positive, got {shingle!r}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        # One template holds the permutations; copies avoid recomputing them per signature.
        self._template = MinHash(num_perm=num_perm, seed=seed)
        self._index = _BandIndex(num_perm, self.bands, self.rows, self._template.hashvalues.dtype, seed)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._parents: OrderedDict[str, MinHash] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def signature(self, source: str) -> MinHash:
        m = self._template.copy()
        m.update_batch(shingles(normalise_tokens(source), self.shingle))
        return m

    def signatures(self, sources: Iterable[str]) -> list[MinHash]:
        """`signature` of each source, through `MinHash.bulk` (the permutations are built once)."""
        return MinHash.bulk((shingles(normalise_tokens(s), self.shingle) for s in sources),
                            num_perm=self.num_perm, seed=self.seed)

    def from_hashvalues(self, hashvalues: bytes) -> MinHash:
        """The signature whose `hashvalues.tobytes()` gave `hashvalues` (the archive's blob)."""
        dtype = self._template.hashvalues.dtype
        want = self.num_perm * dtype.itemsize
        if not isinstance(hashvalues, (bytes, bytearray, memoryview)) or len(hashvalues) != want:
            got = f"{len(hashvalues)} bytes" if isinstance(hashvalues, (bytes, bytearray, memoryview)) \
                else type(hashvalues).__name__
            raise ValueError(f"a signature is {want} bytes ({self.num_perm} {dtype} hash values), got {got}; "
                             "was it made with other novelty settings or another datasketch scheme?")
        m = self._template.copy()
        m.hashvalues = np.frombuffer(hashvalues, dtype=dtype).copy()
        return m

    def _values(self, sig: MinHash) -> np.ndarray:
        values = getattr(sig, "hashvalues", None)
        if not isinstance(sig, MinHash) or values is None:
            raise ValueError(f"expected a datasketch MinHash, got {type(sig).__name__}")
        if len(values) != self.num_perm or sig.seed != self.seed \
                or getattr(sig, "scheme", None) != getattr(self._template, "scheme", None):
            raise ValueError(f"signature has {len(values)} permutations, seed {sig.seed}; "
                             f"this index uses {self.num_perm} and seed {self.seed}")
        return np.asarray(values, dtype=self._template.hashvalues.dtype)

    def add(self, key: str, sig: MinHash) -> None:
        """Archive a signature. A key already present keeps its first signature."""
        values = self._values(sig)
        with self._lock:
            if key in self._rows:
                return
            self._rows[key] = len(self._ids)
            self._ids.append(key)
            self._index.append(values)

    def _parent_signature(self, source: str) -> MinHash:
        with self._lock:
            sig = self._parents.get(source)
            if sig is not None:
                self._parents.move_to_end(source)
                return sig
        sig = self.signature(source)
        with self._lock:
            self._parents[source] = sig
            if len(self._parents) > self.PARENT_CACHE:
                self._parents.popitem(last=False)
        return sig

    def nearest(self, sig: MinHash) -> tuple[str | None, float]:
        """The archived candidate most similar to `sig` among the LSH hits, and the similarity
        ((None, 0.0) when none). Exact whenever the similarity reaches the threshold."""
        values = self._values(sig)
        with self._lock:
            row, shared = self._index.nearest(values)
            return (None, 0.0) if row < 0 else (self._ids[row], shared / self.num_perm)

    def check(self, source: str, parent_source: str | None = None, parent_id: str | None = None,
              sig: MinHash | None = None) -> NoveltyResult:
        sig = sig if sig is not None else self.signature(source)
        parent_sim = 0.0
        best, nearest = 0.0, None
        if parent_source is not None:
            shared = int(np.count_nonzero(self._values(sig) == self._parent_signature(parent_source).hashvalues))
            parent_sim = best = shared / self.num_perm
            nearest = parent_id
        key, sim = self.nearest(sig)
        if sim > best:  # strictly: on a tie the parent is named
            best, nearest = sim, key
        return NoveltyResult(novel=bool(best < self.threshold), parent_similarity=float(parent_sim),
                             max_similarity=float(best), nearest_id=nearest)

    def nbytes(self) -> int:
        """Memory of the signatures and the LSH arrays (ids and the id map not counted)."""
        return self._index.nbytes()
