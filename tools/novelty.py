"""MinHash novelty: is a candidate structurally new against its parent and the archive?

The paper's parameters: 128 permutations over 7-token shingles of the normalised
source; Jaccard similarity >= 0.90 to the parent or to any archived candidate means
"not novel". Normalising drops comments, docstrings and layout so that a diff that
only reformats or comments the code is caught as a duplicate.
"""
from __future__ import annotations

import io
import re
import threading
import tokenize
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

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


@dataclass(frozen=True)
class NoveltyResult:
    novel: bool
    parent_similarity: float
    max_similarity: float  # the highest of parent and archive similarity
    nearest_id: str | None  # the archived candidate (or parent) with the highest similarity

    def to_json(self) -> dict:
        return {"novel": self.novel, "parent_similarity": round(self.parent_similarity, 4),
                "max_similarity": round(self.max_similarity, 4), "nearest_id": self.nearest_id}


class NoveltyIndex:
    """An LSH index of archived candidates' MinHash signatures.

    The LSH band threshold sits below the decision threshold so that near misses
    are still fetched; the decision itself uses the estimated Jaccard similarity.
    Thread-safe: the graph checks candidates of one cycle concurrently.
    """

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, shingle: int = 7, seed: int = 1):
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        self._lsh = MinHashLSH(threshold=max(0.5, threshold - 0.1), num_perm=num_perm)
        self._sigs: dict[str, MinHash] = {}
        self._lock = threading.Lock()
        # One template holds the permutations; copies avoid recomputing them per signature.
        self._template = MinHash(num_perm=num_perm, seed=seed)

    def __len__(self) -> int:
        return len(self._sigs)

    def signature(self, source: str) -> MinHash:
        m = self._template.copy()
        m.update_batch(shingles(normalise_tokens(source), self.shingle))
        return m

    def from_hashvalues(self, hashvalues: bytes) -> MinHash:
        m = self._template.copy()
        m.hashvalues = np.frombuffer(hashvalues, dtype=self._template.hashvalues.dtype).copy()
        return m

    def add(self, key: str, sig: MinHash) -> None:
        with self._lock:
            if key in self._sigs:
                return
            self._sigs[key] = sig
            self._lsh.insert(key, sig)

    def check(self, source: str, parent_source: str | None = None, parent_id: str | None = None,
              sig: MinHash | None = None) -> NoveltyResult:
        sig = sig if sig is not None else self.signature(source)
        parent_sim = sig.jaccard(self.signature(parent_source)) if parent_source is not None else 0.0
        best, nearest = parent_sim, (parent_id if parent_source is not None else None)
        with self._lock:
            for key in self._lsh.query(sig):
                sim = sig.jaccard(self._sigs[key])
                if sim > best:
                    best, nearest = sim, key
        return NoveltyResult(novel=best < self.threshold, parent_similarity=parent_sim,
                             max_similarity=best, nearest_id=nearest)
