from deltanas.tools.novelty import NoveltyIndex, normalise_tokens

SRC = '''
import torch.nn as nn

class Net(nn.Module):
    """A small network."""
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, out_shape[0])

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
'''


def test_comments_docstrings_and_layout_are_ignored():
    noisy = SRC.replace('"""A small network."""', '"""Different words."""') + "\n# a comment\n\n"
    assert normalise_tokens(noisy) == normalise_tokens(SRC)


def test_copy_of_parent_is_not_novel():
    idx = NoveltyIndex()
    r = idx.check(SRC + "# tweak\n", SRC, "base")
    assert not r.novel and r.parent_similarity == 1.0 and r.nearest_id == "base"


def test_structural_change_is_novel_against_parent():
    idx = NoveltyIndex()
    changed = SRC.replace("nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)",
                          "nn.Conv2d(16, 64, 5, padding=2), nn.BatchNorm2d(64), nn.GELU(), nn.Dropout(0.1), "
                          "nn.Conv2d(64, 32, 1), nn.SiLU(), nn.AdaptiveMaxPool2d(1)")
    r = idx.check(changed, SRC, "base")
    assert r.novel and r.parent_similarity < 0.9


def test_archive_duplicate_is_caught_and_named():
    idx = NoveltyIndex()
    other = SRC.replace("16", "24")
    idx.add("c001", idx.signature(other))
    r = idx.check(other + "\n# same\n", SRC, "base")
    assert not r.novel and r.nearest_id == "c001" and r.max_similarity == 1.0


def test_signature_roundtrip_through_bytes():
    idx = NoveltyIndex()
    sig = idx.signature(SRC)
    again = idx.from_hashvalues(sig.hashvalues.tobytes())
    assert again.jaccard(sig) == 1.0


def test_untokenisable_source_still_hashes():
    idx = NoveltyIndex()
    r = idx.check('def f(:\n  """unterminated', SRC, "base")
    assert r.novel


# --- the LSH index at scale: same answers as a brute-force scan ---------------------------

import random  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from datasketch import MinHash  # noqa: E402

from deltanas.tools.mutator import NoMutation, mutate_source  # noqa: E402
from deltanas.tools.novelty import NoveltyResult, _BandIndex, lsh_bands, min_shared  # noqa: E402
from deltanas.tools.zoo import list_baselines  # noqa: E402


def brute_force(idx: NoveltyIndex, archive: list[tuple[str, MinHash]], sig: MinHash,
                parent: MinHash | None = None, parent_id: str | None = None) -> NoveltyResult:
    """The definition: every archived signature compared, the parent first, the earliest on a tie."""
    parent_sim = sig.jaccard(parent) if parent is not None else 0.0
    best, nearest = parent_sim, (parent_id if parent is not None else None)
    for key, other in archive:
        sim = sig.jaccard(other)
        if sim > best:
            best, nearest = sim, key
    return NoveltyResult(novel=best < idx.threshold, parent_similarity=float(parent_sim),
                         max_similarity=float(best), nearest_id=nearest)


@pytest.fixture(scope="module")
def mutated_zoo() -> list[str]:
    """2,000 real-ish sources: the zoo, then one rule-based mutation of a random earlier source
    at a time, so that the set holds chains of near-copies at every similarity."""
    rng = random.Random(5)
    sources = [b.source for b in list_baselines()]
    while len(sources) < 2000:
        try:
            sources.append(mutate_source(rng.choice(sources), rng)[1])
        except NoMutation:
            pass
    return sources


