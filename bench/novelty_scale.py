"""Novelty at scale: ms per check against an archive of N candidates, LSH index beside full scans.

    python bench/novelty_scale.py [--n 100000] [--checks 1000] [--scan-checks 30] [--real 4000] [--seed 0] [--json]

The archive is built the way a run builds it: a candidate is archived only when
`NoveltyIndex.check` finds it novel. Its candidates are
- real: zoo baselines and 2-4-step rule-based mutations of random earlier ones
  (`tools/mutator.py`, as the `mutate` backend proposes them), `--real` of them;
- edited: the token stream of a real source with 8-60 random span edits (1-6
  tokens replaced by tokens of the zoo's vocabulary), similar to it but novel;
- random: random token streams over the zoo's vocabulary, of real lengths;
edited and random half each, until N are archived. Signatures come from
`NoveltyIndex.signatures` (`MinHash.bulk`); the real ones pay normalisation
(Python tokenize), the synthetic ones start from tokens.

The checks are the loop's workload: 80% fresh 2-4-step mutations of archived real
sources, 10% archived real sources proposed again, 10% random streams. Each is
timed as `check(source, sig=sig)`, the index part only; signature time per source
is reported apart. Every index answers the same checks; the LSH index is compared
with an exact numpy scan on all of them (agreement wherever the best similarity
reaches the threshold), and the linear scan, the baseline, on the first
`--scan-checks`. Memory is what each index holds after a resume-style rebuild from
the archive's signature bytes (`from_hashvalues` + `add`), traced with tracemalloc.
`--json` prints the figures as one JSON object on stdout and the prose on stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from datasketch import MinHash, MinHashLSH

from deltanas.tools.mutator import NoMutation, mutate_source
from deltanas.tools.novelty import NoveltyIndex, lsh_bands, normalise_tokens, shingles
from deltanas.tools.zoo import list_baselines


# --- the indexes compared ---------------------------------------------------------------


class LinearScan:
    """The baseline: every archived signature compared with `MinHash.jaccard`, one by one."""

    name = "linear scan (MinHash.jaccard per archived signature)"

    def __init__(self, template: NoveltyIndex):
        self.t = template
        self.sigs: dict[str, MinHash] = {}

    def add(self, key: str, sig: MinHash) -> None:
        self.sigs.setdefault(key, sig)

    def nearest(self, sig: MinHash) -> tuple[str | None, float]:
        best, nearest = 0.0, None
        for key, other in self.sigs.items():
            sim = sig.jaccard(other)
            if sim > best:
                best, nearest = sim, key
        return nearest, float(best)


class NumpyScan:
    """Exact too, in one vectorised comparison with the whole signature matrix."""

    name = "numpy scan (whole matrix, one comparison)"

    def __init__(self, template: NoveltyIndex):
        self.t = template
        self.ids: list[str] = []
        self.rows: list[np.ndarray] = []
        self.matrix = np.empty((0, template.num_perm), dtype=template._template.hashvalues.dtype)

    def add(self, key: str, sig: MinHash) -> None:
        self.ids.append(key)
        self.rows.append(sig.hashvalues)

    def nearest(self, sig: MinHash) -> tuple[str | None, float]:
        if len(self.rows) != len(self.matrix):
            self.matrix = np.vstack(self.rows)
        if not len(self.matrix):
            return None, 0.0
        shared = np.count_nonzero(self.matrix == sig.hashvalues, axis=1)
        i = int(np.argmax(shared))
        return (self.ids[i], shared[i] / self.t.num_perm) if shared[i] else (None, 0.0)


class DatasketchLSH:
    """datasketch's MinHashLSH, exact Jaccard on its hits. threshold=0.8 is the index before
    this benchmark (its own band choice, 9 x 13); params=(13, 9) gives it the zero-miss bands."""

    def __init__(self, template: NoveltyIndex, *, params: tuple[int, int] | None = None):
        self.t = template
        if params is None:
            self.lsh = MinHashLSH(threshold=max(0.5, template.threshold - 0.1), num_perm=template.num_perm)
            self.name = f"datasketch MinHashLSH(threshold=0.8): {self.lsh.b} bands x {self.lsh.r} (previous index)"
        else:
            self.lsh = MinHashLSH(num_perm=template.num_perm, params=params)
            self.name = f"datasketch MinHashLSH(params={params}): zero-miss bands"
        self.sigs: dict[str, MinHash] = {}

    def add(self, key: str, sig: MinHash) -> None:
        if key not in self.sigs:
            self.sigs[key] = sig
            self.lsh.insert(key, sig)

    def nearest(self, sig: MinHash) -> tuple[str | None, float]:
        best, nearest = 0.0, None
        for key in self.lsh.query(sig):
            sim = sig.jaccard(self.sigs[key])
            if sim > best:
                best, nearest = sim, key
        return nearest, float(best)


class Ours:
    """`NoveltyIndex` itself, timed through `check` as the graph calls it."""

    def __init__(self, template: NoveltyIndex):
        self.index = NoveltyIndex(threshold=template.threshold, num_perm=template.num_perm,
                                  shingle=template.shingle, seed=template.seed)
        self.name = f"NoveltyIndex: numpy banded LSH, {self.index.bands} bands x {self.index.rows} (this change)"

    def add(self, key: str, sig: MinHash) -> None:
        self.index.add(key, sig)

    def nearest(self, sig: MinHash) -> tuple[str | None, float]:
        r = self.index.check("", sig=sig)
        return r.nearest_id, r.max_similarity


# --- the archive and the checks ----------------------------------------------------------


def mutate(source: str, rng: random.Random) -> str | None:
    """2-4 stacked mutations, as the `mutate` backend proposes."""
    out, done = source, 0
    for _ in range(rng.randint(2, 4)):
        try:
            _, out = mutate_source(out, rng)
            done += 1
        except NoMutation:
            break
    return out if done else None


def edited(tokens: list[str], vocab: list[str], rng: random.Random) -> list[str]:
    out = list(tokens)
    for _ in range(rng.randint(8, 60)):
        i, n = rng.randrange(len(out)), rng.randint(1, 6)
        out[i:i + n] = rng.choices(vocab, k=rng.randint(1, 6))
    return out


def build_archive(n: int, n_real: int, rng: random.Random, index: NoveltyIndex):
    """(archived ids, their sources or None, signatures, real token streams, stats): check, then add if novel."""
    stats = {"real_generated": 0, "synthetic_generated": 0, "rejected": 0, "real_sig_s": 0.0, "synth_sig_s": 0.0,
             "check_add_s": 0.0}
    ids: list[str] = []
    sources: dict[str, str] = {}
    sigs: dict[str, MinHash] = {}

    def offer(key: str, sig: MinHash, source: str | None) -> None:
        t = time.perf_counter()
        if index.check("", sig=sig).novel:
            index.add(key, sig)
            ids.append(key)
            sigs[key] = sig
            if source is not None:
                sources[key] = source
        else:
            stats["rejected"] += 1
        stats["check_add_s"] += time.perf_counter() - t

    real = [b.source for b in list_baselines()]
    while len(real) < n_real:
        child = mutate(rng.choice(real), rng)
        if child is not None:
            real.append(child)
    real = real[:n_real]
    t = time.perf_counter()
    real_sigs = index.signatures(real)
    stats["real_sig_s"] = time.perf_counter() - t
    stats["real_generated"] = len(real)
    for i, (src, sig) in enumerate(zip(real, real_sigs)):
        if len(ids) < n:
            offer(f"real-{i}", sig, src)
    tokens = [normalise_tokens(s) for s in real]
    vocab = [t for toks in tokens for t in toks]
    i = 0
    while len(ids) < n:
        batch = []
        for _ in range(min(4096, 2 * (n - len(ids)))):
            if rng.random() < 0.5:
                batch.append(edited(rng.choice(tokens), vocab, rng))
            else:
                batch.append(rng.choices(vocab, k=len(rng.choice(tokens))))
        t = time.perf_counter()
        batch_sigs = MinHash.bulk([shingles(b, index.shingle) for b in batch], num_perm=index.num_perm,
                                  seed=index.seed)
        stats["synth_sig_s"] += time.perf_counter() - t
        stats["synthetic_generated"] += len(batch)
        for sig in batch_sigs:
            if len(ids) >= n:
                break
            offer(f"syn-{i}", sig, None)
            i += 1
    return ids, sources, sigs, tokens, stats


def make_checks(m: int, ids: list[str], sources: dict[str, str], tokens: list[list[str]], index: NoveltyIndex,
                rng: random.Random) -> tuple[list[MinHash], float]:
    """m signatures to check, and the seconds per source their signatures took."""
    real_ids = [k for k in ids if k in sources]
    vocab = [t for toks in tokens for t in toks]
    texts: list[str] = []
    token_checks: list[list[str]] = []
    while len(texts) + len(token_checks) < m:
        u = rng.random()
        if u < 0.8:
            child = mutate(sources[rng.choice(real_ids)], rng)
            if child is not None:
                texts.append(child)
        elif u < 0.9:
            texts.append(sources[rng.choice(real_ids)])
        else:
            token_checks.append(rng.choices(vocab, k=len(rng.choice(tokens))))
    t = time.perf_counter()
    sigs = index.signatures(texts)
    per_source = (time.perf_counter() - t) / max(1, len(texts))
    sigs += MinHash.bulk([shingles(b, index.shingle) for b in token_checks], num_perm=index.num_perm,
                         seed=index.seed)
    order = list(range(len(sigs)))
    rng.shuffle(order)
    return [sigs[i] for i in order], per_source


def time_checks(nearest: Callable[[MinHash], tuple[str | None, float]], sigs: list[MinHash]):
    answers, times = [], []
    for sig in sigs:
        t = time.perf_counter()
        answers.append(nearest(sig))
        times.append(time.perf_counter() - t)
    return answers, times


def build_from_blobs(make, blobs: list[tuple[str, bytes]], template: NoveltyIndex, *, traced: bool):
    """(index, seconds, bytes held): a resume-style rebuild, as `agent/run/build.py` does it."""
    gc.collect()
    if traced:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    idx = make(template)
    for key, blob in blobs:
        idx.add(key, template.from_hashvalues(blob))
    seconds = time.perf_counter() - t
    held = 0
    if traced:
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    return idx, seconds, held


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    except OSError:
        model = cpu
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or "?"
    return f"{platform.machine()}, {cores} cores ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="archived candidates")
    ap.add_argument("--checks", type=int, default=1000, help="checks timed on each index")
    ap.add_argument("--scan-checks", type=int, default=30, help="checks timed on the linear scan (slow)")
    ap.add_argument("--real", type=int, default=4000, help="real mutated sources among the archive")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="the figures as one JSON object on stdout, the prose on stderr")
    args = ap.parse_args(argv)
    stdout, indexes = sys.stdout, {}
    if args.json:
        sys.stdout = sys.stderr
    rng = random.Random(args.seed)
    index = NoveltyIndex(threshold=args.threshold)
    bands, rows = lsh_bands(args.threshold, index.num_perm)
    print(f"novelty at scale: {hardware()}")
    print(f"threshold {args.threshold}, {index.num_perm} permutations, {index.shingle}-token shingles; "
          f"LSH {bands} bands x {rows} rows (zero misses at or above the threshold by construction)")

    ids, sources, sigs, tokens, st = build_archive(args.n, min(args.real, args.n), rng, index)
    n_real = sum(1 for k in ids if k in sources)
    print(f"archive: {len(ids)} candidates = {n_real} real (zoo baselines + mutations) + {len(ids) - n_real} "
          f"synthetic token streams (edited real streams and random streams, half each); "
          f"{st['rejected']} of {st['real_generated'] + st['synthetic_generated']} generated were rejected "
          "as not novel, as the loop would")
    print(f"signatures: {st['real_sig_s'] / st['real_generated'] * 1e3:.3f} ms per real source "
          f"(tokenize + shingles + MinHash.bulk); "
          f"{st['synth_sig_s'] / max(1, st['synthetic_generated']) * 1e3:.3f} ms per synthetic token stream")
    print(f"archive built through check-then-add: {st['check_add_s']:.2f} s "
          f"({st['check_add_s'] / (len(ids) + st['rejected']) * 1e3:.3f} ms per candidate offered)")

    checks, sig_s = make_checks(args.checks, ids, sources, tokens, index, rng)
    print(f"checks: {len(checks)} (80% fresh mutations of archived sources, 10% resubmitted sources, "
          f"10% random streams); their signatures {sig_s * 1e3:.3f} ms per source")
    blobs = [(k, sigs[k].hashvalues.tobytes()) for k in ids]
    del sigs

    contenders = [(Ours, len(checks)), (lambda t: DatasketchLSH(t, params=(bands, rows)), len(checks)),
                  (DatasketchLSH, len(checks)), (NumpyScan, len(checks)), (LinearScan, args.scan_checks)]
    results = {}
    print()
    print(f"{'index':<72} {'build s':>8} {'memory MB':>10} {'checks':>7} {'ms/check':>9} {'p99 ms':>7}")
    for make, m in contenders:
        idx, build_s, _ = build_from_blobs(make, blobs, index, traced=False)
        # the numpy scan stacks its matrix on its first check: do that outside the timing
        idx.nearest(checks[0])
        answers, times = time_checks(idx.nearest, checks[:m])
        del idx
        _, _, held = build_from_blobs(make, blobs, index, traced=True)
        name = make(index).name
        results[name] = answers
        ms = statistics.mean(times) * 1e3
        p99 = sorted(times)[min(len(times) - 1, int(0.99 * len(times)))] * 1e3
        print(f"{name:<72} {build_s:>8.2f} {held / 2**20:>10.1f} {len(times):>7} {ms:>9.3f} {p99:>7.3f}")
        indexes[name] = {"build_s": build_s, "memory_mb": held / 2**20, "checks": len(times), "ms_per_check": ms,
                         "p99_ms": p99}
        if make is Ours:
            ours_ms = ms
        if make is LinearScan:
            scan_ms = ms

    exact = results[NumpyScan(index).name]
    names = list(results)
    print()
    above = [i for i, (_, sim) in enumerate(exact) if sim >= args.threshold]
    print(f"exact answers at or above the threshold: {len(above)} of {len(exact)} checks")
    for name in names:
        got = results[name]
        n = min(len(got), len(exact))
        checked = [i for i in above if i < n]
        missed = sum(1 for i in checked if got[i][1] < args.threshold)
        differ = sum(1 for i in checked if got[i] != exact[i])
        print(f"  {name}: {missed} of {len(checked)} missed, {differ} with another nearest id or similarity")
        indexes[name].update(above_threshold=len(checked), missed=missed, differ=differ)
    print()
    print(f"RESULT novelty check at N={len(ids)}: {ours_ms:.3f} ms/check (LSH index) "
          f"against {scan_ms:.3f} ms/check (linear scan baseline), {scan_ms / ours_ms:.0f}x less; "
          f"signature {sig_s * 1e3:.3f} ms per source")
    if args.json:
        print(json.dumps({"n": len(ids), "checks": len(checks), "lsh_ms": ours_ms, "scan_ms": scan_ms,
                          "signature_ms": sig_s * 1e3, "ours": Ours(index).name, "indexes": indexes}), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
