"""cellsync.sync: bring each cell's changes up into the API store, without loss.

:class:`CellSync` tails the change feed of every configured cell (DESIGN.md "Sync
correctness"; research notes P1-P14):

- ``sync_once(cell)``: read the cell's cursor and its ``cells`` entry from the store (one
  read transaction), then ONE cell read (:meth:`CellDB.read_feed`: the entries after the
  cursor with the feed's bounds, epoch and hosts version, in one snapshot); keep one entry
  per server (the latest), load every such server's *current* rows in one more cell read
  (``load_instances``), project them (:mod:`cellsync.projection`) and apply them in ONE
  store write transaction together with the cursor ``(cell, last seq)`` (P3: a kill at any
  point loses nothing; a replay is dropped by the version rule, P2) and, when the cell's
  hosts or epoch moved, the cell's entry in the store's ``cells`` database.  The batch is
  applied with ``repair=True``: it holds the servers' *current* rows, never a stale update,
  so the store's tombstone horizon (a guard against stale redeliveries) must not refuse a
  server created while this consumer was away and the store purged old tombstones.
- Batches are bounded in time as well as in size: the API's commands wait for the same
  single LMDB writer, so when a transaction takes longer than ``txn_budget`` the next batch
  of that cell shrinks in proportion (at most halving, never below :data:`MIN_BATCH`); it
  grows back (doubling, up to ``batch``) while transactions stay under half the budget.
- Gap and regression detection (P8/P9): a cursor below ``min_seq - 1`` means the cell
  pruned feed entries this consumer never read (a *gap*: resync).  A cursor above
  ``max_seq``, or a store that knows a higher epoch than the cell has, means the cell went
  back in time (restored from a backup, or replaced): a *regression*, repaired with a new
  epoch (below).  A cell whose epoch is higher than the one the store knows was moved to a
  new epoch by another consumer: resync.  Never a silent loss.
- ``resync(cell)``: anti-entropy from a full scan.  The feed state is read *before* the
  scan (every change up to ``max_seq`` is reflected in the scan, since the scan reads later
  state; later ones are tailed afterwards and are harmless duplicates).  Every server of
  the cell is projected and applied in batches with ``repair=True`` (the store accepts
  servers older than its tombstone horizon); the last batch sets the cursor with
  ``reset_cursor=True`` (it may be lower than the saved one after a regression) and the
  cell's ``cells`` entry.  Servers the store holds for this cell that the cell does not
  have at all ("orphans", found through the store's ``by_cell`` index) get a tombstone at
  their own version (a tombstone wins a version tie), so they disappear.  Records of
  version 0 are the API's provisional BUILD records (P6) that the cell may not have
  received yet: they are never tombstoned here.

Cell epochs
-----------
A cell restored from a backup moves its feed *and its per-server versions* backwards: the
store still holds the higher versions the cell produced after the backup, so the restored
cell's own changes would lose to them (and its servers' later updates with them).  A
version therefore carries the cell's *epoch* in its high bits: ``version = epoch << 40 |
counter`` (:data:`fastpath.cell.db.EPOCH_SHIFT`; epoch 0 = plain counters).  On a
regression cellsync asks the cell to start a new epoch (:meth:`CellDB.start_epoch`) above
both the epoch the store recorded for the cell and the epoch of the highest version the
store holds from it; in one cell transaction every server's version becomes ``new epoch
<< 40 | 1`` and gets a feed entry.  The resync that follows then replaces every store
record of the cell (the cell is the truth: servers deleted after the backup but present in
the restored cell come back, as the cell says), tombstones the servers the restored cell
does not have, and every later change of the cell wins as usual.  The store records the
cell's epoch in its ``cells`` entry, so every other consumer (another API host) sees the
cell's epoch move and resyncs too.

Read-ahead in worker processes (``cellsync.workers``)
----------------------------------------------------
The daemon runs :meth:`CellSync.sync_round`.  With a :class:`Projector` (worker processes,
spawned: an LMDB environment never crosses a fork), a cell that had entries has its next
batch read from its feed right after its apply; a worker reads that batch's rows from the
cell file, projects them and renders their views while the other cells' batches are
applied.  The applying process keeps every decision: the feed checks above run on the
batch as read (the store's cursor for the cell is read again before it is applied, and a
batch read from a cursor that has moved since is read again), and the batch goes into the
store with its cursor in one write transaction as in ``sync_once``.  The worker hands back
:class:`~fastpath.store.Prepared` changes (record, index entry and views as bytes, see
:func:`project_servers`); the store merges and renders again in the write transaction
only for a server with API-owned values (pending commands to overlay).  A worker that fails
only means the batch is projected in process.

Consumers and feed pruning
--------------------------
After a store commit, cellsync reports its cursor to the cell (:meth:`CellDB.ack`, at most
every ``ack_interval`` seconds; it may lag, which only delays pruning).  The cell prunes
entries every live consumer has applied (``CellDB.prune_acked``); a consumer silent for
longer than ``cell.consumer_timeout`` holds nothing back and resyncs on return (gap).

Store upkeep
------------
``sync_once`` also keeps the store small (:meth:`CellSync.housekeeping`): the append-only
changes log is trimmed when a round is idle (and, while busy, once per eight batches), and
tombstones older than ``store.tombstone_retention`` are purged every ten minutes, each in
its own short write transaction.

Host capacity
-------------
The cell's ``hosts`` rows reach the store's ``cells`` database (``Reader.cells()``:
``{name: {name, epoch, hosts_version, hosts: {host: {vcpus, ram_mb, disk_gb, vcpus_used,
ram_mb_used, disk_gb_used, status, availability_zone}}}}``), in the same write transaction
as a batch, whenever the cell's ``hosts_version`` moved; a cell gets its entry at the first
round cellsync sees it, so the API knows every cell before capacity changes.

A restored cell is recognised (a *regression*) when its feed is behind the store's cursor,
when its epoch is behind the one the store recorded, or when the feed entry at the
store's cursor is not the one applied: the store keeps, with the cursor, the commit time
of that entry (``Batch.cursor_mark``), and a restored cell that has since committed past
the cursor has a different entry there.  A resync that finds store versions above the
cell's starts a new epoch first.  Known limit: if the restored cell has also pruned the
entry at the cursor before cellsync looks (pruning by acks keeps it: it waits for this
consumer, so only a forced ``prune_changes`` or ``cell.consumer_timeout`` can), the restore
goes unnoticed until a resync; ``fastpath verify`` reports the servers it affects.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, overload

from cellsync.projection import ProjectionError, project_change
from fastpath.api.views import render_server
from fastpath.cell.db import EPOCH_SHIFT, CellDB, Feed, FeedEntry, SqliteCellDB
from fastpath.store import (
    ApplySummary,
    Batch,
    Catalog,
    CatalogPut,
    Prepared,
    Reader,
    Store,
    Tombstone,
    Upsert,
    prepare_upsert,
)
from fastpath.store import layout as L
from fastpath.store.record import now_us

log = logging.getLogger("cellsync")

ACK_REFRESH = 300.0  # seconds between acks of an unchanged cursor (see CellSync._maybe_ack)

HOST_FIELDS = ("vcpus", "ram_mb", "disk_gb", "vcpus_used", "ram_mb_used", "disk_gb_used",
               "status", "availability_zone")
# The time budget never shrinks a batch below this: a commit has a fixed cost (its fsyncs)
# that smaller batches do not reduce, they would only multiply it.
MIN_BATCH = 32
PURGE_INTERVAL = 600.0  # seconds between two tombstone purges
TRIM_EVERY = 8  # while busy, trim the changes log once per this many batches applied...
TRIM_CHUNK = 2  # ...covering this many batches' worth of changes (see housekeeping)
# A cell behind by more than this many batches (``batch``) is drained in larger transactions
# (``backlog_batch`` under ``backlog_txn_budget``): fewer durable commits per change.
BACKLOG_BATCHES = 2


@dataclass
class SyncResult:
    """What one ``sync_once`` (or ``resync``) did for one cell."""

    cell: str
    entries: int = 0  # feed entries read (0 for a resync)
    servers: int = 0  # servers projected and applied (after dedupe)
    cursor: int | None = None  # the cell's cursor in the store afterwards
    resynced: bool = False
    reason: str = ""  # why a resync ran ("gap", "regression", "epoch", "requested")
    orphans: int = 0  # store servers of the cell that the cell no longer has
    missing: int = 0  # feed entries whose server has no row any more (skipped)
    errors: int = 0  # servers whose rows could not be projected (logged, skipped)
    epoch: int | None = None  # the new epoch this call made the cell start
    hosts: bool = False  # the cell's entry (hosts, epoch) was written
    summaries: list[ApplySummary] = field(default_factory=list)

    @property
    def applied(self) -> int:
        return sum(s.applied + s.tombstoned for s in self.summaries)


@dataclass
class CellStats:
    """Per-cell figures kept by :class:`CellSync` (see :meth:`CellSync.stats`)."""

    cursor: int = 0
    head: int = 0  # the feed's max seq at the last read
    pending_at: int | None = None  # commit time (µs) of the oldest entry not yet applied
    applied_total: int = 0
    resyncs_total: int = 0
    batches_total: int = 0  # store write transactions (applied_total / this: batch size)
    limit: int = 0  # the current batch size (time budget)
    acked: int | None = None  # the cursor last reported to the cell
    acked_when: float = 0.0


# The cyclic GC for a process that projects changes (cellsync's daemon; bench_sync.py): each
# change makes a few dozen short-lived dicts and lists, so with Python's default threshold
# (700) a young collection runs every ~20 changes and an older one often.  Measured: ~13 % of
# a round (docs/benchmarks.md, issue 6).
GC_THRESHOLD = (50_000, 20, 100)


def tune_gc() -> None:
    """Move what start-up made out of the collector's way (``gc.freeze``) and make young
    collections rarer (:data:`GC_THRESHOLD`).  Cycles are still collected, only later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


