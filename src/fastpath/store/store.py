"""The API store: one LMDB environment, opened in each process after fork.

Read side: ``with store.read() as r:`` is exactly one LMDB read transaction (``buffers=True``,
aborted on exit: a request never holds one across requests); everything a query needs
(record, view fragments, index walk, catalogue) is a method of the :class:`Reader`.

Write side: :meth:`Store.apply` is the one way servers enter and leave the store: a
:class:`Batch` of versioned :class:`Upsert` and :class:`Tombstone` changes, catalogue puts and
an optional (cell, cursor), all in one durable write transaction, under the version rule of
DESIGN.md "Sync correctness":

1. An upsert replaces the stored record only if its version is higher (P2).
2. An upsert whose server has a tombstone of an equal or higher version is dropped: no
   resurrection, in either arrival order (P4).  A tombstone of a version >= the stored
   record's removes the record, its index entries and view fragments, and stays (ties go
   to the tombstone).
3. Re-applying a batch changes nothing (P3): every decision compares versions.
4. The cursor is written in the same transaction as the changes it covers (P8), and only
   moves forward: a lower cursor is ignored (the changes are still applied, since the version
   rule makes that safe) and reported in :class:`ApplySummary`; ``Batch.reset_cursor`` sets
   it exactly (a resync after a cell's sequence went back, P9).
5. All indexes change in the same transaction as the record (P11).

LMDB contracts relied on (lmdb.h, py-lmdb docs; research notes section 4):

- "A transaction and its cursors must only be used by a single thread"; a process must not
  use an environment inherited through fork(): every process calls :meth:`Store.open`
  after fork, and a store used in a forked child raises :class:`StoreForkError`.
- "Do not have open an LMDB database twice in the same process at the same time": one
  :class:`Store` per process and path.
- Stale readers: "a process killed with an open read txn leaves a stale slot ... until
  mdb_reader_check": :meth:`Store.open` runs ``reader_check()``.
- MDB_MAP_FULL: "the transaction must be aborted; mdb_env_set_mapsize may then be called
  if no transactions are active in this process": :meth:`Store.apply` aborts, doubles the
  map up to ``max_map_size`` and runs the whole transaction again, or raises
  :class:`StoreFullError`.  MDB_MAP_RESIZED at txn begin ("another process wrote data
  beyond this MDB_env's mapsize"): adopt the new size with ``set_mapsize(0)`` and begin
  again.  Neither may happen while this process holds a read transaction: ``apply`` is never
  called from inside ``read()``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, TypeVar

import lmdb
import msgpack

from fastpath.master.shm import OFF_STORE_READ, OFF_STORE_WRITE
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.errors import (
    MarkerNotFound,
    RecordError,
    StoreError,
    StoreForkError,
    StoreFullError,
    StoreLayoutError,
)

log = logging.getLogger("fastpath.store")

# 64-bit: the map is address space, not memory or disk (writemap=False: the file grows with
# the data only), so reserve a generous map and grow rarely (each growth makes every other
# process re-map at its next transaction).
DEFAULT_MAP_SIZE = 16 << 30
DEFAULT_MAX_MAP_SIZE = 1 << 40
# Sized in the lock file by the first opener; a worker holds one read txn at a time, so this
# covers hundreds of processes with room for stale slots between two reader checks.
DEFAULT_MAX_READERS = 1024

MAX_SERVERS_PER_PAGE = 1000

ViewId = bytes
# What a getter of a buffers=True read transaction returns (a memoryview into the map).
Buf = bytes | memoryview
Renderer = Callable[[Mapping[str, Any]], Mapping[ViewId, bytes]]
T = TypeVar("T")

_NIL = b"\xc0"  # msgpack nil: a tombstone without a final record


# -- fork detection ------------------------------------------------------------------------------
# PERF: a module global refreshed by the at-fork hook costs one compare per transaction,
# where os.getpid() would be a system call per request.
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- counters ------------------------------------------------------------------------------------
class TxnCounters:
    """Read and write transactions begun by this process.

    With ``buffer`` (the shared-memory region of ``fastpath.master.shm``) and the offset of
    this process's slot, the two words ``store_read_txn``/``store_write_txn`` of the slot are
    the counters, so /metrics sums them without asking the process.  The slot has one writer
    (this process) and the words are aligned 64-bit, which the master reads untorn.
    """

    __slots__ = ("_mv", "_local")

    def __init__(self, buffer: Any = None, slot_offset: int = 0) -> None:
        self._local: array[int] | None = None
        if buffer is None:
            self._local = array("Q", [0, 0])
            self._mv = memoryview(self._local)
            return
        if OFF_STORE_WRITE != OFF_STORE_READ + 8 or (slot_offset + OFF_STORE_READ) % 8:
            raise StoreError("store counters must be two adjacent aligned 64-bit words")
        if sys.byteorder != "little":
            # shm.py's layout is little-endian; a native cast would be wrong here.
            raise StoreError("shared-memory store counters need a little-endian machine")
        start = slot_offset + OFF_STORE_READ
        self._mv = memoryview(buffer)[start : start + 16].cast("B").cast("Q")

    @property
    def reads(self) -> int:
        return int(self._mv[0])

    @property
    def writes(self) -> int:
        return int(self._mv[1])

    def release(self) -> None:
        # An exported memoryview keeps an mmap from closing; let go of it with the store.
        self._mv.release()


# -- changes and batches -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Upsert:
    """A server's full record at ``version`` (a complete record: ``record.make_record``)."""

    uuid: str
    version: int
    record: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A server deleted at ``version``.

    ``record`` is the final (deleted) record if the cell sends one; without it the store
    keeps the last record it had, which renders the DELETED entry of ``changes-since``.
    """

    uuid: str
    version: int
    project_id: str
    created_at: int
    deleted_at: int
    record: Mapping[str, Any] | None = None


class Catalog(Enum):
    """Catalogue tables written through :class:`CatalogPut` (last write wins)."""

    FLAVORS = "flavors"  # key: flavor id
    IMAGES = "images"  # key: image id
    KEYPAIRS = "keypairs"  # key: (user_id, name)
    QUOTA_LIMITS = "quota_limits"  # key: project id, or "" for the defaults
    AZS = "azs"  # key: availability zone name
    CELLS = "cells"  # key: cell name


@dataclass(frozen=True, slots=True)
class CatalogPut:
    """Put (or, with ``value=None``, delete) one catalogue entry."""

    table: Catalog
    key: str | tuple[str, str]
    value: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Batch:
    """Everything one write transaction applies."""

    changes: Sequence[Upsert | Tombstone] = ()
    cursor: tuple[str, int] | None = None  # (cell name, feed sequence covered)
    catalog: Sequence[CatalogPut] = ()
    reset_cursor: bool = False  # set the cursor even if lower (resync of a cell)
    repair: bool = False  # anti-entropy: accept servers older than the tombstone horizon


@dataclass(slots=True)
class ApplySummary:
    applied: int = 0  # upserts that created or replaced a record
    skipped_stale: int = 0  # changes dropped by the version rule
    blocked_by_tombstone: int = 0  # of those, upserts refused because of a tombstone
    tombstoned: int = 0  # tombstones stored (removing a record or not)
    catalog: int = 0  # catalogue entries written
    cursor: int | None = None  # the cell's cursor after this transaction
    cursor_moved: bool = False
    map_resizes: int = 0  # times the map grew while applying


class ServerHead(NamedTuple):
    version: int
    project_id: str
    created_at: int
    updated_at: int


class TombstoneInfo(NamedTuple):
    version: int
    project_id: str
    created_at: int
    deleted_at: int
    record: dict[str, Any] | None


class ChangedEntry(NamedTuple):
    updated_at: int  # deleted_at for a tombstone
    uuid: bytes
    entry: R.IndexEntry


# -- the store -----------------------------------------------------------------------------------
_open_stores: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()


class Store:
    """The API store of this process.  Use :meth:`open`; never share one across fork."""

    def __init__(
        self,
        env: lmdb.Environment,
        dbs: Mapping[bytes, Any],
        path: str,
        max_map_size: int,
        counters: TxnCounters,
        stale_readers_cleared: int,
    ) -> None:
        self._env = env
        self.path = path
        self.max_map_size = max_map_size
        self.counters = counters
        self._counts = counters._mv
        self._pid = _pid
        self.stale_readers_cleared = stale_readers_cleared
        self._closed = False
        # PERF: handles as attributes, not dict lookups, on every call.
        self._meta = dbs[L.META]
        self._servers = dbs[L.SERVERS]
        self._by_project = dbs[L.BY_PROJECT]
        self._by_created = dbs[L.BY_CREATED]
        self._by_changed = dbs[L.BY_CHANGED]
        self._views = dbs[L.VIEWS]
        self._api_fields = dbs[L.API_FIELDS]
        self._tombstones = dbs[L.TOMBSTONES]
        self._tomb_age = dbs[L.TOMB_AGE]
        self._flavors = dbs[L.FLAVORS]
        self._images = dbs[L.IMAGES]
        self._keypairs = dbs[L.KEYPAIRS]
        self._quota_limits = dbs[L.QUOTA_LIMITS]
        self._quota_usage = dbs[L.QUOTA_USAGE]
        self._azs = dbs[L.AZS]
        self._cells = dbs[L.CELLS]
        self._cursors = dbs[L.CURSORS]
        self._outbox = dbs[L.OUTBOX]
        self._dbs = dict(dbs)
        self._catalog_db = {
            Catalog.FLAVORS: self._flavors,
            Catalog.IMAGES: self._images,
            Catalog.KEYPAIRS: self._keypairs,
            Catalog.QUOTA_LIMITS: self._quota_limits,
            Catalog.AZS: self._azs,
            Catalog.CELLS: self._cells,
        }

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        max_readers: int = DEFAULT_MAX_READERS,
        sync: bool = True,
        metasync: bool = True,
        readahead: bool = True,
        counters: tuple[Any, int] | None = None,
    ) -> Store:
        """Open (creating if needed) the store under ``data_dir/store`` for this process.

        ``counters``: ``(shared buffer, slot offset)`` to count transactions into the
        process's shared-memory slot; default: a local counter.  ``sync``/``metasync``:
        durable commits (LMDB defaults); only a store that can be rebuilt should relax them.
        Transactions begun here (opening databases, checking the layout) are not counted:
        the counters measure service, and a worker's move only with requests.
        """
        if map_size > max_map_size:
            raise StoreError(f"map_size {map_size} is larger than max_map_size {max_map_size}")
        path = os.path.realpath(os.path.join(os.fspath(data_dir), "store"))
        other = _open_stores.get(path)
        if other is not None and not other._closed and other._pid == _pid:
            raise StoreError(f"the store {path} is already open in this process (pid {_pid})")
        os.makedirs(path, mode=0o700, exist_ok=True)
        env = _open_env(path, map_size, max_readers, sync, metasync, readahead)
        try:
            # lmdb.h: stale reader slots of killed processes pin old pages until
            # mdb_reader_check() clears them (or every process closes the environment).
            cleared = env.reader_check()
            if cleared:
                log.warning("store %s: cleared %d stale reader slot(s) of dead processes", path, cleared)
            dbs = _open_dbs(env, path)
        except BaseException:
            env.close()
            raise
        store = cls(env, dbs, path, max_map_size, TxnCounters(*counters) if counters else TxnCounters(), cleared)
        _open_stores[path] = store
        return store

    def close(self) -> None:
        """Close the environment (in the process that opened it; a no-op elsewhere)."""
        if self._closed:
            return
        self._closed = True
        if self._pid == _pid:
            self._env.close()
        self.counters.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_process(self) -> None:
        if self._pid != _pid:
            raise StoreForkError(
                f"the store {self.path} was opened in process {self._pid} and used in process "
                f"{_pid} after fork(); LMDB environments must not cross fork: call "
                "Store.open() in the child"
            )
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")

    # -- counters --------------------------------------------------------------------------------
    @property
    def read_txns(self) -> int:
        return self.counters.reads

    @property
    def write_txns(self) -> int:
        return self.counters.writes

    # -- transactions ----------------------------------------------------------------------------
    def read(self) -> Reader:
        """One read transaction: ``with store.read() as r: ...``.  Counted once."""
        return Reader(self)

    def _begin_read(self) -> lmdb.Transaction:
        if self._pid != _pid or self._closed:
            self._check_process()
        try:
            txn = self._env.begin(buffers=True)
        except lmdb.MapResizedError:
            # lmdb.h MDB_MAP_RESIZED: another process grew the map; adopt its size.
            self._env.set_mapsize(0)
            txn = self._env.begin(buffers=True)
        self._counts[0] += 1
        return txn

    def _begin_write(self) -> lmdb.Transaction:
        try:
            return self._env.begin(write=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            return self._env.begin(write=True)

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> tuple[T, int]:
        """Run ``body`` in a write transaction and commit, growing the map on MDB_MAP_FULL.

        ``body`` may run more than once (after a growth), always in a fresh transaction, so it
        must keep no state outside it.  Returns (its result, number of map growths).
        """
        self._check_process()
        grown = 0
        while True:
            self._counts[1] += 1
            try:
                # py-lmdb: the context manager commits on normal exit and aborts on an
                # exception -- the only safe way to hold a write txn (research notes s4).
                with self._begin_write() as txn:
                    result = body(txn)
                return result, grown
            except lmdb.MapFullError:
                # The txn is aborted (left the with block by an exception); no txn of this
                # process is active, as mdb_env_set_mapsize requires.
                self._grow()
                grown += 1

    def _grow(self) -> None:
        self._env.set_mapsize(0)  # first adopt a size another process may have set
        current = int(self._env.info()["map_size"])
        if current >= self.max_map_size:
            raise StoreFullError(
                f"the API store {self.path} is full: its LMDB map reached {current} bytes, the "
                f"limit set by the setting store.max_map_size; raise store.max_map_size (and "
                f"check that the disk has room for the data file) and restart"
            )
        new = min(current * 2, self.max_map_size)
        log.warning("store %s: map full at %d bytes, growing to %d", self.path, current, new)
        self._env.set_mapsize(new)

    # -- write API -------------------------------------------------------------------------------
    def apply(self, batch: Batch, render: Renderer | None = None) -> ApplySummary:
        """Apply ``batch`` in one durable write transaction (see the module docstring).

        ``render(record) -> {view_id: json bytes}`` is called for every upsert that wins,
        inside the transaction, with the record as stored (API-owned fields merged); its
        fragments replace the server's previous ones.  An exception from ``render`` (or a bad
        change) aborts the whole batch: nothing of it is written.
        """
        summary, grown = self._write(lambda txn: _Apply(self, txn, render).run(batch))
        summary.map_resizes = grown
        return summary

    def purge_tombstones(self, older_than: int, *, batch_size: int = 10_000) -> int:
        """Remove tombstones of servers deleted before ``older_than`` (microseconds).

        Also raises the tombstone horizon to ``older_than``: from then on an upsert of a server
        the store does not know, older than the horizon, is refused (it may be a stale update
        of a purged server; research notes P4).  Runs in write transactions of at most
        ``batch_size`` tombstones so as not to hold the writer lock long.  Returns the count.
        """
        total = 0
        while True:
            n, _ = self._write(lambda txn: self._purge_some(txn, older_than, batch_size))
            total += n
            if n < batch_size:
                return total

    def _purge_some(self, txn: lmdb.Transaction, older_than: int, limit: int) -> int:
        old = txn.get(L.META_HORIZON, db=self._meta)
        if old is None or L.U64.unpack(old)[0] < older_than:
            txn.put(L.META_HORIZON, L.U64.pack(older_than), db=self._meta)
        victims: list[tuple[int, bytes]] = []
        cur = txn.cursor(db=self._tomb_age)
        if cur.first():
            for key in cur.iternext(keys=True, values=False):
                t = L.time_of_changed_key(key)
                if t >= older_than or len(victims) >= limit:
                    break
                victims.append((t, L.uuid_of_changed_key(key)))
        for t, u in victims:
            txn.delete(u, db=self._tombstones)
            txn.delete(L.by_changed_key(t, u), db=self._by_changed)
            txn.delete(L.tomb_age_key(t, u), db=self._tomb_age)
        return len(victims)

    def reader_check(self) -> int:
        """Clear reader slots of dead processes (run periodically by long-lived writers)."""
        self._check_process()
        return int(self._env.reader_check())

    def info(self) -> dict[str, int]:
        """Map size, bytes in use and reader slots, for monitoring (alert near the map size)."""
        self._check_process()
        info = self._env.info()
        psize = int(self._env.stat()["psize"])
        return {
            "map_size": int(info["map_size"]),
            "used": (int(info["last_pgno"]) + 1) * psize,
            "max_map_size": self.max_map_size,
            "max_readers": int(info["max_readers"]),
            "readers": int(info["num_readers"]),
        }


def _open_env(
    path: str, map_size: int, max_readers: int, sync: bool, metasync: bool, readahead: bool
) -> lmdb.Environment:
    # lmdb.h: "opening a database can fail if another process is opening or closing it at
    # exactly the same time" (py-lmdb #289, EINVAL): workers start together, so retry briefly.
    for attempt in range(5):
        try:
            return lmdb.open(
                path,
                map_size=map_size,
                max_dbs=L.MAX_DBS,
                max_readers=max_readers,
                sync=sync,
                metasync=metasync,
                readahead=readahead,
                mode=0o700,
                subdir=True,
                lock=True,  # never False: the single-writer lock is what keeps the file sane
                max_spare_txns=0,  # a cached read txn holds a reader slot across fork (#346)
            )
        except (lmdb.InvalidParameterError, lmdb.BadRslotError):
            if attempt == 4:
                raise
            time.sleep(0.01 * (attempt + 1))
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the API store at {path}: {exc}") from exc
    raise AssertionError("unreachable")


def _open_dbs(env: lmdb.Environment, path: str) -> dict[bytes, Any]:
    """Open every named database and check the layout version.

    The common case (databases exist) needs only a read transaction, so starting workers
    never queue behind cellsync for the writer lock.  lmdb.h (mdb_dbi_open): "the handle will
    be private to the current transaction until the transaction is successfully committed";
    hence commit, not abort, even the read transaction.
    """
    try:
        txn = env.begin()
    except lmdb.MapResizedError:
        env.set_mapsize(0)
        txn = env.begin()
    try:
        dbs = {name: env.open_db(name, txn=txn, create=False) for name in L.DATABASES}
        _check_layout(txn.get(L.META_LAYOUT, db=dbs[L.META]), path)
        txn.commit()
        return dbs
    except lmdb.NotFoundError:
        txn.abort()
    with env.begin(write=True) as wtxn:
        dbs = {name: env.open_db(name, txn=wtxn, create=True) for name in L.DATABASES}
        stored = wtxn.get(L.META_LAYOUT, db=dbs[L.META])
        if stored is None:
            wtxn.put(L.META_LAYOUT, L.U64.pack(L.LAYOUT_VERSION), db=dbs[L.META])
        else:
            _check_layout(stored, path)
    return dbs


def _check_layout(stored: bytes | memoryview | None, path: str) -> None:
    if stored is None:
        raise lmdb.NotFoundError("no layout version")  # a half-created store: create the rest
    version = int(L.U64.unpack(bytes(stored))[0])
    if version != L.LAYOUT_VERSION:
        raise StoreLayoutError(
            f"the API store {path} has layout version {version}; this fastpath uses layout "
            f"{L.LAYOUT_VERSION}.  The store is derived data: stop fastpath, move {path} aside "
            "and start again to rebuild it from the cells"
        )


# -- apply ---------------------------------------------------------------------------------------
class _Apply:
    """One run of a batch inside one write transaction (rebuilt on every retry)."""

    __slots__ = ("s", "txn", "render", "summary", "usage", "horizon")

    def __init__(self, store: Store, txn: lmdb.Transaction, render: Renderer | None) -> None:
        self.s = store
        self.txn = txn
        self.render = render
        self.summary = ApplySummary()
        self.usage: dict[str, list[int]] = {}  # project -> [instances, cores, ram] deltas
        self.horizon = 0

    def run(self, batch: Batch) -> ApplySummary:
        s, txn = self.s, self.txn
        if not batch.repair:
            h = txn.get(L.META_HORIZON, db=s._meta)
            self.horizon = int(L.U64.unpack(h)[0]) if h is not None else 0
        for ch in batch.changes:
            if type(ch) is Upsert:
                self.upsert(ch)
            elif type(ch) is Tombstone:
                self.tombstone(ch)
            else:
                raise TypeError(f"not a change: {ch!r}")
        if self.usage:
            self.flush_usage()
        for put in batch.catalog:
            self.catalog(put)
        if batch.cursor is not None:
            self.cursor(batch.cursor, batch.reset_cursor)
        return self.summary

    # -- servers ---------------------------------------------------------------------------------
    def upsert(self, ch: Upsert) -> None:
        s, txn, summary = self.s, self.txn, self.summary
        u = L.uuid_key(ch.uuid)
        rec = ch.record
        version = ch.version
        if rec["version"] != version or rec["uuid"] != ch.uuid:
            raise RecordError(f"upsert {ch.uuid} v{version}: the record says {rec['uuid']} v{rec['version']}")
        old = txn.get(u, db=s._servers)
        if old is not None:
            old_version, old_created, old_updated, old_project, _ = L.unpack_frame_head(old)
            if version <= old_version:
                summary.skipped_stale += 1
                return
        else:
            tomb = txn.get(u, db=s._tombstones)
            if tomb is not None:
                tomb_version, _, deleted_at, _, _ = L.unpack_frame_head(tomb)
                if tomb_version >= version:
                    summary.skipped_stale += 1
                    summary.blocked_by_tombstone += 1
                    return
                # Newer than its deletion: the cell says the server lives (e.g. it moved in
                # from another cell); the highest version decides, so the tombstone goes.
                self.drop_tombstone(u, deleted_at)
            elif self.horizon and rec["updated_at"] < self.horizon:
                summary.skipped_stale += 1
                return

        rec = self.merge_api_fields(u, rec)
        project = L.name_bytes(rec["project_id"], "project_id")
        created, updated = rec["created_at"], rec["updated_at"]
        ival = R.pack_index(R.index_entry(rec))
        txn.put(u, L.pack_frame(version, created, updated, project, R.pack(rec)), db=s._servers)
        pkey = L.by_project_key(project, created, u)
        ckey = L.by_changed_key(updated, u)
        if old is None:
            txn.put(pkey, ival, db=s._by_project)
            txn.put(L.by_created_key(created, u), ival, db=s._by_created)
            txn.put(ckey, ival, db=s._by_changed)
            self.count(rec["project_id"], 1, rec["flavor"]["vcpus"], rec["flavor"]["ram"])
        else:
            # Write only what changed (issue 6: pages touched per change decide throughput).
            old_pkey = L.by_project_key(old_project, old_created, u)
            old_ival = txn.get(old_pkey, db=s._by_project)
            if old_pkey != pkey:
                txn.delete(old_pkey, db=s._by_project)
                txn.delete(L.by_created_key(old_created, u), db=s._by_created)
            if old_pkey != pkey or old_ival != ival:
                txn.put(pkey, ival, db=s._by_project)
                txn.put(L.by_created_key(created, u), ival, db=s._by_created)
            old_ckey = L.by_changed_key(old_updated, u)
            if old_ckey != ckey:
                txn.delete(old_ckey, db=s._by_changed)
                txn.put(ckey, ival, db=s._by_changed)
            elif old_ival != ival:
                txn.put(ckey, ival, db=s._by_changed)
            if old_ival != ival:
                if old_ival is not None:
                    o = R.unpack_index(old_ival)
                    self.count(o.project_id, -1, -o.vcpus, -o.ram)
                self.count(rec["project_id"], 1, rec["flavor"]["vcpus"], rec["flavor"]["ram"])
        if self.render is not None:
            self.put_views(u, self.render(rec))
        summary.applied += 1

    def tombstone(self, ch: Tombstone) -> None:
        s, txn, summary = self.s, self.txn, self.summary
        u = L.uuid_key(ch.uuid)
        version = ch.version
        final = ch.record
        old = txn.get(u, db=s._servers)
        if old is not None:
            old_version, old_created, old_updated, old_project, off = L.unpack_frame_head(old)
            if version < old_version:  # a tie goes to the tombstone
                summary.skipped_stale += 1
                return
            if final is None:
                final = R.unpack(old[off:])
            self.remove_live(u, old_project, old_created, old_updated)
        else:
            tomb = txn.get(u, db=s._tombstones)
            if tomb is not None:
                tomb_version, _, deleted_at, _, _ = L.unpack_frame_head(tomb)
                if version <= tomb_version:
                    summary.skipped_stale += 1
                    return
                self.drop_tombstone(u, deleted_at)
        project = L.name_bytes(ch.project_id, "project_id")
        body = R.pack(final) if final is not None else _NIL
        txn.put(u, L.pack_frame(version, ch.created_at, ch.deleted_at, project, body), db=s._tombstones)
        entry = (R.index_entry(final, deleted=True) if final is not None
                 else R.deleted_entry(ch.project_id, ch.created_at))
        txn.put(L.by_changed_key(ch.deleted_at, u), R.pack_index(entry), db=s._by_changed)
        txn.put(L.tomb_age_key(ch.deleted_at, u), b"", db=s._tomb_age)
        summary.tombstoned += 1

    def remove_live(self, u: bytes, project: bytes, created: int, updated: int) -> None:
        s, txn = self.s, self.txn
        pkey = L.by_project_key(project, created, u)
        ival = txn.get(pkey, db=s._by_project)
        if ival is not None:
            o = R.unpack_index(ival)
            self.count(o.project_id, -1, -o.vcpus, -o.ram)
        txn.delete(pkey, db=s._by_project)
        txn.delete(L.by_created_key(created, u), db=s._by_created)
        txn.delete(L.by_changed_key(updated, u), db=s._by_changed)
        txn.delete(u, db=s._servers)
        txn.delete(u, db=s._api_fields)
        self.put_views(u, {})

    def drop_tombstone(self, u: bytes, deleted_at: int) -> None:
        s, txn = self.s, self.txn
        txn.delete(u, db=s._tombstones)
        txn.delete(L.by_changed_key(deleted_at, u), db=s._by_changed)
        txn.delete(L.tomb_age_key(deleted_at, u), db=s._tomb_age)

    def merge_api_fields(self, u: bytes, rec: Mapping[str, Any]) -> Mapping[str, Any]:
        """The record to store: the cell's fields plus the stored API-owned fields (rule 7)."""
        s, txn = self.s, self.txn
        stored = txn.get(u, db=s._api_fields)
        if stored is None:
            # PERF: the common case -- no API-owned values; keep the caller's dict unless the
            # cell (wrongly) sent some, which are not its to write.
            if any(rec.get(name) for name in R.API_FIELDS):
                rec = dict(rec)
                for name in R.API_FIELDS:
                    rec[name] = R.default_of(name)
            return rec
        api: dict[str, Any] = msgpack.unpackb(stored, raw=False)
        pending: dict[str, Any] = api.get("pending", {})
        done = rec["done_commands"]
        if pending and done:
            # The cell executed these commands: its own fields now carry their effect.
            pending = {cid: v for cid, v in pending.items() if cid not in done}
        api["pending"] = pending
        if any(api.values()):
            txn.put(u, R.pack(api), db=s._api_fields)
        else:
            txn.delete(u, db=s._api_fields)
        merged = dict(rec)
        for name in R.API_FIELDS:
            merged[name] = api[name] if name in api else R.default_of(name)
        return merged

    def put_views(self, u: bytes, views: Mapping[ViewId, bytes]) -> None:
        """Make the server's view fragments exactly ``views`` (writing only what changed)."""
        s, txn = self.s, self.txn
        existing: dict[bytes, bytes] = {}
        cur = txn.cursor(db=s._views)
        if cur.set_range(u):
            for key, value in cur:
                if key[:16] != u:
                    break
                existing[bytes(key[16:])] = bytes(value)
        for view_id, fragment in views.items():
            if not 0 < len(view_id) <= L.MAX_VIEW_ID:
                raise RecordError(f"view id {view_id!r}: 1 to {L.MAX_VIEW_ID} bytes")
            if existing.pop(view_id, None) != fragment:
                txn.put(u + view_id, fragment, db=s._views)
        for view_id in existing:
            txn.delete(u + view_id, db=s._views)

    # -- quota usage -----------------------------------------------------------------------------
    def count(self, project: str, instances: int, cores: int, ram: int) -> None:
        d = self.usage.get(project)
        if d is None:
            self.usage[project] = [instances, cores, ram]
        else:
            d[0] += instances
            d[1] += cores
            d[2] += ram

    def flush_usage(self) -> None:
        s, txn = self.s, self.txn
        for project, (instances, cores, ram) in self.usage.items():
            if not (instances or cores or ram):
                continue
            key = L.name_bytes(project, "project_id")
            raw = txn.get(key, db=s._quota_usage)
            usage: dict[str, int] = msgpack.unpackb(raw, raw=False) if raw is not None else {}
            usage["instances"] = usage.get("instances", 0) + instances
            usage["cores"] = usage.get("cores", 0) + cores
            usage["ram"] = usage.get("ram", 0) + ram
            if any(usage.values()):
                txn.put(key, R.pack(usage), db=s._quota_usage)
            else:
                txn.delete(key, db=s._quota_usage)

    # -- catalogue and cursor --------------------------------------------------------------------
    def catalog(self, put: CatalogPut) -> None:
        db = self.s._catalog_db[put.table]
        key = catalog_key(put.table, put.key)
        if put.value is None:
            self.txn.delete(key, db=db)
        else:
            self.txn.put(key, R.pack(put.value), db=db)
        self.summary.catalog += 1

    def cursor(self, cursor: tuple[str, int], reset: bool) -> None:
        cell, seq = cursor
        if isinstance(seq, bool) or not 0 <= seq <= L.MAX_U64:
            raise RecordError(f"cursor of cell {cell!r}: {seq!r} is not an unsigned 64-bit integer")
        key = L.name_bytes(cell, "cell")
        raw = self.txn.get(key, db=self.s._cursors)
        old = int(L.U64.unpack(raw)[0]) if raw is not None else None
        if old is None or seq > old or (reset and seq != old):
            self.txn.put(key, L.U64.pack(seq), db=self.s._cursors)
            self.summary.cursor = seq
            self.summary.cursor_moved = True
        else:
            if seq < old:
                log.warning("cell %s: cursor %d is behind the stored %d; kept %d", cell, seq, old, old)
            self.summary.cursor = old


