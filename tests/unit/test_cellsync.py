"""cellsync.sync and cellsync.verify: real SQLite cells and a real LMDB store in tmp dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cellsync.sync import CellSync
from cellsync.verify import summary_line, verify
from fastpath.cell import SqliteCellDB
from fastpath.store import Store
from fastpath.store.samples import sample_record
from tests.unit.test_projection import cell_values_of


def uid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[tuple[Store, dict[str, SqliteCellDB]]]:
    cells = {n: SqliteCellDB(str(tmp_path / f"{n}.sqlite")) for n in ("cell1", "cell2")}
    store = Store.open(tmp_path / "api", map_size=64 << 20, sync=False, metasync=False)
    yield store, cells
    store.close()
    for c in cells.values():
        c.close()


def create(db: SqliteCellDB, i: int) -> str:
    db.create_instance(cell_values_of(sample_record(uid(i), seed=i)))
    return uid(i)


def assert_clean(store: Store, cells: dict[str, SqliteCellDB]) -> None:
    checked, div = verify(store, cells)
    assert div == []
    with store.read() as r:
        assert r.check() == []
    assert summary_line(checked, len(cells), 0).endswith(": 0 divergent")


def test_create_update_delete_reach_the_store(env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    a, b = create(cells["cell1"], 1), create(cells["cell1"], 2)
    c = create(cells["cell2"], 3)
    cells["cell1"].update_instance(a, vm_state="active", task_state=None)
    cells["cell1"].delete_instance(b)
    s = CellSync(store, cells, batch=2)
    done = s.run_until_idle()
    assert done["cell2"] == 1
    with store.read() as r:
        rec = r.get_server(a)
        assert rec is not None and rec["version"] == 2 and rec["status"] == "ACTIVE"
        assert rec["cell"] == "cell1"
        assert r.get_server(b) is None
        tomb = r.tombstone(b)
        assert tomb is not None and tomb.version == 2
        assert r.get_server(c) is not None
        assert r.cursor("cell1") == cells["cell1"].max_seq()
        assert r.cursor("cell2") == cells["cell2"].max_seq()
    assert_clean(store, cells)
    # Re-running finds nothing: the cursor moved in the same transaction as the records.
    again = s.sync_once("cell1")
    assert again.entries == 0 and again.servers == 0


def test_one_transaction_per_batch_and_dedupe(env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    a = create(cells["cell1"], 1)
    for n in range(5):
        cells["cell1"].update_instance(a, name=f"n{n}")
    s = CellSync(store, {"cell1": cells["cell1"]})
    before = store.write_txns
    res = s.sync_once("cell1")
    assert store.write_txns == before + 1
    assert res.entries == 6 and res.servers == 1 and res.cursor == 6
    with store.read() as r:
        rec = r.get_server(a)
        assert rec is not None and rec["name"] == "n4" and rec["version"] == 6


def test_replay_over_an_older_cursor_is_idempotent(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    a, b = create(db, 1), create(db, 2)
    db.update_instance(a, vm_state="active", task_state=None)
    db.delete_instance(b)
    s = CellSync(store, {"cell1": db})
    s.run_until_idle()
    with store.read() as r:
        dump = r.dump(logical=True)
    # Duplicate delivery: a consumer whose cursor went back (e.g. restored store) replays all.
    s.resync("cell1")  # sets the cursor to max_seq (same) and re-applies every server
    from fastpath.store import Batch
    store.apply(Batch((), cursor=("cell1", 0), reset_cursor=True))
    s.run_until_idle()
    with store.read() as r:
        assert r.dump(logical=True) == dump
    assert_clean(store, {"cell1": db})


def test_pruned_feed_forces_a_resync(env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    a = create(db, 1)
    s = CellSync(store, {"cell1": db}, batch=1)  # the resync applies in several batches
    s.run_until_idle()
    b, c = create(db, 2), create(db, 3)
    db.update_instance(a, name="renamed")
    db.delete_instance(c)
    db.prune_changes(db.max_seq())  # the feed dropped entries cellsync never read
    _, div = verify(store, {"cell1": db})
    assert len(div) == 3  # a behind, b and c missing
    res = s.sync_once("cell1")
    assert res.resynced and res.reason == "gap" and res.cursor == db.max_seq()
    assert len(res.summaries) == 3 and res.servers == 3
    with store.read() as r:
        ra = r.get_server(a)
        assert ra is not None and ra["name"] == "renamed"
        assert r.get_server(b) is not None and r.get_server(c) is None
    assert_clean(store, {"cell1": db})
    assert s.sync_once("cell1").entries == 0


def test_regressed_feed_resyncs_and_tombstones_orphans(
        env: tuple[Store, dict[str, SqliteCellDB]], tmp_path: Path) -> None:
    store, cells = env
    db = cells["cell1"]
    create(db, 1)
    orphan = create(db, 2)
    s = CellSync(store, {"cell1": db})
    s.run_until_idle()
    # The cell is replaced by one that has only server 1 (e.g. restored): feed went backwards.
    db.close()
    fresh = SqliteCellDB(str(tmp_path / "restored.sqlite"))
    cells["cell1"] = fresh
    keep = create(fresh, 1)
    s2 = CellSync(store, {"cell1": fresh})
    res = s2.sync_once("cell1")
    assert res.resynced and res.reason == "regression" and res.orphans == 1
    with store.read() as r:
        assert r.get_server(orphan) is None and r.tombstone(orphan) is not None
        assert r.get_server(keep) is not None and r.cursor("cell1") == fresh.max_seq()
    assert_clean(store, {"cell1": fresh})


def test_delete_racing_update_does_not_resurrect(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    a = create(db, 1)
    s = CellSync(store, {"cell1": db}, batch=1)
    db.update_instance(a, vm_state="active", task_state=None)
    stale = db.load_instance(a)  # an update read before the delete, delivered after it
    assert stale is not None
    db.delete_instance(a)
    s.run_until_idle()
    from cellsync.projection import project_change
    from fastpath.api.views import render_server
    from fastpath.store import Batch
    store.apply(Batch([project_change(stale, "cell1")]), render=render_server)
    # and an old feed position replayed (duplicate delivery over the delete)
    store.apply(Batch((), cursor=("cell1", 1), reset_cursor=True))
    s.run_until_idle()
    with store.read() as r:
        assert r.get_server(a) is None
        tomb = r.tombstone(a)
        assert tomb is not None and tomb.version == 3
    assert_clean(store, {"cell1": db})


def test_verify_reports_a_store_behind_then_zero(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    a = create(cells["cell1"], 1)
    create(cells["cell2"], 2)
    s = CellSync(store, cells)
    s.run_until_idle()
    assert_clean(store, cells)
    cells["cell1"].update_instance(a, name="x")
    checked, div = verify(store, cells)
    assert checked == 2 and len(div) == 1 and a in div[0] and "v2" in div[0]
    assert summary_line(checked, 2, len(div)) == "checked 2 servers in 2 cells: 1 divergent"
    s.run_until_idle()
    checked, div = verify(store, cells)
    assert (checked, div) == (2, [])
