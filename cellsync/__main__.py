"""The ``cellsync`` command: bring every cell's changes up to the API store.

    cellsync [--data-dir DIR] [--once] [--resync [--cell NAME]] [--interval SECONDS]

Without ``--once`` it runs until SIGTERM/SIGINT (:func:`run_daemon`, the same loop that
``fastpath serve`` runs under its master): it syncs every cell of the data dir
(``DATA_DIR/cells/*.sqlite``, picking up cells created later), and when all are idle it
sleeps on its bell ``DATA_DIR/run/wake/cellsync`` (:mod:`fastpath.wake`), which every cell
rings after each commit, or ``--interval`` (``cellsync.poll_interval``) at most.

It publishes its per-cell statistics (cursor, feed head, lag in sequence numbers and
seconds, changes applied, resyncs) to ``DATA_DIR/run/cellsync.json`` at most once a
second, for ``/metrics``: the API never opens a transaction for them.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastpath.errors import SettingsError
from fastpath.settings import Settings

if TYPE_CHECKING:
    from cellsync.sync import CellSync, SyncResult
    from fastpath.sidecar import Control

log = logging.getLogger("cellsync")

# The stats file is written at most this often, and at least this often while unchanged
# (its age on /metrics tells whether cellsync is alive).
STATS_MIN_INTERVAL = 1.0
STATS_REFRESH = 5.0
# New cell databases in the data dir are looked for at most this often.
DISCOVER_INTERVAL = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellsync", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="./data", metavar="DIR")
    p.add_argument("--once", action="store_true", help="sync until idle, then exit")
    p.add_argument("--resync", action="store_true",
                   help="repair from a full scan of the cells (all, or --cell), then exit")
    p.add_argument("--cell", metavar="NAME", help="with --resync: only this cell")
    p.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                   help="longest wait for the bell when every cell is idle "
                        "(default: the cellsync.poll_interval setting, 1 s)")
    return p


def open_all(data_dir: str, only: str | None = None) -> tuple[Any, dict[str, Any]]:
    from fastpath.api import views
    from fastpath.api.context import open_store
    from fastpath.cell.registry import open_cell, open_cells
    from fastpath.settings import load

    settings = load(None, {"data_dir": data_dir})
    views.configure(frozenset())
    cells = {only: open_cell(data_dir, only)} if only else open_cells(data_dir)
    return open_store(settings), cells


def resync_main(data_dir: str, cell: str | None) -> int:
    from cellsync.sync import CellSync

    store, cells = open_all(data_dir, cell)
    try:
        sync = CellSync(store, cells)
        for name in cells:
            result = sync.resync(name, reason="requested")
            print(f"resynced cell {name}: {result}")
    finally:
        store.close()
    return 0


class Stats:
    """Per-cell counters and lag, computed from what the loop sees (one per daemon).

    ``lag_seconds`` is the age of the oldest change not yet applied: the loop notes the
    time at which it first saw the feed head pass each value, and the lag is the age of
    the first note above the cursor (resolution: one loop round, or one bell).
    """

    def __init__(self) -> None:
        self.applied: collections.Counter[str] = collections.Counter()
        self.resyncs: collections.Counter[str] = collections.Counter()
        self.cursor: dict[str, int] = {}
        self.head: dict[str, int] = {}
        self._seen: dict[str, collections.deque[tuple[int, float]]] = {}
        self._last_doc: dict[str, Any] | None = None
        self._written = 0.0

    def record(self, cell: str, res: SyncResult, head: int, now: float) -> None:
        self.applied[cell] += res.applied
        if res.resynced:
            self.resyncs[cell] += 1
        if res.cursor is not None:
            self.cursor[cell] = res.cursor
        self.observe(cell, head, now)

    def observe(self, cell: str, head: int, now: float) -> None:
        self.head[cell] = head
        seen = self._seen.setdefault(cell, collections.deque())
        if not seen or head > seen[-1][0]:
            seen.append((head, now))
        cursor = self.cursor.get(cell, 0)
        while seen and seen[0][0] <= cursor:
            seen.popleft()

    def cells(self, sync: CellSync, now: float) -> dict[str, dict[str, float | int]]:
        stats_of = getattr(sync, "stats", None)  # CellSync.stats() when it has one
        if callable(stats_of):
            try:
                theirs = stats_of()
                if isinstance(theirs, dict):
                    return dict(theirs)
            except Exception:  # noqa: BLE001 - fall back to ours
                log.exception("CellSync.stats() failed; publishing the daemon's own figures")
        out: dict[str, dict[str, float | int]] = {}
        for cell in sync.cells:
            cursor = self.cursor.get(cell, 0)
            head = self.head.get(cell, cursor)
            seen = self._seen.get(cell)
            lag_s = round(now - seen[0][1], 3) if seen and head > cursor else 0.0
            out[cell] = {
                "cursor": cursor,
                "head": head,
                "lag_seqs": max(0, head - cursor),
                "lag_seconds": lag_s,
                "applied_total": self.applied[cell],
                "resyncs_total": self.resyncs[cell],
            }
        return out

    def publish(self, path: str, sync: CellSync, force: bool = False) -> float | None:
        """Write the stats file if due.  Returns in how many seconds to call again because
        a change is held back by the rate limit (None: nothing held back)."""
        from fastpath.master.status import write_json_atomic

        mono = time.monotonic()
        cells = self.cells(sync, mono)
        wait = STATS_MIN_INTERVAL - (mono - self._written)
        if not force and wait > 0:
            return wait if cells != self._last_doc else None
        if not force and cells == self._last_doc and mono - self._written < STATS_REFRESH:
            return None
        doc = {"pid": os.getpid(), "updated_at": round(time.time(), 3), "cells": cells}
        try:
            write_json_atomic(path, doc)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror)
            return None
        self._last_doc = cells
        self._written = mono
        return None


def _discover(sync: CellSync, data_dir: str, stats: Stats, now: float) -> None:
    from fastpath.cell.registry import cell_names, open_cell

    for name in cell_names(data_dir):
        if name not in sync.cells:
            sync.cells[name] = open_cell(data_dir, name)
            stats.observe(name, 0, now)
            log.info("cell %s: syncing", name)


def run_daemon(settings: Settings, ctl: Control) -> int:
    """Tail every cell of the data dir into the store until ``ctl`` says stop."""
    from cellsync.sync import CellSync
    from fastpath.api import views
    from fastpath.api.context import open_store
    from fastpath.master.status import cellsync_stats_path
    from fastpath.wake import Doorbell, bell_path

    data_dir = settings["data_dir"]
    poll = settings["cellsync.poll_interval"]
    # The bell first: a cell committing from now on wakes us even before the first round.
    bell = Doorbell(bell_path(data_dir, "cellsync"))
    store = None
    sync: CellSync | None = None
    try:
        views.configure(frozenset())
        store = open_store(settings)  # after the fork: an LMDB env never crosses one
        make = getattr(CellSync, "from_settings", None)  # the cellsync.* tuning settings
        sync = make(store, {}, settings) if callable(make) else CellSync(store, {})
        # CellSync keeps its own figures when it has stats(); else the loop computes them.
        own_stats = not callable(getattr(sync, "stats", None))
        stats = Stats()
        stats_path = cellsync_stats_path(data_dir)
        discovered = -DISCOVER_INTERVAL
        log.info("cellsync syncing the cells of %s (bell %s)", data_dir, bell.path)
        ctl.ready()
        while not ctl.should_stop():
            ctl.beat()
            now = time.monotonic()
            if now - discovered >= DISCOVER_INTERVAL:
                _discover(sync, data_dir, stats, now)
                discovered = now
            busy = False
            for name, db in list(sync.cells.items()):
                res = sync.sync_once(name)
                if own_stats:
                    stats.record(name, res, db.max_seq(), time.monotonic())
                busy = busy or bool(res.entries or res.resynced)
            held = stats.publish(stats_path, sync)
            if not busy:
                ctl.sleep(poll if held is None else min(poll, held), bell)
        stats.publish(stats_path, sync, force=True)
        return 0
    finally:
        if sync is not None:
            for db in sync.cells.values():
                db.close()
        if store is not None:
            store.close()
        bell.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        if args.resync:
            return resync_main(args.data_dir, args.cell)
        if args.once:
            return once_main(args.data_dir)
        from fastpath.settings import load
        from fastpath.sidecar import standalone_control

        overrides: dict[str, Any] = {"data_dir": args.data_dir}
        if args.interval is not None:
            overrides["cellsync.poll_interval"] = args.interval
        settings = load(None, overrides)
    except (FileNotFoundError, ValueError, SettingsError) as exc:
        print(f"cellsync: {exc}", file=sys.stderr)
        return 2
    ctl = standalone_control()
    try:
        return run_daemon(settings, ctl)
    finally:
        ctl.close()


def once_main(data_dir: str) -> int:
    from cellsync.sync import CellSync

    store, cells = open_all(data_dir)
    try:
        applied = CellSync(store, cells).run_until_idle()
        print(f"cellsync: applied {sum(applied.values())} changes from {len(cells)} cells")
        return 0
    finally:
        for db in cells.values():
            db.close()
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