def catalog_key(table: Catalog, key: str | tuple[str, str]) -> bytes:
    if table is Catalog.KEYPAIRS:
        if not isinstance(key, tuple):
            raise RecordError("a keypair's key is (user_id, name)")
        return L.keypair_key(*key)
    if not isinstance(key, str):
        raise RecordError(f"a {table.value} key is a string")
    if table is Catalog.QUOTA_LIMITS and key == "":
        return L.QUOTA_DEFAULTS
    return L.name_bytes(key, table.value)


# -- the read side -------------------------------------------------------------------------------
class Reader:
    """One read transaction of the store; every getter runs inside it.

    Memoryviews returned (``server_raw``, ``view``) point into the map and are valid only until
    the ``with`` block ends (py-lmdb, "buffers"): copy or render before leaving it.
    """

    __slots__ = ("_s", "_txn")

    def __init__(self, store: Store) -> None:
        self._s = store
        self._txn = store._begin_read()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        # A read txn is ended by abort; with max_spare_txns=0 and MDB_NOTLS that frees its
        # reader slot at once, so nothing pins old pages between requests.
        self._txn.abort()

    @property
    def txn(self) -> lmdb.Transaction:
        """The raw LMDB transaction, for the compiled request path (same counting)."""
        return self._txn

    # -- servers ---------------------------------------------------------------------------------
    def server_raw(self, u: str | bytes) -> Buf | None:
        """The msgpack bytes of a server's record (no decoding), or None."""
        k = L.parse_uuid(u)
        if k is None:
            return None
        v = self._txn.get(k, db=self._s._servers)
        if v is None:
            return None
        return v[L.FRAME_SIZE + v[L.FRAME_SIZE - 1] :]

    def get_server(self, u: str | bytes) -> dict[str, Any] | None:
        raw = self.server_raw(u)
        return None if raw is None else R.unpack(raw)

    def head(self, u: str | bytes) -> ServerHead | None:
        """Version, project and timestamps of a live server, without decoding its record."""
        k = L.parse_uuid(u)
        v = None if k is None else self._txn.get(k, db=self._s._servers)
        if v is None:
            return None
        version, created, updated, project, _ = L.unpack_frame_head(v)
        return ServerHead(version, project.decode(), created, updated)

    def tombstone(self, u: str | bytes) -> TombstoneInfo | None:
        k = L.parse_uuid(u)
        v = None if k is None else self._txn.get(k, db=self._s._tombstones)
        if v is None:
            return None
        version, created, deleted, project, off = L.unpack_frame_head(v)
        final = msgpack.unpackb(v[off:], raw=False)
        return TombstoneInfo(version, project.decode(), created, deleted, final)

    def view(self, u: str | bytes, view_id: ViewId) -> Buf | None:
        """A server's rendered view fragment (JSON bytes), or None."""
        k = L.parse_uuid(u)
        return None if k is None else self._txn.get(k + view_id, db=self._s._views)

    def views(self, u: str | bytes) -> dict[bytes, Buf]:
        """Every view fragment of a server, by view id."""
        k = L.parse_uuid(u)
        out: dict[bytes, Buf] = {}
        if k is None:
            return out
        cur = self._txn.cursor(db=self._s._views)
        if cur.set_range(k):
            for key, value in cur:
                if key[:16] != k:
                    break
                out[bytes(key[16:])] = value
        return out

    # -- lists -----------------------------------------------------------------------------------
    def walk(
        self, project: str | None = None, *, marker: str | bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Buf]]:
        """(uuid16, packed index entry) of a project's servers (or all, ``project=None``).

        Forward: Nova's default order (created_at desc, id desc); ``reverse``: the exact
        opposite.  ``marker``: start after that server; raises :class:`MarkerNotFound` if it
        is neither a live nor a tombstoned server of the scope (the marker may be deleted
        while its tombstone lasts, P14).
        """
        if project is None:
            db, prefix = self._s._by_created, b""
        else:
            db, prefix = self._s._by_project, L.project_prefix(L.name_bytes(project, "project_id"))
        start = None if marker is None else self._marker_key(project, marker)
        cur = self._txn.cursor(db=db)
        plen = len(prefix)
        if not reverse:
            if start is not None:
                ok = cur.set_range(start)
                if ok and cur.key() == start:
                    ok = cur.next()
            elif prefix:
                ok = cur.set_range(prefix)
            else:
                ok = cur.first()
            if not ok:
                return
            for key, value in cur:
                if plen and key[:plen] != prefix:
                    return
                yield L.uuid_of_index_key(key), value
        else:
            if start is not None:
                ok = cur.set_range(start)  # at start (skipped below) or just after its place
                ok = cur.prev() if ok else cur.last()
            elif prefix:
                # The first key after every key of the prefix: project + b"\x01".
                ok = cur.set_range(prefix[:-1] + b"\x01")
                ok = cur.prev() if ok else cur.last()
            else:
                ok = cur.last()
            if not ok:
                return
            for key, value in cur.iterprev():
                if plen and key[:plen] != prefix:
                    return
                yield L.uuid_of_index_key(key), value

    def page(
        self,
        project: str | None = None,
        *,
        marker: str | bytes | None = None,
        limit: int = MAX_SERVERS_PER_PAGE,
        predicate: Callable[[R.IndexEntry], bool] | None = None,
        reverse: bool = False,
    ) -> list[bytes]:
        """uuid16 of up to ``limit`` servers after ``marker`` matching ``predicate``.

        PERF: without a predicate no index entry is decoded.
        """
        out: list[bytes] = []
        if limit <= 0:
            return out
        for u, value in self.walk(project, marker=marker, reverse=reverse):
            if predicate is not None and not predicate(R.unpack_index(value)):
                continue
            out.append(u)
            if len(out) >= limit:
                break
        return out

    def page_entries(
        self,
        project: str | None = None,
        *,
        marker: str | bytes | None = None,
        limit: int = MAX_SERVERS_PER_PAGE,
        predicate: Callable[[R.IndexEntry], bool] | None = None,
        reverse: bool = False,
    ) -> list[tuple[bytes, R.IndexEntry]]:
        """Like :meth:`page`, with each server's index entry."""
        out: list[tuple[bytes, R.IndexEntry]] = []
        if limit <= 0:
            return out
        for u, value in self.walk(project, marker=marker, reverse=reverse):
            entry = R.unpack_index(value)
            if predicate is not None and not predicate(entry):
                continue
            out.append((u, entry))
            if len(out) >= limit:
                break
        return out

    def _marker_key(self, project: str | None, marker: str | bytes) -> bytes:
        k = L.parse_uuid(marker)
        v = None
        if k is not None:
            v = self._txn.get(k, db=self._s._servers)
            if v is None:
                v = self._txn.get(k, db=self._s._tombstones)
        if k is None or v is None:
            raise MarkerNotFound(f"marker [{marker!r}] not found")
        _, created, _, mproject, _ = L.unpack_frame_head(v)
        if project is None:
            return L.by_created_key(created, k)
        if mproject != L.name_bytes(project, "project_id"):
            raise MarkerNotFound(f"marker [{marker!r}] not found")
        return L.by_project_key(mproject, created, k)

    def changes(
        self,
        since: int | None = None,
        *,
        before: int | None = None,
        project: str | None = None,
        reverse: bool = False,
    ) -> Iterator[ChangedEntry]:
        """Servers changed (or deleted) with ``since <= updated_at <= before``, by updated_at.

        Nova's ``changes-since``/``changes-before`` bounds are both inclusive.  Tombstoned
        servers come with ``entry.deleted`` set.  Oldest first, or newest first with
        ``reverse``.
        """
        cur = self._txn.cursor(db=self._s._by_changed)
        lo = L.U64.pack(since if since is not None else 0)
        if not reverse:
            if not cur.set_range(lo):
                return
            it = iter(cur)
        else:
            if before is not None and before < L.MAX_U64:
                ok = cur.set_range(L.U64.pack(before + 1))
                ok = cur.prev() if ok else cur.last()
            else:
                ok = cur.last()
            if not ok:
                return
            it = cur.iterprev()
        for key, value in it:
            t = L.time_of_changed_key(key)
            if not reverse:
                if before is not None and t > before:
                    return
            elif since is not None and t < since:
                return
            entry = R.unpack_index(value)
            if project is not None and entry.project_id != project:
                continue
            yield ChangedEntry(t, L.uuid_of_changed_key(key), entry)

    # -- catalogue -------------------------------------------------------------------------------
    def _get_map(self, db: Any, key: bytes) -> dict[str, Any] | None:
        if not 0 < len(key) <= L.MAX_KEY:
            return None  # LMDB refuses such keys (MDB_BAD_VALSIZE); no entry has one
        v = self._txn.get(key, db=db)
        return None if v is None else msgpack.unpackb(v, raw=False)

    def _all_maps(self, db: Any, prefix: bytes = b"") -> list[dict[str, Any]]:
        cur = self._txn.cursor(db=db)
        out: list[dict[str, Any]] = []
        if not (cur.set_range(prefix) if prefix else cur.first()):
            return out
        for key, value in cur:
            if prefix and key[: len(prefix)] != prefix:
                break
            out.append(msgpack.unpackb(value, raw=False))
        return out

    def flavor(self, flavor_id: str) -> dict[str, Any] | None:
        return self._get_map(self._s._flavors, flavor_id.encode())

    def flavors(self) -> list[dict[str, Any]]:
        """Every flavor, by flavor id (Nova's default order)."""
        return self._all_maps(self._s._flavors)

    def image(self, image_id: str) -> dict[str, Any] | None:
        return self._get_map(self._s._images, image_id.encode())

    def images(self) -> list[dict[str, Any]]:
        return self._all_maps(self._s._images)

    def keypair(self, user_id: str, name: str) -> dict[str, Any] | None:
        try:
            return self._get_map(self._s._keypairs, L.keypair_key(user_id, name))
        except RecordError:
            return None

    def keypairs(self, user_id: str) -> list[dict[str, Any]]:
        """A user's keypairs by name."""
        return self._all_maps(self._s._keypairs, L.keypair_prefix(user_id))

    def quota_limits(self, project: str) -> dict[str, int]:
        """The project's limits: the defaults, overridden by the project's own."""
        limits: dict[str, int] = self._get_map(self._s._quota_limits, L.QUOTA_DEFAULTS) or {}
        if project:
            own = self._get_map(self._s._quota_limits, project.encode())
            if own:
                limits = {**limits, **own}
        return limits

    def quota_usage(self, project: str) -> dict[str, int]:
        """Resources in use by the project's servers, kept by ``apply``: instances, cores, ram."""
        usage = self._get_map(self._s._quota_usage, project.encode()) if project else None
        return {"instances": 0, "cores": 0, "ram": 0, **(usage or {})}

    def availability_zones(self) -> list[dict[str, Any]]:
        return self._all_maps(self._s._azs)

    def cells(self) -> list[dict[str, Any]]:
        return self._all_maps(self._s._cells)

    def cursor(self, cell: str) -> int | None:
        key = cell.encode()
        if not 0 < len(key) <= L.MAX_KEY:
            return None
        v = self._txn.get(key, db=self._s._cursors)
        return None if v is None else int(L.U64.unpack(v)[0])

    def cursors(self) -> dict[str, int]:
        return {bytes(k).decode(): int(L.U64.unpack(v)[0]) for k, v in self._txn.cursor(db=self._s._cursors)}

    def tombstone_horizon(self) -> int:
        v = self._txn.get(L.META_HORIZON, db=self._s._meta)
        return 0 if v is None else int(L.U64.unpack(v)[0])

    # -- whole-store views (tests, verify) -------------------------------------------------------
    def dump(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """Every key and value of every database (tests and debugging; not for requests)."""
        return {
            name.decode(): [(bytes(k), bytes(v)) for k, v in self._txn.cursor(db=db)]
            for name, db in self._s._dbs.items()
        }

    def count(self, database: bytes) -> int:
        return int(self._txn.stat(self._s._dbs[database])["entries"])

    def check(self) -> list[str]:
        """Invariants of the layout (P11); returns the problems found (empty: consistent).

        Every live server has exactly its three index entries, equal to its record's index
        entry; every index entry points at a live server (or, in by_changed, a tombstone);
        no server is both live and tombstoned; view fragments and API fields belong to live
        servers; quota usage is the sum over live servers.
        """
        s, txn = self._s, self._txn
        problems: list[str] = []
        live: dict[bytes, tuple[int, int, bytes, bytes]] = {}
        usage: dict[str, list[int]] = {}
        for k, v in txn.cursor(db=s._servers):
            u = bytes(k)
            version, created, updated, project, off = L.unpack_frame_head(v)
            rec = R.unpack(v[off:])
            if rec["version"] != version or rec["uuid"] != L.uuid_str(u):
                problems.append(f"{L.uuid_str(u)}: frame and record disagree")
            ival = R.pack_index(R.index_entry(rec))
            live[u] = (created, updated, project, ival)
            d = usage.setdefault(rec["project_id"], [0, 0, 0])
            d[0] += 1
            d[1] += rec["flavor"]["vcpus"]
            d[2] += rec["flavor"]["ram"]
        tombs: dict[bytes, tuple[int, bytes]] = {}
        for k, v in txn.cursor(db=s._tombstones):
            u = bytes(k)
            _, created, deleted, project, _ = L.unpack_frame_head(v)
            tombs[u] = (deleted, project)
            if u in live:
                problems.append(f"{L.uuid_str(u)}: both live and tombstoned")
        expect_project = {L.by_project_key(p, c, u): iv for u, (c, _, p, iv) in live.items()}
        expect_created = {L.by_created_key(c, u): iv for u, (c, _, _, iv) in live.items()}
        expect_changed = {L.by_changed_key(t, u): iv for u, (_, t, _, iv) in live.items()}
        for name, db, expect in (
            ("by_project", s._by_project, expect_project),
            ("by_created", s._by_created, expect_created),
        ):
            seen = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
            if seen != expect:
                extra = len(set(seen) - set(expect))
                missing = len(set(expect) - set(seen))
                differ = sum(1 for key in set(seen) & set(expect) if seen[key] != expect[key])
                problems.append(f"{name}: {extra} extra, {missing} missing, {differ} stale entries")
        changed = {bytes(k): bytes(v) for k, v in txn.cursor(db=s._by_changed)}
        for key, iv in expect_changed.items():
            if changed.pop(key, None) != iv:
                problems.append(f"by_changed: entry of {L.uuid_str(key[8:])} missing or stale")
        for u, (deleted, _) in tombs.items():
            key = L.by_changed_key(deleted, u)
            value = changed.pop(key, None)
            if value is None or not R.unpack_index(value).deleted:
                problems.append(f"by_changed: tombstone entry of {L.uuid_str(u)} missing")
        if changed:
            problems.append(f"by_changed: {len(changed)} entries of no server")
        ages = {bytes(k) for k, _ in txn.cursor(db=s._tomb_age)}
        if ages != {L.tomb_age_key(d, u) for u, (d, _) in tombs.items()}:
            problems.append("tomb_age does not match the tombstones")
        for db_name, db in (("views", s._views), ("api_fields", s._api_fields)):
            orphans = {bytes(k[:16]) for k, _ in txn.cursor(db=db)} - set(live)
            if orphans:
                problems.append(f"{db_name}: entries of {len(orphans)} non-live server(s)")
        stored_usage = {
            bytes(k).decode(): msgpack.unpackb(v, raw=False) for k, v in txn.cursor(db=s._quota_usage)
        }
        want_usage = {
            p: {"instances": n, "cores": c, "ram": m} for p, (n, c, m) in usage.items() if n or c or m
        }
        if stored_usage != want_usage:
            problems.append(f"quota_usage {stored_usage} is not the sum over servers {want_usage}")
        return problems
