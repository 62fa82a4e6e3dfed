import sqlite3
import threading

import pytest

from deltanas.agent.archive import CandidateRow, Store, StoreError


def _row(i, **kw):
    return CandidateRow(id=f"c000-{i:03d}", cycle=0, idx=i, kind="delta", dataset="mnist", status="proposed", **kw)


def test_upsert_is_keyed_by_id(tmp_path):
    s = Store(tmp_path / "a.sqlite")
    s.upsert(_row(1))
    s.upsert(_row(1, accuracy=0.5))
    r = _row(1, accuracy=0.7)
    r.status = "ok"
    s.upsert(r)
    assert s.count() == 1
    got = s.get("c000-001")
    assert got.status == "ok" and got.accuracy == 0.7 and got.final


def test_concurrent_writers_lose_nothing(tmp_path):
    s = Store(tmp_path / "a.sqlite")

    def write(k):
        for i in range(50):
            s.upsert(_row(k * 100 + i))
            s.put_trajectory(f"c000-{k * 100 + i:03d}", [{"role": "user", "content": str(i)}])

    ts = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert s.count() == 200
    reader = Store(tmp_path / "a.sqlite", readonly=True)
    assert len(reader.candidates()) == 200
    assert reader.get_trajectory("c000-307") == [{"role": "user", "content": "7"}]


def test_wal_mode(tmp_path):
    Store(tmp_path / "a.sqlite")
    assert sqlite3.connect(tmp_path / "a.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_corrupt_database_names_the_file(tmp_path):
    p = tmp_path / "archive.sqlite"
    p.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="archive.sqlite"):
        Store(p)


def test_foreign_database_is_refused(tmp_path):
    p = tmp_path / "other.sqlite"
    sqlite3.connect(p).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(StoreError, match="not a deltanas archive"):
        Store(p, readonly=True)


def test_cycles_and_meta(tmp_path):
    s = Store(tmp_path / "a.sqlite")
    s.start_cycle(0)
    s.finish_cycle(0, {"candidates": 3})
    s.set_meta("k", {"v": 1})
    assert s.cycles()[0]["summary"] == {"candidates": 3}
    assert s.get_meta("k") == {"v": 1}


def test_edit_sites_round_trip_and_an_older_archive_gains_the_column(tmp_path):
    p = tmp_path / "a.sqlite"
    s = Store(p)
    s.upsert(_row(1, constrain="grammar", sites=[3, 9, 20]))
    s.upsert(_row(2, constrain="none"))
    assert s.get("c000-001").sites == [3, 9, 20] and s.get("c000-002").sites is None
    s.close()
    # An archive from before several sites per candidate: one `site` column, and no `sites`.
    con = sqlite3.connect(p)
    con.execute("ALTER TABLE candidates DROP COLUMN sites")
    con.execute("ALTER TABLE candidates ADD COLUMN site INTEGER")
    con.execute("UPDATE candidates SET site=16 WHERE id='c000-001'")
    con.commit()
    con.close()
    old = Store(p)
    assert old.get("c000-001").sites == [16] and old.get("c000-002").sites is None
    old.upsert(_row(3, sites=[5]))
    assert [r.sites for r in old.candidates()] == [[16], None, [5]]
