"""The forwarder (fastpath.forwarder): a real LMDB store in a temp dir and real SQLite cells.

Outbox entries are written through the store's command API as the API's group commit writes
them (docs/commands.md: key = last key + 1, msgpack map id/cell/server/payload/at).
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fastpath.cell.db import SqliteCellDB
from fastpath.cell.registry import cell_path, open_cell
from fastpath.forwarder import Forwarder, outbox_stats, read_stats
from fastpath.store import Store
from fastpath.store import layout as L
from fastpath.store.commands import RESIZE_GROW, CommandTxn, run_group

S1 = "11111111-1111-4111-8111-111111111111"
S2 = "22222222-2222-4222-8222-222222222222"
S3 = "33333333-3333-4333-8333-333333333333"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Bells:
    def __init__(self) -> None:
        self.rung: list[str] = []

    def __call__(self, path: str) -> None:
        self.rung.append(Path(path).name)


def put_outbox(store: Store, entries: list[dict[str, Any]]) -> list[bytes]:
    """Append entries to the outbox in one group commit (``CommandTxn.put_outbox``)."""

    def resize(kind: str) -> None:
        if kind == RESIZE_GROW:
            store._grow()
        else:
            store._env.set_mapsize(0)

    def work(e: dict[str, Any]) -> Callable[[CommandTxn], int]:
        return lambda c: c.put_outbox(e["cell"], e["server"], e["id"], e["payload"], at=e["at"])

    res = run_group(store, [work(e) for e in entries], None, resize)
    assert all(ok for ok, _ in res.outcomes), res.outcomes
    return [L.outbox_key(seq) for _, seq in res.outcomes]


def entry(cid: str, cell: str, server: str | None, action: str = "reboot",
          at: int = 1_700_000_000_000_000, **extra: Any) -> dict[str, Any]:
    payload = {"action": action, "project_id": "p1", "user_id": "u1", "request_id": cid, **extra}
    return {"id": cid, "cell": cell, "server": server, "payload": payload, "at": at}


def outbox_ids(store: Store) -> list[str]:
    with store.read() as r:
        return [msgpack.unpackb(bytes(v))["id"] for _, v in r.txn.cursor(db=r.dbs.outbox)]


def inbox(db: SqliteCellDB) -> list[tuple[str, str | None, dict[str, Any]]]:
    return db.pending_commands(limit=10_000)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture()
def store(data: Path) -> Iterator[Store]:
    s = Store.open(data, map_size=1 << 24)
    yield s
    s.close()


@pytest.fixture()
def cells(data: Path) -> Iterator[dict[str, SqliteCellDB]]:
    dbs = {n: open_cell(str(data), n, create=True) for n in ("cell1", "cell2")}
    yield dbs
    for db in dbs.values():
        db.close()


def make(store: Store, data: Path, **kw: Any) -> tuple[Forwarder, Clock, Bells]:
    clock, bells = Clock(), Bells()
    kw.setdefault("retry_initial", 1.0)
    kw.setdefault("retry_max", 8.0)
    kw.setdefault("busy_timeout_ms", 20)
    fwd = Forwarder(store, str(data), clock=clock, rng=random.Random(7), ring=bells, **kw)
    return fwd, clock, bells


def test_delivers_in_order_per_cell_and_clears_the_outbox(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    put_outbox(store, [entry("r1", "cell1", S1), entry("r2", "cell2", S2),
                       entry("r3", "cell1", S1, "stop"), entry("r4", "cell1", S3)])
    put_outbox(store, [entry("r5", "cell1", S1, "start")])
    fwd, _, bells = make(store, data)
    res = fwd.round()
    assert (res.delivered, res.queued, res.more, res.failed) == (5, 0, False, [])
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["r1", "r3", "r4", "r5"]
    assert [(c, u) for c, u, _ in inbox(cells["cell2"])] == [("r2", S2)]
    assert inbox(cells["cell1"])[1][2] == entry("r3", "cell1", S1, "stop")["payload"]
    assert outbox_ids(store) == []
    assert sorted(bells.rung) == ["cell-cell1", "cell-cell2"]
    assert fwd.round().delivered == 0
    assert fwd.cells["cell1"].delivered_total == 4


def test_redelivery_after_a_crash_between_inbox_and_outbox_delete_is_ignored(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    e1, e2 = entry("r1", "cell1", S1), entry("r2", "cell1", S1, "stop")
    put_outbox(store, [e1, e2])
    # The state a forwarder killed after its cell transaction and before the outbox delete
    # leaves behind: the commands in the inbox and still in the outbox.
    db = SqliteCellDB(cell_path(str(data), "cell1"))
    try:
        assert db.accept_commands([(e["id"], e["payload"], e["server"]) for e in (e1, e2)]) == 2
    finally:
        db.close()
    assert outbox_ids(store) == ["r1", "r2"]
    # After the restart: delivered again, the inbox ignores the duplicates.
    fwd, _, _ = make(store, data)
    assert fwd.round().delivered == 2
    assert outbox_ids(store) == []
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["r1", "r2"]
    n = cells["cell1"]._conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    assert n == 2
    assert inbox(cells["cell1"])[0][2] == e1["payload"]


def test_a_missing_cell_backs_off_while_the_other_proceeds(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    put_outbox(store, [entry("g1", "ghost", S2), entry("r1", "cell1", S1),
                       entry("g2", "ghost", S3)])
    fwd, clock, _ = make(store, data)
    res = fwd.round()
    assert (res.delivered, res.queued, res.failed) == (1, 2, ["ghost"])
    ghost = fwd.cells["ghost"]
    assert ghost.failures_total == 1 and "FileNotFoundError" in ghost.last_error
    assert 0.5 <= ghost.backoff_until - clock.t <= 1.0
    assert res.next_retry == ghost.backoff_until
    assert outbox_ids(store) == ["g1", "g2"]
    put_outbox(store, [entry("r2", "cell1", S1, "stop")])
    res = fwd.round()  # ghost is not tried during its back-off; cell1 goes on
    assert (res.delivered, res.queued) == (1, 2) and ghost.failures_total == 1
    clock.t = ghost.backoff_until + 0.01
    res = fwd.round()  # still missing: the back-off doubles
    assert ghost.failures_total == 2 and 1.0 <= ghost.backoff_until - clock.t <= 2.0
    g = open_cell(str(data), "ghost", create=True)
    try:
        clock.t = ghost.backoff_until + 0.01
        res = fwd.round()
        assert res.delivered == 2 and ghost.failures == 0 and ghost.backoff_until == 0
        assert [c for c, _, _ in inbox(g)] == ["g1", "g2"]
    finally:
        g.close()
    assert outbox_ids(store) == []
    assert fwd.stats()["cells"]["ghost"]["failures_total"] == 2


def test_a_locked_cell_backs_off_while_the_other_proceeds(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    put_outbox(store, [entry("a1", "cell2", S2), entry("b1", "cell1", S1)])
    locker = sqlite3.connect(cell_path(str(data), "cell2"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds cell2
    fwd, clock, _ = make(store, data)
    try:
        res = fwd.round()
        assert (res.delivered, res.failed) == (1, ["cell2"])
        assert "locked" in fwd.cells["cell2"].last_error
        assert outbox_ids(store) == ["a1"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    clock.t = fwd.cells["cell2"].backoff_until + 0.01
    assert fwd.round().delivered == 1
    assert [c for c, _, _ in inbox(cells["cell2"])] == ["a1"]
    assert outbox_ids(store) == []


def test_order_per_server_holds_across_cells(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    # S1's first command targets a cell that is down: its later command elsewhere waits.
    put_outbox(store, [entry("x1", "ghost", S1), entry("x2", "cell1", S1, "stop"),
                       entry("x3", "cell1", S2)])
    fwd, clock, _ = make(store, data)
    res = fwd.round()
    assert (res.delivered, res.queued) == (1, 2)
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["x3"]
    # During the back-off the blocked entry is still held back.
    assert fwd.round().delivered == 0
    g = open_cell(str(data), "ghost", create=True)
    g.close()
    clock.t += 100
    res = fwd.round()  # x1 now; x2 waits for the next round (one cell per server per round)
    assert (res.delivered, res.queued, res.more) == (1, 1, True)  # the loop goes on at once
    assert fwd.run_until_idle() == 1
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["x3", "x2"]
    assert outbox_ids(store) == []


def test_a_failure_this_round_blocks_the_servers_later_entries_in_other_cells(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    # cell2 fails when tried; S1's later entry for cell1 must not overtake it.
    put_outbox(store, [entry("y1", "cell2", S1), entry("y2", "cell1", S1, "stop"),
                       entry("y3", "cell1", S3)])
    locker = sqlite3.connect(cell_path(str(data), "cell2"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    fwd, clock, _ = make(store, data)
    try:
        # Cells are tried in the order of their first entry: cell2, then cell1.
        res = fwd.round()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert res.failed == ["cell2"] and res.delivered == 1
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["y3"]
    assert outbox_ids(store) == ["y1", "y2"]
    clock.t += 100
    assert fwd.run_until_idle() == 2
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["y3", "y2"]


def test_batches_and_malformed_entries(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    put_outbox(store, [entry(f"c{i:03d}", "cell1", S1) for i in range(25)])

    def bad(txn: Any) -> None:
        txn.put(L.outbox_key(1000), msgpack.packb({"id": "junk"}), db=store.dbs.outbox)
        txn.put(L.outbox_key(1001), b"\xc1not msgpack", db=store.dbs.outbox)

    store._write(bad)
    fwd, _, _ = make(store, data, batch=10)
    res = fwd.round()
    assert res.delivered == 10 and res.more
    assert fwd.run_until_idle() == 15
    assert [c for c, _, _ in inbox(cells["cell1"])] == [f"c{i:03d}" for i in range(25)]
    assert outbox_ids_raw(store) == [] and fwd.dropped_total == 2


def outbox_ids_raw(store: Store) -> list[bytes]:
    with store.read() as r:
        return [bytes(k) for k, _ in r.txn.cursor(db=r.dbs.outbox)]


def test_backoff_is_exponential_with_jitter_and_capped(store: Store, data: Path) -> None:
    fwd, _, _ = make(store, data, retry_initial=0.1, retry_max=3.0)
    for failures, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6), (6, 3.0), (60, 3.0)]:
        delays = {fwd.backoff_delay(failures) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1  # jittered


def test_outbox_stats_and_the_stats_file(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    with store.read() as r:
        assert outbox_stats(r) == (0, None)
    put_outbox(store, [entry("s1", "ghost", S1, at=111), entry("s2", "cell1", S2, at=222)])
    with store.read() as r:
        assert outbox_stats(r) == (2, 111)
    fwd, _, _ = make(store, data)
    fwd.round()
    with store.read() as r:
        assert outbox_stats(r) == (1, 111)
    fwd.write_stats(force=True)
    stats = read_stats(str(data))
    assert stats is not None
    assert stats["cells"]["cell1"]["delivered_total"] == 1
    assert stats["cells"]["ghost"]["queued"] == 1
    assert stats["cells"]["ghost"]["backoff_until"] > stats["updated_at"]
    assert json.loads((data / "run" / "forwarder.json").read_text()) == stats


def test_a_stale_delete_leaves_a_reused_key_alone(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    from fastpath.forwarder import remove_outbox

    [k] = put_outbox(store, [entry("old", "cell1", S1)])
    with store.read() as r:
        raw = r.txn.get(k, db=r.dbs.outbox)
        assert raw is not None
        old = bytes(raw)
    assert remove_outbox(store, [(k, old)]) == 1
    [k2] = put_outbox(store, [entry("new", "cell1", S1)])
    assert k2 == k  # the outbox was empty: the key is reused
    assert remove_outbox(store, [(k, old)]) == 0
    assert outbox_ids(store) == ["new"]


def test_metric_lines_read_the_store_once_uncounted(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    from fastpath.forwarder import metric_lines

    put_outbox(store, [entry("m1", "ghost", S1, at=1_000_000), entry("m2", "cell1", S2)])
    fwd, _, _ = make(store, data)
    fwd.round()
    fwd.write_stats(force=True)
    reads = store.read_txns
    lines = metric_lines(store, str(data))
    assert store.read_txns == reads  # a scrape does not move the requests' budget counters
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
              for ln in lines if not ln.startswith("#")}
    assert values["fastpath_outbox_depth"] == 1
    assert values["fastpath_outbox_oldest_age_seconds"] > 1e9  # at = 1 s after the epoch
    assert values['fastpath_forwarder_delivered_total{cell="cell1"}'] == 1
    assert values['fastpath_forwarder_failures_total{cell="ghost"}'] == 1
    assert values['fastpath_forwarder_delivered_total{cell="ghost"}'] == 0


def test_a_round_sends_a_servers_entries_to_one_cell_only(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    # cell1 is met first (S2), then S1 goes to cell2 and, later, to cell1: were cell1's
    # entries delivered first and cell2 then failed, S1's second entry would overtake.
    put_outbox(store, [entry("z0", "cell1", S2), entry("z1", "cell2", S1),
                       entry("z2", "cell1", S1, "stop"), entry("z3", "cell1", S3)])
    locker = sqlite3.connect(cell_path(str(data), "cell2"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    fwd, clock, _ = make(store, data)
    try:
        res = fwd.round()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert res.failed == ["cell2"] and res.delivered == 2
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["z0", "z3"]
    clock.t += 100
    assert fwd.run_until_idle() == 2
    assert [c for c, _, _ in inbox(cells["cell2"])] == ["z1"]
    assert [c for c, _, _ in inbox(cells["cell1"])] == ["z0", "z3", "z2"]
    assert outbox_ids(store) == []


def test_a_dead_cells_queue_is_not_decoded_again_at_every_round(
        store: Store, data: Path, cells: dict[str, SqliteCellDB]) -> None:
    ghosts = [entry(f"g{i:02d}", "ghost", str(uuidlib.UUID(int=i + 100, version=4)))
              for i in range(40)]
    put_outbox(store, [*ghosts, entry("a0", "cell1", S1)])
    fwd, clock, _ = make(store, data)
    res = fwd.round()  # ghost fails: backing off from now on
    assert (res.delivered, res.failed, res.scanned) == (1, ["ghost"], 41)
    res = fwd.round()  # the dead queue is walked once more and remembered
    assert (res.delivered, res.queued, res.scanned) == (0, 40, 40)
    put_outbox(store, [entry(f"a{i}", "cell1", S1) for i in range(1, 6)])
    res = fwd.round()
    assert (res.delivered, res.queued, res.scanned) == (5, 40, 5)
    put_outbox(store, [entry("g40", "ghost", S2), entry("a6", "cell1", S1),
                       entry("g41", "ghost", S3), entry("a7", "cell1", S2)])
    res = fwd.round()  # S2 waits behind its ghost entry
    assert (res.delivered, res.queued, res.scanned) == (1, 43, 4)
    assert [fwd.round().scanned for _ in range(2)] == [2, 0]  # the prefix took them in
    assert fwd.cells["ghost"].queued == 42 and fwd.cells["cell1"].queued == 1
    g = open_cell(str(data), "ghost", create=True)
    try:
        clock.t = fwd.cells["ghost"].backoff_until + 0.01
        res = fwd.round()  # out of back-off: everything is looked at again
        assert (res.delivered, res.scanned) == (42, 43) and res.more
        assert fwd.run_until_idle() == 1
        assert [c for c, _, _ in inbox(g)] == [e["id"] for e in ghosts] + ["g40", "g41"]
    finally:
        g.close()
    assert [c for c, _, _ in inbox(cells["cell1"])] == [f"a{i}" for i in range(8)]
    assert outbox_ids(store) == []


# -- a stateful property test: order per server under random cell failures ----------------------
class ForwarderMachine(RuleBasedStateMachine):
    """Commands for a few servers spread over three cells; cells lock and unlock at random;
    the clock jumps; rounds run.  At every step each server's delivered commands are a
    prefix of its accepted ones (never a gap), each cell's inbox holds them in acceptance
    order, and nothing is both delivered and still in the outbox.  At the end everything
    is delivered once."""

    CELLS = ("c1", "c2", "c3")
    SERVERS = [str(uuidlib.UUID(int=i + 1, version=4)) for i in range(4)]

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        self.store = Store.open(self.tmp, map_size=1 << 24, sync=False, metasync=False)
        self.dbs = {n: open_cell(str(self.tmp), n, create=True) for n in self.CELLS}
        self.lockers: dict[str, sqlite3.Connection] = {}
        self.fwd, self.clock, _ = make(self.store, self.tmp, busy_timeout_ms=0,
                                       retry_initial=0.5, retry_max=4.0, batch=3)
        self.accepted: dict[str, list[str]] = {u: [] for u in self.SERVERS}
        self.serial = 0

    @rule(items=st.lists(st.tuples(st.sampled_from(SERVERS), st.sampled_from(CELLS),
                                   st.booleans()), min_size=1, max_size=5))
    def accept(self, items: list[tuple[str, str, bool]]) -> None:
        entries = []
        for server, cell, same_cell in items:
            self.serial += 1
            cid = f"k{self.serial:04d}"
            # Mostly a server's own cell, sometimes another (the order rule spans cells).
            target = self.CELLS[self.SERVERS.index(server) % 3] if same_cell else cell
            entries.append(entry(cid, target, server))
            self.accepted[server].append(cid)
        put_outbox(self.store, entries)

    @rule(cell=st.sampled_from(CELLS))
    def toggle_lock(self, cell: str) -> None:
        conn = self.lockers.pop(cell, None)
        if conn is not None:
            conn.execute("ROLLBACK")
            conn.close()
            return
        conn = sqlite3.connect(cell_path(str(self.tmp), cell), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        self.lockers[cell] = conn

    @rule(dt=st.floats(0, 5))
    def tick(self, dt: float) -> None:
        self.clock.t += dt

    @rule()
    def round(self) -> None:
        self.fwd.round()

    def inboxes(self) -> dict[str, list[tuple[str, str]]]:
        """(command id, server) of every cell's inbox, in inbox order (WAL lets this read
        beside a locker's write transaction)."""
        out = {}
        for name, db in self.dbs.items():
            out[name] = [(cid, u or "") for cid, u, _ in db.pending_commands(limit=10_000)]
        return out

    @invariant()
    def order_per_server(self) -> None:
        inboxes = self.inboxes()  # WAL: a locked cell can still be read
        queued = set(outbox_ids(self.store))
        for u, cids in self.accepted.items():
            mine: list[str] = []
            for rows in inboxes.values():
                ids = [cid for cid, su in rows if su == u]
                assert ids == sorted(ids), (u, ids)  # acceptance order in each inbox
                mine += ids
            assert cids[: len(mine)] == sorted(mine), (u, cids, sorted(mine))  # no gap
            assert not set(mine) & queued  # delivered entries left the outbox

    def teardown(self) -> None:
        try:
            for cell in list(self.lockers):
                self.toggle_lock(cell)
            self.clock.t += 1000
            self.fwd.run_until_idle()
            assert outbox_ids(self.store) == []
            self.order_per_server()
            delivered = sorted(cid for rows in self.inboxes().values() for cid, _ in rows)
            assert delivered == sorted(c for cids in self.accepted.values() for c in cids)
        finally:
            self.fwd.close()
            for db in self.dbs.values():
                db.close()
            self.store.close()
            shutil.rmtree(self.tmp)


TestForwarderMachine = ForwarderMachine.TestCase
TestForwarderMachine.settings = settings(max_examples=30, stateful_step_count=30,
                                         deadline=None, database=None)