@pytest.mark.parametrize("threshold", [0.9, 0.8])
def test_lsh_answers_like_brute_force_on_mutated_zoo_networks(mutated_zoo, threshold, monkeypatch):
    monkeypatch.setattr(_BandIndex, "MERGE_AT", 512)  # 1,400 rows: two merges into the sorted arrays and a tail
    idx = NoveltyIndex(threshold=threshold)
    sigs = idx.signatures(mutated_zoo)
    archive = [(f"c{i}", s) for i, s in enumerate(sigs[:1400])]
    for key, sig in archive:
        idx.add(key, sig)
    rng = random.Random(threshold)
    queries = list(range(1400, 2000)) + rng.sample(range(1400), 100)  # new sources, and archived ones again
    above = 0
    for q in queries:
        p = rng.randrange(len(mutated_zoo)) if q % 3 == 0 else None
        got = idx.check(mutated_zoo[q], None if p is None else mutated_zoo[p], None if p is None else f"p{p}",
                        sig=sigs[q])
        want = brute_force(idx, archive, sigs[q], None if p is None else sigs[p], None if p is None else f"p{p}")
        assert got.novel == want.novel and got.parent_similarity == want.parent_similarity
        if want.max_similarity >= threshold:
            above += 1
            assert got == want
        else:  # below the threshold only the LSH hits are compared: never more than the scan
            assert got.max_similarity <= want.max_similarity
    assert above >= 200, above  # the comparison must exercise many near-copies, not only novel ones


@pytest.mark.parametrize("threshold,num_perm", [(0.9, 128), (0.95, 128), (0.75, 128), (0.9, 100), (0.5, 64),
                                                (1.0, 128), (0.99, 256)])
def test_bands_cannot_miss_a_pair_at_the_threshold(threshold, num_perm):
    """The worst case: every differing position spoils another band. At the threshold one band survives."""
    bands, rows = lsh_bands(threshold, num_perm)
    k = min_shared(threshold, num_perm)
    assert k / num_perm >= threshold > (k - 1) / num_perm
    assert bands == num_perm - k + 1 and bands * rows <= num_perm and rows >= 1
    idx = NoveltyIndex(threshold=threshold, num_perm=num_perm)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32 - 1, num_perm, dtype=np.uint64).astype(idx._template.hashvalues.dtype)
    archived = idx.from_hashvalues(base.tobytes())
    idx.add("a", archived)
    spoil = [b * rows for b in range(bands)]  # the first position of each band
    at_threshold = base.copy()
    at_threshold[spoil[:num_perm - k]] += 1
    r = idx.check("", sig=idx.from_hashvalues(at_threshold.tobytes()))
    assert (r.novel, r.nearest_id, r.max_similarity) == (False, "a", k / num_perm)
    below = base.copy()
    below[spoil] += 1  # one more difference spoils every band: the pair is novel and may be skipped
    assert idx.check("", sig=idx.from_hashvalues(below.tobytes())).novel


def test_bulk_signatures_equal_single_ones(mutated_zoo):
    idx = NoveltyIndex()
    bulk = idx.signatures(mutated_zoo[:40])
    assert all(np.array_equal(b.hashvalues, idx.signature(s).hashvalues) for b, s in zip(bulk, mutated_zoo))


def test_resume_from_archive_bytes_answers_the_same(mutated_zoo):
    """What agent/run/build.py does on resume: the archive's `minhash` blobs, `from_hashvalues`, `add`."""
    live = NoveltyIndex()
    sigs = live.signatures(mutated_zoo[:300])
    blobs = []
    for i, sig in enumerate(sigs):
        live.add(f"c{i}", sig)
        blobs.append((f"c{i}", sig.hashvalues.tobytes()))
    resumed = NoveltyIndex()
    for key, blob in blobs:
        resumed.add(key, resumed.from_hashvalues(blob))
    assert len(resumed) == len(live) == 300 and "c7" in resumed and "x" not in resumed
    for src in mutated_zoo[300:400] + mutated_zoo[:20]:
        assert resumed.check(src, mutated_zoo[0], "p") == live.check(src, mutated_zoo[0], "p")
    assert resumed.check(mutated_zoo[5]).nearest_id == "c5"


