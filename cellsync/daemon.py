"""cellsync's daemon: tails every cell of the data dir into the store until told to stop.

What ``cellsync`` (without ``--once``/``--resync``) and ``fastpath serve`` (as the master's
``cellsync`` sidecar) run: :func:`run_daemon`.  It lives here, not in ``__main__``, because
its shard processes are spawned: a spawned child finds the function it runs by module name.

It syncs every cell of the data dir (``DATA_DIR/cells/*.sqlite``, picking up cells created
later), and when all are idle it sleeps on its bell ``DATA_DIR/run/wake/cellsync``
(:mod:`fastpath.wake`), which every cell rings after each commit, or
``cellsync.poll_interval`` at most.

With ``cellsync.shards`` > 1 (default 2) the cells are shared among that many shard
processes (every n-th cell by name from the k-th), each tailing its own cells through the
whole pipeline -- read, project, render, apply -- with its own store handle; the daemon
relays its bell to theirs (``run/wake/cellsync-shardK``), merges their statistics, and
stops if one dies (the master, or whoever runs it, starts it again).  With
``cellsync.workers`` > 0 (default 0) each shard also reads, projects and renders a busy
cell's next batch in worker processes while it applies its other cells' batches
(:meth:`cellsync.sync.CellSync.sync_round`).

It publishes its per-cell statistics (``CellSync.stats()``: cursor, feed head, lag in
sequence numbers and seconds, changes applied, resyncs, batches) to
``DATA_DIR/run/cellsync.json`` at most once a second, for ``/metrics``: the API never opens
a transaction for them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastpath.settings import Settings

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from cellsync.sync import CellSync
    from fastpath.sidecar import Control
    from fastpath.wake import Doorbell

log = logging.getLogger("cellsync")

# The stats file is written at most this often, and at least this often while unchanged
# (its age on /metrics tells whether cellsync is alive).
STATS_MIN_INTERVAL = 1.0
STATS_REFRESH = 5.0
# New cell databases in the data dir are looked for at most this often.
DISCOVER_INTERVAL = 1.0


class StatsFile:
    """Publishes the per-cell statistics (``CellSync.stats()``) to ``run/cellsync.json``: at
    most once a second, when the figures changed, and every STATS_REFRESH seconds anyway
    (its age is liveness).  ``send``: instead of the file, hand them to this (a shard sends
    them to the daemon, which writes the file); False if they could not go."""

    def __init__(self, path: str, send: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.path = path
        self._send = send or self._write
        self._last: dict[str, Any] | None = None
        self._written = -STATS_MIN_INTERVAL

    def publish(self, cells: dict[str, Any], force: bool = False) -> float | None:
        """Publish if due.  Returns in how many seconds to call again because a change is
        held back by the rate limit (None: nothing held back)."""
        mono = time.monotonic()
        wait = STATS_MIN_INTERVAL - (mono - self._written)
        if not force and wait > 0:
            return wait if cells != self._last else None
        if not force and cells == self._last and mono - self._written < STATS_REFRESH:
            return None
        if self._send(cells):
            self._last = cells
            self._written = mono
        return None

    def _write(self, cells: dict[str, Any]) -> bool:
        from fastpath.master.status import write_json_atomic

        doc = {"pid": os.getpid(), "updated_at": round(time.time(), 3), "cells": cells}
        try:
            write_json_atomic(self.path, doc)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror)
            return False
        return True


def _discover(sync: CellSync, data_dir: str, shard: tuple[int, int] | None = None) -> None:
    """Follow the data dir's cells: the new ones are synced; with ``shard`` (k, n), only
    every n-th cell by name from the k-th, and a cell that moved to another shard (cells
    were added or removed) is let go (two shards on one cell for a moment are harmless:
    every apply is idempotent and the cursor only moves forward)."""
    from fastpath.cell.registry import cell_names, open_cell

    names = cell_names(data_dir)
    if shard is not None:
        k, n = shard
        names = names[k::n]
        for gone in [c for c in sync.cells if c not in names]:
            sync.drop_cell(gone).close()
            log.info("cell %s: left to another cellsync shard", gone)
    for name in names:
        if name not in sync.cells:
            sync.cells[name] = open_cell(data_dir, name)
            log.info("cell %s: syncing", name)


class _Host(Protocol):
    """What the tailing loop (:func:`_tail`) needs from the process it runs in."""

    def should_stop(self) -> bool: ...
    def beat(self) -> None: ...
    def ready(self) -> None: ...
    def sleep(self, timeout: float) -> None: ...
    def publish(self, cells: dict[str, Any], force: bool = False) -> float | None: ...


class _Alone:
    """The daemon tails every cell itself: its bell, the master's control, the stats file."""

    def __init__(self, ctl: Control, bell: Doorbell, stats: StatsFile) -> None:
        self.ctl, self.bell, self.stats = ctl, bell, stats

    def should_stop(self) -> bool:
        return self.ctl.should_stop()

    def beat(self) -> None:
        self.ctl.beat()

    def ready(self) -> None:
        self.ctl.ready()

    def sleep(self, timeout: float) -> None:
        self.ctl.sleep(timeout, self.bell)  # it beats while it waits

    def publish(self, cells: dict[str, Any], force: bool = False) -> float | None:
        return self.stats.publish(cells, force)


