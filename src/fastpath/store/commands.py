"""The command write transaction: what an API command may write, and the group that
shares one durable commit (docs/commands.md).

:func:`run_group` runs a list of *works* -- ``work(ctxn) -> value`` -- in ONE LMDB write
transaction and commits it (durably: the store is opened with LMDB's synced commits).
Each work runs in its own **nested transaction** (``mdb_txn_begin`` with a parent; py-lmdb
``env.begin(write=True, parent=txn)``): a work that raises (an ``HTTPFault`` refusal such as
403 over quota or 409 task-state conflict, or a bug) has its child aborted -- none of its
writes stay -- and the others of the group commit.  So a work may write and *then* refuse;
nothing it wrote survives.  A work sees the writes of the works before it in the group
(LMDB: a child sees its parent's changes), which is how the re-checks inside the write
transaction (quota headroom, task state, lock) cannot over-admit.

The group may run more than once (after the map grew: every work again, in a fresh
transaction), so a work keeps no state outside its ``CommandTxn`` and computes anything
random (ids, passwords, times) *before* it is submitted.

Map growth and adopting a map grown by another process call ``mdb_env_set_mapsize``, which
LMDB allows only "if no transactions are active in this process".  :func:`run_group` runs
in a committer thread while the event loop thread reads, so it never resizes itself: it
aborts, calls ``resize(kind)`` (the committer runs it on the loop thread, between requests,
where no read transaction is open) and runs the group again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb
import msgpack

from fastpath.store import apply as A
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.changes import Catalog, CatalogPut, Renderer, Upsert
from fastpath.store.dbs import Dbs
from fastpath.store.errors import RecordError
from fastpath.store.reader import Reader

if TYPE_CHECKING:
    from fastpath.store.store import Store

log = logging.getLogger("fastpath.store")

Work = Callable[["CommandTxn"], Any]


class TxnReader(Reader):
    """The read API of :class:`Reader` over a write transaction (reads inside the command's
    transaction see its own and its group's earlier writes).  Not a context manager: the
    transaction belongs to :func:`run_group`."""

    def __init__(self, dbs: Dbs, txn: lmdb.Transaction) -> None:  # noqa: D107
        self._d = dbs
        self._txn = txn

    def __enter__(self) -> Reader:
        raise TypeError("a TxnReader is not a transaction of its own")


class CommandTxn:
    """What one command may do inside the group's write transaction.

    ``txn``/``dbs``: the raw (nested) transaction and the database handles; ``reader``: the
    read API over it.  Writes go through the methods below so that indexes, views, quota
    usage and catalogue generations stay right (one code path with ``Store.apply``).
    """

    __slots__ = ("txn", "dbs", "reader", "render", "outbox_written", "_apply")

    def __init__(self, dbs: Dbs, txn: lmdb.Transaction, render: Renderer | None) -> None:
        self.txn = txn
        self.dbs = dbs
        self.reader = TxnReader(dbs, txn)
        self.render = render
        self.outbox_written = 0
        self._apply = A.Apply(dbs, txn, render)

    # -- reads -------------------------------------------------------------------------------
    def quota_usage(self, project: str) -> dict[str, int]:
        """instances, cores, ram in use by the project, with this group's writes so far."""
        return self.reader.quota_usage(project)

    def quota_limits(self, project: str) -> dict[str, int]:
        return self.reader.quota_limits(project)

    # -- the outbox --------------------------------------------------------------------------
    def put_outbox(self, cell: str, server: str | None, command_id: str,
                   payload: Mapping[str, Any], at: int | None = None) -> int:
        """Append a command for ``cell`` to the outbox; returns its sequence (key).

        Key = the outbox's last key + 1, inside this transaction, so keys follow commit order
        (and, per server, acceptance order).  The value is docs/commands.md's outbox entry.
        """
        L.name_bytes(cell, "cell")
        cur = self.txn.cursor(db=self.dbs.outbox)
        seq = int(L.U64.unpack(cur.key())[0]) + 1 if cur.last() else 1
        entry = {"id": command_id, "cell": cell, "server": server, "payload": dict(payload),
                 "at": R.now_us() if at is None else at}
        self.txn.put(L.outbox_key(seq), R.pack(entry), db=self.dbs.outbox)
        self.outbox_written += 1
        return seq

    def put_outbox_packed(self, entry: OutboxEntry) -> int:
        """:meth:`put_outbox` of an entry packed before the transaction
        (:func:`pack_outbox`): a cursor step and one put under the writer lock."""
        cur = self.txn.cursor(db=self.dbs.outbox)
        seq = int(L.U64.unpack(cur.key())[0]) + 1 if cur.last() else 1
        self.txn.put(L.outbox_key(seq), entry.value, db=self.dbs.outbox)
        self.outbox_written += 1
        return seq

    # -- servers -----------------------------------------------------------------------------
    def put_provisional(self, servers: Sequence[Provisional]) -> None:
        """Store new servers' provisional records, packed before the transaction
        (:func:`prepare_provisional`): what :meth:`upsert_provisional` writes, with only
        the existence checks, the puts and one quota-usage update left under the writer
        lock.  A server whose uuid has stray API fields or views stored (never after a
        delete: the store removes both) goes through :meth:`upsert_provisional`.

        Raises :class:`RecordError` if a uuid is taken (live or tombstoned).
        """
        d, txn, ap = self.dbs, self.txn, self._apply
        get, put = txn.get, txn.put
        views = txn.cursor(db=d.views)
        for p in servers:
            u = p.key
            if get(u, db=d.servers) is not None or get(u, db=d.tombstones) is not None:
                raise RecordError(f"server {p.record['uuid']} exists already")
            if get(u, db=d.api_fields) is not None or (
                    views.set_range(u) and views.key()[:16] == u):
                self.upsert_provisional(p.record, p.rendered)
                continue
            put(u, p.frame, db=d.servers)
            put(p.by_project, p.index, db=d.by_project)
            put(p.by_created, p.index, db=d.by_created)
            put(p.by_changed, L.CHANGED_LIVE, db=d.by_changed)
            put(p.by_cell, b"", db=d.by_cell)
            if self.render is not None:
                rendered = p.rendered if p.rendered is not None else self.render(p.effective)
                for view_id, fragment in rendered.items():
                    put(u + view_id, fragment, db=d.views)
            ap.count(p.project, 1, p.vcpus, p.ram)
        ap.flush_usage()
        ap.usage.clear()

    def upsert_provisional(self, record: Mapping[str, Any],
                           rendered: Mapping[bytes, bytes] | None = None) -> None:
        """Store a new server's provisional record (version 0, a complete record) through
        apply's upsert: indexes, views, quota usage.  ``rendered``: its views, rendered
        before the transaction (PERF: less time holding LMDB's writer lock; a new record
        has no pending entries, so its effective record is itself).

        Raises :class:`RecordError` if the uuid is taken (live or tombstoned).
        """
        if record["version"] != 0:
            raise RecordError(f"a provisional record has version 0, not {record['version']}")
        u = L.uuid_key(record["uuid"])
        if self.txn.get(u, db=self.dbs.servers) is not None or \
                self.txn.get(u, db=self.dbs.tombstones) is not None:
            raise RecordError(f"server {record['uuid']} exists already")
        ap = self._apply
        if rendered is not None and self.render is not None:
            ap.render = lambda _rec: rendered
        try:
            ap.upsert(Upsert(record["uuid"], 0, record))
        finally:
            ap.render = self.render
        ap.flush_usage()
        ap.usage.clear()

    def set_pending(self, uuid: str, command_id: str, fields: Mapping[str, Any],
                    at: int | None = None) -> Mapping[str, Any]:
        """Record an accepted command's predicted effect on a live server (``pending``) and
        re-render the server's index entries and views from the effective record.

        ``fields``: cell-owned fields (:data:`record.PENDABLE`) as they will be once the cell
        ran the command.  Its ``at`` is ``at`` (default now), raised past the server's
        pending entries if need be, so the overlay follows commit order (the order the cell
        runs them in).  Returns the new effective record.  The frame (version, timestamps)
        is kept: only the cell moves a server's version.
        """
        _check_pendable(fields)
        d, txn = self.dbs, self.txn
        u = L.uuid_key(uuid)
        frame = txn.get(u, db=d.servers)
        if frame is None:
            raise RecordError(f"server {uuid} is not live in the store")
        plan = _plan_pending(uuid, bytes(frame), _opt_bytes(txn.get(u, db=d.api_fields)),
                             command_id, fields, at, self.render)
        return self._put_pending(plan)

    def pending_is_current(self, plan: PendingPlan) -> bool:
        """Whether the server's stored frame and API fields are still the bytes ``plan``
        was made from (:func:`prepare_pending`): then :meth:`put_pending` writes what
        :meth:`set_pending` would."""
        d, txn = self.dbs, self.txn
        frame = txn.get(plan.key, db=d.servers)
        return frame is not None and bytes(frame) == plan.frame_in and \
            _opt_bytes(txn.get(plan.key, db=d.api_fields)) == plan.api_in

    def put_pending(self, plan: PendingPlan) -> Mapping[str, Any]:
        """:meth:`set_pending` as planned before the transaction, once
        :meth:`pending_is_current` said so in this transaction: the new frame, API fields,
        index entry and views written as they are; returns the new effective record.
        PERF: decoding, the overlay and rendering the views stay out of the writer lock
        (~100 -> ~20 us a command under it)."""
        return self._put_pending(plan)

    def _put_pending(self, plan: PendingPlan) -> Mapping[str, Any]:
        d, txn, ap = self.dbs, self.txn, self._apply
        u = plan.key
        txn.put(u, plan.api, db=d.api_fields)
        txn.put(u, plan.frame, db=d.servers)
        old_ival = txn.get(plan.by_project, db=d.by_project)
        if old_ival != plan.index:
            txn.put(plan.by_project, plan.index, db=d.by_project)
            txn.put(plan.by_created, plan.index, db=d.by_created)
            if old_ival is not None:
                o = R.unpack_index(old_ival)
                ap.count(o.project_id, -1, -o.vcpus, -o.ram)
            eff = plan.effective
            ap.count(eff["project_id"], 1, eff["flavor"]["vcpus"], eff["flavor"]["ram"])
            ap.flush_usage()
            ap.usage.clear()
        if self.render is not None:
            ap.put_views(u, plan.views if plan.views is not None else self.render(plan.effective))
        return plan.effective

    # -- catalogue ---------------------------------------------------------------------------
    def catalog(self, puts: Sequence[CatalogPut]) -> None:
        """Put or delete catalogue entries (flavors, keypairs, quota_limits, images, ...),
        raising each changed table's generation: apply's code path."""
        ap = self._apply
        for put in puts:
            ap.catalog(put)
        for table in ap.changed_tables:
            ap.bump_generation(table)
        ap.changed_tables.clear()

    def put_catalog(self, table: Catalog, key: str | tuple[str, str],
                    value: Mapping[str, Any] | None) -> None:
        """One catalogue put (``value=None``: delete)."""
        self.catalog([CatalogPut(table, key, value)])


# -- packed before the transaction ------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class OutboxEntry:
    """An outbox entry's value, packed on the event loop (:func:`pack_outbox`)."""

    value: bytes


def pack_outbox(cell: str, server: str | None, command_id: str, payload: Mapping[str, Any],
                at: int | None = None) -> OutboxEntry:
    """The value :meth:`CommandTxn.put_outbox` would write, packed now (PERF: a create's
    payload is ~1.5 KB of msgpack; packing it outside the write transaction shortens the
    time LMDB's writer lock is held)."""
    L.name_bytes(cell, "cell")
    return OutboxEntry(R.pack({"id": command_id, "cell": cell, "server": server,
                               "payload": dict(payload),
                               "at": R.now_us() if at is None else at}))


@dataclass(slots=True, frozen=True)
class Provisional:
    """A new server's writes, computed on the event loop (:func:`prepare_provisional`)."""

    record: Mapping[str, Any]
    effective: Mapping[str, Any]
    rendered: Mapping[bytes, bytes] | None
    key: bytes
    frame: bytes
    index: bytes
    by_project: bytes
    by_created: bytes
    by_changed: bytes
    by_cell: bytes
    project: str
    vcpus: int
    ram: int


def prepare_provisional(record: Mapping[str, Any],
                        rendered: Mapping[bytes, bytes] | None = None) -> Provisional:
    """Everything :meth:`CommandTxn.put_provisional` writes for a new server, packed before
    the transaction: the frame (msgpack of the record), the index entry and its keys, the
    views (``rendered``, or rendered in the transaction when None) and the quota deltas.
    The same bytes as apply's upsert of a new server (a test compares the stores)."""
    if record["version"] != 0:
        raise RecordError(f"a provisional record has version 0, not {record['version']}")
    if any(record.get(name) for name in R.API_FIELDS):  # apply's merge_api_fields
        record = {**record, **{name: R.default_of(name) for name in R.API_FIELDS}}
    for view_id in rendered or ():
        if not 0 < len(view_id) <= L.MAX_VIEW_ID:
            raise RecordError(f"view id {view_id!r}: 1 to {L.MAX_VIEW_ID} bytes")
    u = L.uuid_key(record["uuid"])
    project = L.name_bytes(record["project_id"], "project_id")
    created, updated = record["created_at"], record["updated_at"]
    eff = R.effective(record)
    flavor = eff["flavor"]
    return Provisional(
        record, eff, rendered, u,
        L.pack_frame(0, created, updated, project, R.pack(record)),
        R.pack_index(R.index_entry(eff)), L.by_project_key(project, created, u),
        L.by_created_key(created, u), L.by_changed_key(updated, u),
        L.by_cell_key(L.name_bytes(record["cell"], "cell"), u),
        record["project_id"], flavor["vcpus"], flavor["ram"])


@dataclass(slots=True, frozen=True)
class PendingPlan:
    """What :meth:`CommandTxn.set_pending` writes, computed from the stored bytes
    ``frame_in`` / ``api_in`` (:func:`prepare_pending`)."""

    key: bytes
    frame_in: bytes
    api_in: bytes | None
    effective: Mapping[str, Any]
    frame: bytes
    api: bytes
    index: bytes
    by_project: bytes
    by_created: bytes
    views: Mapping[bytes, bytes] | None


def _opt_bytes(v: bytes | memoryview | None) -> bytes | None:
    return None if v is None else bytes(v)


def _check_pendable(fields: Mapping[str, Any]) -> None:
    bad = sorted(set(fields) - R.PENDABLE)
    if bad:
        raise RecordError(f"pending fields not allowed: {', '.join(bad)}")


def _plan_pending(uuid: str, frame: bytes, api_raw: bytes | None, command_id: str,
                  fields: Mapping[str, Any], at: int | None,
                  render: Renderer | None) -> PendingPlan:
    _check_pendable(fields)
    u = L.uuid_key(uuid)
    version, created, updated, project, off = L.unpack_frame_head(frame)
    rec = R.unpack(frame[off:])
    api: dict[str, Any] = msgpack.unpackb(api_raw, raw=False) if api_raw is not None else {}
    pending = dict(api.get("pending") or {})
    # The overlay applies entries by ``at``: keep that the commit order, even when a
    # command read earlier commits later (or the clock stepped back).
    when = R.now_us() if at is None else at
    if pending:
        when = max(when, max(int(e.get("at", 0)) for e in pending.values()) + 1)
    pending[command_id] = {"at": when, "fields": dict(fields)}
    api["pending"] = pending
    rec["pending"] = pending
    eff = R.effective(rec)
    return PendingPlan(
        u, frame, api_raw, eff, L.pack_frame(version, created, updated, project, R.pack(rec)),
        R.pack(api), R.pack_index(R.index_entry(eff)), L.by_project_key(project, created, u),
        L.by_created_key(created, u), render(eff) if render is not None else None)


def prepare_pending(reader: Reader, uuid: str, command_id: str, fields: Mapping[str, Any],
                    at: int, render: Renderer | None) -> PendingPlan | None:
    """:meth:`CommandTxn.set_pending`'s writes, computed in a read transaction (None if
    the server is not live there); ``at`` must be given (the same in both phases)."""
    u = L.uuid_key(uuid)
    txn, d = reader.txn, reader.dbs
    frame = txn.get(u, db=d.servers)
    if frame is None:
        return None
    return _plan_pending(uuid, bytes(frame), _opt_bytes(txn.get(u, db=d.api_fields)),
                         command_id, fields, at, render)


# -- the group --------------------------------------------------------------------------------
@dataclass(slots=True)
class GroupResult:
    """What one run of a group did: per work ``(ok, value or exception)``, in order."""

    outcomes: list[tuple[bool, Any]]
    outbox_written: int
    attempts: int
    lock_wait: float = 0.0  # seconds waiting for LMDB's writer lock (other writers)
    held: float = 0.0  # seconds from holding the lock to the durable commit (works + fsync)
    works: float = 0.0  # of ``held``: seconds running the works (the rest: commit + fsync)


RESIZE_GROW = "grow"  # MDB_MAP_FULL: grow the map (Store._grow)
RESIZE_ADOPT = "adopt"  # MDB_MAP_RESIZED: adopt the size another process set


def run_group(store: Store, works: Sequence[Work], render: Renderer | None,
              resize: Callable[[str], None], *,
              more: Callable[[int], Sequence[Work]] | None = None,
              max_group: int = 0) -> GroupResult:
    """Run ``works`` in one durable write transaction, each in its own nested transaction
    (see the module docstring).  Counted as one write transaction of ``store`` per attempt.

    ``more(room)``: called once the works ran, before the commit, for up to ``room`` works
    that arrived meanwhile (``max_group`` minus the group so far); they join the group
    (their outcomes follow), and ``more`` is asked again until it has none or the group is
    full.  PERF: commands that arrive while a group's works run share its fsync.

    Exceptions of a work are its outcome; ``lmdb.MapFullError`` is not (the whole group
    runs again after ``resize(RESIZE_GROW)``).  Any other failure of the transaction itself
    (begin, commit) raises: no work of the group is committed.
    """
    store._check_process()
    env = store._env
    todo = list(works)  # grows with ``more``; a run after the map grew runs them all again
    attempts = 0
    while True:
        attempts += 1
        t0 = time.perf_counter()
        try:
            txn = env.begin(write=True)
        except lmdb.MapResizedError:
            resize(RESIZE_ADOPT)
            continue
        t1 = time.perf_counter()
        store._counts[1] += 1
        outcomes: list[tuple[bool, Any]] = []
        written = 0
        t2 = t1
        try:
            with txn:  # py-lmdb: commit on normal exit, abort on an exception
                i = 0
                while True:
                    if i == len(todo):
                        room = max_group - len(todo)
                        late = more(room) if more is not None and room > 0 else ()
                        if not late:
                            break
                        todo.extend(late)
                    work = todo[i]
                    i += 1
                    child = env.begin(write=True, parent=txn)
                    ctxn = CommandTxn(store.dbs, child, render)
                    try:
                        value = work(ctxn)
                    except lmdb.MapFullError:
                        child.abort()
                        raise
                    except Exception as exc:  # noqa: BLE001 - the work's own outcome
                        child.abort()
                        outcomes.append((False, exc))
                        continue
                    child.commit()
                    written += ctxn.outbox_written
                    outcomes.append((True, value))
                t2 = time.perf_counter()
            return GroupResult(outcomes, written, attempts, t1 - t0, time.perf_counter() - t1,
                               t2 - t1)
        except lmdb.MapFullError:
            resize(RESIZE_GROW)


__all__ = ["CommandTxn", "GroupResult", "OutboxEntry", "PendingPlan", "Provisional", "TxnReader",
           "Work", "pack_outbox", "prepare_pending", "prepare_provisional", "run_group",
           "RESIZE_GROW", "RESIZE_ADOPT"]
