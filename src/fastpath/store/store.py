"""The API store: one LMDB environment, opened in each process after fork.

Read side: ``with store.read() as r:`` is exactly one LMDB read transaction (``buffers=True``,
aborted on exit: a request never holds one across requests); everything a query needs
(record, view fragments, index walk, catalogue) is a method of the
:class:`~fastpath.store.reader.Reader`.

Write side: :meth:`Store.apply` is the one way servers enter and leave the store: a
:class:`~fastpath.store.changes.Batch` of versioned upserts and tombstones, catalogue puts
and an optional (cell, cursor), in one durable write transaction, under the version rule of
DESIGN.md "Sync correctness" (see :mod:`fastpath.store.apply`):

1. An upsert replaces the stored record only if its version is higher (P2).
2. An upsert whose server has a tombstone of an equal or higher version is dropped: no
   resurrection, in either arrival order (P4).  A tombstone of a version >= the stored
   record's removes the record, its index entries and view fragments, and stays (ties go
   to the tombstone).
3. Re-applying a batch changes nothing (P3): every decision compares versions.
4. The cursor is written in the same transaction as the changes it covers (P8), and only
   moves forward: a lower cursor is ignored (the changes are still applied, since the
   version rule makes that safe) and reported in the summary; ``Batch.reset_cursor`` sets it
   exactly (a resync after a cell's sequence went back, P9).
5. All indexes change in the same transaction as the record (P11).

LMDB contracts relied on (lmdb.h caveats and function docs; research notes section 4):

- "Use an MDB_env* in the process which opened it, not after fork()": every process calls
  :meth:`Store.open` after fork; a store used in a forked child raises
  :class:`StoreForkError`.
- "Do not have open an LMDB database twice in the same process at the same time": one
  :class:`Store` per process and path.
- "Avoid aborting a process with an active transaction. The transaction becomes
  'long-lived' ... until a check for stale readers is performed": :meth:`Store.open` runs
  ``reader_check()``; long-lived writers call :meth:`Store.reader_check` now and then.
- mdb_env_set_mapsize "may be called at later times if no transactions are active in this
  process": on MDB_MAP_FULL :meth:`Store.apply` leaves (aborts) the transaction, doubles the
  map up to ``max_map_size`` and runs the whole transaction again, or raises
  :class:`StoreFullError`.  "If the mapsize is increased by another process, and data has
  grown beyond the range of the current mapsize, mdb_txn_begin() will return
  MDB_MAP_RESIZED. This function may be called with a size of zero to adopt the new size":
  so does every begin here.  Hence ``apply`` must not be called while this process holds a
  read transaction (py-lmdb invalidates open transactions on a resize).
- "Opening a database can fail if another process is opening or closing it at exactly the
  same time": open retries briefly.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from array import array
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from fastpath.master.shm import OFF_STORE_READ, OFF_STORE_WRITE
from fastpath.store import apply as A
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.changes import ApplySummary, Batch, Renderer
from fastpath.store.dbs import Dbs
from fastpath.store.errors import StoreError, StoreForkError, StoreFullError, StoreLayoutError
from fastpath.store.reader import Reader

log = logging.getLogger("fastpath.store")

# 64-bit: the map is address space, not memory or disk (writemap=False: the file grows with
# the data only), so reserve a generous map and grow rarely (each growth makes every other
# process re-map at its next transaction).
DEFAULT_MAP_SIZE = 16 << 30
DEFAULT_MAX_MAP_SIZE = 1 << 40
# Sized in the lock file by the first opener; a worker holds one read txn at a time, so this
# covers hundreds of processes with room for stale slots between two reader checks.
DEFAULT_MAX_READERS = 1024

T = TypeVar("T")


# -- fork detection ------------------------------------------------------------------------------
# PERF: a module global refreshed by an at-fork hook costs one compare per transaction, where
# os.getpid() would be a system call per request.
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- counters ------------------------------------------------------------------------------------
class TxnCounters:
    """Read and write transactions begun by this process.

    With ``buffer`` (the shared region of ``fastpath.master.shm``) and the offset of this
    process's slot, the slot's words ``store_read_txn``/``store_write_txn`` are the counters,
    so /metrics sums them without asking the process.  The slot has one writer (this
    process) and the words are aligned 64-bit, which the master reads untorn.
    """

    __slots__ = ("mv", "_local")

    def __init__(self, buffer: Any = None, slot_offset: int = 0) -> None:
        self._local: array[int] | None = None
        if buffer is None:
            self._local = array("Q", [0, 0])
            self.mv = memoryview(self._local)
            return
        if OFF_STORE_WRITE != OFF_STORE_READ + 8 or (slot_offset + OFF_STORE_READ) % 8:
            raise StoreError("store counters must be two adjacent aligned 64-bit words")
        if sys.byteorder != "little":
            # shm.py's layout is little-endian; a native cast would be wrong here.
            raise StoreError("shared-memory store counters need a little-endian machine")
        start = slot_offset + OFF_STORE_READ
        self.mv = memoryview(buffer)[start : start + 16].cast("B").cast("Q")

    @property
    def reads(self) -> int:
        return int(self.mv[0])

    @property
    def writes(self) -> int:
        return int(self.mv[1])

    def release(self) -> None:
        # An exported memoryview keeps an mmap from closing; let go of it with the store.
        self.mv.release()


# -- the store -----------------------------------------------------------------------------------
_open_stores: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()


class Store:
    """The API store of this process.  Use :meth:`open`; never share one across fork."""

    def __init__(
        self,
        env: lmdb.Environment,
        dbs: Dbs,
        path: str,
        max_map_size: int,
        counters: TxnCounters,
        stale_readers_cleared: int,
    ) -> None:
        self._env = env
        self.dbs = dbs
        self.path = path
        self.max_map_size = max_map_size
        self.counters = counters
        self._counts = counters.mv
        self._pid = _pid
        self._closed = False
        self.stale_readers_cleared = stale_readers_cleared

    # -- opening and closing ---------------------------------------------------------------------
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
        durable commits (LMDB's defaults); only a process writing rebuildable data may relax
        them (LMDB flags are per process: a relaxed writer's commits become durable with the
        next synced commit of any process).  Transactions begun here (opening databases,
        checking the layout) are not counted: the counters measure service, and a worker's
        move only with requests.
        """
        if map_size > max_map_size:
            raise StoreError(f"map_size {map_size} is larger than max_map_size {max_map_size}")
        path = os.path.realpath(os.path.join(os.fspath(data_dir), "store"))
        other = _open_stores.get(path)
        if other is not None and not other._closed:
            if other._pid == _pid:
                raise StoreError(f"the store {path} is already open in this process (pid {_pid})")
            # Closing the inherited environment here would clear the parent's reader slots
            # (py-lmdb aborts its transactions), so there is no safe way to reopen it.
            raise StoreError(
                f"the store {path} was opened by process {other._pid} before it forked this "
                f"one ({_pid}); open the store only after fork (the master never opens it)"
            )
        os.makedirs(path, mode=0o700, exist_ok=True)
        env = _open_env(path, map_size, max_readers, sync, metasync, readahead)
        try:
            cleared = int(env.reader_check())
            if cleared:
                log.warning("store %s: cleared %d stale reader slot(s) of dead processes", path, cleared)
            dbs = _open_dbs(env, path)
        except BaseException:
            env.close()
            raise
        store = cls(
            env, dbs, path, max_map_size,
            TxnCounters(*counters) if counters is not None else TxnCounters(), cleared,
        )
        _open_stores[path] = store
        return store

    def close(self) -> None:
        """Close the environment; in a forked child, only mark this copy closed.

        A child must not close an inherited environment: py-lmdb would abort the inherited
        transactions, and aborting a read transaction clears its reader slot -- the parent's
        slot, in the shared lock file, while the parent still reads through it.
        """
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
        """One read transaction: ``with store.read() as r: ...``; counted once."""
        return Reader(self)

    def _begin_read(self) -> lmdb.Transaction:
        if self._pid != _pid or self._closed:
            self._check_process()
        try:
            txn = self._env.begin(buffers=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
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

        ``body`` may run more than once (after a growth), each time in a fresh transaction,
        so it keeps no state outside it.  Returns (its result, number of growths).
        """
        self._check_process()
        grown = 0
        while True:
            self._counts[1] += 1
            try:
                # py-lmdb: the context manager commits on normal exit and aborts on an
                # exception -- the safe way to hold a write txn (research notes s4).
                with self._begin_write() as txn:
                    result = body(txn)
                return result, grown
            except lmdb.MapFullError:
                # mdb_put/mdb_txn_commit: "MDB_MAP_FULL - the database is full, see
                # mdb_env_set_mapsize()".  The txn is gone (aborted by leaving the with
                # block), so no txn of this process is active, as set_mapsize requires.
                self._grow()
                grown += 1

    def _grow(self) -> None:
        # Not set_mapsize(0) first: that adopts the size in the last committed meta page,
        # which is still the old one while a batch needs several doublings in a row.  A
        # size grown by another process is adopted at txn begin (MDB_MAP_RESIZED) instead.
        current = int(self._env.info()["map_size"])
        if current >= self.max_map_size:
            raise StoreFullError(
                f"the API store {self.path} is full: its LMDB map reached {current} bytes, the "
                "limit set by the setting store.max_map_size; raise store.max_map_size (and "
                "check that the disk has room for the data file), then restart"
            )
        new = min(current * 2, self.max_map_size)
        log.warning("store %s: map full at %d bytes, growing it to %d", self.path, current, new)
        self._env.set_mapsize(new)

    # -- write API -------------------------------------------------------------------------------
    def apply(self, batch: Batch, render: Renderer | None = None) -> ApplySummary:
        """Apply ``batch`` in one durable write transaction (see the module docstring).

        ``render(record) -> {view_id: JSON bytes}`` is called for every upsert that wins,
        inside the transaction, with the *effective* record (``record.effective``: the record
        as stored, API-owned fields merged, pending commands overlaid -- so a renderer that
        looks up views rendered in advance must key them on that); its fragments replace
        the server's previous ones.  An exception from ``render`` (or a bad
        change) aborts the whole batch: nothing of it is written.
        """
        summary, grown = self._write(lambda txn: A.Apply(self.dbs, txn, render).run(batch))
        summary.map_resizes = grown
        return summary

    def purge_tombstones(self, older_than: int, *, batch_size: int = 10_000) -> int:
        """Remove the tombstones of servers deleted before ``older_than`` (microseconds).

        Also raises the tombstone horizon to ``older_than``: from then on an upsert of a server
        the store does not know and older than the horizon is refused (it may be a stale
        update of a purged server; research notes P4), so the retention must exceed the
        longest redelivery delay.  Runs write transactions of at most ``batch_size``
        tombstones, not to hold the writer lock long.  Returns how many were removed.
        """
        total = 0
        while True:
            n, _ = self._write(lambda txn: A.purge_some(txn, self.dbs, older_than, batch_size))
            total += n
            if n < batch_size:
                return total

    def trim_changes(self, limit: int = 10_000) -> A.TrimResult:
        """Remove superseded entries of the changes log, walking at most ``limit`` entries
        from where the previous call stopped (one write transaction).  Returns (walked,
        removed, at_end): ``at_end`` once a sweep of the whole log is complete.  Run it
        regularly (cellsync: after batches, with ``limit`` a few times the batch size) so the
        log stays close to one entry per server.
        """
        result, _ = self._write(lambda txn: A.trim_some(txn, self.dbs, limit))
        return result

    def reader_check(self) -> int:
        """Clear reader slots of dead processes; returns how many (run it now and then)."""
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
                mode=0o700,  # user_data may hold secrets: only fastpath's user reads the store
                subdir=True,
                lock=True,  # never False: the single-writer lock keeps the file sane (#269)
                max_spare_txns=0,  # a cached read txn keeps a reader slot across fork (#346)
            )
        except (lmdb.InvalidParameterError, lmdb.BadRslotError):
            # "Opening a database can fail if another process is opening or closing it at
            # exactly the same time" (py-lmdb #289): workers start together; retry briefly.
            if attempt == 4:
                raise
            time.sleep(0.01 * (attempt + 1))
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the API store at {path}: {exc}") from exc
    raise AssertionError("unreachable")


def _open_dbs(env: lmdb.Environment, path: str) -> Dbs:
    """Open (creating if needed) every named database and check the layout version.

    In a write transaction, even when every database exists: mdb_dbi_open says "The
    database handle will be private to the current transaction until the transaction is
    successfully committed. If the transaction is aborted the handle will be closed
    automatically", and py-lmdb's C extension ends a read-only transaction by resetting it
    for reuse, never by mdb_txn_commit -- handles opened in one are lost.  A starting
    process therefore waits once for the writer lock (one cellsync batch at most).
    """
    try:
        wtxn = env.begin(write=True)
    except lmdb.MapResizedError:
        env.set_mapsize(0)
        wtxn = env.begin(write=True)
    with wtxn:
        handles = {name: env.open_db(name, txn=wtxn, create=True) for name in L.DATABASES}
        stored = wtxn.get(L.META_LAYOUT, db=handles[L.META])
        if stored is None:
            wtxn.put(L.META_LAYOUT, L.U64.pack(L.LAYOUT_VERSION), db=handles[L.META])
        else:
            _check_layout(stored, path, wtxn, Dbs(handles))
    return Dbs(handles)


def _migrate_1_to_2(txn: lmdb.Transaction, dbs: Dbs) -> int:
    """Layout 2 added ``by_cell``: build it from the live records (decoding each once)."""
    n = 0
    for k, v in txn.cursor(db=dbs.servers):
        off = L.unpack_frame_head(v)[4]
        cell = R.unpack(v[off:]).get("cell")
        if isinstance(cell, str) and cell:
            txn.put(L.by_cell_key(L.name_bytes(cell, "cell"), bytes(k)), b"", db=dbs.by_cell)
            n += 1
    return n


# Layouts that the current code can upgrade in place, in the opening write transaction.
_MIGRATIONS: dict[int, Callable[[lmdb.Transaction, Dbs], int]] = {1: _migrate_1_to_2}


def _check_layout(stored: bytes, path: str, txn: lmdb.Transaction, dbs: Dbs) -> None:
    version = int(L.U64.unpack(bytes(stored))[0])
    while version in _MIGRATIONS and version < L.LAYOUT_VERSION:
        # The first process to open an older store migrates it under the writer lock;
        # the others then find the new layout.
        n = _MIGRATIONS[version](txn, dbs)
        log.warning("store %s: migrated layout %d to %d (%d records)", path, version, version + 1, n)
        version += 1
        txn.put(L.META_LAYOUT, L.U64.pack(version), db=dbs.meta)
    if version != L.LAYOUT_VERSION:
        raise StoreLayoutError(
            f"the API store {path} has layout version {version}; this fastpath uses layout "
            f"{L.LAYOUT_VERSION}.  The store is derived data: stop fastpath, move {path} aside "
            "and start again to rebuild it from the cells"
        )
