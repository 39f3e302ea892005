"""The forwarder: delivers the API store's outbox to the cells' inboxes (issue 7).

The "RPC that writes to disk and returns" (DESIGN.md "Data flow"; the contract is
docs/commands.md).  An API command commits an outbox entry and rings the ``forwarder``
bell; this process then, in rounds:

1. reads outbox entries in key order (commit order), in one read transaction, until it has
   ``forwarder.batch`` deliverable ones (entries of a cell that is backing off are walked
   past, at most ``16 * batch`` per round, so they do not hold the other cells back);
2. groups them by cell and delivers each cell's entries, in order, with one SQL transaction
   per cell (``CellDB.accept_commands``: ``INSERT OR IGNORE`` by command id, so a
   re-delivery after a crash between steps 2 and 4 is ignored by the inbox);
3. rings the bell of every cell that received something (``cell-NAME``);
4. deletes the delivered entries in ONE store write transaction.

Order per server: an entry is never delivered while an earlier entry of the same server is
undelivered (its cell is backing off, or failed this round), whichever cell each targets.
Entries of one cell keep their key order in the inbox (``received_at`` strictly increasing).

A cell that fails (database locked past ``forwarder.busy_timeout_ms``, file missing, later
PostgreSQL down) keeps its entries queued and is retried with exponential back-off and
jitter (``forwarder.retry_initial`` doubling up to ``forwarder.retry_max``); the other cells
go on.  A cell is never created here: the entries of a cell whose database does not exist
yet wait for it.

Metrics: ``DATA_DIR/run/forwarder.json`` (atomic rename, at most once a second), read by
the API's ``/metrics``; the outbox depth and age come from the store itself
(:func:`outbox_stats`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
import msgpack

from fastpath import wake
from fastpath.cell.db import SqliteCellDB
from fastpath.cell.registry import cell_path

if TYPE_CHECKING:
    from fastpath.sidecar import Control
    from fastpath.store.reader import Reader
    from fastpath.store.store import Store

log = logging.getLogger("fastpath.forwarder")

STATS_FILE = os.path.join("run", "forwarder.json")
STATS_EVERY = 1.0  # seconds between two writes of the stats file


# -- the outbox, as the forwarder reads it --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox entry (docs/commands.md "Outbox entry"); ``raw`` is the stored value."""

    key: bytes
    raw: bytes
    id: str
    cell: str
    server: str | None
    payload: dict[str, Any]
    at: int


def decode_entry(key: bytes, raw: bytes) -> Entry | None:
    """The entry stored under ``key``; None if it is not a well-formed command."""
    try:
        v = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    if not isinstance(v, dict):
        return None
    cid, cell, server, payload, at = (v.get(k) for k in ("id", "cell", "server", "payload", "at"))
    if (not isinstance(cid, str) or not cid or not isinstance(cell, str) or not cell
            or not (server is None or isinstance(server, str)) or not isinstance(payload, dict)
            or not isinstance(at, int)):
        return None
    return Entry(key, raw, cid, cell, server, payload, at)


def outbox_stats(r: Reader) -> tuple[int, int | None]:
    """(entries in the outbox, ``at`` of the oldest one or None), inside ``r``'s transaction."""
    return _outbox_stats(r.txn, r.dbs)


def _outbox_stats(txn: Any, dbs: Any) -> tuple[int, int | None]:
    depth = int(txn.stat(dbs.outbox)["entries"])
    if not depth:
        return 0, None
    cur = txn.cursor(db=dbs.outbox)
    if not cur.first():
        return 0, None
    e = decode_entry(bytes(cur.key()), bytes(cur.value()))
    return depth, None if e is None else e.at