@dataclass
class Projected:
    """The changes of a batch of servers (:func:`project_servers`), and the servers left out:
    ``missing`` (the feed names them, the cell has no row) and ``errors`` ((uuid, problem):
    rows that make no valid record)."""

    changes: list[Prepared | Tombstone]
    missing: list[str]
    errors: list[tuple[str, str]]


def project_servers(cell: str, db: CellDB, uuids: Sequence[str]) -> Projected:
    """The current change of each server, rows read in one cell read when possible.

    A live server's change is :class:`~fastpath.store.Prepared`: its record packed, its
    index entry packed and its views rendered here, so that the store's write transaction
    only checks versions and puts bytes -- and so that a projector worker hands the
    applying process bytes, not records to unpickle (issue 6: the applier's CPU per change
    is what bounds the pipeline).
    """
    many = getattr(db, "load_instances", None)
    if callable(many):
        loaded: Mapping[str, Any] = many(uuids)
        rows_of: Callable[[str], Any] = loaded.get
    else:
        rows_of = db.load_instance
    out = Projected([], [], [])
    for uuid in uuids:
        rows = rows_of(uuid)
        if rows is None:
            out.missing.append(uuid)
            continue
        try:
            ch = project_change(rows, cell)
        except ProjectionError as exc:
            out.errors.append((uuid, str(exc)))
            continue
        out.changes.append(prepare_upsert(ch.record, render_server) if isinstance(ch, Upsert)
                           else ch)
    return out


