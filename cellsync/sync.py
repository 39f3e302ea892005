"""cellsync.sync: bring each cell's changes up into the API store, without loss.

:class:`CellSync` tails the change feed of every configured cell (DESIGN.md "Sync
correctness"; research notes P1-P14):

- ``sync_once(cell)``: read the cell's cursor from the store (one read transaction), read
  at most ``batch`` feed entries after it, keep one entry per server (the latest), load and
  project each server's *current* rows (:mod:`cellsync.projection`), and apply them in ONE
  store write transaction together with the cursor ``(cell, last seq)`` (P3: a kill at any
  point loses nothing; a replay is dropped by the version rule, P2).
- Gap and regression detection (P8/P9): a cursor below ``min_seq() - 1`` means the cell
  pruned feed entries this consumer never read; a cursor above ``max_seq()`` means the
  cell's feed went backwards (restored from a backup, or replaced).  Either way the cell is
  resynced instead of tailed: never a silent loss.
- ``resync(cell)``: anti-entropy from a full scan.  ``max_seq()`` is read *before* the scan
  (every change up to it is reflected in the scan, since the scan reads later state; later
  ones are tailed afterwards and are harmless duplicates).  Every server of the cell is
  projected and applied in batches with ``repair=True`` (the store accepts servers older
  than its tombstone horizon); the last batch sets the cursor with ``reset_cursor=True``
  (it may be lower than the saved one after a regression).  Servers the store holds for
  this cell that the cell no longer has at all ("orphans") get a tombstone at their own
  version (a tombstone wins a version tie), so they disappear.  Orphans are found by
  walking the store's ``by_cell`` index (only this cell's servers).  Records of version 0
  are the API's provisional BUILD records (P6) that the cell may not have received yet:
  they are never tombstoned here.

Known limit: a cell restored from a backup also moves its per-server versions backwards;
resync then cannot replace a store record that carries a higher (lost) version.  That needs
a cell epoch in the version (future work); ``fastpath verify`` reports such servers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cellsync.projection import project_change
from fastpath.api.views import render_server
from fastpath.cell.db import CellDB
from fastpath.store import ApplySummary, Batch, Reader, Store, Tombstone, Upsert
from fastpath.store import layout as L
from fastpath.store.record import now_us

log = logging.getLogger("cellsync")


@dataclass
class SyncResult:
    """What one ``sync_once`` (or ``resync``) did for one cell."""

    cell: str
    entries: int = 0  # feed entries read (0 for a resync)
    servers: int = 0  # servers projected and applied (after dedupe)
    cursor: int | None = None  # the cell's cursor in the store afterwards
    resynced: bool = False
    reason: str = ""  # why a resync ran ("gap", "regression", "requested")
    orphans: int = 0  # store servers of the cell that the cell no longer has
    missing: int = 0  # feed entries whose server has no row any more (skipped)
    summaries: list[ApplySummary] = field(default_factory=list)

    @property
    def applied(self) -> int:
        return sum(s.applied + s.tombstoned for s in self.summaries)


def store_servers_of(r: Reader, cell: str) -> Iterator[tuple[str, int, str, int]]:
    """``(uuid, version, project_id, created_at)`` of every live store record of ``cell``.

    A walk over the store's ``by_cell`` index: only that cell's servers, no record decoded.
    """
    for u, head in r.cell_servers(cell):
        yield L.uuid_str(u), head.version, head.project_id, head.created_at


class CellSync:
    """Feed tailing and resync of a set of cells into one store (one thread)."""

    def __init__(self, store: Store, cells: Mapping[str, CellDB], batch: int = 1000) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.store = store
        self.cells = dict(cells)
        self.batch = batch

    def _apply(self, batch: Batch) -> ApplySummary:
        return self.store.apply(batch, render=render_server)

    def cursor(self, cell: str) -> int:
        with self.store.read() as r:
            c = r.cursor(cell)
        return 0 if c is None else c

    # -- tailing ---------------------------------------------------------------------------
    def sync_once(self, cell: str) -> SyncResult:
        db = self.cells[cell]
        cursor = self.cursor(cell)
        if cursor < db.min_seq() - 1:
            log.warning("cell %s: feed pruned past cursor %d (min seq %d): resync",
                        cell, cursor, db.min_seq())
            return self.resync(cell, reason="gap")
        top = db.max_seq()
        if cursor > top:
            log.warning("cell %s: cursor %d is past the feed's max seq %d: resync",
                        cell, cursor, top)
            return self.resync(cell, reason="regression")
        entries = db.changes_after(cursor, self.batch)
        res = SyncResult(cell, entries=len(entries), cursor=cursor)
        if not entries:
            return res
        if entries[0][0] > cursor + 1 and db.min_seq() > cursor + 1:
            # Entries after the cursor were pruned between min_seq() and changes_after().
            return self.resync(cell, reason="gap")
        latest: dict[str, int] = {}
        for seq, uuid, _version, _kind in entries:
            latest[uuid] = seq  # dict order: by first appearance; the rows are current anyway
        changes: list[Upsert | Tombstone] = []
        for uuid in latest:
            rows = db.load_instance(uuid)
            if rows is None:
                res.missing += 1
                log.warning("cell %s: feed names %s but the cell has no such server", cell, uuid)
                continue
            changes.append(project_change(rows, cell))
        last = entries[-1][0]
        summary = self._apply(Batch(changes, cursor=(cell, last)))
        res.servers = len(changes)
        res.cursor = summary.cursor if summary.cursor is not None else last
        res.summaries.append(summary)
        return res

    def run_until_idle(self, max_rounds: int = 1_000_000) -> dict[str, int]:
        """sync_once over every cell until none has new entries; servers applied per cell."""
        done = {c: 0 for c in self.cells}
        for _ in range(max_rounds):
            busy = False
            for cell in self.cells:
                r = self.sync_once(cell)
                done[cell] += r.servers
                if r.entries or r.resynced:
                    busy = True
            if not busy:
                return done
        raise RuntimeError(f"cells still busy after {max_rounds} rounds")

    # -- anti-entropy ----------------------------------------------------------------------
    def resync(self, cell: str, reason: str = "requested") -> SyncResult:
        db = self.cells[cell]
        top = db.max_seq()  # BEFORE the scan: everything up to it is in what the scan reads
        res = SyncResult(cell, resynced=True, reason=reason)
        versions = db.all_instance_versions()
        present = {u for u, _, _ in versions}
        with self.store.read() as r:
            orphans = [
                Tombstone(u, v, project, created, now_us())
                for u, v, project, created in store_servers_of(r, cell)
                if u not in present and v > 0
            ]
        res.orphans = len(orphans)
        chunk: list[Upsert | Tombstone] = []
        for i, (uuid, _, _) in enumerate(versions):
            rows = db.load_instance(uuid)
            if rows is not None:
                chunk.append(project_change(rows, cell))
            if len(chunk) >= self.batch and i < len(versions) - 1:
                res.summaries.append(self._apply(Batch(chunk, repair=True)))
                res.servers += len(chunk)
                chunk = []
        chunk.extend(orphans)
        summary = self._apply(Batch(chunk, cursor=(cell, top), reset_cursor=True, repair=True))
        res.summaries.append(summary)
        res.servers += len(chunk) - len(orphans)
        res.cursor = top
        log.info("cell %s: resync (%s): %d servers, %d orphans tombstoned, cursor %d",
                 cell, reason, res.servers, res.orphans, top)
        return res