def metric_lines(store: Store, data_dir: str) -> list[str]:
    """The forwarder's ``/metrics`` series: outbox depth and age from ONE store read
    transaction, delivered/failed per cell from ``run/forwarder.json``.

    The read is not counted in the worker's store counters: they measure the requests'
    budget (one read per query), and a scrape must not move them.
    """
    env = store._env
    try:
        txn = env.begin(buffers=True)
    except lmdb.MapResizedError:
        env.set_mapsize(0)  # another process grew the map (as Store._begin_read does)
        txn = env.begin(buffers=True)
    try:
        depth, oldest = _outbox_stats(txn, store.dbs)
    finally:
        txn.abort()
    age = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1e6)
    lines = [
        "# HELP fastpath_outbox_depth Commands accepted by the API and not yet delivered to "
        "their cell (one store read per scrape, not counted in fastpath_store_read_txn_total).",
        "# TYPE fastpath_outbox_depth gauge",
        f"fastpath_outbox_depth {depth}",
        "# HELP fastpath_outbox_oldest_age_seconds Age of the oldest undelivered command.",
        "# TYPE fastpath_outbox_oldest_age_seconds gauge",
        f"fastpath_outbox_oldest_age_seconds {age:.3f}",
    ]
    stats = read_stats(data_dir)
    cells = stats.get("cells") if stats is not None else None
    if isinstance(cells, dict):
        for name, key, kind, text in (
            ("fastpath_forwarder_delivered_total", "delivered_total", "counter",
             "Commands the forwarder delivered to the cell's inbox since it started."),
            ("fastpath_forwarder_failures_total", "failures_total", "counter",
             "Failed deliveries to the cell (each followed by a back-off) since it started."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for cell in sorted(cells):
                v = cells[cell].get(key) if isinstance(cells[cell], dict) else None
                if isinstance(v, int) and not isinstance(v, bool):
                    lines.append(f'{name}{{cell="{_label(cell)}"}} {v}')
    return lines


def _label(value: str) -> str:
    """A Prometheus label value (cell names are letters, digits, '-' and '_' already)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def remove_outbox(store: Store, entries: Sequence[tuple[bytes, bytes]]) -> int:
    """Delete the (key, value) entries that still hold that value, in one write transaction.

    Comparing the value makes a stale delete harmless: a key freed by an earlier delete and
    reused by a newer command (the outbox's last key + 1) is left alone.  Returns how many
    were deleted.
    """
    if not entries:
        return 0

    def body(txn: Any) -> int:
        db = store.dbs.outbox
        n = 0
        for key, raw in entries:
            cur = txn.get(key, db=db)
            if cur is not None and bytes(cur) == raw:
                txn.delete(key, db=db)
                n += 1
        return n

    # Store._write is the store's write-transaction runner (map growth, counters); the
    # outbox has no other writer-side API yet.
    removed, _ = store._write(body)
    return int(removed)


# -- per-cell state -------------------------------------------------------------------------------
@dataclass
class CellLink:
    """What the forwarder knows about delivering to one cell."""

    name: str
    db: SqliteCellDB | None = None
    failures: int = 0  # consecutive failures (0: healthy)
    backoff_until: float = 0.0  # clock() time before which it is not tried again
    delivered_total: int = 0
    failures_total: int = 0
    queued: int = 0  # entries left in the outbox for this cell at the end of the last round
    last_error: str = ""

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except Exception:  # a broken connection: nothing to keep
                pass
            self.db = None


@dataclass(frozen=True)
class _Prefix:
    """The head of the outbox known to wait for backing-off cells: every entry up to
    ``last_key`` is queued for a cell of ``backing_off`` or for a server ``blocked`` by one;
    valid while exactly those cells back off (the forwarder is the outbox's only deleter
    and new entries only append)."""

    last_key: bytes
    backing_off: frozenset[str]
    blocked: dict[str, bytes]
    queued: dict[str, int]


@dataclass
class RoundResult:
    delivered: int = 0  # entries newly delivered (or found already in the inbox)
    dropped: int = 0  # malformed entries removed
    queued: int = 0  # entries read but left in the outbox
    more: bool = False  # run again at once (batch limit hit, or entries held for order)
    next_retry: float | None = None  # earliest clock() time a backing-off cell may be tried
    failed: list[str] = field(default_factory=list)  # cells that failed this round
    scanned: int = 0  # outbox entries decoded this round (the remembered prefix excluded)


class Forwarder:
    """Delivers outbox entries to cell inboxes; one :meth:`round` at a time."""

    def __init__(
        self,
        store: Store,
        data_dir: str,
        *,
        batch: int = 1000,
        retry_initial: float = 0.05,
        retry_max: float = 30.0,
        busy_timeout_ms: int = 200,
        scan_limit: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        ring: Callable[[str], None] = wake.ring,
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.batch = batch
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.busy_timeout_ms = busy_timeout_ms
        self.scan_limit = scan_limit if scan_limit is not None else 16 * batch
        self.clock = clock
        self.rng = rng or random.Random()
        self.ring = ring
        self.cells: dict[str, CellLink] = {}
        self._bells: dict[str, str] = {}
        self.dropped_total = 0
        self._stats_written = 0.0
        self._prefix: _Prefix | None = None

    # -- one round --------------------------------------------------------------------------
    def round(self) -> RoundResult:
        """Read, deliver, ring, delete: see the module docstring."""
        res = RoundResult()
        now = self.clock()
        groups: dict[str, list[Entry]] = {}
        blocked: dict[str, bytes] = {}  # server -> key of its earliest undelivered entry
        server_cell: dict[str, str] = {}  # server -> the cell its entries go to this round
        bad: list[tuple[bytes, bytes]] = []
        for link in self.cells.values():
            link.queued = 0
        planned = scanned = 0
        next_round = False
        # PERF: entries of a backing-off cell are walked past (other cells must not wait
        # behind them), but at most scan_limit per round; and the run of such entries at the
        # head of the outbox (the "prefix") is remembered while the same cells back off, so
        # a dead cell's deep queue is not decoded again at every round (every API commit).
        backing_off = frozenset(n for n, lk in self.cells.items() if lk.backoff_until > now)
        start: bytes | None = None
        if self._prefix is not None and backing_off and self._prefix.backing_off == backing_off:
            start = self._prefix.last_key
            blocked = dict(self._prefix.blocked)
            for name, n in self._prefix.queued.items():
                self.cells[name].queued = n
        prefix_open = True
        prefix_last = start
        prefix_state: _Prefix | None = None
        with self.store.read() as r:
            cur = r.txn.cursor(db=r.dbs.outbox)
            positioned = cur.set_range(start) if start is not None else cur.first()
            while positioned:
                key, value = bytes(cur.key()), bytes(cur.value())
                positioned = cur.next()
                if key == start:
                    continue
                if planned >= self.batch:
                    res.more = True
                    break
                if scanned >= self.scan_limit:
                    break
                scanned += 1
                e = decode_entry(key, value)
                if e is None:
                    log.error("forwarder: dropping malformed outbox entry %s", key.hex())
                    bad.append((key, value))
                    prefix_open = False
                    continue
                link = self._link(e.cell)
                # A round delivers a server's entries to one cell only (the cell of its
                # first entry), so a failing cell can never leave a gap in a server's order.
                if link.backoff_until > now or (e.server is not None and (
                        e.server in blocked or server_cell.setdefault(e.server, e.cell) != e.cell)):
                    if e.server is not None:
                        if e.server not in blocked and link.backoff_until <= now:
                            next_round = True  # deliverable once its earlier entries are
                            prefix_open = False
                        blocked.setdefault(e.server, e.key)
                    link.queued += 1
                    if prefix_open:
                        prefix_last = key
                    continue
                if prefix_open:
                    prefix_open = False
                    prefix_state = self._snapshot_prefix(prefix_last, backing_off, blocked)
                groups.setdefault(e.cell, []).append(e)
                planned += 1
        if prefix_open:
            prefix_state = self._snapshot_prefix(prefix_last, backing_off, blocked)
        self._prefix = prefix_state if backing_off else None
        res.scanned = scanned

        done: list[tuple[bytes, bytes]] = []
        for name, entries in groups.items():
            link = self.cells[name]
            try:
                db = self._db(link)
                db.accept_commands([(e.id, e.payload, e.server) for e in entries])
            except Exception as exc:  # any failure of one cell must not stop the others
                self._failed(link, exc, now)
                res.failed.append(name)
                link.queued += len(entries)
                continue
            if link.failures:
                log.info("forwarder: cell %s reachable again after %d failed attempt(s)",
                         name, link.failures)
            link.failures = 0
            link.backoff_until = 0.0
            link.last_error = ""
            link.delivered_total += len(entries)
            res.delivered += len(entries)
            done.extend((e.key, e.raw) for e in entries)
            self.ring(self._bell(name))

        if done or bad:
            remove_outbox(self.store, done + bad)
        res.more = res.more or (next_round and bool(done))
        res.dropped = len(bad)
        self.dropped_total += len(bad)
        res.queued = sum(link.queued for link in self.cells.values())
        waits = [lk.backoff_until for lk in self.cells.values() if lk.queued and lk.backoff_until]
        res.next_retry = min(waits, default=None)
        return res

    def _snapshot_prefix(self, last_key: bytes | None, backing_off: frozenset[str],
                         blocked: dict[str, bytes]) -> _Prefix | None:
        if last_key is None:
            return None
        return _Prefix(last_key, backing_off, dict(blocked),
                       {n: lk.queued for n, lk in self.cells.items() if lk.queued})

    def run_until_idle(self, max_rounds: int = 1000) -> int:
        """Rounds until nothing more can be delivered now; returns how many were delivered."""
        total = 0
        for _ in range(max_rounds):
            res = self.round()
            total += res.delivered
            if not res.more and not (res.delivered and res.queued):
                break
        return total

    # -- cells ------------------------------------------------------------------------------
    def _link(self, name: str) -> CellLink:
        link = self.cells.get(name)
        if link is None:
            link = self.cells[name] = CellLink(name)
        return link

    def _bell(self, name: str) -> str:
        path = self._bells.get(name)
        if path is None:
            path = self._bells[name] = wake.bell_path(self.data_dir, "cell-" + name)
        return path

    def _db(self, link: CellLink) -> SqliteCellDB:
        if link.db is None:
            path = cell_path(self.data_dir, link.name)  # ValueError for a bad name
            if not os.path.exists(path):
                raise FileNotFoundError(f"cell {link.name!r} has no database yet ({path})")
            link.db = SqliteCellDB(path, busy_timeout_ms=self.busy_timeout_ms)
        return link.db

    def _failed(self, link: CellLink, exc: BaseException, now: float) -> None:
        link.close()  # reopen next time: the file may have been replaced
        link.failures += 1
        link.failures_total += 1
        link.last_error = f"{type(exc).__name__}: {exc}"
        delay = self.backoff_delay(link.failures)
        link.backoff_until = now + delay
        log.warning("forwarder: cell %s failed (%s); retrying in %.3fs", link.name,
                    link.last_error, delay)

    def backoff_delay(self, failures: int) -> float:
        """Exponential back-off with jitter: half fixed, half random ("equal jitter")."""
        cap = min(self.retry_max, self.retry_initial * (2 ** min(failures - 1, 62)))
        return cap / 2 + self.rng.uniform(0, cap / 2)

    # -- metrics ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        now_mono, now_wall = self.clock(), time.time()
        return {
            "pid": os.getpid(),
            "updated_at": now_wall,
            "dropped_total": self.dropped_total,
            "cells": {
                name: {
                    "delivered_total": link.delivered_total,
                    "failures_total": link.failures_total,
                    "backoff_until": (now_wall + link.backoff_until - now_mono
                                      if link.backoff_until > now_mono else None),
                    "queued": link.queued,
                    "last_error": link.last_error,
                }
                for name, link in sorted(self.cells.items())
            },
        }

    def write_stats(self, force: bool = False) -> None:
        """Write ``DATA_DIR/run/forwarder.json`` (atomic rename), at most once a second."""
        now = time.monotonic()
        if not force and now - self._stats_written < STATS_EVERY:
            return
        self._stats_written = now
        path = os.path.join(self.data_dir, STATS_FILE)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(self.stats(), f, separators=(",", ":"), sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("forwarder: cannot write %s: %s", path, exc)

    def close(self) -> None:
        for link in self.cells.values():
            link.close()


def read_stats(data_dir: str) -> dict[str, Any] | None:
    """The forwarder's last stats file, or None (not running yet, or unreadable)."""
    try:
        with open(os.path.join(data_dir, STATS_FILE)) as f:
            v = json.load(f)
    except (OSError, ValueError):
        return None
    return v if isinstance(v, dict) else None


# -- the process ----------------------------------------------------------------------------------
def from_settings(store: Store, settings: Any) -> Forwarder:
    return Forwarder(
        store,
        settings["data_dir"],
        batch=settings["forwarder.batch"],
        retry_initial=settings["forwarder.retry_initial"],
        retry_max=settings["forwarder.retry_max"],
        busy_timeout_ms=settings["forwarder.busy_timeout_ms"],
    )


def run(settings: Any, ctl: Control) -> int:
    """The forwarder's loop, under the master or alone (``fastpath forwarder``)."""
    from fastpath.api.context import open_store

    data_dir = settings["data_dir"]
    poll = settings["forwarder.poll_interval"]
    bell = wake.Doorbell(wake.bell_path(data_dir, "forwarder"))
    store = open_store(settings)
    fwd = from_settings(store, settings)
    log.info("forwarder serving the outbox of %s", store.path)
    ctl.ready()
    try:
        while not ctl.should_stop():
            ctl.beat()
            res = fwd.round()
            fwd.write_stats()
            if res.more:
                continue
            timeout = poll
            if res.next_retry is not None:
                timeout = min(timeout, max(0.0, res.next_retry - fwd.clock()))
            ctl.sleep(timeout, bell)
    finally:
        fwd.write_stats(force=True)
        fwd.close()
        bell.close()
        store.close()
    log.info("forwarder stopped")
    return 0


def forwarder_main(settings: Any) -> int:
    """``fastpath forwarder``: the loop as its own process (SIGTERM/SIGINT stop it)."""
    from fastpath.sidecar import standalone_control

    logging.basicConfig(
        level=settings["log.level"].upper(),
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    ctl = standalone_control()
    try:
        print(f"fastpath forwarder: data dir {os.path.abspath(settings['data_dir'])}", flush=True)
        return run(settings, ctl)
    finally:
        ctl.close()