# -- the projector: cell reads and projections in worker processes -------------------------
_worker_cells: dict[str, SqliteCellDB] = {}


def _worker_start(parent: int) -> None:
    """A projector worker: the daemon's GC setting, and gone as soon as its parent is (a
    ``kill -9`` of cellsync leaves no worker behind: the pool's queues cannot tell)."""
    tune_gc()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_project(path: str, cell: str, uuids: list[str]) -> Projected:
    db = _worker_cells.get(path)
    if db is None:
        db = _worker_cells[path] = SqliteCellDB(path)
    return project_servers(cell, db, uuids)


class Projector:
    """``workers`` processes that read servers' rows from a cell file, project them and
    render their views, for :meth:`CellSync.sync_round`'s read-ahead (``cellsync.workers``).
    Only reads: the store, the cursors and every decision stay in the applying process."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent holds an LMDB environment, which never crosses a fork.
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_start, initargs=(os.getpid(),))
        # Every worker started (and its imports done) now, not in the first batches' time.
        for f in [pool.submit(time.sleep, 0.2) for _ in range(self.workers)]:
            f.result()
        return pool

    def submit(self, db: CellDB, cell: str, uuids: list[str]) -> Future[Projected] | None:
        """The projection of ``uuids`` under way in a worker; None for a cell that is not a
        SQLite file (the caller projects it itself)."""
        if not isinstance(db, SqliteCellDB):
            return None
        try:
            return self.pool.submit(_worker_project, db.path, cell, uuids)
        except BrokenProcessPool:  # a worker died (killed): new workers
            log.warning("projector: a worker process died; starting new ones")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._start()
            return self.pool.submit(_worker_project, db.path, cell, uuids)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Plan:
    """A batch read from a cell's feed (the first half of sync_once): what the second half
    projects and applies."""

    cell: str
    cursor: int  # the store's cursor for the cell when the feed was read
    feed: Feed
    entries: list[FeedEntry]
    limit: int
    puts: list[CatalogPut]
    uuids: list[str]
    res: SyncResult
    projected: Future[Projected] | None = None  # a worker's projection (read-ahead)


def store_servers_of(r: Reader, cell: str) -> Iterator[tuple[str, int, str, int]]:
    """``(uuid, version, project_id, created_at)`` of every live store record of ``cell``.

    A walk over the store's ``by_cell`` index: only that cell's servers, no record decoded.
    """
    for u, head in r.cell_servers(cell):
        yield L.uuid_str(u), head.version, head.project_id, head.created_at


def default_consumer(store_path: str) -> str:
    """This API host's consumer name: host name and a digest of the store's path."""
    digest = hashlib.sha256(store_path.encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{digest}"


def cell_entry(cell: str, feed: Feed, hosts: Mapping[str, Mapping[str, Any]],
               known: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cell's value in the store's ``cells`` database (keys of others are kept)."""
    return {
        **(known or {}),
        "name": cell,
        "epoch": feed.epoch,
        "hosts_version": feed.hosts_version,
        "hosts": {name: {k: h.get(k) for k in HOST_FIELDS} for name, h in hosts.items()},
    }


