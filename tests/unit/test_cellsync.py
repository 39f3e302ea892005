"""cellsync.sync and cellsync.verify: real SQLite cells and a real LMDB store in tmp dirs."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellsync.projection import project_change
from cellsync.sync import CellSync
from cellsync.verify import summary_line, verify
from fastpath.api.views import render_server
from fastpath.cell import SqliteCellDB
from fastpath.cell.db import EPOCH_SHIFT, Retention
from fastpath.store import Batch, Store
from fastpath.store import layout as L
from fastpath.store.record import effective, now_us
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


# -- issue 6, second part: by_cell, consumers, epochs, hosts, stats, time budget -------------
def backup(db: SqliteCellDB, to: Path) -> None:
    """A consistent copy of a live cell database (SQLite's online backup)."""
    src, dst = sqlite3.connect(db.path), sqlite3.connect(str(to))
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def restore(sync: CellSync, cells: dict[str, SqliteCellDB], name: str, frm: Path) -> SqliteCellDB:
    """Put a backup in place of a cell's database, as an operator would (cell stopped)."""
    path = cells[name].path
    cells[name].close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    shutil.copyfile(frm, path)
    db = cells[name] = sync.cells[name] = SqliteCellDB(path)
    return db


def test_verify_and_orphans_see_only_the_cells_own_servers(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    a, b = create(cells["cell1"], 1), create(cells["cell2"], 2)
    s = CellSync(store, cells)
    s.run_until_idle()
    with store.read() as r:
        assert [L.uuid_str(u) for u, _ in r.cell_servers("cell1")] == [a]
        assert [L.uuid_str(u) for u, _ in r.cell_servers("cell2")] == [b]
    # cell2's server is not an orphan of cell1: a resync of cell1 leaves it alone.
    assert s.resync("cell1").orphans == 0
    checked, div = verify(store, {"cell1": cells["cell1"]})
    assert (checked, div) == (1, [])
    assert_clean(store, cells)


def test_cells_and_host_capacity_reach_the_store(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    db.upsert_host("h1", "h1.node", 16, 65536, 1000, "az1")
    s = CellSync(store, {"cell1": db})
    res = s.sync_once("cell1")  # no server yet: the cell is known all the same
    assert res.hosts and res.entries == 0
    with store.read() as r:
        entry = r.cells()["cell1"]
    assert entry["name"] == "cell1" and entry["epoch"] == 0
    assert entry["hosts"] == {"h1": {"vcpus": 16, "ram_mb": 65536, "disk_gb": 1000,
                                     "vcpus_used": 0, "ram_mb_used": 0, "disk_gb_used": 0,
                                     "status": "UP", "availability_zone": "az1"}}
    assert not s.sync_once("cell1").hosts  # nothing moved: nothing written
    # Usage and a server change: one write transaction carries both.
    create(db, 1)
    db.set_host_usage("h1", 2, 4096, 20)
    before = store.write_txns
    res = s.sync_once("cell1")
    assert res.hosts and res.servers == 1 and store.write_txns == before + 1
    with store.read() as r:
        assert r.cells()["cell1"]["hosts"]["h1"]["vcpus_used"] == 2
        assert r.cursor("cell1") == db.max_seq()


def test_cursor_is_acked_and_the_feed_pruned_then_a_stale_consumer_resyncs(
        env: tuple[Store, dict[str, SqliteCellDB]], tmp_path: Path) -> None:
    store, cells = env
    db = cells["cell1"]
    clock = [1000.0]
    s = CellSync(store, {"cell1": db}, consumer="api-1", ack_interval=5, clock=lambda: clock[0])
    for i in range(6):
        create(db, i)
    s.run_until_idle()
    assert db.consumers()["api-1"][0] == 6
    for i in range(6, 9):
        create(db, i)
    s.run_until_idle()
    assert db.consumers()["api-1"][0] == 6  # acks at most every ack_interval
    clock[0] += 5
    s.sync_once("cell1")
    assert db.consumers()["api-1"][0] == 9
    # A second API host that went away at seq 3 holds pruning back until it times out.
    db.ack("api-2", 3)
    loose = Retention(feed_min_age=0, feed_keep=0, consumer_timeout=60)
    assert db.prune_acked(now_us() + 1, loose) == 3
    assert db.prune_acked(now_us() + 61_000_000, loose) == 6 and db.min_seq() == 10
    # api-2 comes back: its store's cursor (3) is before the feed's start, so it resyncs.
    other = Store.open(tmp_path / "api2", map_size=64 << 20, sync=False, metasync=False)
    try:
        late = CellSync(other, {"cell1": db}, consumer="api-2")
        other.apply(Batch((), cursor=("cell1", 3)))
        res = late.sync_once("cell1")
        assert res.resynced and res.reason == "gap" and res.servers == 9
        assert verify(other, {"cell1": db})[1] == []
        assert db.consumers()["api-2"][0] == 9
    finally:
        other.close()


def test_an_idle_consumer_keeps_acking_its_cursor(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    """An idle but live cellsync acks its unchanged cursor again every ACK_REFRESH seconds,
    so the cell does not count it out after cell.consumer_timeout and prune past it."""
    from cellsync.sync import ACK_REFRESH

    store, cells = env
    db = cells["cell1"]
    clock = [1000.0]
    s = CellSync(store, {"cell1": db}, consumer="api-1", ack_interval=1, clock=lambda: clock[0])
    create(db, 1)
    s.run_until_idle()
    first = db.consumers()["api-1"]
    clock[0] += ACK_REFRESH / 2
    time.sleep(0.002)  # the cell stamps acks with its own clock: let it move
    s.sync_once("cell1")
    assert db.consumers()["api-1"] == first  # nothing new, not yet due
    clock[0] += ACK_REFRESH
    s.sync_once("cell1")
    seq, seen = db.consumers()["api-1"]
    assert seq == first[0] and seen > first[1]


def test_done_commands_keep_the_last_n(env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    a = create(db, 1)
    db.maintenance(time.time(), Retention(done_commands_kept=3))
    for n in range(5):
        db.accept_command(f"c{n}", {"action": "reboot"}, a)
        db.finish_command(f"c{n}")
    CellSync(store, {"cell1": db}).run_until_idle()
    with store.read() as r:
        rec = r.get_server(a)
    assert rec is not None and rec["done_commands"] == ["c2", "c3", "c4"]


@pytest.mark.parametrize("new_changes", [1, 40])  # fewer and more than the cell lost
def test_a_cell_restored_from_a_backup_starts_a_new_epoch(
        env: tuple[Store, dict[str, SqliteCellDB]], tmp_path: Path, new_changes: int) -> None:
    store, cells = env
    db = cells["cell1"]
    kept, renamed, deleted_later = create(db, 1), create(db, 2), create(db, 3)
    s = CellSync(store, cells)
    s.run_until_idle()
    backup(db, tmp_path / "backup.sqlite")
    # After the backup: changes the restore will lose, all synced to the store.
    db.update_instance(renamed, name="lost-name")
    for _ in range(5):
        db.update_instance(kept, progress=50)
    db.delete_instance(deleted_later)
    born_after = create(db, 4)
    s.run_until_idle()
    with store.read() as r:
        assert r.get_server(born_after) is not None and r.get_server(deleted_later) is None
    db = restore(s, cells, "cell1", tmp_path / "backup.sqlite")
    # The restored cell works on: its changes must win over what the store holds.
    for n in range(new_changes):
        db.update_instance(renamed, name=f"after-restore-{n}")
    s.run_until_idle()
    assert db.epoch() >= 1
    with store.read() as r:
        rec = r.get_server(renamed)
        assert rec is not None and rec["name"] == f"after-restore-{new_changes - 1}"
        assert rec["version"] >> EPOCH_SHIFT == db.epoch()
        # The cell is the truth: the server deleted after the backup lives in it again...
        assert r.get_server(deleted_later) is not None
        # ...and the one it never had is tombstoned.
        assert r.get_server(born_after) is None and r.tombstone(born_after) is not None
        assert r.cells()["cell1"]["epoch"] == db.epoch()
    assert_clean(store, cells)
    # Later changes keep winning.
    db.update_instance(kept, name="later")
    s.run_until_idle()
    with store.read() as r:
        rec = r.get_server(kept)
        assert rec is not None and rec["name"] == "later"
    assert_clean(store, cells)


def test_an_epoch_started_by_another_consumer_makes_this_one_resync(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    a = create(db, 1)
    s = CellSync(store, {"cell1": db})
    s.run_until_idle()
    db.start_epoch()  # as another API host's cellsync would after a regression
    res = s.sync_once("cell1")
    assert res.resynced and res.reason == "epoch"
    with store.read() as r:
        rec = r.get_server(a)
        assert rec is not None and rec["version"] == (1 << EPOCH_SHIFT) | 1
    assert_clean(store, {"cell1": db})
    assert not s.sync_once("cell1").resynced


def test_stats_follow_cursor_head_and_lag(env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    clock = [0.0]
    s = CellSync(store, {"cell1": db}, batch=2, clock=lambda: clock[0])
    for i in range(5):
        create(db, i)
    assert s.stats()["cell1"]["lag_seqs"] == 0  # nothing read yet
    s.sync_once("cell1")
    ats = [e.at for e in db.read_feed(0, 10).entries]
    clock[0] = ats[2] / 1e6 + 1.5
    st = s.stats()["cell1"]
    assert (st["cursor"], st["head"], st["lag_seqs"], st["applied_total"]) == (2, 5, 3, 2)
    assert st["batches_total"] == 1
    assert st["lag_seconds"] == pytest.approx(1.5)  # entry 3, the oldest not applied
    s.run_until_idle()
    st = s.stats()["cell1"]
    assert (st["cursor"], st["lag_seqs"], st["lag_seconds"], st["applied_total"]) == (5, 0, 0.0, 5)
    assert st["batches_total"] == 3  # batches of 2: 2 + 2 + 1
    db.prune_changes(db.max_seq())
    create(db, 9)
    create(db, 10)
    s.store.apply(Batch((), cursor=("cell1", 1), reset_cursor=True))  # now behind a gap
    s.sync_once("cell1")
    assert s.stats()["cell1"]["resyncs_total"] == 1 and s.stats()["cell1"]["cursor"] == 7


def test_batches_shrink_to_the_time_budget_and_grow_back(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    from cellsync.sync import MIN_BATCH

    store, cells = env
    db = cells["cell1"]
    with db.transaction():
        for i in range(400):
            create(db, i)
    s = CellSync(store, {"cell1": db}, batch=100, txn_budget=1e-9)  # every txn is too long
    sizes = [s.sync_once("cell1").entries for _ in range(3)]
    assert sizes == [100, 50, MIN_BATCH]  # at most halving, down to the floor
    assert s.sync_once("cell1").entries == MIN_BATCH
    s.txn_budget = 60.0
    s.sync_once("cell1")
    assert s._state("cell1").limit == 2 * MIN_BATCH
    s.run_until_idle()
    assert s._state("cell1").limit == 100
    assert_clean(store, {"cell1": db})


def test_a_backlog_is_drained_in_larger_batches_then_back_to_the_usual_size(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    with db.transaction():
        for i in range(200):
            create(db, i)
    s = CellSync(store, {"cell1": db}, batch=10, txn_budget=60.0, backlog_batch=40,
                 backlog_txn_budget=60.0)
    sizes = [s.sync_once("cell1").entries for _ in range(7)]
    # Behind by more than two batches: doubling up to backlog_batch; within two batches of
    # the head: the usual size again at once.
    assert sizes == [10, 20, 40, 40, 40, 40, 10]
    assert s._state("cell1").limit == 10
    assert s.sync_once("cell1").entries == 0
    assert_clean(store, {"cell1": db})


# -- any fault sequence ends with zero divergence (Hypothesis) ----------------------------------
# (kind, n): create/update/delete server n; sync n rounds; backup or restore the cell file;
# prune the feed up to max seq - n; rewind the store's cursor by n and replay.
OPS = st.tuples(
    st.sampled_from(["create", "create", "update", "update", "update", "delete", "sync",
                     "sync", "backup", "restore", "prune", "rewind"]),
    st.integers(0, 5),
)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=8, max_size=40))
def test_any_sequence_of_changes_restores_prunes_and_replays_converges(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]) -> None:
    tmp = tmp_path_factory.mktemp("seq")
    cells = {"cell1": SqliteCellDB(str(tmp / "cell1.sqlite"))}
    store = Store.open(tmp / "api", map_size=64 << 20, sync=False, metasync=False)
    s = CellSync(store, cells, batch=3)
    saved = tmp / "backup.sqlite"
    has_backup = unseen_restore = False
    try:
        for op, n in ops:
            db = cells["cell1"]
            live = {u for u, _, k in db.all_instance_versions() if k == "upsert"}
            known = {u for u, _, _ in db.all_instance_versions()}
            if op == "create" and uid(n) not in known:
                create(db, n)
            elif op == "update" and uid(n) in live:
                db.update_instance(uid(n), name=f"n{db.max_seq()}")
            elif op == "delete" and uid(n) in live:
                db.delete_instance(uid(n))
            elif op == "sync":
                for _ in range(1 + n % 3):
                    s.sync_once("cell1")
                unseen_restore = False
            elif op == "backup":
                backup(db, saved)
                has_backup = True
            elif op == "restore" and has_backup:
                restore(s, cells, "cell1", saved)
                unseen_restore = True
            elif op == "prune" and not unseen_restore:
                # Not between a restore and cellsync's next look: a restored cell whose
                # entry at the store's cursor is gone cannot be told from one pruned as
                # usual (the documented limit; pruning by acks never removes that entry).
                db.prune_changes(db.max_seq() - n)
            elif op == "rewind" and not unseen_restore:
                # A replay: cellsync reads again from an older cursor (with that entry's
                # mark).  Not over a restore cellsync has not seen yet: the store's data
                # would then be newer than its cursor, which no real history produces.
                back = max(0, s.cursor("cell1") - n)
                store.apply(Batch((), cursor=("cell1", back), reset_cursor=True,
                                  cursor_mark=db.read_feed(back, 0).after_at))
                s.run_until_idle()  # the replay, at once (duplicates only)
        s.run_until_idle()
        checked, div = verify(store, cells)
        assert div == [] and checked == len(cells["cell1"].all_instance_versions())
        with store.read() as r:
            assert r.check() == []
            for u, v, kind in cells["cell1"].all_instance_versions():
                rec = r.get_server(u)
                if kind == "delete":  # no deleted server came back
                    assert rec is None
                else:
                    assert rec is not None and rec["version"] == v
    finally:
        store.close()
        for c in cells.values():
            c.close()


def test_a_server_older_than_the_tombstone_horizon_still_comes_up(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    """cellsync brings current rows: the horizon (for stale redeliveries) must not drop a
    server created while cellsync was away and the store purged its old tombstones."""
    store, cells = env
    db = cells["cell1"]
    s = CellSync(store, {"cell1": db})
    create(db, 1)
    s.run_until_idle()
    late = create(db, 2)  # sample records are from 2024: far below a horizon of "now"
    store.purge_tombstones(now_us())
    s.run_until_idle()
    with store.read() as r:
        assert r.tombstone_horizon() > 0 and r.get_server(late) is not None
    assert_clean(store, {"cell1": db})


def test_verify_names_a_server_the_store_files_under_another_cell(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    a = create(cells["cell1"], 1)
    gone = create(cells["cell1"], 2)
    s = CellSync(store, cells)
    s.run_until_idle()
    cells["cell1"].delete_instance(gone)
    rows = cells["cell1"].load_instance(a)
    assert rows is not None
    rows["instance"]["version"] += 5  # as if cell2 had it, newer
    store.apply(Batch([project_change(rows, "cell2")]))
    checked, div = verify(store, cells)
    assert checked == 3 and len(div) == 3  # cell1's two, and cell2's stray record
    assert f"cell1 {a}: v1 live, store says cell 'cell2' v6" in div
    assert f"cell1 {gone}: cell v2 deleted, store v1 live" in div
    assert f"cell2 {a}: not in the cell, store v6 live" in div


def test_orphans_are_tombstoned_in_bounded_batches_cursor_last(
        env: tuple[Store, dict[str, SqliteCellDB]], tmp_path: Path) -> None:
    store, cells = env
    db = cells["cell1"]
    for i in range(4):
        create(db, i)
    CellSync(store, {"cell1": db}).run_until_idle()
    fresh = SqliteCellDB(str(tmp_path / "replaced.sqlite"))  # the cell replaced: 1 of 4 left
    try:
        create(fresh, 0)
        s = CellSync(store, {"cell1": fresh}, batch=1)
        res = s.resync("cell1")
        assert (res.servers, res.orphans, len(res.summaries)) == (1, 3, 4)
        assert [x.cursor_moved for x in res.summaries] == [False, False, False, True]
        assert all(x.applied + x.tombstoned <= 1 for x in res.summaries)
        assert_clean(store, {"cell1": fresh})
    finally:
        fresh.close()


def test_sync_keeps_the_changes_log_trimmed_and_purges_old_tombstones(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    store, cells = env
    db = cells["cell1"]
    clock = [time.time()]
    s = CellSync(store, {"cell1": db}, batch=10, tombstone_retention=3600,
                 clock=lambda: clock[0])
    for i in range(5):
        create(db, i)
    sizes = []
    for n in range(100):  # busy: a trim once per 8 batches of changes
        db.update_instance(uid(n % 5), name=f"n{n}", updated_at=now_us() + n)
        s.sync_once("cell1")
        with store.read() as r:
            sizes.append(r.changes_log_size()[0])
    assert max(sizes) <= 5 + 8 * 10 and min(sizes[80:]) < 80  # trimmed while busy too
    s.sync_once("cell1")  # an idle round trims what is left
    s.sync_once("cell1")
    with store.read() as r:
        assert r.changes_log_size() == (5, 5)
    db.delete_instance(uid(0))
    s.run_until_idle()
    with store.read() as r:
        assert r.tombstone(uid(0)) is not None
    clock[0] += 3600 + 600 + 1  # past the retention and the purge interval
    db.update_instance(uid(1), name="later")
    s.sync_once("cell1")
    with store.read() as r:
        assert r.tombstone(uid(0)) is None and r.tombstone_horizon() > 0
    # The cell still lists the server as deleted; without a tombstone that is not divergent.
    assert_clean(store, {"cell1": db})


# -- the projector: read-ahead in worker processes (cellsync.workers) -------------------------
def test_rounds_with_the_projector_converge_while_cells_keep_changing(
        env: tuple[Store, dict[str, SqliteCellDB]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="cellsync")
    store, cells = env
    for i in range(40):
        create(cells["cell1" if i % 2 else "cell2"], i)
    s = CellSync(store, cells, batch=7)
    s.start_projector(2)
    try:
        read_ahead = 0
        rewound = False
        for rnd in range(200):
            busy = s.sync_round()
            read_ahead += sum(1 for p in s._ahead.values()
                              if getattr(p, "projected", None) is not None)
            if rnd < 30:  # the cells change under the read-ahead batches
                db = cells["cell1" if rnd % 2 else "cell2"]
                u = uid(rnd)  # cell1 has the odd ones
                if rnd % 5 == 0:
                    db.delete_instance(u)
                else:
                    db.update_instance(u, name=f"r{rnd}")
            if not rewound and "cell1" in s._ahead:
                # Someone else moves the cursor back under a batch read ahead: it is dropped.
                rewound = True
                store.apply(Batch((), cursor=("cell1", 3), reset_cursor=True,
                                  cursor_mark=cells["cell1"].read_feed(3, 0).after_at))
            if rnd > 30 and not busy:
                break
        else:
            raise AssertionError("still busy after 200 rounds")
        assert read_ahead > 0  # batches were projected by the workers
        assert "cell cell1: cursor moved from" in caplog.text
        with store.read() as r:
            for name, db in cells.items():
                assert r.cursor(name) == db.max_seq()
                for u, _, kind in db.all_instance_versions():
                    rec = r.get_server(u)
                    if kind == "upsert":  # the views rendered ahead are the record's
                        assert rec is not None
                        views = {k: bytes(v) for k, v in r.views(u).items()}
                        assert views == render_server(effective(rec))
        assert_clean(store, cells)
    finally:
        s.close()
    assert s.projector is None


def test_projector_workers_leave_with_a_killed_parent(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    db = SqliteCellDB(str(tmp_path / "cell1.sqlite"))
    create(db, 1)
    db.close()
    code = (
        "import multiprocessing, sys, time\n"
        "from cellsync.sync import Projector\n"
        "from fastpath.cell import SqliteCellDB\n"
        "db = SqliteCellDB(sys.argv[1])\n"
        "p = Projector(2)\n"
        "got = p.submit(db, 'cell1', [sys.argv[2]]).result(60)\n"
        "assert len(got.changes) == 1, got\n"
        "print(*[c.pid for c in multiprocessing.active_children()], flush=True)\n"
        "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cell1.sqlite"), uid(1)],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert pids
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their parent"
        time.sleep(0.1)


def test_prepared_changes_overlay_pending_commands_in_the_store(
        env: tuple[Store, dict[str, SqliteCellDB]]) -> None:
    """project_servers hands the store Prepared changes (record, index entry and views
    packed by a worker); a server with a pending command in the store is merged and
    rendered again in the write transaction: its views show the command's effect (the
    store's own tests follow it until the cell reports the command done)."""
    from cellsync.sync import project_servers
    from fastpath.store import Prepared
    from fastpath.store import record as R

    store, cells = env
    db = cells["cell1"]
    u = create(db, 1)
    got = project_servers("cell1", db, [u])
    assert [type(c) for c in got.changes] == [Prepared] and not got.missing
    sync = CellSync(store, cells)
    sync.run_until_idle()
    pending = {"cmd-1": {"at": now_us(), "fields": {"task_state": "rebooting"}}}
    store._write(lambda txn: txn.put(L.uuid_key(u), R.pack({"pending": pending}),
                                     db=store.dbs.api_fields))
    db.update_instance(u, name="renamed")
    sync.run_until_idle()

    def shown() -> tuple[dict[bytes, bytes], dict[str, object]]:
        with store.read() as r:
            rec = r.get_server(u)
            assert rec is not None
            return {k: bytes(v) for k, v in r.views(u).items()}, rec

    views, rec = shown()
    assert rec["name"] == "renamed" and rec["pending"] == pending
    assert views == render_server(effective(rec))
    assert effective(rec)["status"] == "REBOOT"
    assert_clean(store, cells)