def _tail(settings: Settings, host: _Host, shard: tuple[int, int] | None) -> int:
    """Tail the cells of the data dir (``shard``: a share of them) into the store until
    ``host`` says stop."""
    from cellsync.sync import CellSync, tune_gc
    from fastpath.api import views
    from fastpath.api.context import open_store

    data_dir = settings["data_dir"]
    poll = settings["cellsync.poll_interval"]
    store = None
    sync: CellSync | None = None
    try:
        views.configure(frozenset())
        store = open_store(settings)  # after the fork: an LMDB env never crosses one
        sync = CellSync.from_settings(store, {}, settings)  # the cellsync.* tuning settings
        tune_gc()  # after start-up: its objects are frozen out of every later collection
        sync.start_projector(settings["cellsync.workers"])
        # One round before "ready": the store then knows every cell (and its capacity), so
        # the API can schedule a create from the moment the master announces it serves.
        _discover(sync, data_dir, shard)
        discovered = time.monotonic()
        sync.sync_round()
        host.publish(sync.stats())
        host.ready()
        while not host.should_stop():
            host.beat()
            now = time.monotonic()
            if now - discovered >= DISCOVER_INTERVAL:
                _discover(sync, data_dir, shard)
                discovered = now
            busy = sync.sync_round()
            held = host.publish(sync.stats())
            if not busy:
                host.sleep(poll if held is None else min(poll, held))
        host.publish(sync.stats(), force=True)
        return 0
    finally:
        if sync is not None:
            sync.close()
            for db in sync.cells.values():
                db.close()
        if store is not None:
            store.close()


def run_daemon(settings: Settings, ctl: Control) -> int:
    """Tail every cell of the data dir into the store until ``ctl`` says stop: in this
    process, or (``cellsync.shards`` > 1) in shard processes that share the cells."""
    from fastpath.master.status import cellsync_stats_path
    from fastpath.wake import Doorbell, bell_path

    data_dir = settings["data_dir"]
    # The bell first: a cell committing from now on wakes us even before the first round.
    bell = Doorbell(bell_path(data_dir, "cellsync"))
    stats = StatsFile(cellsync_stats_path(data_dir))
    try:
        if settings["cellsync.shards"] > 1:
            return _run_shards(settings, ctl, bell, stats)
        log.info("cellsync syncing the cells of %s (bell %s)", data_dir, bell.path)
        return _tail(settings, _Alone(ctl, bell, stats), None)
    finally:
        bell.close()


# -- shards ----------------------------------------------------------------------------------
# PERF (issue 6): one process applying every cell's changes, with worker processes projecting
# ahead, spent ~145 us of CPU per change at 10,000 changes/s (the records and views crossing
# processes, the executor's threads); shards that each run the whole pipeline for their own
# cells spend what one process does (~90 us) and apply in parallel, taking turns only for
# LMDB's single writer.
SHARD_BEAT_EVERY = 1.0  # a shard's loop tells the daemon it turns, at most this often
SHARD_SILENT = 10.0  # a shard silent this long: the daemon stops its own heartbeat
PR_SET_PDEATHSIG = 1  # prctl(2)