class CellSync:
    """Feed tailing and resync of a set of cells into one store (one thread).

    ``cells`` may grow while it runs (``sync.cells[name] = db``).
    """

    def __init__(self, store: Store, cells: Mapping[str, CellDB], batch: int = 500, *,
                 txn_budget: float = 0.020, backlog_batch: int | None = None,
                 backlog_txn_budget: float | None = None, consumer: str | None = None,
                 ack_interval: float = 1.0, tombstone_retention: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.store = store
        self.cells: dict[str, CellDB] = dict(cells)
        self.batch = batch
        self.txn_budget = txn_budget
        # A cell behind by more than BACKLOG_BATCHES batches: larger transactions (below).
        self.backlog_batch = max(batch, backlog_batch or batch)
        self.backlog_txn_budget = max(txn_budget, backlog_txn_budget or txn_budget)
        self.consumer = consumer or default_consumer(store.path)
        self.ack_interval = ack_interval
        self.tombstone_retention = tombstone_retention
        self.clock = clock
        self._stats: dict[str, CellStats] = {}
        self._since_trim = 0  # changes applied and not walked by a trim (see housekeeping)
        # The store's cells entries as last decoded, valid while the table's generation is.
        self._cells_gen = -1
        self._cells_seen: dict[str, dict[str, Any] | None] = {}
        self._next_purge = 0.0
        self.projector: Projector | None = None  # sync_round's read-ahead (start_projector)
        self._ahead: dict[str, _Plan | SyncResult] = {}

    def start_projector(self, workers: int) -> None:
        """Read and project each busy cell's next batch in ``workers`` processes while the
        other cells' batches are applied (:meth:`sync_round`); 0: everything in process."""
        if workers > 0 and self.projector is None:
            self.projector = Projector(workers)

    def drop_cell(self, cell: str) -> CellDB:
        """Stop syncing ``cell`` (another process took it over); returns its database for
        the caller to close.  A batch read ahead for it is dropped."""
        step = self._ahead.pop(cell, None)
        if isinstance(step, _Plan) and step.projected is not None:
            step.projected.cancel()
        self._stats.pop(cell, None)
        return self.cells.pop(cell)

    def close(self) -> None:
        """Stop the projector's workers (the cells and the store are the caller's)."""
        self._ahead.clear()
        if self.projector is not None:
            self.projector.close()
            self.projector = None

    @classmethod
    def from_settings(cls, store: Store, cells: Mapping[str, CellDB],
                      settings: Mapping[str, Any]) -> CellSync:
        return cls(store, cells, settings["cellsync.batch"],
                   txn_budget=settings["cellsync.txn_budget_ms"] / 1000.0,
                   backlog_batch=settings["cellsync.backlog_batch"],
                   backlog_txn_budget=settings["cellsync.backlog_txn_budget_ms"] / 1000.0,
                   consumer=settings["cellsync.consumer"] or None,
                   ack_interval=settings["cellsync.ack_interval"],
                   tombstone_retention=settings["store.tombstone_retention"])

    def _state(self, cell: str) -> CellStats:
        st = self._stats.get(cell)
        if st is None:
            st = self._stats[cell] = CellStats(limit=self.batch)
        return st

    def _known(self, r: Reader, cell: str) -> dict[str, Any] | None:
        """The cell's entry in the store's ``cells`` database (PERF: decoded again only when
        the table's generation moved: the entry holds every host of the cell)."""
        gen = r.generation(Catalog.CELLS)
        if gen != self._cells_gen:
            self._cells_gen, self._cells_seen = gen, {}
        if cell not in self._cells_seen:
            self._cells_seen[cell] = r.cell(cell)
        return self._cells_seen[cell]

    def cursor(self, cell: str) -> int:
        with self.store.read() as r:
            c = r.cursor(cell)
        return 0 if c is None else c

    # -- statistics ------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per cell: ``cursor``, ``head`` (max seq seen), ``lag_seqs``, ``lag_seconds`` (age of
        the oldest feed entry not yet applied, by its commit time; 0 when caught up),
        ``applied_total``, ``resyncs_total``, ``batches_total`` (for /metrics)."""
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for cell in self.cells:
            st = self._state(cell)
            behind = st.head > st.cursor
            lag = 0.0
            if behind and st.pending_at is not None:
                lag = round(max(0.0, now - st.pending_at / 1e6), 6)
            out[cell] = {
                "cursor": st.cursor,
                "head": st.head,
                "lag_seqs": max(0, st.head - st.cursor),
                "lag_seconds": lag,
                "applied_total": st.applied_total,
                "resyncs_total": st.resyncs_total,
                "batches_total": st.batches_total,
            }
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _apply(self, st: CellStats, batch: Batch) -> ApplySummary:
        """One write transaction; adjusts the cell's batch size to the time budget (the
        backlog budget and size while the cell is behind, see :meth:`_behind`)."""
        behind = self._behind(st)
        budget = self.backlog_txn_budget if behind else self.txn_budget
        cap = self.backlog_batch if behind else self.batch
        st.limit = min(st.limit, cap)  # caught up: back to the usual size at once
        t0 = time.perf_counter()
        summary = self.store.apply(batch, render=render_server)
        took = time.perf_counter() - t0
        if took > budget and st.limit > MIN_BATCH:
            # In proportion, at most halving: part of ``took`` is the commit's fixed cost.
            st.limit = max(MIN_BATCH, int(st.limit * max(0.5, budget / took)))
        elif took < budget / 2 and st.limit < cap:
            st.limit = min(cap, st.limit * 2)
        st.applied_total += summary.applied + summary.tombstoned
        st.batches_total += 1
        self._since_trim = max(0, self._since_trim + summary.applied + summary.tombstoned
                               - summary.trim_walked)
        return summary

    def _behind(self, st: CellStats) -> bool:
        """The cell is behind by more than :data:`BACKLOG_BATCHES` batches (as last read):
        its batches may grow to ``backlog_batch`` under ``backlog_txn_budget``."""
        return st.head - st.cursor > BACKLOG_BATCHES * self.batch

    def housekeeping(self, idle: bool = False) -> None:
        """The store's upkeep that comes with applying, each in its own short write txn:

        - trim the changes log (``by_changed`` is append-only).  A tailing batch walks one
          entry per change in its own transaction (``Batch.trim``: the log stays under
          about twice the servers, and no commit of its own).  Here, walking four entries
          per change applied and not yet walked keeps the log near one entry per server:
          when a round found nothing to apply (``idle``), or while busy once
          :data:`TRIM_EVERY` batches' worth of changes were applied without a walk
          (resyncs); each call walks at most ``4 * TRIM_CHUNK`` batches' worth of entries
          (the writer lock is shared with the API's commands);
        - every :data:`PURGE_INTERVAL` seconds, purge the tombstones older than
          ``tombstone_retention`` (when set), which raises the store's tombstone horizon.

        ``sync_once`` calls it; it is cheap when there is nothing due.
        """
        if self._since_trim and (idle or self._since_trim >= TRIM_EVERY * self.batch):
            n = min(self._since_trim, TRIM_CHUNK * self.batch)
            self.store.trim_changes(4 * n)
            # Busy: one entry walked per change (as a tailing batch walks); idle rounds
            # walk four per change until caught up.
            self._since_trim = self._since_trim - n if idle else 0
        if self.tombstone_retention is not None:
            now = self.clock()
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL
                n = self.store.purge_tombstones(int((now - self.tombstone_retention) * 1e6),
                                                batch_size=self.batch)
                if n:
                    log.info("purged %d tombstones older than %.0f s", n,
                             self.tombstone_retention)

    def _project(self, cell: str, db: CellDB, uuids: Sequence[str], res: SyncResult,
                 projected: Projected | None = None) -> list[Prepared | Tombstone]:
        """The current change of each server (:func:`project_servers`, unless ``projected``
        already holds them); the servers left out are counted in ``res`` and logged."""
        got = project_servers(cell, db, uuids) if projected is None else projected
        for uuid in got.missing:
            log.warning("cell %s: feed names %s but the cell has no such server", cell, uuid)
        for uuid, problem in got.errors:
            # One bad server must not stop the cell; verify reports it until fixed.
            log.error("cell %s: server %s cannot be projected: %s", cell, uuid, problem)
        res.missing += len(got.missing)
        res.errors += len(got.errors)
        return got.changes

    def _maybe_ack(self, cell: str, db: CellDB, st: CellStats) -> None:
        now = self.clock()
        if now - st.acked_when < self.ack_interval:
            return
        # An unchanged cursor is acked again every ACK_REFRESH seconds: an idle consumer is
        # still a live one, and the cell must not count it out (cell.consumer_timeout) and
        # prune past it, which would cost it a needless resync at its next change.
        if st.acked == st.cursor and now - st.acked_when < max(self.ack_interval, ACK_REFRESH):
            return
        try:
            db.ack(self.consumer, st.cursor)
        except Exception as exc:  # noqa: BLE001 - a busy cell delays pruning, nothing else
            log.warning("cell %s: cannot record consumer cursor: %s", cell, exc)
            return
        st.acked, st.acked_when = st.cursor, now

    # -- tailing ---------------------------------------------------------------------------
    def sync_once(self, cell: str) -> SyncResult:
        step = self._begin(cell)
        return step if isinstance(step, SyncResult) else self._finish(step)

    def sync_round(self) -> bool:
        """:meth:`sync_once` for every cell; True if any had entries (or was resynced).

        With a projector (:meth:`start_projector`), a cell that had entries has its next
        batch read from its feed right after its apply, and that batch's rows are read and
        projected by a worker while the other cells apply theirs: the next round only
        applies it (after checking that the store's cursor for the cell has not moved
        meanwhile; if it has, the batch is read again).  The first batch after an idle
        round is projected in process, for the lag of a lone change.
        """
        busy = False
        for cell in list(self.cells):
            res = self._sync_ahead(cell) if self.projector is not None else self.sync_once(cell)
            busy = busy or bool(res.entries or res.resynced)
        return busy

    def _sync_ahead(self, cell: str) -> SyncResult:
        step = self._ahead.pop(cell, None)
        if isinstance(step, _Plan) and self.cursor(cell) != step.cursor:
            # Someone else (a resync) moved the cursor under the batch read ahead: read again.
            log.info("cell %s: cursor moved from %d under a batch read ahead", cell, step.cursor)
            if step.projected is not None:
                step.projected.cancel()
            step = None
        if step is None:
            step = self._begin(cell)
        if isinstance(step, SyncResult):
            return step
        nxt: _Plan | SyncResult | None = None
        if step.projected is not None:
            # Busy: the batch after this one, from where this one leaves the cursor, goes to
            # a worker before this one is applied (a wrong guess fails the check above).
            nxt = self._begin(cell, ahead=True, after=step)
        res = self._finish(step)
        if nxt is None and res.entries:
            nxt = self._begin(cell, ahead=True)
        if isinstance(nxt, SyncResult) or (nxt is not None and (nxt.entries or nxt.puts)):
            self._ahead[cell] = nxt  # (an idle read is not kept: it would go stale)
        return res

    @overload
    def _begin(self, cell: str, ahead: bool = False) -> _Plan | SyncResult: ...

    @overload
    def _begin(self, cell: str, ahead: bool, after: _Plan) -> _Plan | None: ...

    def _begin(self, cell: str, ahead: bool = False,
               after: _Plan | None = None) -> _Plan | SyncResult | None:
        """sync_once's first half: the cursor, the feed after it and the checks (a resync
        when they fail: its result); ``ahead``: the batch's projection goes to a worker.
        ``after``: the batch after that one (not applied yet), from the cursor and mark it
        will leave; None when any check fails (decided once ``after`` is applied)."""
        db = self.cells[cell]
        st = self._state(cell)
        with self.store.read() as r:
            c = r.cursor(cell)
            mark = r.cursor_mark(cell)
            known = self._known(r, cell)
        cursor = 0 if c is None else c
        if after is not None and after.entries:
            cursor, mark = after.entries[-1].seq, after.entries[-1].at
        # A backlog's larger batches end as soon as the cell is no longer behind.
        limit = st.limit if self._behind(st) else min(st.limit, self.batch)
        feed = db.read_feed(cursor, limit + 1)
        st.head = feed.max_seq
        if after is None:
            st.cursor = cursor
        known_epoch = None if known is None else int(known.get("epoch", 0))
        # The entry at the cursor is not the one applied: the feed was rewritten from there.
        rewritten = bool(mark and feed.after_at and feed.after_at != mark)
        if after is not None and (cursor > feed.max_seq or rewritten or cursor < feed.min_seq - 1
                                  or (known_epoch is not None and known_epoch != feed.epoch)):
            return None
        if (cursor > feed.max_seq or rewritten
                or (known_epoch is not None and known_epoch > feed.epoch)):
            log.warning("cell %s: went back (cursor %d, feed max %d, entry at cursor %s,"
                        " epoch %d, store knew %s): new epoch and resync", cell, cursor,
                        feed.max_seq, "rewritten" if rewritten else "as applied", feed.epoch,
                        known_epoch)
            return self.restart_epoch(cell)
        if known_epoch is not None and known_epoch < feed.epoch:
            log.warning("cell %s: now in epoch %d (store knew %d): resync",
                        cell, feed.epoch, known_epoch)
            return self.resync(cell, reason="epoch")
        if cursor < feed.min_seq - 1:
            log.warning("cell %s: feed pruned past cursor %d (min seq %d): resync",
                        cell, cursor, feed.min_seq)
            return self.resync(cell, reason="gap")
        entries = feed.entries[:limit]
        res = SyncResult(cell, entries=len(entries), cursor=cursor)
        puts: list[CatalogPut] = []
        if (known is None or known.get("hosts_version") != feed.hosts_version
                or known_epoch != feed.epoch):
            puts.append(CatalogPut(Catalog.CELLS, cell, cell_entry(cell, feed, db.hosts(), known)))
            res.hosts = True
        uuids = list(dict.fromkeys(e.uuid for e in entries))  # one per server
        plan = _Plan(cell, cursor, feed, entries, limit, puts, uuids, res)
        if ahead and uuids and self.projector is not None:
            plan.projected = self.projector.submit(db, cell, uuids)
        return plan

    def _finish(self, plan: _Plan) -> SyncResult:
        """sync_once's second half: project (or take the worker's projection) and apply the
        batch with the cursor in one store write transaction; ack, upkeep."""
        cell, entries, res = plan.cell, plan.entries, plan.res
        db = self.cells[cell]
        st = self._state(cell)
        if entries or plan.puts:
            projected = None
            if plan.projected is not None:
                try:
                    projected = plan.projected.result()
                except Exception as exc:  # noqa: BLE001 - a lost worker: project here
                    log.warning("cell %s: projector failed (%s): projecting in process",
                                cell, exc)
            changes = self._project(cell, db, plan.uuids, res, projected)
            last = entries[-1].seq if entries else None
            # repair=True: these are the servers' *current* rows, never a stale update, so
            # the tombstone horizon (meant for stale redeliveries) must not refuse a server
            # created while this consumer was away and the store purged old tombstones.
            # The changes log is trimmed in the same transaction, one entry walked per
            # change (housekeeping catches up when idle): no durable commit of its own.
            summary = self._apply(st, Batch(changes, cursor=None if last is None else (cell, last),
                                            catalog=plan.puts, repair=True,
                                            cursor_mark=entries[-1].at if entries else 0,
                                            trim=len(changes)))
            res.servers = len(changes)
            res.summaries.append(summary)
            if last is not None:
                res.cursor = summary.cursor if summary.cursor is not None else last
        st.cursor = res.cursor or 0
        feed, limit = plan.feed, plan.limit
        st.pending_at = feed.entries[limit].at if len(feed.entries) > limit else None
        self._maybe_ack(cell, db, st)
        self.housekeeping(idle=not (entries or res.hosts))
        return res

    def run_until_idle(self, max_rounds: int = 1_000_000) -> dict[str, int]:
        """sync_once over every cell until none has new entries; servers applied per cell."""
        done = {c: 0 for c in self.cells}
        for _ in range(max_rounds):
            busy = False
            for cell in list(self.cells):
                r = self.sync_once(cell)
                done[cell] = done.get(cell, 0) + r.servers
                if r.entries or r.resynced:
                    busy = True
            if not busy:
                return done
        raise RuntimeError(f"cells still busy after {max_rounds} rounds")

    # -- anti-entropy ----------------------------------------------------------------------
    def restart_epoch(self, cell: str) -> SyncResult:
        """A regression: make the cell start an epoch above anything this store holds from
        it, then resync (module docstring, "Cell epochs")."""
        db = self.cells[cell]
        with self.store.read() as r:
            known = r.cell(cell)
            top = max((h.version for _, h in r.cell_servers(cell)), default=0)
        at_least = max((top >> EPOCH_SHIFT) + 1, int((known or {}).get("epoch", -1)) + 1)
        epoch = db.start_epoch(at_least)
        log.warning("cell %s: started epoch %d", cell, epoch)
        res = self.resync(cell, reason="regression", epoch_check=False)
        res.epoch = epoch
        return res

    def resync(self, cell: str, reason: str = "requested", *, epoch_check: bool = True
               ) -> SyncResult:
        db = self.cells[cell]
        st = self._state(cell)
        # The store first, then the cell: cells never remove rows, so every server the
        # store holds for the cell now is in the scan below unless the cell lost it (an
        # orphan).  The other way round, a server created after the scan and applied by
        # another consumer (the daemon beside `fastpath resync`) would look like one.
        with self.store.read() as r:
            known = r.cell(cell)
            mine = {u: (v, project, created) for u, v, project, created in store_servers_of(r, cell)}
        feed = db.read_feed(0, 0)  # BEFORE the scan: everything up to max_seq is in it
        top = feed.max_seq
        versions = db.all_instance_versions()
        present = {u for u, _, _ in versions}
        behind = False
        if epoch_check:
            with self.store.read() as r:
                behind = any((mine[u][0] if u in mine else r.tombstone_version(u) or 0) > v
                             for u, v, _ in versions)
        if behind:
            # The store holds versions the cell has not reached: it went back in time (e.g.
            # restored, and its feed pruned so that the cursor could not tell).  Only a new
            # epoch lets its servers win again.
            log.warning("cell %s: the store holds newer versions than the cell (resync %s)",
                        cell, reason)
            return self.restart_epoch(cell)
        st.resyncs_total += 1
        res = SyncResult(cell, resynced=True, reason=reason)
        orphans = [Tombstone(u, v, project, created, now_us())
                   for u, (v, project, created) in mine.items() if u not in present and v > 0]
        res.orphans = len(orphans)
        # Servers, then orphans, in batches of the cell's (time-budgeted) size; the cursor
        # and the cell's entry go with the last batch only.
        todo: list[str | Tombstone] = [*(u for u, _, _ in versions), *orphans]
        i = 0
        while True:
            chunk = todo[i:i + min(st.limit, self.batch)]
            i += len(chunk)
            changes: list[Prepared | Tombstone] = self._project(
                cell, db, [u for u in chunk if isinstance(u, str)], res)
            res.servers += len(changes)
            changes += [t for t in chunk if isinstance(t, Tombstone)]
            if i < len(todo):
                res.summaries.append(self._apply(st, Batch(changes, repair=True)))
                continue
            entry = cell_entry(cell, feed, db.hosts(), known)
            summary = self._apply(st, Batch(
                changes, cursor=(cell, top), reset_cursor=True, repair=True,
                cursor_mark=feed.top_at, catalog=[CatalogPut(Catalog.CELLS, cell, entry)]))
            res.summaries.append(summary)
            break
        res.cursor = st.cursor = top
        st.head = max(st.head, top)
        st.pending_at = None
        res.hosts = True
        log.info("cell %s: resync (%s): %d servers, %d orphans tombstoned, cursor %d",
                 cell, reason, res.servers, res.orphans, top)
        self._maybe_ack(cell, db, st)
        return res