def test_from_hashvalues_round_trip_keeps_the_values():
    idx = NoveltyIndex()
    sig = idx.signature(SRC)
    blob = sig.hashvalues.tobytes()
    again = idx.from_hashvalues(blob)
    assert np.array_equal(again.hashvalues, sig.hashvalues) and again.hashvalues.tobytes() == blob
    assert again.hashvalues.flags.writeable  # a copy, not a view of the caller's bytes
    idx.add("c1", again)
    assert idx.check(SRC + "# again\n").nearest_id == "c1"


def test_first_signature_of_a_key_wins():
    idx = NoveltyIndex()
    idx.add("c1", idx.signature(SRC))
    idx.add("c1", idx.signature(SRC.replace("16", "48")))
    assert len(idx) == 1 and idx.check(SRC).nearest_id == "c1" and idx.check(SRC).max_similarity == 1.0


def test_parent_is_named_on_a_tie_with_the_archive():
    idx = NoveltyIndex()
    idx.add("c1", idx.signature(SRC))
    r = idx.check(SRC + "# copy\n", SRC, "base")
    assert r.nearest_id == "base" and r.max_similarity == 1.0 and not r.novel


def test_earliest_archived_candidate_is_named_on_a_tie():
    idx = NoveltyIndex()
    for key in ("c3", "c1", "c2"):
        idx.add(key, idx.signature(SRC))
    assert idx.check(SRC).nearest_id == "c3"


def test_empty_index_finds_nothing():
    r = NoveltyIndex().check(SRC)
    assert r == NoveltyResult(novel=True, parent_similarity=0.0, max_similarity=0.0, nearest_id=None)


def test_bad_input_is_refused_with_a_clear_error():
    idx = NoveltyIndex()
    with pytest.raises(ValueError, match="512 bytes"):
        idx.from_hashvalues(b"\x00" * 1024)  # a 64-bit signature of another scheme
    with pytest.raises(ValueError, match="512 bytes"):
        idx.from_hashvalues("not bytes")
    other = NoveltyIndex(num_perm=64)
    with pytest.raises(ValueError, match="64 permutations"):
        idx.add("c1", other.signature(SRC))
    with pytest.raises(ValueError, match="seed 2"):
        idx.check(SRC, sig=NoveltyIndex(seed=2).signature(SRC))
    with pytest.raises(ValueError, match="MinHash"):
        idx.add("c1", idx.signature(SRC).hashvalues)
    assert len(idx) == 0
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            NoveltyIndex(threshold=bad)
    with pytest.raises(ValueError, match="num_perm"):
        NoveltyIndex(num_perm=0)


def test_concurrent_adds_and_checks(mutated_zoo):
    idx = NoveltyIndex()
    sigs = idx.signatures(mutated_zoo[:400])
    errors: list[BaseException] = []

    def work(part: int) -> None:
        try:
            for i in range(part, 400, 4):
                idx.add(f"c{i}", sigs[i])
                assert idx.check("", sig=sigs[i]).max_similarity == 1.0
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(idx) == 400
    assert all(not idx.check("", sig=s).novel for s in sigs)


def test_parent_signatures_are_cached_and_bounded():
    idx = NoveltyIndex()
    idx.PARENT_CACHE = 3
    parents = [SRC.replace("16", str(w)) for w in (8, 12, 20, 24, 28)]
    for p in parents:
        first = idx.check(SRC, p, "p")
        assert idx.check(SRC, p, "p") == first
    assert len(idx._parents) == 3 and list(idx._parents) == parents[-3:]


def test_result_is_plain_json():
    """The graph checkpoints the result as JSON: numpy scalars would break it."""
    import json

    idx = NoveltyIndex()
    idx.add("c1", idx.signature(SRC.replace("16", "24")))
    for r in (idx.check(SRC, SRC, "base"), idx.check(SRC.replace("16", "24")), idx.check(SRC)):
        assert json.loads(json.dumps(r.to_json())) == r.to_json()
        assert type(r.novel) is bool and type(r.max_similarity) is float and type(r.parent_similarity) is float
