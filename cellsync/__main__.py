"""The ``cellsync`` command: bring every cell's changes up to the API store.

    cellsync [--data-dir DIR] [--once] [--resync [--cell NAME]] [--interval SECONDS]

Without ``--once`` it runs until SIGTERM/SIGINT (:func:`run_daemon`, the same loop that
``fastpath serve`` runs under its master): it syncs every cell of the data dir
(``DATA_DIR/cells/*.sqlite``, picking up cells created later), and when all are idle it
sleeps on its bell ``DATA_DIR/run/wake/cellsync`` (:mod:`fastpath.wake`), which every cell
rings after each commit, or ``--interval`` (``cellsync.poll_interval``) at most.

With ``cellsync.workers`` > 0 (default 2) a busy cell's next batch is read, projected and
rendered in worker processes while the other cells' batches are applied
(:meth:`cellsync.sync.CellSync.sync_round`).

It publishes its per-cell statistics (``CellSync.stats()``: cursor, feed head, lag in
sequence numbers and seconds, changes applied, resyncs) to ``DATA_DIR/run/cellsync.json``
at most once a second, for ``/metrics``: the API never opens a transaction for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastpath.errors import SettingsError
from fastpath.settings import Settings

if TYPE_CHECKING:
    from cellsync.sync import CellSync
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


class StatsFile:
    """Publishes ``CellSync.stats()`` to ``run/cellsync.json``: at most once a second, when
    the figures changed, and every STATS_REFRESH seconds anyway (its age is liveness)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last: dict[str, Any] | None = None
        self._written = -STATS_MIN_INTERVAL

    def publish(self, sync: CellSync, force: bool = False) -> float | None:
        """Write the file if due.  Returns in how many seconds to call again because a
        change is held back by the rate limit (None: nothing held back)."""
        from fastpath.master.status import write_json_atomic

        mono = time.monotonic()
        cells = sync.stats()
        wait = STATS_MIN_INTERVAL - (mono - self._written)
        if not force and wait > 0:
            return wait if cells != self._last else None
        if not force and cells == self._last and mono - self._written < STATS_REFRESH:
            return None
        doc = {"pid": os.getpid(), "updated_at": round(time.time(), 3), "cells": cells}
        try:
            write_json_atomic(self.path, doc)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror)
            return None
        self._last = cells
        self._written = mono
        return None


def _discover(sync: CellSync, data_dir: str) -> None:
    from fastpath.cell.registry import cell_names, open_cell

    for name in cell_names(data_dir):
        if name not in sync.cells:
            sync.cells[name] = open_cell(data_dir, name)
            log.info("cell %s: syncing", name)


def run_daemon(settings: Settings, ctl: Control) -> int:
    """Tail every cell of the data dir into the store until ``ctl`` says stop."""
    from cellsync.sync import CellSync, tune_gc
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
        sync = CellSync.from_settings(store, {}, settings)  # the cellsync.* tuning settings
        stats = StatsFile(cellsync_stats_path(data_dir))
        discovered = -DISCOVER_INTERVAL
        tune_gc()  # after start-up: its objects are frozen out of every later collection
        sync.start_projector(settings["cellsync.workers"])
        log.info("cellsync syncing the cells of %s (bell %s)", data_dir, bell.path)
        # One round before "ready": the store then knows every cell (and its capacity), so
        # the API can schedule a create from the moment the master announces it serves.
        _discover(sync, data_dir)
        discovered = time.monotonic()
        sync.sync_round()
        stats.publish(sync)
        ctl.ready()
        while not ctl.should_stop():
            ctl.beat()
            now = time.monotonic()
            if now - discovered >= DISCOVER_INTERVAL:
                _discover(sync, data_dir)
                discovered = now
            busy = sync.sync_round()
            held = stats.publish(sync)
            if not busy:
                ctl.sleep(poll if held is None else min(poll, held), bell)
        stats.publish(sync, force=True)
        return 0
    finally:
        if sync is not None:
            sync.close()
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