class _Shard:
    """Inside a shard process: its own bell (rung by the daemon when a cell rings), stop on
    SIGTERM or when the daemon is gone, ready and stats sent up the pipe."""

    def __init__(self, conn: Connection, bell: Doorbell, ctl: Control) -> None:
        self.conn, self.bell, self.ctl = conn, bell, ctl
        self.stats = StatsFile("", send=lambda cells: self._send(("stats", cells)))
        self._beat = -SHARD_BEAT_EVERY

    def should_stop(self) -> bool:
        return self.ctl.should_stop()

    def beat(self) -> None:
        """Tell the daemon this shard's loop turns (at most every SHARD_BEAT_EVERY s)."""
        now = time.monotonic()
        if now - self._beat >= SHARD_BEAT_EVERY:
            self._beat = now
            self._send(("beat", None))

    def ready(self) -> None:
        self._send(("ready", None))

    def sleep(self, timeout: float) -> None:
        """Until the bell, ``timeout`` or a stop, beating while idle."""
        end = time.monotonic() + timeout
        while not self.ctl.should_stop():
            left = end - time.monotonic()
            if left <= 0 or self.ctl.sleep(min(left, SHARD_BEAT_EVERY), self.bell):
                return
            self.beat()

    def publish(self, cells: dict[str, Any], force: bool = False) -> float | None:
        return self.stats.publish(cells, force)

    def _send(self, msg: tuple[str, Any]) -> bool:
        try:
            self.conn.send(msg)
        except OSError:
            self.ctl.request_stop()  # the daemon is gone
            return False
        return True


def _shard_main(values: dict[str, Any], source: str, k: int, n: int, conn: Connection,
                parent: int) -> None:
    """A shard process (spawned: the daemon may hold an LMDB environment in a test)."""
    import threading

    from fastpath.settings import Settings
    from fastpath.sidecar import standalone_control
    from fastpath.wake import Doorbell, bell_path

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")

    # A kill -9 of the daemon leaves no shard behind, not even for a moment: the kernel
    # kills the shard with it (Linux), and a thread watches for a parent gone anyway.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    settings = Settings(values, source)
    ctl = standalone_control()
    bell = Doorbell(bell_path(settings["data_dir"], f"cellsync-shard{k}"))
    try:
        sys.exit(_tail(settings, _Shard(conn, bell, ctl), (k, n)))
    finally:
        bell.close()
        ctl.close()


def _run_shards(settings: Settings, ctl: Control, bell: Doorbell, stats: StatsFile) -> int:
    """The daemon of ``cellsync.shards`` shard processes: relays its bell to theirs,
    merges their statistics into the stats file, announces readiness when every shard
    has done its first round, and stops (the master restarts it) if a shard dies."""
    import multiprocessing
    import select

    from fastpath.wake import bell_path, ring

    data_dir = settings["data_dir"]
    n = settings["cellsync.shards"]
    ctx = multiprocessing.get_context("spawn")
    shards: list[tuple[Any, Connection, str]] = []
    log.info("cellsync starting %d shards for the cells of %s (bell %s)", n, data_dir, bell.path)
    try:
        for k in range(n):
            r, w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_shard_main, name=f"cellsync-shard{k}",
                               args=(dict(settings), settings.source, k, n, w, os.getpid()))
            proc.start()
            w.close()
            shards.append((proc, r, bell_path(data_dir, f"cellsync-shard{k}")))
        cells: dict[int, dict[str, Any]] = {}
        ready: set[int] = set()
        started = time.monotonic()
        heard = [started] * n  # when each shard last said anything
        held: float | None = None
        silent = False
        while not ctl.should_stop():
            # The master's watchdog sees the shards through this beat: a shard whose loop
            # stopped turning (stuck) stops it, and after master.sidecar_timeout the master
            # kills and restarts cellsync, as it would a single stuck process.
            stuck = [k for k in range(n) if time.monotonic() - heard[k] > SHARD_SILENT]
            if not stuck:
                ctl.beat()
            elif not silent:
                log.warning("cellsync shard(s) %s silent for more than %.0f s: no heartbeat"
                            " until they answer", stuck, SHARD_SILENT)
            silent = bool(stuck)
            fds = [ctl.fileno(), bell.fileno(), *(c.fileno() for _, c, _ in shards)]
            timeout = min(1.0, held) if held is not None else 1.0
            readable, _, _ = select.select(fds, [], [], timeout)
            if bell.fileno() in readable and bell.drain():
                for _, _, shard_bell in shards:
                    ring(shard_bell)
            for k, (proc, conn, _) in enumerate(shards):
                if conn.fileno() not in readable:
                    continue
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    proc.join(1)
                    log.error("cellsync shard %d (pid %s) died (exit code %s): stopping",
                              k, proc.pid, proc.exitcode)
                    return 1
                heard[k] = time.monotonic()
                if kind == "ready":
                    ready.add(k)
                    if len(ready) == n:
                        log.info("cellsync: %d shards ready", n)
                        ctl.ready()
                elif kind == "stats":
                    cells[k] = value
            merged: dict[str, Any] = {}
            for k in sorted(cells):
                merged.update(cells[k])
            held = stats.publish(merged)
        return 0
    finally:
        for proc, _, _ in shards:
            if proc.is_alive():
                proc.terminate()
        for proc, conn, _ in shards:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
